"""Settings for a command: the environment and .env, with the flags given on top. A bad value (a flag or
a ``SYNTH_`` variable) is a one-line usage error naming the setting, not a pydantic traceback."""

from typing import Any

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError

from core.settings import Settings


def load_settings(**overrides: Any) -> Settings:
    """``Settings`` with the overrides that were given (None, or an empty list, means not given)."""
    given = {k: v for k, v in overrides.items() if v is not None and v != []}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(problems) from None
    except SettingsError as exc:  # a list or dict setting (SYNTH_ALLOWED_HOTKEYS...) that is not JSON
        raise typer.BadParameter(f"{exc}: list and dict settings are JSON, e.g. "
                                 '["5F..."] or {"XAU": "pyth"}') from None

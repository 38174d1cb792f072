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
        problems = "; ".join(f"{variable(e['loc'])}: {e['msg']}" for e in exc.errors())
        raise typer.BadParameter(problems) from None
    except SettingsError as exc:  # a list or dict setting (SYNTH_ALLOWED_HOTKEYS...) that is not JSON
        raise typer.BadParameter(f"{exc}: list and dict settings are JSON, e.g. "
                                 '["5F..."] or {"XAU": "pyth"}') from None


def variable(loc: tuple[int | str, ...]) -> str:
    """The name an operator sets (SYNTH_AXON_PORT, as the flags' help names it), not the field's: "axon_port"
    matched neither the environment, the .env file nor the flag."""
    if not loc:
        return "settings"
    head, *rest = (str(part) for part in loc)
    return ".".join([f"SYNTH_{head.upper()}", *rest])

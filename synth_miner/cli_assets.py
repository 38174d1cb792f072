"""Asset names given on the command line: upper-cased (btc means BTC) and checked against the registry."""

from collections.abc import Iterable

import typer

from core.assets import ASSETS


def checked_assets(names: Iterable[str], option: str, also: Iterable[str] = ()) -> list[str]:
    """The names, upper-cased and de-duplicated in order; one neither in the registry nor in ``also``
    (what a folder or store at hand holds) is refused instead of silently matching nothing."""
    wanted = list(dict.fromkeys(a.strip().upper() for a in names))
    allowed = set(ASSETS) | set(also)
    unknown = [a for a in wanted if a not in allowed]
    if unknown:
        raise typer.BadParameter(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(sorted(ASSETS))}",
                                 param_hint=option)
    return wanted

"""Command-line values the option types let through, refused before any work as one usage line."""

import math

import typer


def positive(value: float | None) -> float | None:
    """Typer callback: a finite number above 0, or not given. Click's ranges let inf and nan through (nan
    compares false with every bound): ``int(inf * 86_400)`` was a traceback, nan days matched nothing."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a finite number above 0")
    return value


def non_negative(value: float | None) -> float | None:
    """Typer callback: a finite number, 0 or above, or not given (a tolerance of nan promoted nothing)."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise typer.BadParameter(f"{value} is not a finite number, 0 or above")
    return value

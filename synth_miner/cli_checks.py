"""Command-line values the option types let through, refused before any work as one usage line."""

import math
import tempfile
from pathlib import Path

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


def writable_folder(folder: Path, option: str) -> None:
    """Create ``folder`` and write a file in it, before a run that ends by writing there (a training, a
    backtest, a tuning, a calibration): an unwritable one failed only then, with a traceback, the run lost."""
    if folder.exists() and not folder.is_dir():
        raise typer.BadParameter(f"{folder} is a file, not a folder", param_hint=option)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise typer.BadParameter(f"{folder} cannot be written: {exc.strerror or exc}", param_hint=option) from None

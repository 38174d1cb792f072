"""Read and write ``timestamp,close`` CSV(.gz) files in the ../shared/data format."""

import gzip
import io
from functools import lru_cache
from pathlib import Path

import numpy as np

from core.assets import spec_for_any
from core.prices import PriceDataError, PriceHistory

STEP_SUFFIX = {60: "1m", 300: "5m"}


def read_csv(path: Path, step: int) -> PriceHistory:
    """Parse one file; a bad header, row or price raises PriceDataError naming the file.

    Parsed files are kept per (path, size, mtime): replay sources and jobs re-open the same
    multi-megabyte files every minute, and a changed file is re-read.
    """
    try:
        stat = path.stat()
    except OSError as exc:
        raise PriceDataError(f"{path}: unreadable ({exc})") from exc
    return _read_csv_cached(path, step, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _read_csv_cached(path: Path, step: int, size: int, mtime_ns: int) -> PriceHistory:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            header = fh.readline().strip().lower()
            if header.replace(" ", "") != "timestamp,close":
                raise PriceDataError(f"{path}: expected header 'timestamp,close', got {header!r}")
            body = fh.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise PriceDataError(f"{path}: unreadable ({exc})") from exc
    if not body.strip():
        return PriceHistory.empty(step)
    try:
        table = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise PriceDataError(f"{path}: malformed row ({exc})") from exc
    if table.shape[1] != 2:
        raise PriceDataError(f"{path}: expected 2 columns, got {table.shape[1]}")
    try:
        return PriceHistory.from_arrays(step, table[:, 0].astype(np.int64), table[:, 1])
    except PriceDataError as exc:
        raise PriceDataError(f"{path}: {exc}") from exc


def write_csv(path: Path, history: PriceHistory) -> None:
    """Write atomically (temp file + rename) so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    lines = "".join(f"{t},{c!r}\n" for t, c in zip(history.ts.tolist(), history.close.tolist()))
    with gzip.open(tmp, "wt") as fh:
        fh.write("timestamp,close\n" + lines)
    tmp.replace(path)


def find_file(folder: Path, asset: str, step: int) -> Path | None:
    """``<asset>_1m.csv.gz`` (or the registry's data stem, e.g. spy for SPYX)."""
    for stem in spec_for_any(asset).file_stems:
        for ext in (".csv.gz", ".csv"):
            candidate = folder / f"{stem}_{STEP_SUFFIX[step]}{ext}"
            if candidate.exists():
                return candidate
    return None


def load_asset(folder: Path, asset: str) -> tuple[PriceHistory | None, PriceHistory | None]:
    """The asset's 1-minute and 5-minute histories from a folder; None where a file is absent."""
    found = {step: find_file(folder, asset, step) for step in STEP_SUFFIX}
    return tuple(read_csv(p, s) if p else None for s, p in found.items())  # type: ignore[return-value]

"""Read and write ``timestamp,close`` CSV(.gz) files in the ../shared/data format."""

import gzip
import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from core.assets import spec_for_any
from core.atomic_files import atomic_write
from core.prices import MAX_EPOCH_S, PriceDataError, PriceHistory, bar_time_problem

STEP_SUFFIX = {60: "1m", 300: "5m"}
PARSED_KEPT = 64  # parsed files kept in memory (the newest parse of each, never stale versions)

_parsed: "OrderedDict[tuple[Path, int], tuple[tuple[int, int], PriceHistory]]" = OrderedDict()
_parsed_lock = threading.Lock()


def read_csv(path: Path, step: int) -> PriceHistory:
    """Parse one file; a bad header, row, timestamp or price raises PriceDataError naming the file.

    Timestamps must be whole unix seconds (not milliseconds) on the ``step`` grid, as in ../shared/data.
    Parsed files are kept per path (with their size and mtime): replay sources and jobs re-open the
    same multi-megabyte files every minute, and a changed file is re-read and replaces its old parse.
    """
    try:
        stat = path.stat()
    except OSError as exc:
        raise PriceDataError(f"{path}: unreadable ({exc})") from exc
    key, signature = (path, step), (stat.st_size, stat.st_mtime_ns)
    with _parsed_lock:
        hit = _parsed.get(key)
        if hit is not None and hit[0] == signature:
            _parsed.move_to_end(key)
            return hit[1]
    history = _parse(path, step)
    with _parsed_lock:
        _parsed[key] = (signature, history)
        _parsed.move_to_end(key)
        while len(_parsed) > PARSED_KEPT:
            _parsed.popitem(last=False)
    return history


def _parse(path: Path, step: int) -> PriceHistory:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
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
    raw_ts = table[:, 0]
    # Checked before the cast to int64: it would silently truncate 1700000000.5 and turn NaN into -2**63.
    bad = np.flatnonzero(~np.isfinite(raw_ts) | (raw_ts != np.floor(raw_ts)) | (np.abs(raw_ts) >= MAX_EPOCH_S))
    if bad.size:
        value = float(raw_ts[bad[0]])
        hint = " (milliseconds?)" if np.isfinite(value) and abs(value) >= MAX_EPOCH_S else ""
        raise PriceDataError(f"{path}: data row {bad[0] + 1}: timestamp {value!r} is not whole unix seconds{hint}")
    ts = raw_ts.astype(np.int64)
    problem = bar_time_problem(step, ts)
    if problem is not None:
        raise PriceDataError(f"{path}: {problem}")
    try:
        return PriceHistory.from_arrays(step, ts, table[:, 1])
    except PriceDataError as exc:
        raise PriceDataError(f"{path}: {exc}") from exc


def write_csv(path: Path, history: PriceHistory) -> None:
    """Write atomically (own temp file, fsync, rename) so a reader never sees half a file, even after a crash.

    Each call writes its own temp file: two writers of one path at once leave one whole file, never a mix.
    """
    lines = "".join(f"{t},{c!r}\n" for t, c in zip(history.ts.tolist(), history.close.tolist()))
    with atomic_write(path, mode=0o644) as raw:  # 0644: a data file is not private
        with gzip.open(raw, "wt") as fh:
            fh.write("timestamp,close\n" + lines)


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

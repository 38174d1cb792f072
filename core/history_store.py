"""Durable price history on disk, partitioned by asset, step and UTC day; appended by the refresh job.

Partition ``{root}/{ASSET}/{1m|5m}/{YYYY-MM-DD}.day``: a 32-byte header (magic, version, step, day,
slot count, CRC-32 of the payload) then one little-endian float64 per bar slot of the day, 0.0 for
a gap (1440 slots = 11.5 KB at 1 minute). Fixed slots make an append a slice assignment and a read a
single ``np.frombuffer``; the CRC catches a torn or foreign file on read.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the partition and the
folder fsynced (so the rename survives a power cut): a crash or a failing write leaves the old
partition as it was and raises ``StoreWriteError``.
Appends to one asset and step are serialised across processes by an ``flock`` on a lock file.
"""

import fcntl
import logging
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np

from core.cache import HistoryCache
from core.constants import SECONDS_PER_DAY
from core.prices import PriceHistory, bar_time_problem
from core.settings import Settings
from core.store_sources import Stretch, changes, owners, read_stretches, write_stretches, written

MAGIC = b"SYNTHDAY"
VERSION = 1
HEADER = struct.Struct("<8sHHIqII")  # magic, version, reserved, step, day, slots, crc32
SLOT = np.dtype("<f8")
SUFFIX = ".day"
EPOCH = date(1970, 1, 1)
STEP_DIRS = {60: "1m", 300: "5m"}

log = logging.getLogger(__name__)


class HistoryStoreError(RuntimeError):
    """The on-disk history could not be read or written."""

    stored: int = 0  # an append's bars stored on the other days before it raised (see append)


class StoreWriteError(HistoryStoreError):
    """A partition write failed; the previous partition is intact."""


class StoreReadError(HistoryStoreError):
    """A partition is corrupt or not a partition at all."""


class StoreUnreadableError(StoreReadError):
    """A partition could not be read (I/O or permission error): nothing is known about its bytes."""


class StoreInputError(HistoryStoreError, ValueError):
    """Bars or an asset name the store refuses (off the grid, not unix seconds); nothing was written."""


@dataclass(frozen=True)
class StoreSummary:
    asset: str
    step: int
    days: int
    rows: int
    first_ts: int | None
    last_ts: int | None
    gaps: int  # places where consecutive bars are more than one step apart
    missing_bars: int  # bars absent between the first and the last


def combined_error(failed: Sequence[HistoryStoreError], stored: int, unit: str, tail: str = "") -> HistoryStoreError:
    """The first of several failures, saying how many more there were, with the bars stored meanwhile."""
    more = f" (and {len(failed) - 1} more {unit})" if len(failed) > 1 else ""
    error = type(failed[0])(f"{failed[0]}{more}{tail}")
    error.stored = stored  # the caller's count of new bars stays true
    return error


@dataclass(frozen=True)
class Merged:
    """What an append changed: bars not stored before, and stored bars given another close."""

    new: int
    replaced: int


def step_dir(step: int) -> str:
    return STEP_DIRS.get(step, f"{step}s")


def day_name(day: int) -> str:
    return datetime.fromtimestamp(day * SECONDS_PER_DAY, tz=UTC).date().isoformat()


def _write_bytes(fh: IO[bytes], data: bytes) -> None:
    """The one place bytes hit the disk (tests make it fail half-way)."""
    fh.write(data)


def _valid_asset(asset: str) -> bool:
    return bool(asset) and not any(c in asset for c in "/\\.") and asset == asset.strip()


def fsync_folder(folder: Path) -> None:
    """Make a rename (or a new file) in ``folder`` durable: the rename lives in the folder's entries."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HistoryStore:
    def __init__(self, root: Path, durable: bool = True) -> None:
        self.root = root
        self.durable = durable  # fsync each partition; off only for throw-away stores

    @classmethod
    def from_settings(cls, settings: Settings) -> "HistoryStore":
        return cls(settings.data_dir / "history")

    # --- layout ------------------------------------------------------------------------------------------
    def folder(self, asset: str, step: int) -> Path:
        if not _valid_asset(asset):
            raise StoreInputError(f"invalid asset name {asset!r}")
        return self.root / asset / step_dir(step)

    def partition(self, asset: str, step: int, day: int) -> Path:
        return self.folder(asset, step) / f"{day_name(day)}{SUFFIX}"

    def assets(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # A folder that is no asset (an operator's ``BTC.bak`` copy) is skipped, not fatal to compact or status.
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _valid_asset(p.name))

    def steps(self, asset: str) -> list[int]:
        by_dir = {name: step for step, name in STEP_DIRS.items()}
        base = self.root / asset
        if not base.is_dir():
            return []
        found = []
        for p in base.iterdir():
            if p.is_dir():
                step = by_dir.get(p.name) or (int(p.name[:-1]) if p.name.endswith("s") and p.name[:-1].isdigit()
                                              else None)
                if step and step_dir(step) == p.name:  # 60s/ is not 1m/, the folder every access to step 60 uses
                    found.append(step)
        return sorted(found)

    def days(self, asset: str, step: int) -> list[int]:
        folder = self.folder(asset, step)
        if not folder.is_dir():
            return []
        days = []
        for p in folder.glob(f"*{SUFFIX}"):
            try:
                day = date.fromisoformat(p.stem)
            except ValueError:
                continue
            # Only the names ``partition`` gives: 20260527.day parses too, and listed it read the day twice.
            if day.isoformat() == p.stem:
                days.append((day - EPOCH).days)
        return sorted(days)

    # --- reading -----------------------------------------------------------------------------------------
    def _slots(self, asset: str, step: int, day: int) -> np.ndarray[Any, np.dtype[np.float64]] | None:
        path = self.partition(asset, step, day)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnreadableError(f"{path}: unreadable ({exc})") from exc
        per_day = SECONDS_PER_DAY // step
        if len(raw) != HEADER.size + per_day * SLOT.itemsize:
            raise StoreReadError(f"{path}: {len(raw)} bytes, expected {HEADER.size + per_day * SLOT.itemsize}")
        magic, version, _, f_step, f_day, slots, crc = HEADER.unpack_from(raw)
        payload = raw[HEADER.size:]
        if magic != MAGIC or version != VERSION:
            raise StoreReadError(f"{path}: not a history partition (magic {magic!r}, version {version})")
        if (f_step, f_day, slots) != (step, day, per_day):
            raise StoreReadError(f"{path}: header says step {f_step} day {f_day} slots {slots}")
        if zlib.crc32(payload) != crc:
            raise StoreReadError(f"{path}: checksum mismatch (torn or altered file)")
        values = np.frombuffer(payload, dtype=SLOT).astype(np.float64)
        # The store writes 0.0 (a gap) or a finite price > 0: anything else came from elsewhere, checksum or not.
        bad = np.flatnonzero(~((values == 0.0) | ((values > 0.0) & (values < np.inf))))
        if bad.size:
            raise StoreReadError(f"{path}: {bad.size} slot(s) hold no valid price (slot {int(bad[0])}: "
                                 f"{float(values[bad[0]])!r})")
        return values

    def read_day(self, asset: str, step: int, day: int) -> PriceHistory:
        values = self._slots(asset, step, day)
        if values is None:
            return PriceHistory.empty(step)
        present = np.flatnonzero(values > 0)
        return PriceHistory(step, day * SECONDS_PER_DAY + present.astype(np.int64) * step, values[present])

    def read(self, asset: str, step: int, start: int, end: int) -> PriceHistory:
        """Stored bars with start <= ts < end."""
        if end <= start:
            return PriceHistory.empty(step)
        lo, hi = start // SECONDS_PER_DAY, (end - 1) // SECONDS_PER_DAY
        parts = [self.read_day(asset, step, d) for d in self.days(asset, step) if lo <= d <= hi]
        if not parts:
            return PriceHistory.empty(step)
        hist = PriceHistory(step, np.concatenate([p.ts for p in parts]), np.concatenate([p.close for p in parts]))
        return hist.between(start, end)

    def stretches(self, asset: str, step: int) -> list[Stretch]:
        """Which source wrote which stretch of the step's bars, in time order (``core.store_sources``)."""
        try:
            return read_stretches(self.folder(asset, step))
        except OSError as exc:
            raise StoreUnreadableError(f"{self.folder(asset, step)}: sources unreadable ({exc})") from exc

    def read_sourced(self, asset: str, step: int, start: int, end: int) -> tuple[PriceHistory, tuple[int, ...]]:
        """``read``, and the bar times in it where the source changes (``core.datasets.SourcedReader``)."""
        history = self.read(asset, step, start, end)
        return history, changes(history.ts, owners(self.stretches(asset, step), history.ts))

    def span(self, asset: str, step: int) -> tuple[int, int] | None:
        days = self.days(asset, step)
        first = next((h for h in (self.read_day(asset, step, d) for d in days) if len(h)), None)
        last = next((h for h in (self.read_day(asset, step, d) for d in reversed(days)) if len(h)), None)
        if first is None or last is None or first.first_ts is None or last.last_ts is None:
            return None
        return first.first_ts, last.last_ts

    def summary(self, asset: str, step: int) -> StoreSummary:
        rows = gaps = missing = 0
        first: int | None = None
        last: int | None = None
        days = self.days(asset, step)
        for day in days:
            hist = self.read_day(asset, step, day)
            if not len(hist):
                continue
            ts = hist.ts
            if last is not None:
                ts = np.r_[last, ts]
            jumps = np.diff(ts)
            gaps += int(np.count_nonzero(jumps > step))
            missing += int(np.sum(jumps[jumps > step] // step - 1))
            rows += len(hist)
            first = hist.first_ts if first is None else first
            last = hist.last_ts
        return StoreSummary(asset, step, len(days), rows, first, last, gaps, missing)

    # --- writing -----------------------------------------------------------------------------------------
    def append(self, asset: str, history: PriceHistory) -> int:
        """Add (or overwrite) bars; returns how many were not stored before. Idempotent."""
        return self.merge(asset, history).new

    def merge(self, asset: str, history: PriceHistory, source: str | None = None) -> "Merged":
        """``append``, also counting the stored bars whose close the history replaced with another: an
        import over bars a live provider stored says how many it changed instead of changing them silently.
        ``source`` (a provider's name, an imported file's): recorded, so training does not span a change of
        source (``read_sourced``)."""
        if not len(history):
            return Merged(0, 0)
        step = history.step
        # Checked for every bar before any day is written: a bad last bar must not leave the first days stored.
        problem = bar_time_problem(step, history.ts)
        if problem is not None:
            raise StoreInputError(f"{asset} {step} s: {problem}; nothing stored "
                                  f"(bars must sit on a {step} s grid of unix seconds)")
        per_day = SECONDS_PER_DAY // step
        day = history.ts // SECONDS_PER_DAY
        bounds = np.r_[0, np.flatnonzero(np.diff(day)) + 1, day.size]
        new = replaced = 0
        # A day that cannot be read or written must not cost the other days their bars: the refresh owes
        # the store only what is newer than its newest bar, so days skipped here would never be retried.
        failed: list[HistoryStoreError] = []
        days_held: list[tuple[int, int]] = []  # (first, last) bar of each day that holds these bars now
        with self._locked(asset, step):
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                d = int(day[a])
                slots = (history.ts[a:b] - d * SECONDS_PER_DAY) // step
                try:
                    old = self._slots(asset, step, d)
                    values = np.zeros(per_day, np.float64) if old is None else old.copy()
                    before = values[slots]
                    unchanged = old is not None and np.array_equal(before, history.close[a:b])
                    if not unchanged:
                        values[slots] = history.close[a:b]
                        self._write_partition(asset, step, d, values)
                except HistoryStoreError as exc:  # not written: the day keeps its bars and their source
                    failed.append(exc)
                    continue
                days_held.append((int(history.ts[a]), int(history.ts[b - 1])))
                if unchanged:
                    continue
                new += int(np.count_nonzero(before <= 0))
                replaced += int(np.count_nonzero((before > 0) & (before != history.close[a:b])))
            if source is not None and days_held:  # under the lock: two writers never lose a stretch
                self._record_source(asset, step, source, days_held)
        if failed:
            raise combined_error(failed, new, "day(s)", "; the other days were stored") from failed[0]
        return Merged(new, replaced)

    def _record_source(self, asset: str, step: int, source: str, days_held: Sequence[tuple[int, int]]) -> None:
        """Day by day: bars owed from days before (a torn day the refresh rewrites) must not claim the days
        between, which another source may hold. A failure here costs the record, never the bars."""
        folder = self.folder(asset, step)
        try:
            before = read_stretches(folder)
        except OSError as exc:
            log.warning("%s %s s: sources not recorded (%s)", asset, step, exc)
            return
        after = before
        for first, last in days_held:
            after = written(after, source, first, last, step)
        if after != before:
            write_stretches(folder, after)

    def _write_partition(self, asset: str, step: int, day: int,
                         values: np.ndarray[Any, np.dtype[np.float64]]) -> None:
        path = self.partition(asset, step, day)
        payload = values.astype(SLOT).tobytes()
        data = HEADER.pack(MAGIC, VERSION, 0, step, day, values.size, zlib.crc32(payload)) + payload
        tmp: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as fh:
                _write_bytes(fh, data)
                fh.flush()
                if self.durable:
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
            tmp = None
        except Exception as exc:
            raise StoreWriteError(f"{path}: write failed, previous partition kept: {exc}") from exc
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
        if self.durable:
            try:
                fsync_folder(path.parent)
            except OSError as exc:
                raise StoreWriteError(f"{path}: written, but its folder could not be synced: {exc}") from exc

    @contextmanager
    def _locked(self, asset: str, step: int) -> Iterator[None]:
        folder = self.folder(asset, step)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreWriteError(f"{folder}: cannot lock for writing ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def _aside_name(path: Path) -> Path:
    """``<day>.corrupt``, numbered when a day of that name was set aside before (each kept for inspection)."""
    aside, n = path.with_name(path.name + ".corrupt"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.corrupt.{n}"), n + 1
    return aside


@dataclass(frozen=True)
class CompactReport:
    partitions: int  # partitions checked
    rows: int
    empty_removed: int  # partitions holding no bar at all
    corrupt: int  # partitions set aside as ``*.corrupt`` (kept for inspection, no longer read)
    temp_removed: int  # temporary files left by writers that crashed
    unreadable: int = 0  # partitions an I/O or permission error kept us from reading: left in place
    folders_skipped: int = 0  # step folders that could not be locked or changed (another user's, read-only)

    def as_dict(self) -> dict[str, int]:
        return {"partitions": self.partitions, "rows": self.rows, "empty_removed": self.empty_removed,
                "corrupt": self.corrupt, "unreadable": self.unreadable, "temp_removed": self.temp_removed,
                "folders_skipped": self.folders_skipped}


def compact(store: HistoryStore, temp_age_s: float = 3600.0) -> CompactReport:
    """Daily upkeep: verify every partition, set corrupt ones aside, drop empty ones, sweep stale temp files.

    Fixed-slot partitions never fragment, so there is nothing to merge; what can go wrong is a torn
    file from outside (the checksum finds it) or temp files of a writer killed before its rename.
    """
    partitions = rows = empty = corrupt = unreadable = temps = skipped = 0
    now = time.time()
    for asset in store.assets():
        for step in store.steps(asset):
            folder = store.folder(asset, step)
            try:
                with store._locked(asset, step):
                    for tmp in folder.glob(".*.tmp"):
                        if now - tmp.stat().st_mtime > temp_age_s:
                            tmp.unlink(missing_ok=True)
                            temps += 1
                    for day in store.days(asset, step):
                        partitions += 1
                        path = store.partition(asset, step, day)
                        try:
                            n = len(store.read_day(asset, step, day))
                        except StoreUnreadableError as exc:
                            # Not proof of corruption (EIO, EACCES): moved aside, its intact bars would no longer
                            # be read.
                            log.warning("compact: %s", exc)
                            unreadable += 1
                            continue
                        except StoreReadError:
                            path.replace(_aside_name(path))
                            corrupt += 1
                            continue
                        if n == 0:
                            path.unlink()
                            empty += 1
                        rows += n
            except (HistoryStoreError, OSError) as exc:
                # One folder this process may not lock or change must not cost the folders after it their
                # upkeep: their torn days stayed in place, and the refresh rewrites a day only once set aside.
                log.warning("compact: %s skipped (%s)", folder, exc)
                skipped += 1
    return CompactReport(partitions, rows, empty, corrupt, temps, unreadable, skipped)


def compact_store(settings: Settings) -> dict[str, int]:
    """The Celery job's entry point: ``compact`` on the store under ``settings.data_dir``."""
    return compact(HistoryStore.from_settings(settings)).as_dict()


def rebuild_cache(store: HistoryStore, cache: HistoryCache, asset: str, window: int, now: int | None = None,
                  steps: Sequence[int] | None = None) -> int:
    """Refill the cache from the store for the last ``window`` seconds (after a Redis restart or FLUSHALL).

    Returns the number of bars that were missing from the cache. ``now`` defaults to the wall clock.
    """
    now = int(time.time()) if now is None else now
    written = 0
    for step in steps if steps is not None else store.steps(asset):
        hist = store.read(asset, step, now - window, now).known_at(now)
        if len(hist):
            written += cache.write(asset, hist)
    return written

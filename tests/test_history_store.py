"""HistoryStore: day partitions on disk, idempotent appends, atomic writes, rebuilding a cache."""

import gc
import gzip
import logging
import multiprocessing
import os
import shutil
import weakref
from functools import partial
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import redis

from core import history_store
from core.cache import MemoryHistoryCache
from core.cache_redis import RedisHistoryCache
from core.constants import SECONDS_PER_DAY
from core.csv_history import read_csv, write_csv
from core.history_store import HistoryStore, Merged, StoreReadError, StoreWriteError, day_name, rebuild_cache
from core.prices import PriceDataError, PriceHistory
from tests.provider_fixtures import random_walk_bars

DAY0 = 20_600 * SECONDS_PER_DAY

bars = partial(random_walk_bars, level=2500.0)


def test_append_partitions_by_utc_day_and_reads_back(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    hist = bars(DAY0 - 600 * 60, 2400, drop=(10, 11, 2000))
    assert store.append("ETH", hist) == len(hist)
    days = store.days("ETH", 60)
    assert days == [DAY0 // SECONDS_PER_DAY - 1, DAY0 // SECONDS_PER_DAY, DAY0 // SECONDS_PER_DAY + 1]
    assert (tmp_path / "ETH" / "1m" / f"{day_name(days[1])}.day").is_file()
    back = store.read("ETH", 60, 0, 2 ** 40)
    np.testing.assert_array_equal(back.ts, hist.ts)
    np.testing.assert_array_equal(back.close, hist.close)
    assert store.span("ETH", 60) == (hist.first_ts, hist.last_ts)
    summary = store.summary("ETH", 60)
    assert (summary.rows, summary.gaps, summary.missing_bars, summary.days) == (len(hist), 2, 3, 3)
    assert store.assets() == ["ETH"] and store.steps("ETH") == [60]


def test_append_is_idempotent_and_later_values_win(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    hist = bars(DAY0, 300)
    store.append("BTC", hist)
    path = store.partition("BTC", 60, DAY0 // SECONDS_PER_DAY)
    mtime = path.stat().st_mtime_ns
    assert store.append("BTC", hist) == 0
    assert path.stat().st_mtime_ns == mtime  # nothing changed: nothing rewritten
    fix = PriceHistory(60, hist.ts[:5], hist.close[:5] * 1.01)
    assert store.append("BTC", fix) == 0
    np.testing.assert_array_equal(store.read("BTC", 60, DAY0, DAY0 + 300).close, fix.close)
    assert store.append("BTC", bars(DAY0 + 300 * 60, 10, step=60)) == 10
    # merge says which stored closes it changed: the same ones again change nothing, 2 others and 3 new do.
    assert store.merge("BTC", fix) == Merged(0, 0)
    again = PriceHistory(60, hist.ts[3:8], np.r_[fix.close[3:5] * 1.02, hist.close[5:8]])
    assert store.merge("BTC", again) == Merged(0, 2)
    assert store.merge("BTC", bars(DAY0 + 400 * 60, 3, step=60)) == Merged(3, 0)


def test_a_failing_write_leaves_the_old_partition_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = HistoryStore(tmp_path)
    old = bars(DAY0, 600)
    store.append("BTC", old)
    path = store.partition("BTC", 60, DAY0 // SECONDS_PER_DAY)
    before = path.read_bytes()

    def half_then_fail(fh: IO[bytes], data: bytes) -> None:
        fh.write(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history_store, "_write_bytes", half_then_fail)
    with pytest.raises(StoreWriteError, match="No space left"):
        store.append("BTC", bars(DAY0 + 600 * 60, 100, seed=3))
    assert path.read_bytes() == before
    np.testing.assert_array_equal(store.read("BTC", 60, DAY0, DAY0 + SECONDS_PER_DAY).ts, old.ts)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no debris left behind


def torn_day(store: HistoryStore) -> tuple[Path, bytes]:
    """100 BTC bars on DAY0, then that day's file with its last byte flipped (a checksum mismatch)."""
    store.append("BTC", bars(DAY0, 100))
    path = store.partition("BTC", 60, DAY0 // SECONDS_PER_DAY)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path, bytes(raw)


def test_corrupt_partitions_are_refused(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    path, _ = torn_day(store)
    with pytest.raises(StoreReadError, match="checksum"):
        store.read("BTC", 60, DAY0, DAY0 + 6000)
    path.write_bytes(b"timestamp,close\n")
    with pytest.raises(StoreReadError, match="bytes"):
        store.read_day("BTC", 60, DAY0 // SECONDS_PER_DAY)


def test_a_corrupt_day_does_not_stop_an_append_writing_the_other_days(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    path, raw = torn_day(store)
    hist = bars(DAY0 - 600 * 60, 3 * 1440)  # the day before, the torn day, and the day after
    with pytest.raises(StoreReadError, match="checksum.*other days were stored") as raised:
        store.append("BTC", hist)
    written = hist.between(DAY0 - SECONDS_PER_DAY, DAY0).ts.size + hist.between(DAY0 + SECONDS_PER_DAY, 2 ** 40).ts.size
    assert raised.value.stored == written  # the caller can still count what was written
    for day in (DAY0 - SECONDS_PER_DAY, DAY0 + SECONDS_PER_DAY):
        np.testing.assert_array_equal(store.read("BTC", 60, day, day + SECONDS_PER_DAY).ts,
                                      hist.between(day, day + SECONDS_PER_DAY).ts)
    assert path.read_bytes() == raw  # the torn file is left for compact to set aside


def test_bad_names_and_grids(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    with pytest.raises(ValueError, match="asset"):
        store.append("../etc", bars(DAY0, 5))
    with pytest.raises(ValueError, match="grid"):
        store.append("BTC", PriceHistory.from_arrays(60, [DAY0 + 30], [1.0]))


def _append_in_process(root: str, start: int, seed: int) -> int:
    return HistoryStore(Path(root)).append("BTC", bars(start, 400, seed=seed))


def test_appends_from_several_processes_lose_nothing(tmp_path: Path) -> None:
    """Four processes append interleaved ranges of one day: the file lock keeps every bar."""
    ctx = multiprocessing.get_context("fork")
    starts = [DAY0 + i * 300 * 60 for i in range(4)]  # 400-bar ranges overlapping by 100
    with ctx.Pool(4) as pool:
        pool.starmap(_append_in_process, [(str(tmp_path), s, i) for i, s in enumerate(starts)])
    back = HistoryStore(tmp_path).read("BTC", 60, DAY0, DAY0 + SECONDS_PER_DAY)
    np.testing.assert_array_equal(back.ts, DAY0 + 60 * np.arange(1300))


def test_rebuild_cache_after_flushall(tmp_path: Path, redis_url: str) -> None:
    store = HistoryStore(tmp_path)
    m1 = bars(DAY0, 3 * 1440, drop=(100, 101))
    store.append("BTC", m1)
    store.append("BTC", m1.resample(300))
    client = redis.Redis.from_url(redis_url)
    cache = RedisHistoryCache(client)
    now = int(m1.ts[-1]) + 60
    assert rebuild_cache(store, cache, "BTC", 2 * SECONDS_PER_DAY, now=now) > 0
    client.flushall()
    assert cache.span("BTC", 60) is None
    written = rebuild_cache(store, cache, "BTC", 2 * SECONDS_PER_DAY, now=now)
    expected = m1.between(now - 2 * SECONDS_PER_DAY, now)
    back = cache.read("BTC", 60, 0, 2 ** 40)
    np.testing.assert_array_equal(back.ts, expected.ts)
    assert written == len(expected) + len(m1.resample(300).between(now - 2 * SECONDS_PER_DAY, now))
    client.close()
    memory = MemoryHistoryCache()
    assert rebuild_cache(store, memory, "BTC", SECONDS_PER_DAY, now=now, steps=[60]) == 1440


def test_compact_sets_corrupt_partitions_aside_and_sweeps_debris(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    store.append("BTC", bars(DAY0 - 100 * 60, 300))  # two days
    store.append("ETH", PriceHistory(60, bars(DAY0, 5).ts, np.zeros(5) + 1.0))
    empty_day = DAY0 // SECONDS_PER_DAY + 3
    history_store.HistoryStore._write_partition(store, "ETH", 60, empty_day, np.zeros(1440))
    broken = store.partition("BTC", 60, DAY0 // SECONDS_PER_DAY)
    broken.write_bytes(broken.read_bytes()[:-8])
    debris = broken.parent / f".{broken.name}.abc.tmp"
    debris.write_bytes(b"half")
    report = history_store.compact(store, temp_age_s=-1)
    assert report.as_dict() == {"partitions": 4, "rows": 100 + 5, "empty_removed": 1, "corrupt": 1,
                                "unreadable": 0, "temp_removed": 1, "folders_skipped": 0}
    assert broken.with_name(broken.name + ".corrupt").exists() and not debris.exists()
    assert len(store.read("BTC", 60, 0, 2 ** 40)) == 100  # the intact day still reads
    assert history_store.compact(store).corrupt == 0
    store.append("BTC", bars(DAY0, 10))  # the day is written again, and damaged again
    broken.write_bytes(broken.read_bytes()[:-8])
    assert history_store.compact(store).corrupt == 1
    assert broken.with_name(broken.name + ".corrupt").exists() and broken.with_name(broken.name + ".corrupt.1").exists()


def test_compact_does_not_set_aside_a_partition_it_merely_could_not_read(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O or permission error says nothing about the file's bytes: moved aside, its bars would vanish."""
    store = HistoryStore(tmp_path)
    store.append("BTC", bars(DAY0, 100))
    path = store.partition("BTC", 60, DAY0 // SECONDS_PER_DAY)
    real_read = Path.read_bytes

    def failing_read(self: Path) -> bytes:
        if self == path:
            raise PermissionError(13, "Permission denied")
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", failing_read)
    with pytest.raises(StoreReadError, match="unreadable"):
        store.read_day("BTC", 60, DAY0 // SECONDS_PER_DAY)
    report = history_store.compact(store)
    assert report.corrupt == 0 and report.unreadable == 1 and path.exists()
    monkeypatch.setattr(Path, "read_bytes", real_read)
    assert len(store.read("BTC", 60, 0, 2 ** 40)) == 100


def test_a_folder_compact_cannot_lock_does_not_cost_the_others_their_upkeep(tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Before: the first step folder that could not be locked or changed (another user's files, a read-only
    mount; here a lock that is a folder) raised StoreWriteError out of compact, so every folder after it kept
    its torn days: read errors at every refresh, and no refresh rewrites a day until it is set aside."""
    store = HistoryStore(tmp_path)
    store.append("AAA", bars(DAY0, 10))
    path, _ = torn_day(store)  # BTC, listed after AAA
    lock = store.folder("AAA", 60) / ".lock"
    lock.unlink()
    lock.mkdir()
    with caplog.at_level(logging.WARNING, logger="core.history_store"):
        report = history_store.compact(store)
    assert (report.folders_skipped, report.corrupt, report.partitions) == (1, 1, 1)
    assert f"{store.folder('AAA', 60)} skipped" in caplog.text
    assert path.with_name(path.name + ".corrupt").exists() and not path.exists()
    assert len(store.read("AAA", 60, 0, 2 ** 40)) == 10  # the skipped folder is left as it was


# --- input the store must refuse, and the CSV files it is imported from ---------------------------------------
def test_timestamps_in_milliseconds_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    good = bars(DAY0, 10)
    in_ms = PriceHistory(60, np.r_[good.ts, good.ts[-1] * 1000], np.r_[good.close, 2500.0])
    with pytest.raises(history_store.HistoryStoreError, match="milliseconds"):
        store.append("BTC", in_ms)
    assert store.days("BTC", 60) == []  # the valid first day was not written either
    with pytest.raises(history_store.HistoryStoreError, match="grid"):  # the callers catch HistoryStoreError
        store.append("BTC", PriceHistory.from_arrays(60, [DAY0 + 30], [1.0]))


@pytest.mark.parametrize(("history", "message"), [
    (PriceHistory(60, np.r_[-60, bars(DAY0, 10).ts], np.r_[2500.0, bars(DAY0, 10).close]),
     "timestamp -60 is before 1970"),
    (PriceHistory.from_arrays(7, DAY0 + (-DAY0) % 7 + 7 * np.arange(10), np.full(10, 2500.0)),
     "step 7 s does not divide a day"),
], ids=["a bar before 1970", "a step that does not divide a day"])
def test_bars_before_1970_or_on_a_step_that_does_not_divide_a_day_are_refused_before_anything_is_written(
        tmp_path: Path, history: PriceHistory, message: str) -> None:
    store = HistoryStore(tmp_path)
    with pytest.raises(history_store.StoreInputError, match=f"{message}.*nothing stored"):
        store.append("BTC", history)
    assert store.days("BTC", history.step) == []
    assert list(tmp_path.rglob(f"*{history_store.SUFFIX}")) == []


def test_a_stray_folder_in_the_store_root_does_not_break_compact(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    store.append("BTC", bars(DAY0, 10))
    (tmp_path / "BTC.bak" / "1m").mkdir(parents=True)  # an operator's backup copy
    assert store.assets() == ["BTC"]
    assert history_store.compact(store).rows == 10


def test_a_file_or_folder_with_a_non_canonical_name_is_not_read_as_a_day_or_a_step(tmp_path: Path) -> None:
    """``20260527.day`` (ISO basic form) parses as a date too: listed, it read 2026-05-27 twice (PriceDataError,
    which the retraining and calibration jobs do not catch) and a date with no partition of its own made
    compaction unlink a file that does not exist (FileNotFoundError: the job stopped for every asset)."""
    store = HistoryStore(tmp_path)
    hist = bars(DAY0, 100)
    store.append("BTC", hist)
    day = DAY0 // SECONDS_PER_DAY
    path = store.partition("BTC", 60, day)
    copy = path.with_name(day_name(day).replace("-", "") + ".day")
    shutil.copy(path, copy)  # an operator's copy of the day
    shutil.copy(path, path.with_name("20260101.day"))  # a date the store has no partition for
    (tmp_path / "BTC" / "60s").mkdir()  # another name of step 60: only 1m/ is ever read
    back = store.read("BTC", 60, 0, 2 ** 40)
    np.testing.assert_array_equal(back.ts, hist.ts)
    report = history_store.compact(store)
    assert (report.partitions, report.rows, report.empty_removed, report.corrupt) == (1, 100, 0, 0)
    assert copy.exists()  # not the store's file: left alone
    assert store.days("BTC", 60) == [day] and store.steps("BTC") == [60]


@pytest.mark.parametrize("bad", [np.inf, -2500.0, np.nan])
def test_a_partition_holding_an_impossible_price_is_corrupt_not_a_gap_or_a_crash(tmp_path: Path, bad: float) -> None:
    """A checksum only proves the bytes are the ones written: a slot neither 0.0 (a gap) nor a finite price > 0
    was not written by the store. Before: inf raised PriceDataError from read (uncaught by the retraining job)
    and from compact (the daily job died), a negative or NaN price was silently read as a gap."""
    store = HistoryStore(tmp_path)
    values = np.zeros(1440)
    values[:3] = [2500.0, bad, 2501.0]
    store._write_partition("BTC", 60, DAY0 // SECONDS_PER_DAY, values)
    with pytest.raises(StoreReadError, match="no valid price"):
        store.read("BTC", 60, 0, 2 ** 40)
    assert history_store.compact(store).corrupt == 1  # set aside like a torn file
    assert len(store.read("BTC", 60, 0, 2 ** 40)) == 0


def test_the_rename_is_made_durable_by_syncing_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[tuple[int, int]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store = HistoryStore(tmp_path)
    store.append("BTC", bars(DAY0, 10))
    folder = store.folder("BTC", 60).stat()
    assert (folder.st_dev, folder.st_ino) in synced  # without it a power cut can undo the rename


def _write_csv(path: Path, text: str) -> Path:
    path.write_text("timestamp,close\n" + text)
    return path


@pytest.mark.parametrize(("body", "message"), [
    ("1767225600000,100.0\n1767225660000,101.0\n", "milliseconds"),
    ("1767225600.5,100.0\n1767225660,101.0\n", "not whole unix seconds"),
    ("1767225630,100.0\n1767225690,101.0\n", "grid"),
    ("nan,100.0\n", "not whole unix seconds"),
    ("-60,100.0\n0,101.0\n", "before 1970"),
])
def test_csv_timestamps_that_are_not_unix_seconds_on_the_grid_are_refused(tmp_path: Path, body: str,
                                                                           message: str) -> None:
    path = _write_csv(tmp_path / "btc_1m.csv", body)
    with pytest.raises(PriceDataError, match=message) as info:
        read_csv(path, 60)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("btc_1m.csv.gz", gzip.compress(b"timestamp,close\n" + b"1700000040,100.0\n" * 500)[:-40], "unreadable"),
    ("btc_1m.csv.gz", b"timestamp,close\n1700000040,100.0\n", "unreadable"),
    ("btc_1m.csv", b"timestamp,close\n1700000040,\xff\xfe\n", "unreadable"),
    ("btc_1m.csv", b"timestamp,close\n1700000040,100.0\n1700000100,abc\n", "malformed row"),
    ("btc_1m.csv", b"timestamp,close\n1700000040,100.0,5.0\n1700000100,101.0,6.0\n", "expected 2 columns, got 3"),
], ids=["a truncated gzip", "plain text named .gz", "not utf-8", "a close that is not a number", "3 columns"])
def test_a_corrupt_or_malformed_csv_is_refused_by_name_and_left_as_it_was(tmp_path: Path, name: str, raw: bytes,
                                                                         message: str) -> None:
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(PriceDataError, match=message) as info:
        read_csv(path, 60)
    assert str(path) in str(info.value)
    assert path.read_bytes() == raw and [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("body", ["", "\n", "\n  \n"], ids=["nothing", "a newline", "blank lines"])
@pytest.mark.parametrize("name", ["btc_5m.csv", "btc_5m.csv.gz"])
def test_a_csv_with_nothing_after_its_header_is_an_empty_history(tmp_path: Path, name: str, body: str) -> None:
    raw = f"timestamp,close\n{body}".encode()
    (tmp_path / name).write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    empty = read_csv(tmp_path / name, 300)
    assert len(empty) == 0 and empty.step == 300


def test_upper_case_gz_names_are_read_as_gzip(tmp_path: Path) -> None:
    hist = bars(DAY0, 5)
    write_csv(tmp_path / "x.csv.gz", hist)
    (tmp_path / "x.csv.gz").rename(tmp_path / "BTC_1M.CSV.GZ")
    np.testing.assert_array_equal(read_csv(tmp_path / "BTC_1M.CSV.GZ", 60).ts, hist.ts)


def test_two_writers_of_one_csv_do_not_share_a_temporary_file(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A second writer finishes while the first is still writing: each must use its own temp file."""
    target = tmp_path / "btc_1m.csv.gz"
    first, second = bars(DAY0, 20), bars(DAY0, 2000, seed=5)
    real_open = gzip.open

    def open_then_let_another_writer_in(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(gzip, "open", real_open)
        fh = real_open(*args, **kwargs)
        write_csv(target, second)
        return fh

    monkeypatch.setattr(gzip, "open", open_then_let_another_writer_in)
    write_csv(target, first)  # before the fix: FileNotFoundError, and a mix of both in the file
    back = read_csv(target, 60)
    np.testing.assert_array_equal(back.ts, first.ts)
    np.testing.assert_array_equal(back.close, first.close)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # no temp file left behind


def test_a_rewritten_csv_does_not_keep_its_old_parse_alive(tmp_path: Path) -> None:
    path = tmp_path / "btc_1m.csv.gz"
    write_csv(path, bars(DAY0, 3000))
    old = weakref.ref(read_csv(path, 60))
    write_csv(path, bars(DAY0, 3001))
    assert len(read_csv(path, 60)) == 3001
    gc.collect()
    assert old() is None  # one parse per file: a file rewritten every minute must not pile up copies

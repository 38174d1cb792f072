"""HistoryStore: day partitions on disk, idempotent appends, atomic writes, rebuilding a cache."""

import multiprocessing
from functools import partial
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import redis

from core import history_store
from core.cache import MemoryHistoryCache
from core.cache_redis import RedisHistoryCache
from core.constants import SECONDS_PER_DAY
from core.history_store import HistoryStore, StoreReadError, StoreWriteError, day_name, rebuild_cache
from core.prices import PriceHistory
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


def test_corrupt_partitions_are_refused(tmp_path: Path) -> None:
    store = HistoryStore(tmp_path)
    store.append("BTC", bars(DAY0, 100))
    path = store.partition("BTC", 60, DAY0 // SECONDS_PER_DAY)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreReadError, match="checksum"):
        store.read("BTC", 60, DAY0, DAY0 + 6000)
    path.write_bytes(b"timestamp,close\n")
    with pytest.raises(StoreReadError, match="bytes"):
        store.read_day("BTC", 60, DAY0 // SECONDS_PER_DAY)


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
                                "temp_removed": 1}
    assert broken.with_name(broken.name + ".corrupt").exists() and not debris.exists()
    assert len(store.read("BTC", 60, 0, 2 ** 40)) == 100  # the intact day still reads
    assert history_store.compact(store).corrupt == 0

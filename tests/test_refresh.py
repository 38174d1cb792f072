"""refresh_asset against a local Binance server, a real Redis and a disk store."""

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import redis

from core import history_store, refresh
from core.cache import MemoryHistoryCache
from core.cache_redis import RedisHistoryCache
from core.constants import BAR_CLOSE_GRACE_S, CACHE_SOURCE_KEY, LATEST_PRICE_KEY, SECONDS_PER_DAY
from core.csv_history import write_csv
from core.fake_providers import FakeMarket, FakeServer, FakeServerThread, Faults, ManualClock, start_fake
from core.history_store import HistoryStore, compact
from core.market_data import build_snapshot
from core.prices import LatestPrice, PriceHistory
from core.refresh import (
    RefreshConfigError,
    cache_windows,
    default_steps,
    durable_store,
    refresh_asset,
    refresh_assets,
    refresh_assets_sync,
    replays_prices,
)
from core.settings import Settings
from core.sources.binance import BinanceSource
from core.sources.http import HttpConfig
from core.sources.hyperliquid import HyperliquidSource
from core.sources.pyth import PythSource
from core.sources.replay import ReplaySource
from core.store_sources import Stretch, read_stretches
from tests.provider_fixtures import T0, fake_provider_fixtures, redis_cache_fixtures, write_held_in

WINDOW = 2 * SECONDS_PER_DAY

# BTC 1m and 5m; the market holds a day of rows still to come.
csv_dir, clock, market, server = fake_provider_fixtures("binance", ["btc"], days=5, with_5m=True,
                                                        lead_s=SECONDS_PER_DAY)
client, cache = redis_cache_fixtures()


@pytest.fixture
def settings(tmp_path: Path, server: FakeServer) -> Settings:
    return Settings(cache_days_hf=1.0, cache_days_lf=2.0, binance_url=server.url, http_backoff_s=0.01,
                    http_backoff_max_s=0.02, http_retries=1, refresh_lock_s=10.0, data_dir=tmp_path)


@pytest.fixture
async def source(settings: Settings, clock: ManualClock) -> AsyncIterator[BinanceSource]:
    src = BinanceSource(settings.binance_url, HttpConfig.from_settings(settings), clock)
    yield src
    await src.close()


@pytest.fixture
def store(settings: Settings) -> HistoryStore:
    return HistoryStore.from_settings(settings)


def truth(market: FakeMarket, now: float, step: int = 60, window: int = WINDOW) -> PriceHistory:
    lo = -(-(int(now) - window) // step) * step
    return market.bars("BTC", step).between(lo, int(now)).known_at(int(now))


def cached(cache: RedisHistoryCache, step: int = 60) -> PriceHistory:
    return cache.read("BTC", step, 0, 2 ** 40)


async def test_cold_then_incremental_then_idempotent(source: BinanceSource, cache: RedisHistoryCache,
                                                     store: HistoryStore, settings: Settings, server: FakeServer,
                                                     market: FakeMarket, clock: ManualClock) -> None:
    cold = await refresh_asset("BTC", source, cache, store, settings, now=T0)
    step = cold.steps[0]
    expected = truth(market, T0)
    assert cold.ok and step.fetched == step.new_in_store == step.new_in_cache == len(expected)
    np.testing.assert_array_equal(cached(cache).ts, expected.ts)
    np.testing.assert_array_equal(store.read("BTC", 60, 0, 2 ** 40).close, expected.close)
    assert cold.latest is not None and cache.latest("BTC") == cold.latest

    clock.advance(600)
    calls = server.faults.requests
    warm = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert warm.steps[0].fetched == 10 and warm.steps[0].new_in_cache == 10
    assert server.faults.requests - calls == 2  # one page for the tail, one for the latest price
    np.testing.assert_array_equal(cached(cache).ts, truth(market, clock()).ts)  # trimmed to the window

    again = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert (again.steps[0].fetched, again.steps[0].new_in_cache, again.steps[0].new_in_store) == (0, 0, 0)
    # The store knows its bars came from binance, one stretch: a later provider's would begin a new one.
    stored = store.read("BTC", 60, 0, 2 ** 40)
    assert read_stretches(store.folder("BTC", 60)) == [Stretch("binance", int(stored.ts[0]), int(stored.ts[-1]))]


async def test_concurrent_refreshes_fetch_once_and_write_once(source: BinanceSource, redis_url: str,
                                                              store: HistoryStore, settings: Settings,
                                                              server: FakeServer, market: FakeMarket) -> None:
    clients = [redis.Redis.from_url(redis_url) for _ in range(4)]
    reports = await asyncio.gather(*(refresh_asset("BTC", source, RedisHistoryCache(c), store, settings, now=T0)
                                     for c in clients))
    expected = truth(market, T0)
    assert all(r.ok for r in reports)
    assert sum(r.steps[0].new_in_cache for r in reports) == len(expected)  # each bar written once
    assert sum(r.steps[0].fetched for r in reports) == len(expected)  # the lock: one fetch, three no-ops
    np.testing.assert_array_equal(RedisHistoryCache(clients[0]).read("BTC", 60, 0, 2 ** 40).ts, expected.ts)
    assert len(store.read("BTC", 60, 0, 2 ** 40)) == len(expected)
    for c in clients:
        c.close()


async def test_gaps_from_the_provider_stay_gaps(source: BinanceSource, cache: RedisHistoryCache,
                                                store: HistoryStore, settings: Settings, server: FakeServer,
                                                market: FakeMarket, clock: ManualClock) -> None:
    server.faults.missing_every = 9
    await refresh_asset("BTC", source, cache, store, settings, now=T0)
    server.faults.reset()
    clock.advance(300)
    await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    full = truth(market, clock())
    old = full.ts < T0 // 60 * 60 - 60  # bars the first refresh covered
    expected = full.ts[~old | ((full.ts // 60) % 9 != 0)]
    np.testing.assert_array_equal(cached(cache).ts, expected)
    assert np.count_nonzero(np.diff(cached(cache).ts) > 60) > 0


async def test_wrong_exponent_prints_never_reach_the_cache_or_the_store(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        server: FakeServer, market: FakeMarket) -> None:
    server.faults.spike_every = 7  # every 7th minute served x100
    report = await refresh_asset("BTC", source, cache, store, settings, now=T0)
    expected = truth(market, T0)
    spiked = (expected.ts // 60) % 7 == 0
    step = report.steps[0]
    assert step.fetched == len(expected) and step.dropped + step.held_back == np.count_nonzero(spiked)
    assert any("implausible bar(s) dropped" in e for e in report.errors)
    real = PriceHistory(60, expected.ts[~spiked], expected.close[~spiked])
    for got in (cached(cache), store.read("BTC", 60, 0, 2 ** 40)):
        # Every real bar up to the held-back tail, at its real price; no x100 print anywhere.
        want = real.between(0, int(expected.ts[-1]) - 60 * (step.held_back - 1))
        np.testing.assert_array_equal(got.ts, want.ts)
        np.testing.assert_array_equal(got.close, want.close)


async def test_a_garbage_newest_print_is_held_back_and_never_anchors(
        cache: RedisHistoryCache, store: HistoryStore, settings: Settings, market: FakeMarket,
        clock: ManualClock) -> None:
    # Pyth: its Hermes latest price is a separate feed, so both the bar and the print can be garbage.
    pyth = await start_fake("pyth", market)
    source = PythSource(pyth.url, pyth.url, HttpConfig.from_settings(settings), clock)
    try:
        assert (await refresh_asset("BTC", source, cache, store, settings, now=T0)).ok
        clock.advance(180)
        pyth.faults.bad_price = 1e9  # the newest bar and the latest price: a broken feed
        report = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
        expected = truth(market, clock())
        assert (report.steps[0].held_back, report.steps[0].dropped) == (1, 0)
        assert report.latest is None
        assert any("implausibly far from the newest close" in e for e in report.errors)
        kept_latest = cache.latest("BTC")
        assert kept_latest is not None and kept_latest.publish_time <= T0 + 60  # the last good print stays
        np.testing.assert_array_equal(cached(cache).ts, expected.ts[:-1])
        snapshot = build_snapshot(cache, "BTC", int(clock()), WINDOW)
        assert snapshot.anchor == expected.close[-2]  # the newest trusted close, not 1e9

        pyth.faults.reset()
        clock.advance(120)
        again = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
        assert again.ok and again.latest is not None and again.latest.price < 1e9
        now_truth = truth(market, clock())
        np.testing.assert_array_equal(cached(cache).ts, now_truth.ts)  # the held-back minute came back, real
        np.testing.assert_array_equal(cached(cache).close, now_truth.close)
        np.testing.assert_array_equal(store.read("BTC", 60, 0, 2 ** 40).close[-5:], now_truth.close[-5:])
    finally:
        await source.close()
        await pyth.stop()


async def test_cache_is_rebuilt_from_the_store_after_flushall(source: BinanceSource, cache: RedisHistoryCache,
                                                              client: redis.Redis, store: HistoryStore,
                                                              settings: Settings, server: FakeServer) -> None:
    await refresh_asset("BTC", source, cache, store, settings, now=T0)
    before = cached(cache)
    client.flushall()
    server.faults.status = 503  # the provider is down too: only the store can help
    report = await refresh_asset("BTC", source, cache, store, settings, now=T0)
    assert report.steps[0].from_store == len(before) and report.steps[0].fetched == 0
    assert not report.ok and any("ProviderUnavailable" in e for e in report.errors)
    after = cached(cache)
    np.testing.assert_array_equal(after.ts, before.ts)
    np.testing.assert_array_equal(after.close, before.close)


async def test_warm_from_the_store_then_only_the_rest_from_the_provider(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        market: FakeMarket) -> None:
    expected = truth(market, T0)
    older = expected.between(0, T0 - SECONDS_PER_DAY)
    store.append("BTC", older)
    report = await refresh_asset("BTC", source, cache, store, settings, now=T0)
    assert report.steps[0].from_store == len(older)
    assert report.steps[0].fetched == len(expected) - len(older)
    np.testing.assert_array_equal(cached(cache).ts, expected.ts)


async def test_a_failing_store_does_not_stop_the_cache(source: BinanceSource, cache: RedisHistoryCache,
                                                       store: HistoryStore, settings: Settings, market: FakeMarket,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(fh: IO[bytes], data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history_store, "_write_bytes", full_disk)
    report = await refresh_asset("BTC", source, cache, store, settings, now=T0)
    assert any("StoreWriteError" in e for e in report.errors)
    assert report.steps[0].new_in_cache == len(truth(market, T0))
    assert store.days("BTC", 60) == []


async def test_replay_sources_cache_both_steps_with_their_windows(csv_dir: Path, cache: RedisHistoryCache,
                                                                  settings: Settings, clock: ManualClock) -> None:
    replay = ReplaySource(csv_dir, clock)
    report = await refresh_asset("BTC", replay, cache, None, settings, now=T0)
    windows = cache_windows(settings, (60, 300))
    assert [s.step for s in report.steps] == [60, 300] and windows == {60: 86_400, 300: 172_800}
    for s in report.steps:
        assert s.span is not None and s.span[0] >= T0 - windows[s.step] and s.new_in_cache > 0


def test_refresh_assets_sync_builds_everything_from_settings(csv_dir: Path, redis_url: str, tmp_path: Path) -> None:
    with FakeServerThread("binance", FakeMarket(csv_dir)) as fake:
        settings = Settings(redis_url=redis_url, binance_url=fake.url, data_dir=tmp_path, cache_days_hf=0.5,
                            cache_days_lf=1.0, http_retries=0)
        reports = refresh_assets_sync(["BTC", "ETH"], settings)
    btc, eth = reports
    assert btc.ok and btc.steps[0].new_in_cache > 1000 and btc.latest is not None
    assert not eth.ok and eth.steps[0].fetched == 0  # ETH has a symbol but the fake has no ETH file
    c = redis.Redis.from_url(redis_url)
    assert RedisHistoryCache(c).span("BTC", 60) is not None
    c.close()
    assert HistoryStore.from_settings(settings).days("BTC", 60)
    with pytest.raises(RefreshConfigError):
        refresh_assets_sync(["BTC"], Settings(redis_url=None))


async def test_a_corrupt_store_partition_is_reported_and_the_cache_still_moves_on(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        clock: ManualClock) -> None:
    await refresh_asset("BTC", source, cache, store, settings, now=T0)
    day = max(store.days("BTC", 60))
    part = store.partition("BTC", 60, day)
    raw = bytearray(part.read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte: the checksum no longer matches
    part.write_bytes(bytes(raw))
    clock.advance(120)
    report = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert any(e.startswith("store span") for e in report.errors)
    span = cache.span("BTC", 60)
    assert span is not None and span[1] == (int(clock()) // 60 - 1) * 60  # the newest closed bar is cached


def test_the_refresh_job_never_writes_replayed_prices_to_the_store(csv_dir: Path, redis_url: str,
                                                                   tmp_path: Path) -> None:
    """Replayed rows are old prices dated "now": in the store they would feed calibration and retraining."""
    settings = Settings(redis_url=redis_url, price_provider="replay", replay_dir=csv_dir, data_dir=tmp_path,
                        cache_days_hf=0.5, cache_days_lf=1.0)
    assert replays_prices(settings) and durable_store(settings) is None
    (btc,) = refresh_assets_sync(["BTC"], settings)
    assert btc.provider == "replay" and btc.steps[0].new_in_cache > 100  # the cache is still refreshed
    assert all(s.new_in_store == 0 and s.from_store == 0 for s in btc.steps)
    assert HistoryStore.from_settings(settings).assets() == []
    assert not (tmp_path / "history").exists()
    live = Settings(data_dir=tmp_path, price_provider="binance")
    store = durable_store(live)
    assert not replays_prices(live) and store is not None and store.root == tmp_path / "history"


async def test_a_replay_source_leaves_the_store_it_is_given_alone(csv_dir: Path, cache: RedisHistoryCache,
                                                                   store: HistoryStore, settings: Settings,
                                                                   clock: ManualClock) -> None:
    """A per-asset replay override reaches refresh_asset with the real store: it is not written either."""
    report = await refresh_asset("BTC", ReplaySource(csv_dir, clock), cache, store, settings, now=T0, steps=(60,))
    assert report.steps[0].new_in_cache > 0 and report.steps[0].new_in_store == 0
    assert store.days("BTC", 60) == []


async def test_a_corrupt_partition_does_not_cost_the_store_the_days_after_it(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        clock: ManualClock) -> None:
    """The newest partition is torn while the job is down; the bars of the days after it, fetched on its
    return, must still reach the store (only the torn day's are refused), or they are never owed again."""
    await refresh_asset("BTC", source, cache, store, settings, now=T0)
    torn = max(store.days("BTC", 60))
    part = store.partition("BTC", 60, torn)
    raw = bytearray(part.read_bytes())
    raw[-1] ^= 0xFF
    part.write_bytes(bytes(raw))
    clock.advance((torn + 1) * SECONDS_PER_DAY - T0 + 8 * 3600)  # back 8 h into the next UTC day
    report = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert any("StoreWriteError" in e or "StoreReadError" in e for e in report.errors)
    assert next(s for s in report.steps if s.step == 60).new_in_store > 7 * 60  # the next day's 8 h, counted (was 0)
    for _ in range(2):  # later refreshes: nothing more is written for the day after the torn one
        clock.advance(120)
        await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    start = (torn + 1) * SECONDS_PER_DAY
    in_cache = cache.read("BTC", 60, start, int(clock()))
    assert len(in_cache) > 8 * 60
    np.testing.assert_array_equal(store.read("BTC", 60, start, int(clock())).ts, in_cache.ts)
    # The daily compaction sets the torn day aside; the cache still holds it, and the next refresh puts it back
    # (it is older than the store's newest bar, so "newer than the store" alone never owed it again).
    assert compact(store).corrupt == 1 and torn not in store.days("BTC", 60)
    clock.advance(60)
    await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    torn_day = cache.read("BTC", 60, torn * SECONDS_PER_DAY, start)
    assert len(torn_day) > 0 and torn in store.days("BTC", 60)
    np.testing.assert_array_equal(store.read("BTC", 60, torn * SECONDS_PER_DAY, start).ts, torn_day.ts)


async def test_history_the_store_gets_after_the_cache_filled_reaches_the_cache(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        market: FakeMarket, server: FakeServer) -> None:
    """The provider kept only the last hours (Hyperliquid keeps 3.5 days) when the cache filled; the operator
    then imports the older history into the store: the cache's window must be filled from it."""
    expected = truth(market, T0)
    recent = expected.between(T0 - 6 * 3600, T0)
    cache.write("BTC", recent)  # what a provider with a short retention gave the first refresh
    store.append("BTC", expected)  # ``synth-miner data import`` / ``data sync`` afterwards
    server.faults.status = 503  # and whatever the provider holds, it is not asked for the head
    report = await refresh_asset("BTC", source, cache, store, settings, now=T0)
    assert report.steps[0].from_store == len(expected) - len(recent)
    np.testing.assert_array_equal(cached(cache).ts, expected.ts)
    np.testing.assert_array_equal(cached(cache).close, expected.close)


async def test_waiting_for_another_refreshs_lock_holds_no_executor_thread(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        clock: ManualClock) -> None:
    """A provider outage keeps an asset's lock held for up to a minute: the refreshes waiting for it must
    not each block a thread of asyncio's default executor, where the miner's other blocking calls queue."""
    from concurrent.futures import ThreadPoolExecutor

    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))  # one stuck thread would block everything
    holder = cache.refresh_lock("BTC", ttl_s=30, wait_s=0)
    assert holder.acquire(blocking=False)  # another process is refreshing BTC
    waiting = asyncio.create_task(refresh_asset("BTC", source, cache, store, settings, now=int(clock())))
    await asyncio.sleep(0.5)
    began = time.monotonic()
    assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), timeout=2.0) == 42  # the executor is free
    assert time.monotonic() - began < 1.0 and not waiting.done()  # ...while the refresh still waits
    holder.release()  # the other refresh ends: this one takes the lock and goes on
    report = await asyncio.wait_for(waiting, timeout=10.0)
    assert report.ok and len(cached(cache)) > 0


async def test_a_refresh_cancelled_while_its_lock_is_taken_leaves_it_free(
        cache: RedisHistoryCache, store: HistoryStore, settings: Settings, source: BinanceSource,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The try runs on a thread that a cancellation does not stop: the lock it took after the refresh had
    gone was held by nobody for its whole TTL, and every other refresher of the asset waited on it."""
    real = cache.refresh_lock
    taken = threading.Event()

    class SlowLock:
        def __init__(self, lock: Any) -> None:
            self.lock = lock

        def acquire(self, blocking: bool = False) -> bool:
            time.sleep(0.5)  # a slow Redis round trip: the refresh is cancelled meanwhile
            got = bool(self.lock.acquire(blocking=blocking))
            taken.set()
            return got

        def release(self) -> None:
            self.lock.release()

    monkeypatch.setattr(cache, "refresh_lock", lambda *a, **k: SlowLock(real(*a, **k)))
    refreshing = asyncio.create_task(refresh_asset("BTC", source, cache, store, settings, now=T0))
    await asyncio.sleep(0.1)
    refreshing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await refreshing
    assert await asyncio.to_thread(taken.wait, 5)
    other = real("BTC", ttl_s=30, wait_s=0)
    deadline = time.monotonic() + 5
    while not other.acquire(blocking=False):  # released at once, not after settings.refresh_lock_s
        assert time.monotonic() < deadline, "the lock stayed held after its refresh was cancelled"
        await asyncio.sleep(0.05)
    other.release()


async def test_a_failed_page_keeps_the_pages_before_it_and_the_next_refresh_fills_the_rest(
        cache: RedisHistoryCache, store: HistoryStore, settings: Settings, market: FakeMarket,
        server: FakeServer, source: BinanceSource, clock: ManualClock) -> None:
    """A cold refresh of three Binance pages whose second answers 503 on every attempt: the first page's
    bars reach the cache and the store (they were all lost before), the error is still reported, and the
    next refresh, the page healthy again, resumes right after them: no gap, no duplicate."""
    lo = -(-(T0 - WINDOW) // 60) * 60  # the window's first bar: the first page starts there
    server.faults.set(down_from=(lo + 1000 * 60,))  # the second page
    report = await refresh_asset("BTC", source, cache, store, settings, now=T0)
    first_page = truth(market, T0).between(lo, lo + 1000 * 60)
    assert len(first_page) > 900
    assert not report.ok and any("PartialHistoryError" in e and "503" in e for e in report.errors)
    step = report.steps[0]
    assert step.fetched == step.new_in_cache == step.new_in_store == len(first_page)
    for got in (cached(cache), store.read("BTC", 60, 0, 2 ** 40)):
        np.testing.assert_array_equal(got.ts, first_page.ts)
        np.testing.assert_array_equal(got.close, first_page.close)

    server.faults.reset()
    clock.advance(120)
    again = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert again.ok, again.errors
    # The cache holds the window (trimmed as it moved on), the store everything since the first bar.
    since_lo = market.bars("BTC", 60).between(lo, int(clock())).known_at(int(clock()))
    for got, expected in ((cached(cache), truth(market, clock())), (store.read("BTC", 60, 0, 2 ** 40), since_lo)):
        np.testing.assert_array_equal(got.ts, expected.ts)  # no gap and no duplicate
        np.testing.assert_array_equal(got.close, expected.close)
    assert again.steps[0].fetched == len(since_lo) - len(first_page)  # only the rest was asked for


async def test_a_bad_print_the_provider_keeps_is_a_gap_and_the_cache_moves_on(
        cache: RedisHistoryCache, store: HistoryStore, settings: Settings, market: FakeMarket,
        server: FakeServer, source: BinanceSource, clock: ManualClock) -> None:
    """A kline whose close stays 0 in every reply used to fail every page holding it: each refresh asked
    again from that bar, and the cache (and the store) froze for the whole window while the anchor moved on.
    Inside a page it is a gap; as the newest bar, the bars before it are kept and the next refresh, with a
    good bar after it, drops it and moves on."""
    inside = int(truth(market, T0).ts[-500])
    server.faults.zero_at = (inside,)
    report = await refresh_asset("BTC", source, cache, store, settings, now=T0)
    assert report.ok, report.errors  # a lone bad row is logged, not an error of the refresh
    expected = truth(market, T0)
    expected = PriceHistory(60, expected.ts[expected.ts != inside], expected.close[expected.ts != inside])
    for got in (cached(cache), store.read("BTC", 60, 0, 2 ** 40)):
        np.testing.assert_array_equal(got.ts, expected.ts)
        np.testing.assert_array_equal(got.close, expected.close)

    newest = int(expected.ts[-1]) + 60  # the next bar to close: a bad print the provider keeps
    server.faults.zero_at = (inside, newest)
    clock.advance(newest + 60 + BAR_CLOSE_GRACE_S - clock())
    stuck = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert any(e.startswith("history 60s: BadPriceError: 1 of 1 rows unusable") for e in stuck.errors), stuck.errors
    assert cached(cache).last_ts == newest - 60
    for _ in range(3):  # the next bars arrive: the bad one is a gap behind them, and the cache keeps up
        clock.advance(60)
        again = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
        # (the latest price is refused while the bad kline is among the three it reads: the cache anchors)
        assert not [e for e in again.errors if not e.startswith("latest")], again.errors
        assert cached(cache).last_ts == truth(market, clock()).last_ts
    assert newest not in cached(cache).ts and newest not in store.read("BTC", 60, 0, 2 ** 40).ts
    clock.advance(3600)
    assert (await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))).ok
    assert cached(cache).last_ts == truth(market, clock()).last_ts


async def test_a_cache_filled_by_another_source_is_rebuilt_not_joined(
        cache: RedisHistoryCache, store: HistoryStore, settings: Settings, market: FakeMarket,
        source: BinanceSource, clock: ManualClock, csv_dir: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Replayed prices written to a Redis the live fleet then uses: the live refresh resumed after the
    replayed bars (stamped up to now), and the jump from the replayed level to the live one passed screening
    as a confirmed move: a fake 50 % one-minute return in every live forecast's history for the window."""
    replayed = tmp_path / "replayed"
    replayed.mkdir()
    live = market.bars("BTC", 60)
    write_csv(replayed / "btc_1m.csv.gz", PriceHistory(60, live.ts, live.close * 0.6))  # another level
    replay = ReplaySource(replayed, clock)
    assert (await refresh_asset("BTC", replay, cache, None, settings, now=T0)).ok
    assert len(cached(cache)) > 1000 and float(cached(cache).close[-1]) < 0.7 * float(truth(market, T0).close[-1])

    clock.advance(300)
    with caplog.at_level(logging.WARNING, logger="core.refresh"):
        report = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert report.ok, report.errors
    got, expected = cached(cache), truth(market, clock())
    np.testing.assert_array_equal(got.ts, expected.ts)
    np.testing.assert_array_equal(got.close, expected.close)  # not one replayed bar left
    assert "the cached history came from replay, now from binance: cleared and rebuilt" in caplog.text
    caplog.clear()
    clock.advance(60)
    with caplog.at_level(logging.WARNING, logger="core.refresh"):
        assert (await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))).ok
    assert "cleared" not in caplog.text  # the same source again: nothing to clear


def _damage(client: redis.Redis, cache: RedisHistoryCache, what: str) -> None:
    day = int(cached(cache).ts[-1]) // SECONDS_PER_DAY
    if what == "day of the wrong size":
        client.set(cache.day_key("BTC", 60, day), b"x" * 13)
    elif what == "span that is no bar time":
        client.hset(cache.meta_key("BTC", 60), "lo", b"yesterday")
    elif what == "day of another type":
        client.delete(cache.day_key("BTC", 60, day))
        client.rpush(cache.day_key("BTC", 60, day), b"x")
    elif what.startswith("past day"):  # a day inside the window that no write or trim touches again
        past = int(cached(cache, 300).ts[-1]) // SECONDS_PER_DAY - 1
        assert cached(cache, 300).ts[0] < past * SECONDS_PER_DAY
        key = cache.day_key("BTC", 300, past)
        if what == "past day of another type":
            client.delete(key)
            client.hset(key, "0", b"100.0")
        else:
            client.setrange(key, 8 * 100, np.array([np.nan], dtype="<f8").tobytes())
    elif what == "span of another type":
        client.delete(cache.meta_key("BTC", 300))
        client.set(cache.meta_key("BTC", 300), b"x")
    else:
        key = (LATEST_PRICE_KEY if what.startswith("latest") else CACHE_SOURCE_KEY).format(asset="BTC")
        client.delete(key)
        client.rpush(key, b"x")


@pytest.mark.parametrize("what", ["day of the wrong size", "span that is no bar time", "day of another type",
                                  "past day of another type", "past day with a NaN slot", "span of another type", "latest price of another type",
                                  "source of another type"])
async def test_a_damaged_cache_entry_is_dropped_and_rebuilt_by_the_next_refresh(
        what: str, source: BinanceSource, cache: RedisHistoryCache, client: redis.Redis, store: HistoryStore,
        settings: Settings, market: FakeMarket, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    """An entry the cache could not have written failed every refresh (and every forecast read of the asset)
    until someone cleared it by hand: the refresh now drops the asset's keys and rebuilds them, from the
    store first. Another asset's keys are left alone. A past day of another type (or a NaN slot) read as a gap
    and was found only if bars were written into that day again, which for a day inside the window never
    happens: the refresh now reads its whole window, so every damaged day is found within a minute."""
    assert (await refresh_asset("BTC", source, cache, store, settings, now=T0, steps=(60, 300))).ok
    bystander = PriceHistory(60, np.array([T0 // 60 * 60 - 60]), np.array([2000.0]))
    cache.write("BTCX", bystander)
    _damage(client, cache, what)

    clock.advance(600)
    now = int(clock())
    with caplog.at_level(logging.WARNING, logger="core.refresh"):
        repaired = await refresh_asset("BTC", source, cache, store, settings, now=now, steps=(60, 300))
    assert [e for e in repaired.errors if "dropped and rebuilt" in e] == list(repaired.errors), repaired.errors
    assert "BTC: cached history unusable" in caplog.text
    assert repaired.steps[0].from_store > 0  # rebuilt from the store, not fetched again
    for step, window in cache_windows(settings, (60, 300)).items():
        got, expected = cached(cache, step), truth(market, now, step, window)
        np.testing.assert_array_equal(got.ts, expected.ts)
        np.testing.assert_array_equal(got.close, expected.close)
    assert repaired.latest is not None and cache.latest("BTC") == repaired.latest
    np.testing.assert_array_equal(cache.read("BTCX", 60, 0, 2 ** 40).close, bystander.close)
    assert cache.claim_source("BTC", "binance") == "binance"  # recorded again by the rebuild
    again = await refresh_asset("BTC", source, cache, store, settings, now=now, steps=(60, 300))
    assert again.ok, again.errors


async def test_a_refresh_that_fails_on_redis_itself_drops_nothing(
        source: BinanceSource, cache: RedisHistoryCache, client: redis.Redis, store: HistoryStore,
        settings: Settings) -> None:
    """Only an entry the cache could not have written is dropped; another Redis error (here a script the
    server refuses to run while it is out of memory) is raised and reported, the cache kept as it is."""
    assert (await refresh_asset("BTC", source, cache, store, settings, now=T0)).ok
    before = cached(cache)
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            await refresh_asset("BTC", source, cache, store, settings, now=T0 + 600)
    finally:
        client.config_set("maxmemory", 0)
    after = cached(cache)
    np.testing.assert_array_equal(after.ts, before.ts)
    np.testing.assert_array_equal(after.close, before.close)
    assert cache.latest("BTC") is not None


def _warnings(caplog: pytest.LogCaptureFixture, asset: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and asset in r.getMessage()]


async def test_an_asset_the_source_has_no_data_for_warns_once_then_at_debug(
        csv_dir: Path, settings: Settings, clock: ManualClock, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Replayed prices without an XRP file logged three WARNING lines for XRP every minute, in the miner and
    the cpu worker (about 17k lines a day); a permanent condition is worth one warning per process."""
    monkeypatch.setattr(refresh, "_no_data_reported", set(), raising=False)
    replay, cache = ReplaySource(csv_dir, clock), MemoryHistoryCache()
    with caplog.at_level(logging.DEBUG, logger="core.refresh"):
        first = await refresh_asset("XRP", replay, cache, None, settings, now=T0)
        assert not first.ok and len(first.errors) == 3 and len(_warnings(caplog, "XRP")) == 1
        assert "no replay file for XRP" in _warnings(caplog, "XRP")[0]
        caplog.clear()
        again = await refresh_asset("XRP", replay, cache, None, settings, now=T0 + 60)
        assert not again.ok and len(again.errors) == 3  # still in the report
        assert _warnings(caplog, "XRP") == []
        assert any(r.levelno == logging.DEBUG and "no replay file for XRP" in r.getMessage() for r in caplog.records)
        caplog.clear()
        btc = await refresh_asset("BTC", replay, cache, None, settings, now=T0 + 60)
        assert btc.ok and _warnings(caplog, "BTC") == []  # assets with a file are unaffected


async def test_a_transient_provider_error_is_still_warned_at_every_refresh(
        source: BinanceSource, server: FakeServer, settings: Settings, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(refresh, "_no_data_reported", set(), raising=False)
    server.faults.set(status=503)
    cache = MemoryHistoryCache()
    with caplog.at_level(logging.DEBUG, logger="core.refresh"):
        for now in (T0, T0 + 60):
            caplog.clear()
            report = await refresh_asset("BTC", source, cache, None, settings, now=now)
            assert not report.ok and any("history 60s" in w and "503" in w for w in _warnings(caplog, "BTC"))


async def test_a_retry_after_is_honoured_by_the_next_refresh_run_too(server: FakeServer, settings: Settings) -> None:
    """Each run of the refresh job builds new sources. Before the fix their new clients knew nothing of the
    Retry-After Binance sent the run before: every run (each minute) hit it again, and Binance answers
    repeat offenders with a 418 ban, longer each time. Now the hold outlives the run's clients."""
    server.faults.set(status=429, retry_after_s=300.0)
    for now in (T0, T0 + 60, T0 + 120):
        [report] = await refresh_assets(["BTC"], settings, MemoryHistoryCache(), None, now=now)
        assert not report.ok and all("Retry-After" in error for error in report.errors), report.errors
    assert server.faults.requests == 1


async def test_a_retry_after_on_latest_holds_back_the_history_from_that_host_only(
        source: BinanceSource, server: FakeServer, settings: Settings, market: FakeMarket,
        clock: ManualClock) -> None:
    """The refresh asks for the latest price first. Binance's answer to it, 429 with a Retry-After, is for every
    request from this IP (its limits and bans are per IP, across endpoints): the history is not asked for either.
    Pyth's latest price comes from Hermes, its history from Benchmarks: a hold on the one leaves the other be."""
    server.faults.set(status=429, status_count=1, retry_after_s=300.0)
    report = await refresh_asset("BTC", source, MemoryHistoryCache(), None, settings, now=T0)
    assert server.faults.requests == 1
    assert any(e.startswith("history 60s") and "asked for no requests" in e for e in report.errors), report.errors

    hermes = await start_fake("pyth", market, faults=Faults(status=429, retry_after_s=300.0))
    benchmarks = await start_fake("pyth", market)
    pyth = PythSource(benchmarks.url, hermes.url, HttpConfig.from_settings(settings), clock)
    try:
        held = await refresh_asset("BTC", pyth, MemoryHistoryCache(), None, settings, now=T0)
    finally:
        await pyth.close()
        await hermes.stop()
        await benchmarks.stop()
    assert held.latest is None and [e.split(":")[0] for e in held.errors] == ["latest"], held.errors
    assert hermes.faults.requests == 1 and held.steps[0].fetched > 0 and benchmarks.faults.requests > 0


async def test_a_provider_keeping_days_of_minutes_also_fills_the_24h_window_at_5_minutes(
        tmp_path: Path, shared_data: Path) -> None:
    """Hyperliquid keeps its newest 5000 candles: 3.5 days at 1 minute, too few for the 24 h equity model
    (5 sessions of 5-minute bars), so a new fleet answered every equity 24 h prompt from EWMA-t until the
    store held a week. Its 5-minute candles reach back 17 days: the refresh fetches them too."""
    from core.engines_registry import build_forecaster
    from core.prompts import ForecastRequest
    from core.sources.registry import build_source

    clock = ManualClock(T0)
    market = FakeMarket(write_held_in(tmp_path / "csv", shared_data, ["nvda"], 28, with_5m=True), clock)
    server = await start_fake("hyperliquid", market)
    settings = Settings(hyperliquid_url=server.url, data_dir=tmp_path, http_backoff_s=0.01)  # default windows
    source = build_source("hyperliquid", settings, clock)
    binance = build_source("binance", settings, clock)
    forecaster = build_forecaster(settings, "patchtst")
    request = ForecastRequest("NVDAX", T0 // 60 * 60 + 120, 300, 86_400, 100)
    try:
        assert default_steps(source, settings) == (60, 300) and default_steps(binance, settings) == (60,)
        served = {}
        for steps in ((60,), None):  # the 1-minute read alone, as before; then the default
            cache = MemoryHistoryCache()
            await refresh_asset("NVDAX", source, cache, None, settings, now=T0, steps=steps)
            snapshot = build_snapshot(cache, "NVDAX", T0, settings.cache_window_s(300))
            served[steps] = forecaster.run(request, snapshot)
        m1, m5 = cache.span("NVDAX", 60), cache.span("NVDAX", 300)
        assert m1 is not None and m1[1] - m1[0] < 3.5 * SECONDS_PER_DAY  # all the provider keeps
        assert m5 is not None and m5[1] - m5[0] > 10 * SECONDS_PER_DAY  # the 14-day window, weekends aside
        assert served[(60,)].engine == "ewma_t" and "returns" in str(served[(60,)].fallback_reason)
        assert served[None].engine == "patchtst", served[None].fallback_reason
    finally:
        await source.close()
        await binance.close()
        await server.stop()


async def test_a_lone_garbage_bar_in_a_one_minute_refresh_is_judged_against_the_cache(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        server: FakeServer, clock: ManualClock) -> None:
    """The every-minute refresh fetches a single bar: judged only against the bars fetched with it, a x100
    print is its own median and passes. The cache's newest close is the reference, so it is held back."""
    assert (await refresh_asset("BTC", source, cache, store, settings, now=T0)).ok
    before = cached(cache)
    clock.advance(60)
    server.faults.bad_price = float(before.close[-1]) * 100  # the one new kline, and the latest price
    report = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    step = report.steps[0]
    assert (step.fetched, step.held_back, step.new_in_cache, step.new_in_store) == (1, 1, 0, 0)
    assert cached(cache).last_ts == before.last_ts
    assert float(store.read("BTC", 60, 0, 2 ** 40).close.max()) < float(before.close.max()) * 2


async def test_bars_a_failed_store_write_missed_are_owed_to_the_store(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        market: FakeMarket, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Minutes the cache got while the disk was full are written with the next refresh that can write: the
    store resumes after its own newest bar, and would otherwise keep a hole that no later fetch fills."""
    assert (await refresh_asset("BTC", source, cache, store, settings, now=T0)).ok
    write_bytes = history_store._write_bytes

    def full_disk(fh: IO[bytes], data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(history_store, "_write_bytes", full_disk)
    clock.advance(180)
    failed = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert any("StoreWriteError" in e for e in failed.errors) and failed.steps[0].new_in_cache == 3
    monkeypatch.setattr(history_store, "_write_bytes", write_bytes)
    clock.advance(60)
    again = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert again.ok, again.errors
    expected = truth(market, clock())
    stored = store.read("BTC", 60, int(expected.ts[0]), int(clock()))
    np.testing.assert_array_equal(stored.ts, expected.ts)  # no hole where the writes failed
    np.testing.assert_array_equal(stored.close, expected.close)


def _live_source(provider: str, url: str, clock: ManualClock) -> BinanceSource | HyperliquidSource | PythSource:
    config = HttpConfig(timeout_s=2.0, retries=1, backoff_s=0.01, backoff_max_s=0.02)
    if provider == "binance":
        return BinanceSource(url, config, clock)
    if provider == "hyperliquid":
        return HyperliquidSource(url, config, clock)
    return PythSource(url, url, config, clock)


@pytest.mark.parametrize("ahead_s", [300, 3600])
@pytest.mark.parametrize("provider", ["binance", "hyperliquid", "pyth"])
async def test_a_provider_whose_clock_runs_ahead_has_none_of_its_bars_stored(
        provider: str, ahead_s: int, csv_dir: Path, tmp_path: Path, shared_data: Path, cache: RedisHistoryCache,
        store: HistoryStore, settings: Settings) -> None:
    """A provider whose clock runs ahead stamps each bar later than it closed: asked for the bars up to our now,
    it answers bars that are really ``ahead_s`` older, which were stored as dated, in the cache and for good in
    the store (training, calibration), while only ``latest`` was refused (and Hyperliquid's not even that). Its
    reply now says by how much its clock runs ahead, and nothing of it is stored until the clocks agree."""
    asset, folder, now = "BTC", csv_dir, T0
    if provider == "hyperliquid":  # no BTC there: gold, on a Tuesday (T0 is a Sunday, gold closed)
        asset, now = "XAU", T0 + 2 * SECONDS_PER_DAY
        folder = write_held_in(tmp_path / "xau", shared_data, ["xau"], days=8)
    clock = ManualClock(now)
    fake = await start_fake("all", FakeMarket(folder, ManualClock(now + ahead_s), lead_s=SECONDS_PER_DAY))
    src = _live_source(provider, fake.url, clock)
    try:
        report = await refresh_asset(asset, src, cache, store, settings, now=now)
    finally:
        await src.close()
        await fake.stop()
    assert len(cache.read(asset, 60, 0, 2 ** 40)) == 0 and cache.latest(asset) is None
    assert store.span(asset, 60) is None
    assert report.steps[0].fetched == 0 and report.latest is None
    [said] = [e for e in report.errors if "ahead of our clock" in e]
    assert f"{provider} clock runs" in said and "its bars are not stored" in said, report.errors
    shown = int(re.search(r"(\d+) s ahead of our clock", said).group(1))  # type: ignore[union-attr]
    assert ahead_s - 120 <= shown <= ahead_s + 60  # the newest bar opens up to a bar after its clock's minute


async def test_a_replay_whose_clock_runs_ahead_of_the_refresh_has_none_of_its_rows_cached(
        csv_dir: Path, cache: RedisHistoryCache, settings: Settings) -> None:
    """The refresh checks every source's stamps against its own now, not only the live clients (which check
    against their own clock): a replay played an hour ahead had its rows up to now cached, and its latest price,
    published an hour ahead, kept every real print after it out of the cache for that hour."""
    replay = ReplaySource(csv_dir, ManualClock(T0 + 3600))
    report = await refresh_asset("BTC", replay, cache, None, settings, now=T0, steps=(60,))
    assert len(cached(cache)) == 0 and cache.latest("BTC") is None
    [said] = [e for e in report.errors if "ahead of our clock" in e]
    assert said.startswith("latest: replay clock runs 3") and "its bars are not stored" in said


async def test_a_cached_bar_from_the_future_is_dropped_not_left_to_freeze_the_refresh(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        market: FakeMarket, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    """A bar stamped a day ahead in the shared cache (written by a replay or a process whose clock ran ahead):
    the refresh resumed after the cache's newest bar, past now, so it fetched nothing and said ok, and the cache
    stayed frozen until our clock reached that bar. It is now found, dropped and rebuilt from the store."""
    assert (await refresh_asset("BTC", source, cache, store, settings, now=T0)).ok
    future = T0 // 60 * 60 + SECONDS_PER_DAY
    cache.write("BTC", PriceHistory(60, np.array([future]), np.array([float(cached(cache).close[-1])])))
    clock.advance(600)
    now = int(clock())
    with caplog.at_level(logging.WARNING, logger="core.refresh"):
        report = await refresh_asset("BTC", source, cache, store, settings, now=now)
    assert [e for e in report.errors if "dropped and rebuilt" in e] == list(report.errors) != []
    assert "the newest cached bar closes" in caplog.text
    got, expected = cached(cache), truth(market, now)
    np.testing.assert_array_equal(got.ts, expected.ts)  # the ten new minutes, and nothing from the future
    np.testing.assert_array_equal(got.close, expected.close)


async def test_a_cached_latest_price_from_the_future_is_dropped_not_left_to_hold_back_every_print(
        source: BinanceSource, cache: RedisHistoryCache, store: HistoryStore, settings: Settings,
        clock: ManualClock) -> None:
    """set_latest keeps the newest publish time: a print stamped a day ahead (a replay or a process whose clock
    ran ahead) refused every real print after it for that day, and snapshots skipped it for the newest close,
    up to a minute older. It is now dropped with the asset's keys and rebuilt."""
    assert (await refresh_asset("BTC", source, cache, store, settings, now=T0)).ok
    cache.set_latest("BTC", LatestPrice(1.0, T0 + SECONDS_PER_DAY))
    clock.advance(600)
    report = await refresh_asset("BTC", source, cache, store, settings, now=int(clock()))
    assert [e for e in report.errors if "dropped and rebuilt" in e] == list(report.errors) != []
    assert report.latest is not None and cache.latest("BTC") == report.latest
    assert report.latest.publish_time <= int(clock())


async def test_a_refresh_that_waited_for_the_lock_takes_the_prints_published_meanwhile(
        csv_dir: Path, cache: RedisHistoryCache, settings: Settings) -> None:
    """A refresh takes its ``now`` before it waits for the asset's lock (up to half of refresh_lock_s): a print
    published during the wait lies after that ``now`` but not after our clock, and is no clock running ahead.
    Judged against the stale ``now`` alone, it was refused as one, and nothing was cached."""
    clock_now = int(time.time())
    replay = ReplaySource(csv_dir, ManualClock(clock_now))  # its newest row closes at our clock's now
    report = await refresh_asset("BTC", replay, cache, None, settings, now=clock_now - 600, steps=(60,))
    assert report.ok, report.errors
    assert report.latest is not None and report.latest.publish_time > clock_now - 600
    assert cache.latest("BTC") == report.latest and len(cached(cache)) > 0

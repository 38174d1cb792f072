"""MarketData: a Redis that never answers must not stall the event loop; a cache is refreshed when a bar is overdue."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from core import market_data
from core.cache import MemoryHistoryCache
from core.cache_redis import RedisHistoryCache
from core.fake_providers import ManualClock
from core.market_data import MarketData
from core.prices import LatestPrice, PriceHistory
from core.refresh import RefreshReport
from core.settings import Settings
from core.sources.registry import sources_for
from core.sources.replay import ReplaySource
from tests.conftest import free_port
from tests.provider_fixtures import T0, write_held_in

SOCKET_TIMEOUT_S = 0.5


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # swallow the request until the client hangs up
    writer.close()


async def test_a_hung_redis_does_not_stall_the_event_loop() -> None:
    hung = await asyncio.start_server(_never_answer, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=SOCKET_TIMEOUT_S,
                         socket_connect_timeout=SOCKET_TIMEOUT_S)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: every provider call is refused at once
    settings = Settings(binance_url=url, hyperliquid_url=url, pyth_benchmarks_url=url, pyth_hermes_url=url,
                        http_retries=0)
    sources = sources_for(settings)
    data = MarketData(RedisHistoryCache(client), sources, 86_400, settings=settings)
    ticks: list[float] = []

    async def heartbeat() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)  # the heartbeat is ticking before the snapshot starts
    try:
        began = time.perf_counter()
        with pytest.raises(redis.RedisError):
            await data.snapshot("BTC")
        ticks.append(time.perf_counter())  # a loop blocked until the very end counts too
    finally:
        beat.cancel()
        client.close()
        await sources.close()
        hung.close()
    assert ticks[-1] - began >= SOCKET_TIMEOUT_S * 0.9, "the hung read was never waited for"
    # A read made on the loop would stop the heartbeat for a whole socket timeout; in a thread it ticks on.
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    assert ticks[0] < began and max(gaps) < SOCKET_TIMEOUT_S, (len(ticks), max(gaps))


class CountingMarketData(MarketData):
    """The real MarketData, counting the refreshes a snapshot decides to make."""

    refreshes = 0

    async def refresh(self, asset: str) -> RefreshReport:
        self.refreshes += 1
        return await super().refresh(asset)


async def test_a_5_minute_only_cache_is_refreshed_when_a_bar_is_overdue_not_on_every_call(
        tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A replay folder without 1-minute files: the cache holds 5-minute bars only, whose newest close is
    # normally up to 5 minutes old. Judged by the 1-minute rule, it would read as stale on every request.
    write_held_in(tmp_path, shared_data, ["btc"], days=1, with_5m=True)
    (tmp_path / "btc_1m.csv.gz").unlink()
    monkeypatch.setattr(market_data, "RETRY_S", 0)  # every request may refresh: only staleness decides
    clock = ManualClock(T0)
    data = CountingMarketData(MemoryHistoryCache(), lambda asset: ReplaySource(tmp_path, clock), 86_400, clock=clock)
    await data.snapshot("BTC")
    assert data.refreshes == 1  # empty cache
    newest_close = data.cache.span("BTC", 300)[1] + 300  # type: ignore[index]
    assert data.cache.span("BTC", 60) is None and T0 - 300 < newest_close <= T0
    await data.snapshot("BTC")
    clock.advance(newest_close + 300 + market_data.FRESH_S - T0)  # the next bar is due, not yet overdue
    await data.snapshot("BTC")
    assert data.refreshes == 1
    clock.advance(1)
    await data.snapshot("BTC")
    assert data.refreshes == 2


class SlowLatestSource:
    """Closed 1-minute bars at 100, and a latest price whose call takes ``latency_s`` of the clock's time."""

    name = "slow"

    def __init__(self, clock: ManualClock, latency_s: float) -> None:
        self.clock, self.latency_s = clock, latency_s

    async def history(self, asset: str, start: int, end: int, step: int = 60) -> PriceHistory:
        last = min(end, int(self.clock()) // step * step)  # bars closed by now: ts + step <= now
        ts = np.arange(-(-start // step) * step, last - step + 1, step, dtype=np.int64)
        return PriceHistory(step, ts, np.full(ts.size, 100.0))

    async def latest(self, asset: str) -> LatestPrice:
        self.clock.advance(self.latency_s)  # a retry or two: the price is published meanwhile
        return LatestPrice(101.0, int(self.clock()) - 1)

    async def close(self) -> None:
        return None


async def test_the_latest_price_a_slow_refresh_fetched_is_the_anchor() -> None:
    """The snapshot's "now" was taken before its refresh: a latest price published during a refresh longer
    than a few seconds read as "from the future" and was dropped for an older close."""
    clock = ManualClock(T0)
    source = SlowLatestSource(clock, latency_s=20.0)
    data = MarketData(MemoryHistoryCache(), lambda asset: source, 3600, clock=clock)
    snap = await data.snapshot("BTC")
    assert (snap.anchor, snap.anchor_time) == (101.0, T0 + 19)
    assert snap.m1 is not None and snap.m1.last_close_time is not None and snap.m1.last_close_time <= T0


def test_a_snapshot_knows_only_what_was_published_by_its_now() -> None:
    """A worker builds its snapshot at the request's "now", which may lag the refresh that filled the cache:
    a bar still open then, or a latest price published after it, must not anchor the forecast, and the
    anchor's time is the newest bar's close time (its open time plus a step), not its open time."""
    cache = MemoryHistoryCache()
    ts = np.arange(T0 // 60 * 60 - 600, T0 // 60 * 60, 60, dtype=np.int64)  # the last one closes at the minute
    cache.write("BTC", PriceHistory(60, ts, 100.0 + np.arange(ts.size, dtype=np.float64)))
    cache.set_latest("BTC", LatestPrice(500.0, int(ts[-1]) + 60))  # published at the minute too
    now = int(ts[-1]) + 30  # half-way through the newest cached bar
    snap = market_data.build_snapshot(cache, "BTC", now, 3600)
    assert snap.m1 is not None and snap.m1.last_ts == ts[-2]
    assert (snap.anchor, snap.anchor_time) == (100.0 + ts.size - 2, int(ts[-2]) + 60)

"""MinerData: a garbage print must not anchor a fallback (local fake provider); a hung provider must not make a
snapshot miss its deadline."""

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from core.cache import MemoryHistoryCache
from core.fake_providers import FakeServer, ManualClock
from core.market_data import MarketData
from core.prices import MarketSnapshot, PriceDataError
from core.settings import Settings
from core.sources.registry import SourceRegistry, sources_for
from miner.data import MinerData
from tests.provider_fixtures import fake_provider_fixtures

csv_dir, clock, market, server = fake_provider_fixtures("pyth", ["btc"], days=2, lead_s=3600)


@pytest.fixture
async def sources(server: FakeServer, clock: ManualClock) -> AsyncIterator[SourceRegistry]:
    settings = Settings(pyth_benchmarks_url=server.url, pyth_hermes_url=server.url, provider_overrides={"BTC": "pyth"},
                        cache_days_hf=1.0, cache_days_lf=1.0, http_retries=0)
    registry = sources_for(settings, clock)
    yield registry
    await registry.close()


@pytest.fixture
def miner(sources: SourceRegistry, clock: ManualClock) -> MinerData:
    shared = MarketData(MemoryHistoryCache(), sources, 86_400, clock=clock, settings=sources.settings)
    return MinerData(shared)


async def test_fallback_refuses_an_implausible_anchor_and_keeps_the_old_one(
        miner: MinerData, server: FakeServer, clock: ManualClock) -> None:
    kept = await miner.snapshot("BTC")
    clock.advance(60)
    server.faults.set(bad_price=kept.anchor * 100)  # Hermes serves a wrong exponent
    snap = await miner.fallback_snapshot("BTC")
    assert snap.anchor == kept.anchor and snap.anchor_time == kept.anchor_time


async def test_fallback_takes_a_plausible_newer_anchor(miner: MinerData, clock: ManualClock) -> None:
    kept = await miner.snapshot("BTC")
    clock.advance(60)
    snap = await miner.fallback_snapshot("BTC")
    assert snap.anchor_time == kept.anchor_time + 60
    assert snap.anchor == pytest.approx(kept.anchor, rel=0.1)


async def test_a_fallback_reads_the_snapshot_of_its_own_window(miner: MinerData, clock: ManualClock) -> None:
    """A 24 h request's fallback read whichever snapshot came last: after a 1 h request, 4 days of
    history instead of its own 14 (here 1 h and 1 day)."""
    day = await miner.snapshot("BTC", 86_400)
    hour = await miner.snapshot("BTC", 3_600)
    assert day.m1 is not None and hour.m1 is not None and len(day.m1) > 20 * len(hour.m1)
    clock.advance(60)
    for lookback, kept in ((86_400, day), (3_600, hour), (None, hour)):  # None: the asset's newest
        snap = await miner.fallback_snapshot("BTC", lookback_s=lookback)
        assert snap.m1 is kept.m1 and snap.anchor_time == kept.anchor_time + 60


SNAP = MarketSnapshot("BTC", None, None, 100.0, int(time.time()))


class SlowShared:
    """A shared market data whose refresh hangs (slow provider) and whose latest price is slow too."""

    def __init__(self) -> None:
        self.cache = MemoryHistoryCache()
        self.settings = Settings(_env_file=None)

    async def snapshot(self, asset: str, lookback_s: int | None = None) -> MarketSnapshot:
        await asyncio.sleep(30)
        raise AssertionError("unreachable")

    def window_for(self, asset: str) -> int:
        return 86_400

    def sources(self, asset: str) -> Any:
        async def latest(asset: str) -> Any:
            await asyncio.sleep(30)
        return SimpleNamespace(latest=latest)


async def test_a_snapshot_is_ready_by_its_deadline_when_the_provider_hangs(caplog: pytest.LogCaptureFixture) -> None:
    shared = SlowShared()
    data = MinerData(shared, emergency=shared)  # type: ignore[arg-type]
    data._last["BTC"] = SNAP  # an earlier request's snapshot
    began = time.time()
    snap = await data.snapshot("BTC", deadline=began + 0.5)
    took = time.time() - began
    assert snap is SNAP
    assert took < 0.5 + 1.5, f"the snapshot took {took:.2f} s for a 0.5 s deadline"  # it took 3-5 s
    assert "failed for BTC (TimeoutError)" in caplog.text  # not "(TimeoutError: )"


async def test_the_anchor_timeout_is_named_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    shared = SlowShared()
    data = MinerData(shared, emergency=shared)  # type: ignore[arg-type]
    data._last["BTC"] = SNAP
    assert await data.fallback_snapshot("BTC", deadline=time.time() + 1.0) is SNAP
    assert "fresh anchor for BTC unavailable (TimeoutError)" in caplog.text  # it said "()"


async def test_a_snapshot_with_nothing_known_gives_up_at_its_deadline() -> None:
    shared = SlowShared()
    data = MinerData(shared, emergency=shared)  # type: ignore[arg-type]
    began = time.time()
    with pytest.raises(PriceDataError, match=r"no price for BTC in time: TimeoutError$"):
        await data.snapshot("BTC", deadline=began + 0.5)
    took = time.time() - began
    assert took < 0.5 + 1.5, f"the snapshot took {took:.2f} s for a 0.5 s deadline"  # it took 3-5 s

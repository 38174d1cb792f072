"""MinerData's fallback against a local fake provider: a garbage print must not anchor a forecast."""

from collections.abc import AsyncIterator

import pytest

from core.cache import MemoryHistoryCache
from core.fake_providers import FakeServer, ManualClock
from core.market_data import MarketData
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

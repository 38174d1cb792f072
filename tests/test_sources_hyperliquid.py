"""HyperliquidSource against the local Hyperliquid server (gold 1m: real MT5 bars with their gaps)."""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from core.csv_history import read_csv, write_csv
from core.fake_providers import HYPERLIQUID_MAX_CANDLES, FakeMarket, FakeServer, ManualClock, start_fake
from core.sources.http import BadPriceError, HttpConfig, MalformedReplyError, StalePriceError, UnsupportedAssetError
from core.sources.hyperliquid import HyperliquidSource

T0 = 1_900_000_030
CONFIG = HttpConfig(timeout_s=2.0, retries=2, backoff_s=0.01, backoff_max_s=0.05)


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """Eight days of XAU 1m before its held-out boundary, ending on a trading minute."""
    out = tmp_path_factory.mktemp("hl_csv")
    cut = json.loads((shared_data / "manifest.json").read_text())["xau_1m"]["eval_start_ts"]
    hist = read_csv(shared_data / "xau_1m.csv.gz", 60).between(cut - 8 * 86_400, cut)
    write_csv(out / "xau_1m.csv.gz", hist)
    return out


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def market(csv_dir: Path, clock: ManualClock) -> FakeMarket:
    return FakeMarket(csv_dir, clock)


@pytest.fixture
async def server(market: FakeMarket) -> AsyncIterator[FakeServer]:
    srv = await start_fake("hyperliquid", market)
    yield srv
    await srv.stop()


@pytest.fixture
async def source(server: FakeServer, clock: ManualClock) -> AsyncIterator[HyperliquidSource]:
    src = HyperliquidSource(server.url, CONFIG, clock)
    yield src
    await src.close()


async def test_history_keeps_the_gaps_of_the_feed(source: HyperliquidSource, market: FakeMarket) -> None:
    start, end = T0 - 3 * 86_400, T0
    hist = await source.history("XAU", start, end)
    truth = market.bars("XAU", 60).between(start, end).known_at(T0)
    assert np.any(np.diff(truth.ts) > 60)  # gold has daily breaks: real gaps in the range
    np.testing.assert_array_equal(hist.ts, truth.ts)
    np.testing.assert_allclose(hist.close, truth.close, rtol=1e-12)


async def test_only_the_newest_5000_candles_exist(source: HyperliquidSource, market: FakeMarket) -> None:
    hist = await source.history("XAU", T0 - 8 * 86_400, T0)
    kept_from = T0 // 60 * 60 - (HYPERLIQUID_MAX_CANDLES - 1) * 60
    truth = market.bars("XAU", 60).between(kept_from, T0).known_at(T0)
    np.testing.assert_array_equal(hist.ts, truth.ts)


async def test_pages_capped_below_5000_are_followed_up(source: HyperliquidSource, server: FakeServer,
                                                       market: FakeMarket) -> None:
    server.faults.page_cap = 400
    hist = await source.history("XAU", T0 - 3 * 86_400, T0)
    truth = market.bars("XAU", 60).between(T0 - 3 * 86_400, T0).known_at(T0)
    np.testing.assert_array_equal(hist.ts, truth.ts)
    assert server.faults.requests >= len(truth) // 400


async def test_latest_is_the_newest_closed_candle(source: HyperliquidSource, market: FakeMarket) -> None:
    latest = await source.latest("XAU")
    closed = market.bars("XAU", 60).known_at(T0)
    assert latest.publish_time == closed.last_close_time
    assert latest.price == pytest.approx(float(closed.close[-1]), rel=1e-12)


async def test_latest_without_recent_candles_is_stale(source: HyperliquidSource, server: FakeServer) -> None:
    server.faults.stale_s = 1200
    with pytest.raises(StalePriceError):
        await source.latest("XAU")


async def test_all_mids_are_checked(source: HyperliquidSource, server: FakeServer, market: FakeMarket) -> None:
    mids = await source.mids()
    assert mids == {"xyz:GOLD": pytest.approx(float(market.bars("XAU", 60).known_at(T0).close[-1]))}
    server.faults.bad_price = -1.0
    with pytest.raises(BadPriceError):
        await source.mids()
    server.faults.set(bad_price=None, malformed=True)
    with pytest.raises(MalformedReplyError):
        await source.mids()


async def test_a_candle_without_close_is_malformed(source: HyperliquidSource, server: FakeServer) -> None:
    server.faults.mismatched = True
    with pytest.raises(MalformedReplyError, match="lacks 't' or 'c'"):
        await source.history("XAU", T0 - 3600, T0)


async def test_assets_without_a_coin(source: HyperliquidSource) -> None:
    with pytest.raises(UnsupportedAssetError):
        await source.history("BTC", T0 - 600, T0)

"""BinanceSource against the local Binance server (real HTTP on loopback, real shared-data prices)."""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from core.csv_history import read_csv, write_csv
from core.fake_providers import FakeMarket, FakeServer, ManualClock, start_fake
from core.sources.binance import PAGE_LIMIT, BinanceSource, _parse_klines
from core.sources.http import HttpConfig, MalformedReplyError, ProviderHTTPError, UnsupportedAssetError

T0 = 1_900_000_030  # not on a minute: the still-open bar must never be returned
CONFIG = HttpConfig(timeout_s=2.0, retries=2, backoff_s=0.01, backoff_max_s=0.05)


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """Ten days of BTC 1m before the held-out boundary (held-out rows never leave the shared folder)."""
    out = tmp_path_factory.mktemp("binance_csv")
    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    write_csv(out / "btc_1m.csv.gz", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 10 * 86_400, cut))
    return out


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def market(csv_dir: Path, clock: ManualClock) -> FakeMarket:
    return FakeMarket(csv_dir, clock)


@pytest.fixture
async def server(market: FakeMarket) -> AsyncIterator[FakeServer]:
    srv = await start_fake("binance", market)
    yield srv
    await srv.stop()


@pytest.fixture
async def source(server: FakeServer, clock: ManualClock) -> AsyncIterator[BinanceSource]:
    src = BinanceSource(server.url, CONFIG, clock)
    yield src
    await src.close()


async def test_history_pages_across_the_kline_limit(source: BinanceSource, server: FakeServer,
                                                    market: FakeMarket) -> None:
    start, end = T0 - 3 * 86_400, T0
    hist = await source.history("BTC", start, end)
    truth = market.bars("BTC", 60).between(start, end).known_at(T0)
    assert len(truth) > 4 * PAGE_LIMIT  # the range needs several pages
    np.testing.assert_array_equal(hist.ts, truth.ts)
    np.testing.assert_allclose(hist.close, truth.close, rtol=1e-12)
    assert server.faults.requests == -(-(T0 // 60 * 60 - start) // (PAGE_LIMIT * 60))  # one call per page
    assert hist.last_ts is not None and hist.last_ts + 60 <= T0  # the open kline is left out


async def test_history_follows_up_when_the_server_caps_pages(source: BinanceSource, server: FakeServer,
                                                             market: FakeMarket) -> None:
    server.faults.page_cap = 300
    start, end = T0 - 86_400, T0
    hist = await source.history("BTC", start, end)
    truth = market.bars("BTC", 60).between(start, end).known_at(T0)
    np.testing.assert_array_equal(hist.ts, truth.ts)
    assert server.faults.requests >= len(truth) // 300


async def test_history_at_5_minutes_and_empty_ranges(source: BinanceSource, market: FakeMarket) -> None:
    hist = await source.history("BTC", T0 - 86_400, T0, step=300)
    truth = market.bars("BTC", 300).between(T0 - 86_400, T0).known_at(T0)
    np.testing.assert_array_equal(hist.ts, truth.ts)
    assert len(await source.history("BTC", T0 + 60, T0 + 600)) == 0  # nothing closed yet
    assert len(await source.history("BTC", T0 - 100 * 86_400, T0 - 90 * 86_400)) == 0  # before the data


async def test_latest_is_the_newest_closed_kline(source: BinanceSource, market: FakeMarket) -> None:
    latest = await source.latest("BTC")
    closed = market.bars("BTC", 60).known_at(T0)
    assert latest.publish_time == closed.last_close_time
    assert latest.price == pytest.approx(float(closed.close[-1]), rel=1e-12)


async def test_unknown_assets_and_steps_are_refused(source: BinanceSource) -> None:
    with pytest.raises(UnsupportedAssetError):
        await source.history("WTIOIL", T0 - 600, T0)
    with pytest.raises(UnsupportedAssetError):
        await source.history("BTC", T0 - 600, T0, step=900)


async def test_a_client_error_is_not_retried(source: BinanceSource, server: FakeServer) -> None:
    server.faults.set(status=400)
    with pytest.raises(ProviderHTTPError) as err:
        await source.history("BTC", T0 - 600, T0)
    assert err.value.status == 400
    assert server.faults.requests == 1


def test_kline_times_must_describe_one_step() -> None:
    with pytest.raises(MalformedReplyError, match="not one 60 s kline"):
        _parse_klines([[60_000, "1", "1", "1", "1", "0", 60_000 + 299_999]], "test", 60)
    with pytest.raises(MalformedReplyError, match="not an integer"):
        _parse_klines([[True, "1", "1", "1", "1", "0", 59_999]], "test", 60)

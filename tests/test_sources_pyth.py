"""PythSource (Benchmarks history + Hermes latest) against the local Pyth server."""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from core.csv_history import read_csv, write_csv
from core.fake_providers import FakeMarket, FakeServer, ManualClock, start_fake
from core.sources.http import (
    BadPriceError,
    HttpConfig,
    MalformedReplyError,
    ProviderHTTPError,
    ProviderRejected,
    StalePriceError,
    UnsupportedAssetError,
)
from core.sources.pyth import PythSource

T0 = 1_900_000_030
CONFIG = HttpConfig(timeout_s=2.0, retries=2, backoff_s=0.01, backoff_max_s=0.05)
PAGE_BARS = 500  # small pages so two days already need several


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    out = tmp_path_factory.mktemp("pyth_csv")
    cut = json.loads((shared_data / "manifest.json").read_text())["btc_1m"]["eval_start_ts"]
    write_csv(out / "btc_1m.csv.gz", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 5 * 86_400, cut))
    return out


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def market(csv_dir: Path, clock: ManualClock) -> FakeMarket:
    return FakeMarket(csv_dir, clock)


@pytest.fixture
async def server(market: FakeMarket) -> AsyncIterator[FakeServer]:
    srv = await start_fake("pyth", market)
    yield srv
    await srv.stop()


@pytest.fixture
async def source(server: FakeServer, clock: ManualClock) -> AsyncIterator[PythSource]:
    src = PythSource(server.url, server.url, CONFIG, clock, page_bars=PAGE_BARS)
    yield src
    await src.close()


async def test_history_is_paginated_over_long_ranges(source: PythSource, server: FakeServer,
                                                     market: FakeMarket) -> None:
    start, end = T0 - 2 * 86_400, T0
    hist = await source.history("BTC", start, end)
    truth = market.bars("BTC", 60).between(start, end).known_at(T0)
    np.testing.assert_array_equal(hist.ts, truth.ts)
    np.testing.assert_allclose(hist.close, truth.close, rtol=1e-12)
    assert server.faults.requests == -(-(T0 // 60 * 60 - start) // (PAGE_BARS * 60))


async def test_a_server_capping_pages_is_followed_up(source: PythSource, server: FakeServer,
                                                     market: FakeMarket) -> None:
    server.faults.page_cap = 120
    hist = await source.history("BTC", T0 - 86_400, T0)
    truth = market.bars("BTC", 60).between(T0 - 86_400, T0).known_at(T0)
    np.testing.assert_array_equal(hist.ts, truth.ts)


async def test_no_data_is_an_empty_history(source: PythSource) -> None:
    hist = await source.history("BTC", T0 - 60 * 86_400, T0 - 50 * 86_400)
    assert len(hist) == 0 and hist.step == 60


async def test_an_udf_error_object_is_a_typed_error(source: PythSource) -> None:
    with pytest.raises(ProviderRejected, match="not found"):
        await source._page("Crypto.NOPE/USD", 60, T0 - 600, T0)


async def test_mismatched_udf_arrays_are_refused(source: PythSource, server: FakeServer) -> None:
    server.faults.mismatched = True
    with pytest.raises(MalformedReplyError, match="mismatched UDF array lengths"):
        await source.history("BTC", T0 - 3600, T0)


async def test_hermes_latest_scales_by_the_exponent(source: PythSource, market: FakeMarket) -> None:
    latest = await source.latest("BTC")
    closed = market.bars("BTC", 60).known_at(T0)
    assert latest.publish_time == closed.last_close_time
    assert latest.price == pytest.approx(float(closed.close[-1]), abs=1e-8)
    assert latest.confidence is not None and 0 < latest.confidence < latest.price * 1e-3


async def test_hermes_refuses_stale_and_non_positive_prices(source: PythSource, server: FakeServer) -> None:
    server.faults.stale_s = 600
    with pytest.raises(StalePriceError):
        await source.latest("BTC")
    server.faults.reset()
    for bad in (0.0, -12.5):
        server.faults.bad_price = bad
        with pytest.raises(BadPriceError):
            await source.latest("BTC")


async def test_hermes_missing_exponent_is_malformed(source: PythSource, server: FakeServer) -> None:
    server.faults.mismatched = True
    with pytest.raises(MalformedReplyError, match="expo"):
        await source.latest("BTC")


async def test_feed_without_prices_is_a_404(source: PythSource) -> None:
    with pytest.raises(ProviderHTTPError) as err:  # XRP has a feed id but the folder has no XRP file
        await source.latest("XRP")
    assert err.value.status == 404


async def test_assets_without_pyth_symbols(source: PythSource) -> None:
    with pytest.raises(UnsupportedAssetError):
        await source.history("SP500", T0 - 600, T0)
    with pytest.raises(UnsupportedAssetError):
        await source.latest("SPCX")

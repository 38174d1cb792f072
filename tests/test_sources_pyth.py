"""PythSource (Benchmarks history + Hermes latest) against the local Pyth server."""

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
import pytest
from aiohttp import web

from core.fake_providers import FakeMarket, FakeServer, ManualClock, build_app
from core.sources.http import (
    BadPriceError,
    MalformedReplyError,
    ProviderHTTPError,
    ProviderRejected,
    StalePriceError,
    UnsupportedAssetError,
)
from core.sources.pyth import PythSource
from tests.provider_fixtures import FAST_RETRIES, T0, fake_provider_fixtures, source_fixture

PAGE_BARS = 500  # small pages so two days already need several

csv_dir, clock, market, server = fake_provider_fixtures("pyth", ["btc"], days=5)
source = source_fixture(lambda url, clock: PythSource(url, url, FAST_RETRIES, clock, page_bars=PAGE_BARS))


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


def _broken_extras(reply: dict[str, Any], how: str) -> None:
    for key in ("o", "h", "l", "v"):
        if how == "null":
            reply[key] = None
        elif how == "short":
            reply[key] = reply[key][:-1]
        else:
            reply[key] = "n/a"


@pytest.mark.parametrize("how", ["null", "short", "not an array"])
async def test_a_page_with_broken_open_high_low_volume_is_kept(market: FakeMarket, clock: ManualClock,
                                                              how: str) -> None:
    """The validator reads only ``t`` and ``c`` (protocol doc, section 5), and so does this client: a
    page whose unused o/h/l/v arrays are null, short or not arrays was refused whole before."""

    @web.middleware
    async def break_extras(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        response = await handler(request)
        assert isinstance(response, web.Response) and isinstance(response.body, bytes)
        reply = orjson.loads(response.body)
        if request.path.endswith("/history") and reply.get("s") == "ok":
            _broken_extras(reply, how)
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

    app = build_app("pyth", market)
    app.middlewares.insert(0, break_extras)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    src = PythSource(url, url, FAST_RETRIES, clock, page_bars=PAGE_BARS)
    try:
        hist = await src.history("BTC", T0 - 86_400, T0)
    finally:
        await src.close()
        await runner.cleanup()
    truth = market.bars("BTC", 60).between(T0 - 86_400, T0).known_at(T0)
    np.testing.assert_array_equal(hist.ts, truth.ts)
    np.testing.assert_allclose(hist.close, truth.close, rtol=1e-12)


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

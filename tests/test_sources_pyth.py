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
    PartialHistoryError,
    ProviderHTTPError,
    ProviderRejected,
    StalePriceError,
    UnsupportedAssetError,
)
from core.sources.pyth import PythSource
from tests.provider_fixtures import FAST_RETRIES, T0, fake_provider_fixtures, rewriting_fake, source_fixture

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


@pytest.mark.parametrize(("garble", "message"), [
    (lambda reply: [reply], "expected a UDF object with a status 's'"),
    (lambda reply: {k: v for k, v in reply.items() if k != "s"}, "expected a UDF object with a status 's'"),
    (lambda reply: reply | {"s": 1}, "expected a UDF object with a status 's'"),
    (lambda reply: reply | {"s": "partial"}, "unknown UDF status 'partial'"),
    (lambda reply: reply | {"t": {str(i): t for i, t in enumerate(reply["t"])}}, "'t' and 'c' must be arrays"),
    (lambda reply: reply | {"c": ",".join(map(str, reply["c"]))}, "'t' and 'c' must be arrays"),
    (lambda reply: reply | {"t": [t * 1000 for t in reply["t"]]}, r"not in unix seconds \(milliseconds\?\)"),
], ids=["a list", "no status", "a status not a string", "an unknown status", "t an object", "c a string",
        "t in milliseconds"])
async def test_a_benchmarks_reply_of_another_shape_is_refused_and_the_pages_before_it_are_kept(
        market: FakeMarket, clock: ManualClock, garble: Callable[[dict[str, Any]], Any], message: str) -> None:
    start = -(-(T0 - 86_400) // 60) * 60
    cut = start + PAGE_BARS * 60  # the second page: from here on every history reply is garbage

    def from_the_cut(request: web.Request, reply: Any) -> Any:
        history = request.path.endswith("/history") and int(request.query["from"]) >= cut
        return garble(reply) if history else reply

    async with rewriting_fake("pyth", market, from_the_cut) as server:
        src = PythSource(server.url, server.url, FAST_RETRIES, clock, page_bars=PAGE_BARS)
        try:
            with pytest.raises(MalformedReplyError, match=message):
                await src.history("BTC", cut, cut + 3600)
            with pytest.raises(PartialHistoryError, match=message) as failed:
                await src.history("BTC", start, T0)
        finally:
            await src.close()
    assert isinstance(failed.value.cause, MalformedReplyError) and failed.value.missing[0] == cut
    truth = market.bars("BTC", 60).between(start, cut).known_at(T0)
    assert len(truth) > 100
    np.testing.assert_array_equal(failed.value.partial.ts, truth.ts)
    np.testing.assert_allclose(failed.value.partial.close, truth.close, rtol=1e-12)


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


def _quote(**changes: object) -> Callable[[dict[str, Any]], Any]:
    def change(reply: dict[str, Any]) -> Any:
        reply["parsed"][0]["price"].update(changes)
        return reply
    return change


@pytest.mark.parametrize(("garble", "message"), [
    (lambda reply: reply | {"parsed": []}, "feed [0-9a-f]+ is not in the reply"),
    (lambda reply: reply | {"parsed": [e | {"id": PythSource.feed_id("ETH")} for e in reply["parsed"]]},
     "feed [0-9a-f]+ is not in the reply"),
    (_quote(expo=11), "exponent 11 out of range"),
    (_quote(expo=-31), "exponent -31 out of range"),
    (_quote(conf="-1"), "confidence '-1' is negative"),
], ids=["no entry", "another feed only", "exponent too large", "exponent too small", "negative confidence"])
async def test_a_hermes_reply_without_our_feed_or_with_an_impossible_quote_is_refused(
        market: FakeMarket, clock: ManualClock, garble: Callable[[dict[str, Any]], Any], message: str) -> None:
    async with rewriting_fake("pyth", market, lambda request, reply: garble(reply)) as server:
        src = PythSource(server.url, server.url, FAST_RETRIES, clock)
        try:
            with pytest.raises(MalformedReplyError, match=message) as failed:
                await src.latest("BTC")
        finally:
            await src.close()
    assert "pyth hermes BTC" in str(failed.value)


async def test_feed_without_prices_is_a_404(source: PythSource) -> None:
    with pytest.raises(ProviderHTTPError) as err:  # XRP has a feed id but the folder has no XRP file
        await source.latest("XRP")
    assert err.value.status == 404


async def test_assets_without_pyth_symbols(source: PythSource) -> None:
    with pytest.raises(UnsupportedAssetError):
        await source.history("SP500", T0 - 600, T0)
    with pytest.raises(UnsupportedAssetError):
        await source.latest("SPCX")

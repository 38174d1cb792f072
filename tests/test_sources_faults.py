"""Every injected fault against every client: a typed error, or a successful retry. Never a wrong price."""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from core.fake_providers import FAULTS_KEY, FakeMarket, FakeServer, Faults, ManualClock, build_app, start_fake
from core.sources.base import PriceSource, ProviderError
from core.sources.binance import BinanceSource
from core.sources.http import (
    BadPriceError,
    HttpConfig,
    MalformedReplyError,
    PartialHistoryError,
    ProviderHTTPError,
    ProviderTimeout,
    ProviderUnavailable,
    StalePriceError,
)
from core.sources.hyperliquid import HyperliquidSource
from core.sources.pyth import PythSource
from tests.provider_fixtures import FAST_RETRIES, T0, fake_provider_fixtures

CONFIG = FAST_RETRIES
RETRIES = CONFIG.retries
ASSET = {"binance": "BTC", "pyth": "BTC", "hyperliquid": "XAU"}
PROVIDERS = sorted(ASSET)

csv_dir, clock, market, server = fake_provider_fixtures("all", ["btc", "xau"], days=2)


def make_source(provider: str, url: str, clock: ManualClock, config: HttpConfig = CONFIG) -> PriceSource:
    if provider == "binance":
        return BinanceSource(url, config, clock)
    if provider == "pyth":
        return PythSource(url, url, config, clock)
    return HyperliquidSource(url, config, clock)


@pytest.fixture(params=PROVIDERS)
async def client(request: pytest.FixtureRequest, server: FakeServer,
                 clock: ManualClock) -> AsyncIterator[tuple[str, PriceSource]]:
    src = make_source(request.param, server.url, clock)
    yield request.param, src
    await src.close()


async def one_page(src: PriceSource, asset: str) -> Any:
    return await src.history(asset, T0 - 3600, T0)


RECOVERABLE = [
    pytest.param({"status": 429, "status_count": RETRIES}, id="429-then-ok"),
    pytest.param({"status": 503, "status_count": 1, "retry_after_s": 0.05}, id="503-retry-after-then-ok"),
    pytest.param({"status": 500, "status_count": RETRIES}, id="500-then-ok"),
]


@pytest.mark.parametrize("faults", RECOVERABLE)
async def test_transient_failures_are_retried(client: tuple[str, PriceSource], server: FakeServer,
                                              market: FakeMarket, faults: dict[str, Any]) -> None:
    provider, src = client
    server.faults.set(**faults)
    hist = await one_page(src, ASSET[provider])
    truth = market.bars(ASSET[provider], 60).between(T0 - 3600, T0).known_at(T0)
    np.testing.assert_array_equal(hist.ts, truth.ts)
    assert server.faults.requests == faults["status_count"] + 1


FATAL_TO_A_PAGE = [
    pytest.param({"status": 503}, ProviderUnavailable, id="503-forever"),
    pytest.param({"status": 429}, ProviderUnavailable, id="429-forever"),
    pytest.param({"status": 403}, ProviderHTTPError, id="403"),
    pytest.param({"truncate": True}, MalformedReplyError, id="truncated-body"),
    pytest.param({"malformed": True}, MalformedReplyError, id="malformed-body"),
]
# One bad row (the fake spoils each reply's newest): a gap in a history page, an error for a latest price.
BAD_NEWEST_ROW = [
    pytest.param({"mismatched": True}, MalformedReplyError, id="mismatched"),
    pytest.param({"bad_price": 0.0}, BadPriceError, id="zero-price"),
    pytest.param({"bad_price": -3.0}, BadPriceError, id="negative-price"),
]
FATAL = FATAL_TO_A_PAGE + BAD_NEWEST_ROW


@pytest.mark.parametrize(("faults", "error"), FATAL_TO_A_PAGE)
async def test_faults_raise_typed_errors_for_history(client: tuple[str, PriceSource], server: FakeServer,
                                                     faults: dict[str, Any], error: type[ProviderError]) -> None:
    provider, src = client
    server.faults.set(**faults)
    with pytest.raises(error):
        await one_page(src, ASSET[provider])
    assert server.faults.requests == (RETRIES + 1 if error is ProviderUnavailable else 1)


@pytest.mark.parametrize(("faults", "error"), BAD_NEWEST_ROW + [
    pytest.param({"bad_price": float("nan")}, ProviderError, id="nan-price")])
async def test_a_bad_newest_row_keeps_the_bars_before_it(client: tuple[str, PriceSource], server: FakeServer,
                                                         market: FakeMarket, faults: dict[str, Any],
                                                         error: type[ProviderError]) -> None:
    """The page keeps its other bars. The range is followed up from the dropped bar (its newest kept bar
    ends early, as a server capping its pages answers), and the follow-up holding only the bad row fails:
    the bars before it come back on a PartialHistoryError, and the refresh asks again from the bad bar.
    Failing the whole page froze the cache: the refresh asked for it again from the same bar every minute.
    (Pyth's mismatched fault is arrays of two lengths: the reply's shape, fatal to the page.)"""
    provider, src = client
    server.faults.set(**faults)
    truth = market.bars(ASSET[provider], 60).between(T0 - 3600, T0).known_at(T0)
    if provider == "pyth" and faults.get("mismatched"):
        with pytest.raises(MalformedReplyError, match="mismatched UDF array lengths"):
            await one_page(src, ASSET[provider])
        return
    with pytest.raises(PartialHistoryError) as failed:
        await one_page(src, ASSET[provider])
    assert isinstance(failed.value.cause, error), failed.value.cause
    np.testing.assert_array_equal(failed.value.partial.ts, truth.ts[:-1])
    np.testing.assert_array_equal(failed.value.partial.close, truth.close[:-1])
    assert failed.value.missing[0] == truth.ts[-1]


async def test_a_bad_row_inside_a_page_is_a_gap(client: tuple[str, PriceSource], server: FakeServer,
                                                market: FakeMarket, caplog: pytest.LogCaptureFixture) -> None:
    provider, src = client
    truth = market.bars(ASSET[provider], 60).between(T0 - 3600, T0).known_at(T0)
    server.faults.zero_at = (int(truth.ts[10]),)
    with caplog.at_level(logging.WARNING, logger="core.sources.http"):
        hist = await one_page(src, ASSET[provider])
    np.testing.assert_array_equal(hist.ts, np.delete(truth.ts, 10))
    np.testing.assert_array_equal(hist.close, np.delete(truth.close, 10))
    assert f"1 of {len(truth)} rows dropped as gaps" in caplog.text, caplog.text


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_slow_replies_time_out_after_every_attempt(provider: str, server: FakeServer,
                                                         clock: ManualClock) -> None:
    src = make_source(provider, server.url, clock, HttpConfig(timeout_s=0.1, retries=1, backoff_s=0.01))
    server.faults.latency_s = 0.3
    try:
        with pytest.raises(ProviderTimeout, match="timed out"):
            await one_page(src, ASSET[provider])
        with pytest.raises(ProviderTimeout):
            await src.latest(ASSET[provider])
    finally:
        await src.close()
    assert server.faults.requests == 4  # two attempts each


@pytest.mark.parametrize(("faults", "error"), FATAL + [
    pytest.param({"stale_s": 900}, StalePriceError, id="stale-latest"),
])
async def test_faults_raise_typed_errors_for_latest(client: tuple[str, PriceSource], server: FakeServer,
                                                    faults: dict[str, Any], error: type[ProviderError]) -> None:
    provider, src = client
    server.faults.set(**faults)
    with pytest.raises(error):
        await src.latest(ASSET[provider])


@pytest.mark.parametrize("provider", ["binance", "hyperliquid"])  # decimal-string prices can say NaN
async def test_nan_prices_are_refused(provider: str, server: FakeServer, clock: ManualClock) -> None:
    src = make_source(provider, server.url, clock)
    server.faults.bad_price = float("nan")
    try:
        with pytest.raises(BadPriceError):
            await src.latest(ASSET[provider])
    finally:
        await src.close()


async def test_missing_candles_stay_gaps(client: tuple[str, PriceSource], server: FakeServer,
                                         market: FakeMarket) -> None:
    provider, src = client
    server.faults.missing_every = 7
    hist = await one_page(src, ASSET[provider])
    truth = market.bars(ASSET[provider], 60).between(T0 - 3600, T0).known_at(T0)
    expected = truth.ts[(truth.ts // 60) % 7 != 0]
    np.testing.assert_array_equal(hist.ts, expected)
    assert len(hist) < len(truth)


async def test_concurrent_pages_respect_the_per_host_limit(market: FakeMarket, clock: ManualClock) -> None:
    """Twelve Pyth pages under a per-host limit of 4: the fake counts the requests in flight at once,
    and the most ever seen is exactly the limit (the pages do overlap, and never by more)."""
    limit = 4
    in_flight, most = 0, 0

    @web.middleware
    async def count_in_flight(request: web.Request, handler: Any) -> web.StreamResponse:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.3)  # long enough on a slow machine for every allowed page to arrive
            return await handler(request)
        finally:
            in_flight -= 1

    app = build_app("pyth", market)
    app.middlewares.insert(0, count_in_flight)  # outermost: counts from arrival to the reply
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    config = HttpConfig(timeout_s=10.0, retries=0, concurrency_per_host=limit)
    src = PythSource(url, url, config, clock, page_bars=120)
    try:
        await src.history("BTC", T0 - 24 * 3600 + 60, T0)
    finally:
        await src.close()
        await runner.cleanup()
    assert app[FAULTS_KEY].requests == 12
    assert most == limit, f"at most {most} pages in flight at once; the limit is {limit}"


@pytest.mark.parametrize("failed_page", [0, 4, 11])
async def test_one_failed_page_keeps_the_pages_before_it_and_says_what_is_missing(
        market: FakeMarket, clock: ManualClock, failed_page: int) -> None:
    """Twelve Pyth pages, one answering 503 on every attempt: the bars of the pages before it are handed
    over on the error (complete: the caller's next fetch resumes right after them), never those after it
    (a hole behind newer bars would never be fetched again). Before the fix the whole request was lost."""
    page_bars, start = 120, T0 // 60 * 60 - 12 * 120 * 60
    bad_from = start + failed_page * page_bars * 60
    fake = await start_fake("pyth", market, faults=Faults(down_from=(bad_from,)))
    src = PythSource(fake.url, fake.url, CONFIG, clock, page_bars=page_bars)
    try:
        with pytest.raises(ProviderError) as err:
            await src.history("BTC", start, T0)
    finally:
        await src.close()
        await fake.stop()
    if failed_page == 0:  # nothing before it: the page's own error, as for a one-page request
        assert type(err.value) is ProviderUnavailable
        return
    assert isinstance(err.value, PartialHistoryError) and isinstance(err.value.cause, ProviderUnavailable)
    assert err.value.missing == (bad_from, T0 // 60 * 60)
    truth = market.bars("BTC", 60).between(start, bad_from)
    np.testing.assert_array_equal(err.value.partial.ts, truth.ts)
    np.testing.assert_allclose(err.value.partial.close, truth.close, rtol=1e-12)
    assert "503" in str(err.value) and str(bad_from) in str(err.value)

"""The shared HTTP layer: backoff bounds, reply validators, one session per event loop."""

import asyncio
import email.utils
import logging
import random
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from aiohttp import web

from core.constants import BAR_CLOSE_GRACE_S, PROVIDER_CLOCK_AHEAD_TOLERANCE_S
from core.prices import LatestPrice
from core.sources.base import PriceSource
from core.sources.http import (
    BadPriceError,
    ClockAheadError,
    HttpClient,
    HttpConfig,
    MalformedReplyError,
    ProviderHTTPError,
    ProviderUnavailable,
    Rows,
    StalePriceError,
    _retry_after,
    build_history,
    check_fresh,
    closed_end,
    page_ranges,
    parse_int,
    parse_price,
)
from core.sources.hyperliquid import HyperliquidSource
from core.sources.pyth import PythSource


def test_backoff_is_jittered_capped_and_floored_by_retry_after() -> None:
    client = HttpClient("t", HttpConfig(backoff_s=0.5, backoff_max_s=4.0), rng=random.Random(7))
    for attempt in range(8):
        delays = [client.backoff(attempt) for _ in range(200)]
        cap = min(4.0, 0.5 * 2 ** attempt)
        assert 0 <= min(delays) and max(delays) <= cap
        assert len(set(delays)) > 150  # jittered, not a fixed schedule
    assert all(client.backoff(0, retry_after=3.0) >= 3.0 for _ in range(50))
    assert client.backoff(0, retry_after=60.0) == 60.0  # never shortened: _request gives up instead


@pytest.mark.parametrize("value", ["0", 0, "-1.5", -2, "nan", float("inf"), "Infinity"])
def test_non_positive_or_non_finite_prices_are_bad(value: object) -> None:
    with pytest.raises(BadPriceError):
        parse_price(value, "test")


@pytest.mark.parametrize("value", ["1e-320", 5e-324, 1e-40, "1e39", 1e300])
def test_prices_a_float32_cannot_carry_are_bad(value: object) -> None:
    """Paths are scored as float32 (validators refuse values that underflow to 0 or overflow): a subnormal
    close (whose reciprocal is inf) or one past float32's range is garbage, not a price. Before the fix
    they passed as "finite and positive"."""
    with pytest.raises(BadPriceError, match="float32"):
        parse_price(value, "test")


def test_the_float32_range_itself_is_accepted() -> None:
    assert parse_price("1e-30", "t") == 1e-30 and parse_price(3e38, "t") == 3e38


@pytest.mark.parametrize("value", ["abc", None, True, [1.0], {"p": 1}])
def test_non_numbers_are_malformed(value: object) -> None:
    with pytest.raises(MalformedReplyError):
        parse_price(value, "test")


def test_parse_price_and_int_accept_the_wire_forms() -> None:
    assert parse_price("65000.01000000", "t") == 65000.01
    assert parse_price(3, "t") == 3.0
    assert parse_int("1700000000000", "t") == 1_700_000_000_000
    assert parse_int(60.0, "t") == 60
    for bad in (1.5, "1e3", False, None):
        with pytest.raises(MalformedReplyError):
            parse_int(bad, "t")


def rows_of(ts: list[int], close: list[float], bad: int = 0) -> Rows:
    """A reply's rows as a parser reads them, ``bad`` of them unreadable (a zero close)."""
    rows = Rows("t")
    for t, c in zip(ts, close, strict=True):
        rows.read(lambda t, c: (t, c), t, c)
    for i in range(bad):
        rows.read(lambda i: (0, parse_price("0", f"t row {i} close")), i)
    return rows


def test_build_history_sorts_and_drops_a_few_bad_rows_as_gaps(caplog: pytest.LogCaptureFixture) -> None:
    hist = build_history(60, rows_of([180, 60, 120], [3.0, 1.0, 2.0]), 60, 240)
    np.testing.assert_array_equal(hist.ts, [60, 120, 180])  # sorted
    # One bad print among good rows used to fail the page, and the refresh asked for it again from the same
    # bar every minute: the cache froze for the whole window. Now it is a gap, and logged.
    cases = [  # rows, closes, unreadable rows, bars kept, the log's "N of M rows"
        ([60, 120, 180], [1.0, 2.0, 3.0], 1, [60, 120, 180], "1 of 4"),  # a zero close
        ([60, 121, 180], [1.0, 2.0, 3.0], 0, [60, 180], "1 of 3"),  # off the grid
        ([60, 120, 600], [1.0, 2.0, 3.0], 0, [60, 120], "1 of 3"),  # outside [0, 600)
        ([60, 120, 120, 180, 240], [1.0, 2.0, 2.5, 3.0, 4.0], 0, [60, 180, 240], "2 of 5"),  # two closes: neither
        ([60, 120, 120, 180], [1.0, 2.0, 2.0, 3.0], 0, [60, 120, 180], None),  # the same bar twice: kept once
    ]
    with caplog.at_level(logging.WARNING, logger="core.sources.http"):
        for ts, close, bad, kept, dropped in cases:
            caplog.clear()
            np.testing.assert_array_equal(build_history(60, rows_of(ts, close, bad), 0, 600).ts, kept)
            assert [r.getMessage().split(": ")[1] for r in caplog.records] == (
                [f"{dropped} rows dropped as gaps"] if dropped else []), caplog.text


def test_build_history_refuses_a_reply_mostly_made_of_bad_rows() -> None:
    """Garbage, not a bad print: the first row's error, typed, and how many rows were unusable."""
    with pytest.raises(BadPriceError, match="2 of 3 rows unusable"):
        build_history(60, rows_of([60], [1.0], bad=2), 0, 600)
    with pytest.raises(MalformedReplyError, match="grid"):
        build_history(60, rows_of([61], [1.0]), 0, 600)
    with pytest.raises(MalformedReplyError, match="outside"):
        build_history(60, rows_of([600], [1.0]), 0, 600)
    with pytest.raises(MalformedReplyError, match="duplicate"):
        build_history(60, rows_of([60, 60], [1.0, 2.0]), 0, 600)
    with pytest.raises(BadPriceError):
        Rows("t", problems=rows_of([], [], bad=1).problems).all_or_raise()  # a latest price: no bad row at all


def test_check_fresh() -> None:
    now = 1_000_000.0
    assert check_fresh("t", LatestPrice(1.0, int(now) - 100), now, 180).price == 1.0
    with pytest.raises(StalePriceError, match="181 s old"):
        check_fresh("t", LatestPrice(1.0, int(now) - 181), now, 180)
    with pytest.raises(ClockAheadError, match="3600 s in the future") as err:
        check_fresh("t", LatestPrice(1.0, int(now) + 3600), now, 180)
    assert err.value.ahead_s == 3600 and isinstance(err.value, MalformedReplyError)
    assert check_fresh("t", LatestPrice(1.0, int(now) + PROVIDER_CLOCK_AHEAD_TOLERANCE_S), now, 180).price == 1.0


def test_ranges_and_closed_ends() -> None:
    assert page_ranges(0, 250, 100) == [(0, 100), (100, 200), (200, 250)]
    assert page_ranges(10, 10, 100) == []
    assert closed_end(10_000, 60, 1_030.0) == 1_020  # ts < 1020: [960, 1020) has closed, [1020, 1080) is open
    assert closed_end(500, 60, 1_030.0) == 500
    assert closed_end(10_000, 300, 1_200.0, grace_s=0) == 1_200  # the bar [900, 1200) closed exactly now
    # ...but by default a bar is asked for only a few seconds after its close: a clock slightly ahead of
    # the exchange's must not fetch (and store for good) a bar that is still open there.
    assert closed_end(10_000, 300, 1_200.0) == 900
    assert closed_end(10_000, 60, 1_021.0) == 960
    assert closed_end(10_000, 60, 1_020.0 + BAR_CLOSE_GRACE_S) == 1_020


def test_one_client_works_across_event_loops() -> None:
    """Celery runs ``asyncio.run`` per task: the session must follow the loop, not break on the second."""

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def serve_and_get(client: HttpClient) -> object:
        app = web.Application()
        app.router.add_get("/x", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            return await client.get_json(f"http://127.0.0.1:{runner.addresses[0][1]}/x", [])
        finally:
            await client.close()
            await runner.cleanup()

    client = HttpClient("t", HttpConfig(timeout_s=2.0, retries=0))
    assert asyncio.run(serve_and_get(client)) == {"ok": True}
    assert asyncio.run(serve_and_get(client)) == {"ok": True}


async def test_connection_refused_is_unavailable_after_retries() -> None:
    from tests.conftest import free_port

    client = HttpClient("t", HttpConfig(timeout_s=1.0, retries=2, backoff_s=0.01))
    try:
        with pytest.raises(ProviderUnavailable, match="failed"):
            await client.get_json(f"http://127.0.0.1:{free_port()}/nothing", [])
    finally:
        await client.close()


@dataclass
class RawServer:
    """A tiny loopback server answering every request with ``body`` (``fail`` times ``status`` first)."""

    url: str = ""
    body: bytes = b"{}"
    status: int = 200
    fail: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    hits: list[float] = field(default_factory=list)


@pytest.fixture
async def raw() -> AsyncIterator[RawServer]:
    srv = RawServer()

    async def any_path(request: web.Request) -> web.Response:
        srv.hits.append(time.monotonic())
        if len(srv.hits) <= srv.fail:
            return web.Response(status=srv.status, headers=srv.headers, text='{"msg": "slow down"}')
        return web.Response(body=srv.body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", any_path)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    srv.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield srv
    await runner.cleanup()


async def test_a_retry_after_that_fits_is_honoured_in_full(raw: RawServer) -> None:
    raw.status, raw.fail, raw.headers = 429, 1, {"Retry-After": "0.3"}
    client = HttpClient("t", HttpConfig(timeout_s=2.0, retries=2, backoff_s=0.001, backoff_max_s=0.5))
    try:
        assert await client.get_json(f"{raw.url}/x", []) == {}
    finally:
        await client.close()
    assert len(raw.hits) == 2 and raw.hits[1] - raw.hits[0] >= 0.3


async def test_a_retry_after_longer_than_we_may_wait_holds_this_and_every_later_request(raw: RawServer) -> None:
    """Binance bans an IP that calls again before Retry-After: neither the retry nor the next call (the
    refresh's ``latest`` right after a failed ``history``, another asset's page) may be sent."""
    raw.status, raw.fail, raw.headers = 429, 99, {"Retry-After": "30"}
    client = HttpClient("t", HttpConfig(timeout_s=2.0, retries=4, backoff_s=0.01, backoff_max_s=1.0))
    try:
        with pytest.raises(ProviderUnavailable, match="Retry-After 30 s"):
            await client.get_json(f"{raw.url}/klines", [])
        assert len(raw.hits) == 1  # not retried
        for path in ("klines", "ticker"):
            with pytest.raises(ProviderUnavailable, match="Retry-After"):
                await client.get_json(f"{raw.url}/{path}", [])
    finally:
        await client.close()
    assert len(raw.hits) == 1  # nor sent again by a later call


async def test_a_short_retry_after_delays_the_next_call(raw: RawServer) -> None:
    raw.status, raw.fail, raw.headers = 503, 1, {"Retry-After": "0.4"}
    client = HttpClient("t", HttpConfig(timeout_s=2.0, retries=0, backoff_s=0.001, backoff_max_s=1.0))
    try:
        with pytest.raises(ProviderUnavailable, match="HTTP 503"):
            await client.get_json(f"{raw.url}/x", [])
        assert await client.get_json(f"{raw.url}/x", []) == {}
    finally:
        await client.close()
    assert len(raw.hits) == 2 and raw.hits[1] - raw.hits[0] >= 0.4


async def test_a_retry_after_http_date_is_honoured(raw: RawServer) -> None:
    """RFC 9110 allows Retry-After as an HTTP date: it is a wait like any other, not "absent"."""
    raw.status, raw.fail = 503, 99
    raw.headers = {"Retry-After": email.utils.formatdate(time.time() + 60, usegmt=True)}
    client = HttpClient("t", HttpConfig(timeout_s=2.0, retries=4, backoff_s=0.001, backoff_max_s=1.0))
    try:
        with pytest.raises(ProviderUnavailable, match="Retry-After 5[89]"):
            await client.get_json(f"{raw.url}/x", [])
    finally:
        await client.close()
    assert len(raw.hits) == 1  # before the fix: five requests within 0.1 s


async def start_app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_redirect_to_another_host_is_not_followed(raw: RawServer, status: int, method: str) -> None:
    """Prices are trusted from the configured host only. Before the fix aiohttp followed the redirect and the
    other host's JSON came back as the provider's reply (outside its Retry-After hold and per-host limit)."""
    raw.body = b'[["prices from elsewhere"]]'
    asked: list[str] = []

    async def redirect(request: web.Request) -> web.StreamResponse:
        asked.append(request.path)
        return web.Response(status=status, headers={"Location": f"{raw.url}/elsewhere"},
                            body=b'{"moved": true}', content_type="application/json")

    runner, url = await start_app(redirect)
    client = HttpClient("t", HttpConfig(timeout_s=2.0, retries=2, backoff_s=0.001))
    try:
        with pytest.raises(ProviderHTTPError, match=f"HTTP {status}: redirect to .*/elsewhere' not followed"):
            if method == "GET":
                await client.get_json(f"{url}/api/v3/klines", [])
            else:
                await client.post_json(f"{url}/info", {"type": "allMids"})
    finally:
        await client.close()
        await runner.cleanup()
    assert len(asked) == 1 and raw.hits == []  # not retried, and the other host never asked


@pytest.mark.parametrize("reply", ["endless", "content-length", "gzip-bomb"])
async def test_a_reply_too_large_is_not_read_into_memory(reply: str) -> None:
    """A body streamed without end, one announcing 400 MB, a 20 KB gzip body inflating to 20 MB: before the fix
    each was read whole into memory (over loopback, GBs within the timeout; 1 GB of RAM for a 1 MB bomb)."""
    sent = 0
    stopped = asyncio.Event()

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        if reply == "gzip-bomb":
            bomb = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
            body = bomb.compress(b"[" + b" " * 20_000_000 + b"]") + bomb.flush()
            return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if reply == "content-length":
            resp.content_length = 400_000_000
        await resp.prepare(request)
        try:
            while sent < 400_000_000:
                await resp.write(b" " * 65536)
                sent += 65536
        except ConnectionError:  # the client hung up
            pass
        finally:
            stopped.set()
        return resp

    runner, url = await start_app(huge)
    client = HttpClient("t", HttpConfig(timeout_s=10.0, retries=2, backoff_s=0.001, max_reply_bytes=1 << 20))
    began = time.monotonic()
    try:
        with pytest.raises(MalformedReplyError, match=f"reply larger than {1 << 20} bytes"):
            await client.get_json(f"{url}/api/v3/klines", [])
        assert time.monotonic() - began < 3.0  # refused, not timed out after 10 s (nor retried)
        if reply != "gzip-bomb":
            await asyncio.wait_for(stopped.wait(), 3.0)  # the connection was dropped, not drained
            assert sent < 50_000_000
    finally:
        await client.close()
        await runner.cleanup()


@pytest.mark.parametrize(("value", "expected"), [
    ("12", 12.0), ("0", 0.0), ("-3", None), ("nan", None), ("soon", None), (None, None),
    ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),  # a date already past: no wait
])
def test_retry_after_values(value: str | None, expected: float | None) -> None:
    assert _retry_after(value) == expected


NOW = 1_900_000_030
FEED = "e62df6c8b4a85fe1a67db44dc12de5db330f7ac66b72dc658afedf0f4a415b43"  # BTC/USD on Hermes
HUGE = "9" * 400


def _hermes(price: str = "100", conf: str = "1", publish_time: str = str(NOW - 5)) -> bytes:
    quote = f'{{"price":"{price}","conf":"{conf}","expo":-8,"publish_time":{publish_time}}}'
    return f'{{"parsed":[{{"id":"{FEED}","price":{quote}}}]}}'.encode()


@pytest.mark.parametrize(("provider", "call", "body"), [
    ("pyth", "history", b'{"s":"ok","t":[%d],"c":[5.0]}' % 10 ** 19),
    ("pyth", "latest", _hermes(price=HUGE)),
    ("pyth", "latest", _hermes(conf=HUGE)),
    ("pyth", "latest", _hermes(publish_time=HUGE)),
    ("hyperliquid", "history", b'[{"t":%d,"c":"5"}]' % 10 ** 22),
])
async def test_out_of_range_numbers_are_malformed_not_overflow(raw: RawServer, provider: str, call: str,
                                                               body: bytes) -> None:
    raw.body = body
    config = HttpConfig(timeout_s=2.0, retries=0)
    source: PriceSource = (PythSource(raw.url, raw.url, config, lambda: NOW) if provider == "pyth"
                           else HyperliquidSource(raw.url, config, lambda: NOW))
    asset = "BTC" if provider == "pyth" else "XAU"
    try:
        with pytest.raises(MalformedReplyError):
            if call == "history":
                await source.history(asset, (NOW // 60 - 10) * 60, NOW)
            else:
                await source.latest(asset)
    finally:
        await source.close()

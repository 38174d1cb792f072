"""BinanceSource against the local Binance server (real HTTP on loopback, real shared-data prices)."""

from pathlib import Path

import numpy as np
import pytest

from core.fake_providers import FakeMarket, FakeServer, ManualClock
from core.sources.binance import PAGE_LIMIT, BinanceSource, _parse_klines
from core.sources.http import (
    MalformedReplyError,
    ProviderHTTPError,
    ProviderUnavailable,
    UnsupportedAssetError,
)
from tests.provider_fixtures import (
    FAST_RETRIES,
    T0,
    fake_provider_fixtures,
    latest_from_a_clock_ahead,
    source_fixture,
)

# Ten days of BTC 1m before the held-out boundary.
csv_dir, clock, market, server = fake_provider_fixtures("binance", ["btc"], days=10)
source = source_fixture(lambda url, clock: BinanceSource(url, FAST_RETRIES, clock))


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


async def test_latest_with_our_clock_slightly_behind_just_after_a_minute(server: FakeServer, market: FakeMarket,
                                                                         clock: ManualClock) -> None:
    clock.t = (T0 // 60) * 60 + 0.3  # Binance: 0.3 s into a new minute
    ours = ManualClock(clock.t - 0.5)  # ordinary NTP-level skew: we are still in the previous minute
    src = BinanceSource(server.url, FAST_RETRIES, ours)
    try:
        latest = await src.latest("BTC")
    finally:
        await src.close()
    closed = market.bars("BTC", 60).known_at(int(ours()))  # the newest kline closed by our clock
    assert latest.publish_time == closed.last_close_time
    assert latest.price == pytest.approx(float(closed.close[-1]), rel=1e-12)


@pytest.mark.parametrize("ahead_s", [120, 3600])
async def test_a_binance_clock_running_ahead_is_named_in_the_latest_error(csv_dir: Path, clock: ManualClock,
                                                                          ahead_s: int) -> None:
    """Its newest klines are in the future. Before, the error said only "no closed 1-minute kline in the reply",
    which reads as a lagging or empty feed, and two minutes ahead (the oldest of its three klines not yet in the
    future) it still said so after the hour-ahead fix; now it says by how much its clock runs ahead (the
    refresh then stores none of its bars)."""
    err = await latest_from_a_clock_ahead("binance", lambda url: BinanceSource(url, FAST_RETRIES, clock), csv_dir, ahead_s,
                                          "BTC")
    assert ahead_s - 60 < err.ahead_s <= ahead_s


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


async def test_a_429_retry_after_is_honoured_by_the_next_call_too(source: BinanceSource,
                                                                  server: FakeServer) -> None:
    """A refresh asks history, then latest: after a 429 asking for 30 s, latest must not hit Binance again."""
    server.faults.set(status=429, retry_after_s=30.0)
    with pytest.raises(ProviderUnavailable, match="Retry-After 30"):
        await source.history("BTC", T0 - 600, T0)
    with pytest.raises(ProviderUnavailable, match="Retry-After"):
        await source.latest("BTC")
    with pytest.raises(ProviderUnavailable, match="Retry-After"):
        await source.history("ETH", T0 - 600, T0)
    assert server.faults.requests == 1  # before the fix: 3, and Binance answers repeat offenders with a 418 ban


def test_kline_times_must_describe_one_step() -> None:
    with pytest.raises(MalformedReplyError, match="not one 60 s kline"):
        _parse_klines([[60_000, "1", "1", "1", "1", "0", 60_000 + 299_999]], "test", 60).all_or_raise()
    with pytest.raises(MalformedReplyError, match="not an integer"):
        _parse_klines([[True, "1", "1", "1", "1", "0", 59_999]], "test", 60).all_or_raise()

"""HyperliquidSource against the local Hyperliquid server (gold 1m: real MT5 bars with their gaps)."""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from core.fake_providers import HYPERLIQUID_MAX_CANDLES, FakeMarket, FakeServer, ManualClock
from core.sources.http import (
    BadPriceError,
    MalformedReplyError,
    PartialHistoryError,
    StalePriceError,
    UnsupportedAssetError,
)
from core.sources.hyperliquid import HyperliquidSource, _parse_candles
from tests.provider_fixtures import (
    FAST_RETRIES,
    T0,
    fake_provider_fixtures,
    latest_from_a_clock_ahead,
    rewriting_fake,
    source_fixture,
)

# Eight days of XAU 1m before its held-out boundary, ending on a trading minute.
csv_dir, clock, market, server = fake_provider_fixtures("hyperliquid", ["xau"], days=8)
source = source_fixture(lambda url, clock: HyperliquidSource(url, FAST_RETRIES, clock))


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


@pytest.mark.parametrize("ahead_s", [150, 3600])
async def test_a_hyperliquid_clock_running_ahead_is_refused_with_its_skew(csv_dir: Path, clock: ManualClock,
                                                                          ahead_s: int) -> None:
    """Before: the latest query asked for candles up to our now only, and a Hyperliquid whose clock ran an hour
    ahead answered the candles it had stamped then, an hour old, taken as fresh. It now asks past now too: the
    candles stamped in the future show the skew, and the reply is refused."""
    err = await latest_from_a_clock_ahead("hyperliquid", lambda url: HyperliquidSource(url, FAST_RETRIES, clock), csv_dir, ahead_s,
                                          "XAU")
    assert ahead_s - 60 < err.ahead_s <= ahead_s


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
    server.faults.mismatched = True  # the newest candle of each reply: the bars before it come back
    with pytest.raises(PartialHistoryError, match="lacks 't' or 'c'") as failed:
        await source.history("XAU", T0 - 3600, T0)
    assert isinstance(failed.value.cause, MalformedReplyError) and len(failed.value.partial) > 50
    with pytest.raises(MalformedReplyError, match="lacks 't' or 'c'"):
        await source.latest("XAU")


@pytest.mark.parametrize(("bend", "message"), [
    (lambda candle: candle | {"t": candle["t"] + 500, "T": candle["T"] + 500}, "open time [0-9]+ is not whole seconds"),
    (lambda candle: candle | {"T": candle["t"] + 300_000 - 1}, "spans [0-9]+..[0-9]+, not 60 s"),
], ids=["open time off the second", "a 5-minute candle"])
async def test_a_candle_off_whole_seconds_or_of_another_length_is_refused_and_the_bars_before_it_are_kept(
        market: FakeMarket, clock: ManualClock, bend: Callable[[dict[str, Any]], dict[str, Any]],
        message: str) -> None:
    def bend_the_newest(request: web.Request, reply: Any) -> Any:
        return [*reply[:-1], bend(reply[-1])] if isinstance(reply, list) and reply else reply

    async with rewriting_fake("hyperliquid", market, bend_the_newest) as server:
        src = HyperliquidSource(server.url, FAST_RETRIES, clock)
        try:
            with pytest.raises(MalformedReplyError, match=message):  # a latest price comes from a clean reply only
                await src.latest("XAU")
            # In history it is dropped as a gap; the follow-up asking for it again fails, keeping every bar before it.
            with pytest.raises(PartialHistoryError, match=message) as failed:
                await src.history("XAU", T0 - 3600, T0)
        finally:
            await src.close()
    truth = market.bars("XAU", 60).between(T0 - 3600, T0).known_at(T0)
    assert len(truth) > 30 and failed.value.missing[0] == truth.ts[-1]
    assert isinstance(failed.value.cause, MalformedReplyError)
    np.testing.assert_array_equal(failed.value.partial.ts, truth.ts[:-1])
    np.testing.assert_allclose(failed.value.partial.close, truth.close[:-1], rtol=1e-12)


async def test_assets_without_a_coin(source: HyperliquidSource) -> None:
    with pytest.raises(UnsupportedAssetError):
        await source.history("BTC", T0 - 600, T0)


def test_a_candle_for_another_coin_or_interval_is_refused() -> None:
    """A reply mixing in another coin's or another interval's candles (a proxy or cache in between serving
    the wrong key) must not pass for this coin's prices: the candles say what they are, and it is checked."""
    t = 1_900_000_020 // 60 * 60 * 1000
    good = {"t": t, "T": t + 59_999, "s": "xyz:GOLD", "i": "1m", "c": "2650.5"}
    assert _parse_candles([good], "test", "xyz:GOLD", 60).all_or_raise() == ([t // 1000], [2650.5])
    for wrong in ({"s": "BTC"}, {"i": "5m"}):
        with pytest.raises(MalformedReplyError, match="is for"):
            _parse_candles([good | wrong], "test", "xyz:GOLD", 60).all_or_raise()

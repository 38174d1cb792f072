"""The local provider servers: exact wire formats, time shift, fault control over HTTP."""

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from core.assets import ASSETS
from core.constants import SECONDS_PER_DAY
from core.csv_history import read_csv
from core.fake_providers import ALIGN, FakeMarket, FakeServer, Faults, ManualClock, build_app
from core.market_calendar import BoolArray, in_regular_session, outside_gold_closures
from tests.provider_fixtures import T0, fake_provider_fixtures, write_held_in

csv_dir, clock, market, server = fake_provider_fixtures("all", ["btc", "xau"], days=3)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def test_the_shift_puts_the_newest_close_just_ahead_of_now(market: FakeMarket, csv_dir: Path) -> None:
    raw = read_csv(csv_dir / "btc_1m.csv.gz", 60)
    shifted = market.bars("BTC", 60)
    assert market.shift("BTC") % ALIGN == 0
    assert shifted.last_close_time is not None and T0 <= shifted.last_close_time < T0 + ALIGN
    np.testing.assert_array_equal(shifted.close, raw.close)
    assert market.assets() == ["BTC", "XAU"]


def test_lead_keeps_rows_for_later_and_the_shift_stays_fixed(csv_dir: Path, clock: ManualClock) -> None:
    market = FakeMarket(csv_dir, clock, lead_s=3600)
    from core.fake_providers import Faults

    seen = len(market.served("BTC", 60, 0, 2 ** 40, Faults()))
    shift = market.shift("BTC")
    clock.advance(600)
    assert len(market.served("BTC", 60, 0, 2 ** 40, Faults())) == seen + 10  # ten new minutes appeared
    assert market.shift("BTC") == shift


# Tuesday 2026-10-20, 12:00 UTC: the three weeks before it hold no NYSE holiday and no DST switch (as in
# tests/test_sources_replay.py: a whole-week shift cannot keep the session across one).
OCT_20 = 1_792_497_630


@pytest.mark.parametrize(("stem", "asset", "in_hours"), [("spy", "SPYX", in_regular_session),
                                                         ("xau", "XAU", outside_gold_closures)])
def test_a_file_with_market_hours_keeps_them_and_plays_its_last_week_as_the_clock_moves(
        tmp_path: Path, shared_data: Path, stem: str, asset: str, in_hours: Callable[[np.ndarray], BoolArray]) -> None:
    """Before the fix, a 5-minute shift moved equity session bars into the New York night (and gold's into its
    closures): the models' hours filter dropped them and every 24 h SPYX forecast and both XAU grids fell back
    to EWMA-t ("need 390 returns at 300s, history has 0")."""
    folder = write_held_in(tmp_path, shared_data, [stem], days=21, with_5m=True)
    clock = ManualClock(OCT_20)
    market = FakeMarket(folder, clock)
    file_bars = read_csv(folder / f"{stem}_5m.csv.gz", 300)
    served = market.served(asset, 300, 0, 2 ** 40, Faults())
    assert 0 < len(served) < len(file_bars)  # the file's tail past "now" is not served yet
    assert bool(in_hours(served.ts + 150).all())  # and every bar is still inside its market's hours
    minutes = market.served(asset, 60, 0, 2 ** 40, Faults())
    assert len(minutes) and bool(in_hours(minutes.ts + 30).all())
    newest = market.newest_closed(asset, Faults())
    assert newest is not None and newest[0] <= OCT_20
    clock.advance(7 * SECONDS_PER_DAY)  # a week on, the rest of the file has been played, each row once
    later = market.served(asset, 300, 0, 2 ** 40, Faults())
    np.testing.assert_array_equal(later.ts[:len(served)], served.ts)
    assert len(later) == len(file_bars) and len(np.unique(later.ts)) == len(later)


def test_a_lead_keeps_at_least_that_much_of_an_equity_file_for_later(tmp_path: Path, shared_data: Path) -> None:
    folder = write_held_in(tmp_path, shared_data, ["spy"], days=21)
    lead = 3 * SECONDS_PER_DAY
    market = FakeMarket(folder, ManualClock(OCT_20), lead_s=lead)
    bars = market.bars("SPYX", 60)
    assert bars.last_close_time is not None and bars.last_close_time >= OCT_20 + lead
    assert bool(in_regular_session(bars.ts + 30).all())


def test_a_short_equity_file_keeps_the_five_minute_shift(tmp_path: Path, shared_data: Path) -> None:
    """Under two weeks of rows (CALENDAR_MIN_SPAN_S), a whole-week shift could hide most of the file."""
    market = FakeMarket(write_held_in(tmp_path, shared_data, ["spy"], days=5), ManualClock(T0))
    end = market.bars("SPYX", 60).last_close_time
    assert end is not None and T0 <= end < T0 + ALIGN


async def test_binance_klines_wire_format(server: FakeServer, http: aiohttp.ClientSession,
                                          market: FakeMarket) -> None:
    start = (T0 - 600) // 60 * 60
    params = {"symbol": "BTCUSDT", "interval": "1m", "startTime": str(start * 1000),
              "endTime": str(T0 * 1000), "limit": "1000"}
    async with http.get(f"{server.url}/api/v3/klines", params=params) as resp:
        rows = await resp.json()
    assert resp.status == 200 and len(rows) == 11  # ten closed bars and the open one
    first = rows[0]
    assert len(first) == 12 and first[0] == start * 1000 and first[6] == start * 1000 + 59_999
    assert all(isinstance(first[i], str) for i in (1, 2, 3, 4, 5, 7, 9, 10))
    assert float(first[4]) == pytest.approx(float(market.bars("BTC", 60).between(start, start + 60).close[0]))
    async with http.get(f"{server.url}/api/v3/klines", params={**params, "limit": "1001"}) as resp:
        assert resp.status == 400 and (await resp.json())["code"] == -1130
    async with http.get(f"{server.url}/api/v3/klines", params={**params, "symbol": "NOPE"}) as resp:
        assert resp.status == 400 and (await resp.json()) == {"code": -1121, "msg": "Invalid symbol."}
    async with http.get(f"{server.url}/api/v3/ticker/price", params={"symbol": "BTCUSDT"}) as resp:
        ticker = await resp.json()
    assert ticker["symbol"] == "BTCUSDT" and float(ticker["price"]) > 0


async def test_hyperliquid_info_wire_format(server: FakeServer, http: aiohttp.ClientSession) -> None:
    start = (T0 - 300) // 60 * 60
    body = {"type": "candleSnapshot", "req": {"coin": "xyz:GOLD", "interval": "1m", "startTime": start * 1000,
                                              "endTime": T0 * 1000}}
    async with http.post(f"{server.url}/info", json=body) as resp:
        candles = await resp.json()
    assert candles and set(candles[0]) == {"t", "T", "s", "i", "o", "c", "h", "l", "v", "n"}
    assert candles[0]["s"] == "xyz:GOLD" and candles[0]["i"] == "1m"
    assert candles[0]["T"] == candles[0]["t"] + 59_999 and isinstance(candles[0]["c"], str)
    async with http.post(f"{server.url}/info", json={"type": "allMids"}) as resp:
        mids = await resp.json()
    assert set(mids) == {"xyz:GOLD"} and float(mids["xyz:GOLD"]) > 0
    async with http.post(f"{server.url}/info", json={"type": "nonsense"}) as resp:
        assert resp.status == 422


async def test_benchmarks_and_hermes_wire_format(server: FakeServer, http: aiohttp.ClientSession) -> None:
    params = {"symbol": ASSETS["BTC"].pyth_symbol or "", "resolution": "1", "from": str(T0 - 600), "to": str(T0)}
    async with http.get(f"{server.url}/v1/shims/tradingview/history", params=params) as resp:
        udf = await resp.json()
    assert udf["s"] == "ok" and {len(udf[k]) for k in "tohlcv"} == {len(udf["t"])}
    async with http.get(f"{server.url}/v1/shims/tradingview/history",
                        params={**params, "from": "1000", "to": "2000"}) as resp:
        assert await resp.json() == {"s": "no_data"}
    feed = ASSETS["BTC"].hermes_id or ""
    async with http.get(f"{server.url}/v2/updates/price/latest", params={"ids[]": feed}) as resp:
        reply = await resp.json()
    quote = reply["parsed"][0]["price"]
    assert reply["parsed"][0]["id"] == feed and quote["expo"] == -8
    assert isinstance(quote["price"], str) and int(quote["price"]) > 0 and quote["publish_time"] <= T0
    assert "ema_price" in reply["parsed"][0] and reply["binary"]["encoding"] == "hex"
    async with http.get(f"{server.url}/v2/updates/price/latest", params={"ids[]": "ab" * 32}) as resp:
        assert resp.status == 404


async def test_faults_are_set_and_reset_over_http(server: FakeServer, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{server.url}/_faults", json={"status": 503, "status_count": 1}) as resp:
        assert (await resp.json())["status"] == 503
    klines = f"{server.url}/api/v3/klines"
    async with http.get(klines, params={"symbol": "BTCUSDT", "interval": "1m", "limit": "2"}) as resp:
        assert resp.status == 503
    async with http.get(klines, params={"symbol": "BTCUSDT", "interval": "1m", "limit": "2"}) as resp:
        assert resp.status == 200  # the fault was for one request only
    async with http.post(f"{server.url}/_faults", json={"no_such_fault": 1}) as resp:
        assert resp.status == 400
    async with http.post(f"{server.url}/_faults", json={"truncate": True}) as resp:
        assert resp.status == 200
    async with http.get(klines, params={"symbol": "BTCUSDT", "interval": "1m", "limit": "2"}) as resp:
        with pytest.raises(json.JSONDecodeError):
            json.loads(await resp.text())
    async with http.post(f"{server.url}/_faults/reset") as resp:
        assert (await resp.json())["truncate"] is False
    async with http.get(f"{server.url}/_faults") as resp:
        assert (await resp.json())["requests"] == 0


def test_unknown_fake_provider(market: FakeMarket) -> None:
    with pytest.raises(ValueError, match="unknown fake provider"):
        build_app("coinbase", market)  # type: ignore[arg-type]


@pytest.mark.parametrize("provider", ["binance", "hyperliquid", "pyth"])
async def test_a_page_named_down_answers_503_and_the_others_are_served(
        server: FakeServer, clock: ManualClock, provider: str) -> None:
    """``down_from``: the history page starting at that second fails on every attempt, in each wire format."""
    from core.sources.base import ProviderError
    from core.sources.binance import BinanceSource
    from core.sources.hyperliquid import HyperliquidSource
    from core.sources.pyth import PythSource
    from tests.provider_fixtures import FAST_RETRIES

    src = {"binance": lambda: BinanceSource(server.url, FAST_RETRIES, clock),
           "hyperliquid": lambda: HyperliquidSource(server.url, FAST_RETRIES, clock),
           "pyth": lambda: PythSource(server.url, server.url, FAST_RETRIES, clock)}[provider]()
    asset = "XAU" if provider == "hyperliquid" else "BTC"  # Hyperliquid lists no BTC coin here
    start = T0 // 60 * 60 - 3600
    server.faults.set(down_from=(start,))
    try:
        with pytest.raises(ProviderError, match="503"):
            await src.history(asset, start, start + 1800)
        assert len(await src.history(asset, start + 60, start + 1800)) > 0  # another page: served
    finally:
        await src.close()

"""The local provider servers: exact wire formats, time shift, fault control over HTTP."""

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from core.assets import ASSETS
from core.csv_history import read_csv
from core.fake_providers import ALIGN, FakeMarket, FakeServer, ManualClock, build_app
from tests.provider_fixtures import T0, fake_provider_fixtures

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

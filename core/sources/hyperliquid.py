"""Hyperliquid ``POST {base}/info``: ``candleSnapshot`` history and the latest price.

Latest price: the newest *closed* 1-minute candle of a short ``candleSnapshot``. ``allMids`` has no
timestamp, so a frozen mid could not be told from a live one; the candle's close time (``T``) can be
checked against ``max_price_age_s``, and it is the very quantity the validators score. ``mids()``
still exposes ``allMids`` for a quick look at every coin.

Hyperliquid keeps only about 5000 candles per coin and interval: older ranges come back empty.
"""

import time
from typing import Any

from core.assets import ASSETS
from core.prices import LatestPrice, PriceHistory
from core.sources.http import (
    Clock,
    HttpClient,
    HttpConfig,
    MalformedReplyError,
    StalePriceError,
    UnsupportedAssetError,
    align_up,
    build_history,
    check_fresh,
    closed_end,
    fetch_range,
    gather_pages,
    page_ranges,
    parse_int,
    parse_price,
)

INTERVALS = {60: "1m", 300: "5m"}
PAGE_LIMIT = 5000  # candles per candleSnapshot reply
LATEST_LOOKBACK_S = 600  # the latest-price query asks for the last 10 minutes


class HyperliquidSource:
    name = "hyperliquid"

    def __init__(self, base_url: str, config: HttpConfig, clock: Clock = time.time,
                 http: HttpClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config
        self.clock = clock
        self.http = http or HttpClient(self.name, config)

    def coin(self, asset: str) -> str:
        spec = ASSETS.get(asset)
        if spec is None or spec.hyperliquid_coin is None:
            raise UnsupportedAssetError(f"hyperliquid: no coin for asset {asset!r}")
        return spec.hyperliquid_coin

    async def history(self, asset: str, start: int, end: int, step: int = 60) -> PriceHistory:
        coin = self.coin(asset)
        if step not in INTERVALS:
            raise UnsupportedAssetError(f"hyperliquid: no candle interval for step {step}")
        start, end = align_up(start, step), closed_end(end, step, self.clock())
        if start >= end:
            return PriceHistory.empty(step)

        async def page(a: int, b: int) -> PriceHistory:
            ts, close = await self._candles(coin, step, a, b)
            return build_history(f"hyperliquid candles {coin} [{a}, {b})", step, ts, close, a, b)

        ranges = page_ranges(start, end, PAGE_LIMIT * step)
        return await gather_pages((fetch_range(page, a, b, step) for a, b in ranges), step)

    async def _candles(self, coin: str, step: int, start: int, end: int) -> tuple[list[int], list[float]]:
        payload = {"type": "candleSnapshot",
                   "req": {"coin": coin, "interval": INTERVALS[step], "startTime": start * 1000,
                           "endTime": end * 1000 - 1}}
        reply = await self.http.post_json(f"{self.base_url}/info", payload)
        return _parse_candles(reply, f"hyperliquid candles {coin} [{start}, {end})", coin, step)

    async def latest(self, asset: str) -> LatestPrice:
        coin = self.coin(asset)
        now = self.clock()
        end = int(now) // 60 * 60 + 60
        ts, close = await self._candles(coin, 60, end - LATEST_LOOKBACK_S, end)
        what = f"hyperliquid latest {coin}"
        closed = [(t, c) for t, c in zip(ts, close) if t + 60 <= now]
        if not closed:
            raise StalePriceError(f"{what}: no closed candle in the last {LATEST_LOOKBACK_S} s")
        t, c = max(closed)
        return check_fresh(what, LatestPrice(price=c, publish_time=t + 60), now, self.config.max_price_age_s)

    async def mids(self) -> dict[str, float]:
        """``allMids``: coin -> mid price, every value checked."""
        reply = await self.http.post_json(f"{self.base_url}/info", {"type": "allMids"})
        if not isinstance(reply, dict):
            raise MalformedReplyError(f"hyperliquid allMids: expected an object, got {type(reply).__name__}")
        return {str(coin): parse_price(mid, f"hyperliquid allMids {coin}") for coin, mid in reply.items()}

    async def close(self) -> None:
        await self.http.close()


def _parse_candles(reply: Any, what: str, coin: str, step: int) -> tuple[list[int], list[float]]:
    if not isinstance(reply, list):
        raise MalformedReplyError(f"{what}: expected a list of candles, got {type(reply).__name__}")
    ts: list[int] = []
    close: list[float] = []
    for i, candle in enumerate(reply):
        if not isinstance(candle, dict) or "t" not in candle or "c" not in candle:
            raise MalformedReplyError(f"{what}: candle {i} lacks 't' or 'c': {candle!r:.80}")
        open_ms = parse_int(candle["t"], f"{what} candle {i} t")
        if open_ms % 1000:
            raise MalformedReplyError(f"{what}: candle {i} open time {open_ms} is not whole seconds")
        if "T" in candle and parse_int(candle["T"], f"{what} candle {i} T") != open_ms + step * 1000 - 1:
            raise MalformedReplyError(f"{what}: candle {i} spans {candle['t']}..{candle['T']}, not {step} s")
        if candle.get("s", coin) != coin or candle.get("i", INTERVALS[step]) != INTERVALS[step]:
            raise MalformedReplyError(f"{what}: candle {i} is for {candle.get('s')!r} {candle.get('i')!r}")
        ts.append(open_ms // 1000)
        close.append(parse_price(candle["c"], f"{what} candle {i} close"))
    return ts, close

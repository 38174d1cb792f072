"""Hyperliquid ``POST {base}/info``: ``candleSnapshot`` history and the latest price.

Latest price: the newest *closed* 1-minute candle of a short ``candleSnapshot``. ``allMids`` has no
timestamp, so a frozen mid could not be told from a live one; the candle's close time (``T``) can be
checked against ``max_price_age_s``, and it is the very quantity the validators score. ``mids()``
still exposes ``allMids`` for a quick look at every coin.

Hyperliquid keeps only about 5000 candles per coin and interval: older ranges come back empty.
"""

from typing import Any

from core.prices import LatestPrice, PriceHistory
from core.sources.http import (
    MalformedReplyError,
    PagedSource,
    Rows,
    StalePriceError,
    asset_code,
    build_history,
    newest_closed,
    parse_int,
    parse_price,
    parse_time,
)

INTERVALS = {60: "1m", 300: "5m"}
PAGE_LIMIT = 5000  # candles per candleSnapshot reply
LATEST_LOOKBACK_S = 600  # the latest-price query asks for the last 10 minutes
# ...and up to a day past now: a correct Hyperliquid has nothing there but its open candle, one whose clock runs
# ahead shows its newest candle, so the skew is seen and measured (``newest_closed``). Asked only up to now, a
# clock an hour ahead answered candles an hour old, taken for the newest ones.
LATEST_LOOKAHEAD_S = 86_400


class HyperliquidSource(PagedSource):
    name = "hyperliquid"
    intervals = INTERVALS
    interval_word = "candle interval"
    page_bars = PAGE_LIMIT
    kept_s = {step: PAGE_LIMIT * step for step in INTERVALS}  # the newest 5000 candles per interval: 3.5 / 17 days

    def coin(self, asset: str) -> str:
        return asset_code(asset, lambda spec: spec.hyperliquid_coin, "hyperliquid: no coin")

    def _code(self, asset: str) -> str:
        return self.coin(asset)

    async def _page(self, coin: str, step: int, start: int, end: int) -> PriceHistory:
        return build_history(step, await self._candles(coin, step, start, end), start, end)

    async def _candles(self, coin: str, step: int, start: int, end: int) -> Rows:
        payload = {"type": "candleSnapshot",
                   "req": {"coin": coin, "interval": INTERVALS[step], "startTime": start * 1000,
                           "endTime": end * 1000 - 1}}
        reply = await self.http.post_json(f"{self.base_url}/info", payload)
        return _parse_candles(reply, f"hyperliquid candles {coin} [{start}, {end})", coin, step)

    async def latest(self, asset: str) -> LatestPrice:
        coin = self.coin(asset)
        now = self.clock()
        end = int(now) // 60 * 60 + 60
        ts, close = (await self._candles(coin, 60, end - LATEST_LOOKBACK_S, end + LATEST_LOOKAHEAD_S)).all_or_raise()
        what = f"hyperliquid latest {coin}"
        return newest_closed(what, ts, close, now, self.config.max_price_age_s,
                             StalePriceError(f"{what}: no closed candle in the last {LATEST_LOOKBACK_S} s"))

    async def mids(self) -> dict[str, float]:
        """``allMids``: coin -> mid price, every value checked."""
        reply = await self.http.post_json(f"{self.base_url}/info", {"type": "allMids"})
        if not isinstance(reply, dict):
            raise MalformedReplyError(f"hyperliquid allMids: expected an object, got {type(reply).__name__}")
        return {str(coin): parse_price(mid, f"hyperliquid allMids {coin}") for coin, mid in reply.items()}


def _parse_candles(reply: Any, what: str, coin: str, step: int) -> Rows:
    if not isinstance(reply, list):
        raise MalformedReplyError(f"{what}: expected a list of candles, got {type(reply).__name__}")
    rows = Rows(what)
    for i, candle in enumerate(reply):
        rows.read(_candle, candle, f"{what} candle {i}", coin, step)
    return rows


def _candle(candle: Any, what: str, coin: str, step: int) -> tuple[int, float]:
    if not isinstance(candle, dict) or "t" not in candle or "c" not in candle:
        raise MalformedReplyError(f"{what} lacks 't' or 'c': {candle!r:.80}")
    open_ms = parse_time(candle["t"], f"{what} t")
    if open_ms % 1000:
        raise MalformedReplyError(f"{what} open time {open_ms} is not whole seconds")
    if "T" in candle and parse_int(candle["T"], f"{what} T") != open_ms + step * 1000 - 1:
        raise MalformedReplyError(f"{what} spans {candle['t']}..{candle['T']}, not {step} s")
    if candle.get("s", coin) != coin or candle.get("i", INTERVALS[step]) != INTERVALS[step]:
        raise MalformedReplyError(f"{what} is for {candle.get('s')!r} {candle.get('i')!r}")
    return open_ms // 1000, parse_price(candle["c"], f"{what} close")

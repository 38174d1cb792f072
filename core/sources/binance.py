"""Binance spot klines: ``GET {base}/api/v3/klines`` (1-minute history and the latest price).

Latest price: the newest *closed* 1-minute kline, read from the same klines endpoint. Its close is
what the validators score against and its close time is an exchange timestamp we can check for
staleness; ``/api/v3/ticker/price`` carries no timestamp at all, so it cannot be checked.
"""

from typing import Any

from core.prices import LatestPrice, PriceHistory
from core.sources.http import (
    MalformedReplyError,
    PagedSource,
    Rows,
    asset_code,
    build_history,
    newest_closed,
    parse_price,
    parse_time,
)

INTERVALS = {60: "1m", 300: "5m"}
PAGE_LIMIT = 1000  # Binance's maximum ``limit`` for klines
# The open kline, the one just closed, and one more: with our clock a little behind Binance's right
# after a minute boundary, the kline Binance calls closed is still open to us, so the one before it is used.
LATEST_LIMIT = 3


class BinanceSource(PagedSource):
    name = "binance"
    intervals = INTERVALS
    interval_word = "kline interval"
    page_bars = PAGE_LIMIT

    def symbol(self, asset: str) -> str:
        return asset_code(asset, lambda spec: spec.binance_symbol, "binance: no symbol")

    def _code(self, asset: str) -> str:
        return self.symbol(asset)

    async def _page(self, symbol: str, step: int, start: int, end: int) -> PriceHistory:
        params = [("symbol", symbol), ("interval", INTERVALS[step]), ("startTime", str(start * 1000)),
                  ("endTime", str(end * 1000 - 1)), ("limit", str(PAGE_LIMIT))]
        rows = await self.http.get_json(f"{self.base_url}/api/v3/klines", params)
        return build_history(step, _parse_klines(rows, f"binance klines {symbol} [{start}, {end})", step), start, end)

    async def latest(self, asset: str) -> LatestPrice:
        symbol = self.symbol(asset)
        params = [("symbol", symbol), ("interval", "1m"), ("limit", str(LATEST_LIMIT))]
        rows = await self.http.get_json(f"{self.base_url}/api/v3/klines", params)
        what = f"binance latest {symbol}"
        ts, close = _parse_klines(rows, what, 60).all_or_raise()
        return newest_closed(what, ts, close, self.clock(), self.config.max_price_age_s,
                             MalformedReplyError(f"{what}: no closed 1-minute kline in the reply"))


def _parse_klines(reply: Any, what: str, step: int) -> Rows:
    """Open time (field 0, ms) and close (field 4, decimal string) of each kline row."""
    if not isinstance(reply, list):
        raise MalformedReplyError(f"{what}: expected a list of klines, got {type(reply).__name__}")
    rows = Rows(what)
    for i, row in enumerate(reply):
        rows.read(_kline, row, f"{what} row {i}", step)
    return rows


def _kline(row: Any, what: str, step: int) -> tuple[int, float]:
    if not isinstance(row, list) or len(row) < 7:
        raise MalformedReplyError(f"{what} is not a kline array of 12 fields: {row!r:.80}")
    open_ms = parse_time(row[0], f"{what} open time")
    close_ms = parse_time(row[6], f"{what} close time")
    if open_ms % 1000 or close_ms != open_ms + step * 1000 - 1:
        raise MalformedReplyError(f"{what} times {open_ms}..{close_ms} are not one {step} s kline")
    return open_ms // 1000, parse_price(row[4], f"{what} close")

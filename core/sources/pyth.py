"""Pyth: history from Benchmarks (TradingView UDF shim), the latest price from Hermes.

Hermes serves only current prices, so every history request goes to Benchmarks
``GET {benchmarks}/v1/shims/tradingview/history``; ``latest`` reads
``GET {hermes}/v2/updates/price/latest?ids[]=<feed id>`` (price = price x 10^expo).
"""

import math
import time
from typing import Any

from core.prices import LatestPrice, PriceHistory
from core.sources.http import (
    Clock,
    HttpClient,
    HttpConfig,
    MalformedReplyError,
    PagedSource,
    ProviderRejected,
    Rows,
    asset_code,
    build_history,
    check_fresh,
    parse_int,
    parse_price,
    parse_time,
    scaled,
)

RESOLUTIONS = {60: "1", 300: "5"}
PAGE_BARS = 1440  # one day of minutes per Benchmarks call keeps each reply small


class PythSource(PagedSource):
    name = "pyth"
    intervals = RESOLUTIONS
    interval_word = "Benchmarks resolution"

    def __init__(self, benchmarks_url: str, hermes_url: str, config: HttpConfig, clock: Clock = time.time,
                 http: HttpClient | None = None, page_bars: int = PAGE_BARS) -> None:
        if page_bars < 1:
            raise ValueError("page_bars must be >= 1")
        super().__init__(benchmarks_url, config, clock, http)  # history comes from Benchmarks
        self.benchmarks_url = self.base_url
        self.hermes_url = hermes_url.rstrip("/")
        self.page_bars = page_bars

    @staticmethod
    def symbol(asset: str) -> str:
        return asset_code(asset, lambda spec: spec.pyth_symbol, "pyth: no Benchmarks symbol")

    @staticmethod
    def feed_id(asset: str) -> str:
        return asset_code(asset, lambda spec: spec.hermes_id, "pyth: no Hermes feed id")

    def _code(self, asset: str) -> str:
        return self.symbol(asset)

    async def _page(self, symbol: str, step: int, start: int, end: int) -> PriceHistory:
        # UDF ranges include ``to``: ask up to the last second before ``end``.
        params = [("symbol", symbol), ("resolution", RESOLUTIONS[step]), ("from", str(start)), ("to", str(end - 1))]
        reply = await self.http.get_json(f"{self.benchmarks_url}/v1/shims/tradingview/history", params)
        return build_history(step, _parse_udf(reply, f"pyth benchmarks {symbol} [{start}, {end})"), start, end)

    async def latest(self, asset: str) -> LatestPrice:
        feed = self.feed_id(asset)
        reply = await self.http.get_json(f"{self.hermes_url}/v2/updates/price/latest", [("ids[]", feed)])
        what = f"pyth hermes {asset} ({feed[:8]})"
        price = _parse_hermes(reply, what, feed)
        return check_fresh(what, price, self.clock(), self.config.max_price_age_s)


def _parse_udf(reply: Any, what: str) -> Rows:
    if not isinstance(reply, dict) or not isinstance(reply.get("s"), str):
        raise MalformedReplyError(f"{what}: expected a UDF object with a status 's', got {reply!r:.80}")
    status = reply["s"]
    if status == "no_data":
        return Rows(what)
    if status == "error":
        raise ProviderRejected(f"{what}: {reply.get('errmsg', 'error without a message')}")
    if status != "ok":
        raise MalformedReplyError(f"{what}: unknown UDF status {status!r}")
    # Only ``t`` and ``c`` are read, as by the validator: a null or short o/h/l/v must not cost the page.
    if "t" not in reply or "c" not in reply:
        raise MalformedReplyError(f"{what}: UDF reply lacks 't' or 'c'")
    times, closes = reply["t"], reply["c"]
    if not isinstance(times, list) or not isinstance(closes, list):
        raise MalformedReplyError(f"{what}: UDF fields 't' and 'c' must be arrays")
    if len(times) != len(closes):
        raise MalformedReplyError(f"{what}: mismatched UDF array lengths t={len(times)} c={len(closes)}")
    rows = Rows(what)
    for i, (t, c) in enumerate(zip(times, closes, strict=True)):
        rows.read(_udf_row, t, c, what, i)
    return rows


def _udf_row(t: object, c: object, what: str, i: int) -> tuple[int, float]:
    return parse_time(t, f"{what} t[{i}]"), parse_price(c, f"{what} c[{i}]")


def _parse_hermes(reply: Any, what: str, feed: str) -> LatestPrice:
    parsed = reply.get("parsed") if isinstance(reply, dict) else None
    if not isinstance(parsed, list):
        raise MalformedReplyError(f"{what}: expected an object with a 'parsed' list, got {reply!r:.80}")
    entry = next((e for e in parsed if isinstance(e, dict) and _same_id(e.get("id"), feed)), None)
    if entry is None:
        raise MalformedReplyError(f"{what}: feed {feed} is not in the reply")
    quote = entry.get("price")
    if not isinstance(quote, dict) or not {"price", "expo", "publish_time"} <= quote.keys():
        raise MalformedReplyError(f"{what}: 'price' lacks price/expo/publish_time: {quote!r:.80}")
    expo = parse_int(quote["expo"], f"{what} expo")
    if not -30 <= expo <= 10:
        raise MalformedReplyError(f"{what}: exponent {expo} out of range")
    mantissa = parse_int(quote["price"], f"{what} price")
    price = parse_price(scaled(mantissa, expo, f"{what} price"), f"{what} price")
    confidence: float | None = None
    if "conf" in quote:
        confidence = scaled(parse_int(quote["conf"], f"{what} conf"), expo, f"{what} conf")
        if not math.isfinite(confidence) or confidence < 0:
            raise MalformedReplyError(f"{what}: confidence {quote['conf']!r} is negative")
    publish_time = parse_time(quote["publish_time"], f"{what} publish_time")
    return LatestPrice(price=price, publish_time=publish_time, confidence=confidence)


def _same_id(value: object, feed: str) -> bool:
    return isinstance(value, str) and value.lower().removeprefix("0x") == feed.lower().removeprefix("0x")

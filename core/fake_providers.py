"""Local stand-ins for the price providers: aiohttp apps that speak each provider's exact wire format.

They serve a CSV folder (the ../shared/data format) shifted in time so its newest row lands at "now"
(plus ``lead_s``: rows past "now" appear as the clock moves on, like a live feed). The shift is fixed
per asset on first request, so the served history never slides under a client between two calls.
Files that keep market hours (equities, gold) are shifted by whole New York weeks instead, as
``core.sources.replay`` does: their newest row then lands up to a week past "now" + ``lead_s``.

Faults are a mutable ``Faults`` object per app, changed directly by tests or over HTTP with
``POST /_faults`` (JSON body) and ``POST /_faults/reset``; ``GET /_faults`` shows them.
"""

import asyncio
import dataclasses
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import orjson
from aiohttp import web

from core.assets import ASSETS
from core.csv_history import find_file, load_asset
from core.prices import PriceHistory
from core.sources.http import Clock
from core.sources.replay import market_hours_shift

FakeProvider = Literal["binance", "hyperliquid", "pyth", "all"]
FAKE_PROVIDERS: tuple[FakeProvider, ...] = ("binance", "hyperliquid", "pyth", "all")
ALIGN = 300  # shift by whole 5-minute bars so 1m and 5m rows stay on their grids
BINANCE_MAX_LIMIT = 1000
HYPERLIQUID_MAX_CANDLES = 5000  # per reply, and the history Hyperliquid keeps per coin and interval
KLINE_INTERVALS = {"1m": 60, "5m": 300}
UDF_RESOLUTIONS = {"1": 60, "5": 300}


class FakeDataError(LookupError):
    """The folder has no file for the asset asked for."""


@dataclass
class Faults:
    """What the fake does wrong; every field at its default means a healthy provider."""

    latency_s: float = 0.0  # sleep before answering (beyond the client's timeout = a timeout)
    status: int | None = None  # answer this HTTP status instead of data (429, 500, 503...)
    status_count: int | None = None  # how many requests get ``status``; None = all of them
    retry_after_s: float | None = None  # Retry-After header sent with ``status``
    truncate: bool = False  # cut the JSON body in half
    malformed: bool = False  # valid JSON of the wrong shape
    mismatched: bool = False  # arrays of different lengths / a short row / a candle without a close
    missing_every: int = 0  # drop bars whose index (ts // step) is a multiple of this: missing candles
    bad_price: float | None = None  # the newest bar of each reply (and the latest price) gets this price
    zero_at: tuple[int, ...] = ()  # history bars at these unix seconds close at 0 in every reply: a print kept bad
    spike_every: int = 0  # bars whose index (ts // step) is a multiple of this are served x100: a wrong exponent
    stale_s: float = 0.0  # the feed lags: nothing newer than now - stale_s is served
    page_cap: int | None = None  # answer at most this many bars per call (a server capping below its docs)
    down_from: tuple[int, ...] = ()  # history pages starting at these unix seconds answer 503, every time
    requests: int = 0  # data requests seen (a counter, not a fault)

    def set(self, **changes: Any) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown faults {unknown}; known: {sorted(names)}")
        for name, value in changes.items():
            setattr(self, name, value)

    def reset(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, f.default)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ManualClock:
    """A clock tests move by hand; shared by a fake market and the clients reading it."""

    def __init__(self, t: float) -> None:
        self.t = float(t)

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakeMarket:
    """CSV history per asset, shifted so its newest close lands at now + ``lead_s`` (up to 5 min later).

    A file with market hours spanning ``CALENDAR_MIN_SPAN_S`` or more (``market_hours_shift``) is shifted by
    whole New York weeks so its sessions stay sessions: its newest close lands at or after now + ``lead_s``,
    up to a week later; the rows past now appear as the clock reaches them.
    """

    def __init__(self, folder: Path, clock: Clock = time.time, lead_s: int = 0) -> None:
        if not folder.is_dir():
            raise FakeDataError(f"fake market folder {folder} does not exist")
        self.folder = folder
        self.clock = clock
        self.lead_s = lead_s
        self._files: dict[str, tuple[PriceHistory | None, PriceHistory | None]] = {}
        self._shift: dict[str, int] = {}
        self._bars: dict[tuple[str, int], PriceHistory] = {}

    def assets(self) -> list[str]:
        return [a for a in ASSETS if find_file(self.folder, a, 60) or find_file(self.folder, a, 300)]

    def has(self, asset: str) -> bool:
        return asset in ASSETS and (find_file(self.folder, asset, 60) or find_file(self.folder, asset, 300)) is not None

    def _load(self, asset: str) -> tuple[PriceHistory | None, PriceHistory | None]:
        if asset not in self._files:
            m1, m5 = load_asset(self.folder, asset)
            if m1 is None and m5 is None:
                raise FakeDataError(f"no CSV for {asset} in {self.folder}")
            self._files[asset] = (m1, m5)
        return self._files[asset]

    def shift(self, asset: str) -> int:
        """Seconds added to file times; the 1-minute file's end decides (it is what live feeds serve)."""
        if asset not in self._shift:
            m1, m5 = self._load(asset)
            end = next((h.last_close_time for h in (m1, m5) if h is not None and h.last_close_time is not None),
                       None)
            if end is None:  # empty files: nothing to serve, nothing to shift
                self._shift[asset] = 0
                return 0
            start = min(int(h.ts[0]) for h in (m1, m5) if h is not None and len(h))
            target = int(self.clock()) + self.lead_s
            # A 5-minute shift moved equity session bars into the New York night (and gold's into its
            # closures), where the models' hours filter dropped them all: every forecast fell back to EWMA-t.
            calendar = market_hours_shift(asset, start, end, target)
            # Else round up: the newest close lands in the coming 5 minutes, so the feed starts fresh.
            self._shift[asset] = calendar if calendar is not None else -(-(target - end) // ALIGN) * ALIGN
        return self._shift[asset]

    def bars(self, asset: str, step: int) -> PriceHistory:
        """The whole shifted history at ``step`` (5-minute bars resampled from 1m when no 5m file)."""
        key = (asset, step)
        if key not in self._bars:
            m1, m5 = self._load(asset)
            native = m1 if step == 60 else m5
            if native is None and step == 300 and m1 is not None:
                native = m1.resample(300, complete=False)
            if native is None:
                native = PriceHistory.empty(step)
            self._bars[key] = PriceHistory(step, native.ts + np.int64(self.shift(asset)), native.close)
        return self._bars[key]

    def served(self, asset: str, step: int, start: int, end: int, faults: Faults) -> PriceHistory:
        """Bars start <= ts < end that exist by now: the current, still open bar included (as exchanges do)."""
        now = int(self.clock() - faults.stale_s)
        hist = self.bars(asset, step).between(start, min(end, now + 1))
        if faults.missing_every > 0 and len(hist):
            keep = (hist.ts // step) % faults.missing_every != 0
            hist = PriceHistory(step, hist.ts[keep], hist.close[keep])
        if faults.spike_every > 0 and len(hist):
            spiked = (hist.ts // step) % faults.spike_every == 0
            hist = PriceHistory(step, hist.ts, np.where(spiked, hist.close * 100.0, hist.close))
        return hist

    def newest_closed(self, asset: str, faults: Faults) -> tuple[int, float] | None:
        """(close time, price) of the newest closed bar of either file, as of now - stale."""
        now = int(self.clock() - faults.stale_s)
        found = []
        for step in (60, 300):
            hist = self.bars(asset, step).known_at(now)
            if len(hist) and hist.last_close_time is not None:
                found.append((hist.last_close_time, float(hist.close[-1])))
        return max(found) if found else None


FAULTS_KEY = web.AppKey("faults", Faults)
MARKET_KEY = web.AppKey("market", FakeMarket)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bad(price: float, faults: Faults, newest: bool, ts: int | None = None) -> float:
    if ts is not None and ts in faults.zero_at:
        return 0.0
    return faults.bad_price if newest and faults.bad_price is not None else price


def _json(payload: Any, faults: Faults, status: int = 200) -> web.Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    if faults.truncate:
        body = body[: len(body) // 2]
    return web.Response(body=body, status=status, content_type="application/json")


def _dec(x: float) -> str:
    """Decimal string the way exchanges send prices; non-finite values pass through (fault injection)."""
    return f"{x:.8f}" if math.isfinite(x) else str(x)


@web.middleware
async def _fault_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/_faults"):
        return await handler(request)
    faults = request.app[FAULTS_KEY]
    faults.requests += 1
    if faults.latency_s > 0:
        await asyncio.sleep(faults.latency_s)
    if faults.status is not None and (faults.status_count is None or faults.status_count > 0):
        if faults.status_count is not None:
            faults.status_count -= 1
        headers = {"Retry-After": f"{faults.retry_after_s:g}"} if faults.retry_after_s is not None else None
        return web.Response(status=faults.status, text=f"fake provider: injected HTTP {faults.status}",
                            headers=headers)
    return await handler(request)


def _page_down(faults: Faults, start_s: int) -> web.Response | None:
    """The 503 a history page starting at ``start_s`` gets while ``down_from`` names it."""
    return web.Response(status=503, text="fake: this page is down") if start_s in faults.down_from else None


def _int_param(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"parameter {name}={raw!r} is not an integer") from None


# --- Binance -----------------------------------------------------------------------------------------
def _binance_error(code: int, msg: str, status: int = 400) -> web.Response:
    return web.Response(body=orjson.dumps({"code": code, "msg": msg}), status=status, content_type="application/json")


async def _binance_klines(request: web.Request) -> web.Response:
    faults, market = request.app[FAULTS_KEY], request.app[MARKET_KEY]
    by_symbol = {s.binance_symbol: s.name for s in ASSETS.values() if s.binance_symbol}
    asset = by_symbol.get(request.query.get("symbol", ""))
    if asset is None:
        return _binance_error(-1121, "Invalid symbol.")
    step = KLINE_INTERVALS.get(request.query.get("interval", ""))
    if step is None:
        return _binance_error(-1120, "Invalid interval.")
    limit = _int_param(request, "limit") or 500
    if not 1 <= limit <= BINANCE_MAX_LIMIT:
        return _binance_error(-1130, "Data sent for parameter 'limit' is not valid.")
    if faults.page_cap is not None:
        limit = min(limit, faults.page_cap)
    start_ms, end_ms = _int_param(request, "startTime"), _int_param(request, "endTime")
    if start_ms is not None and (down := _page_down(faults, start_ms // 1000)):
        return down
    if faults.malformed:
        return _json({"code": 0, "msg": "fake: not a list of klines"}, faults)
    if not market.has(asset):
        return _json([], faults)
    lo = -(-start_ms // 1000) if start_ms is not None else 0
    hi = end_ms // 1000 + 1 if end_ms is not None else 2 ** 62
    hist = market.served(asset, step, lo, hi, faults)
    # With a start time Binance pages forward from it; without one it returns the newest rows.
    hist = PriceHistory(step, hist.ts[:limit], hist.close[:limit]) if start_ms is not None else PriceHistory(
        step, hist.ts[-limit:], hist.close[-limit:])
    rows: list[list[Any]] = []
    prev = float(hist.close[0]) if len(hist) else 0.0
    for i, (t, c) in enumerate(zip(hist.ts.tolist(), hist.close.tolist())):
        c = _bad(c, faults, i == len(hist) - 1, t)
        o = prev
        rows.append([t * 1000, _dec(o), _dec(max(o, c)), _dec(min(o, c)), _dec(c), "0.00000000",
                     t * 1000 + step * 1000 - 1, "0.00000000", 0, "0.00000000", "0.00000000", "0"])
        prev = c
    if faults.mismatched and rows:
        rows[-1] = rows[-1][:5]
    return _json(rows, faults)


async def _binance_ticker(request: web.Request) -> web.Response:
    faults, market = request.app[FAULTS_KEY], request.app[MARKET_KEY]
    by_symbol = {s.binance_symbol: s.name for s in ASSETS.values() if s.binance_symbol}
    symbol = request.query.get("symbol", "")
    asset = by_symbol.get(symbol)
    if asset is None or not market.has(asset):
        return _binance_error(-1121, "Invalid symbol.")
    newest = market.newest_closed(asset, faults)
    if newest is None:
        return _binance_error(-1121, "Invalid symbol.")
    return _json({"symbol": symbol, "price": _dec(_bad(newest[1], faults, True))}, faults)


# --- Hyperliquid ---------------------------------------------------------------------------------------
def _hl_bad_request() -> web.Response:
    return web.Response(status=422, text="Failed to deserialize the JSON body into the target type")


async def _hyperliquid_info(request: web.Request) -> web.Response:
    faults, market = request.app[FAULTS_KEY], request.app[MARKET_KEY]
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _hl_bad_request()
    kind = body.get("type") if isinstance(body, dict) else None
    by_coin = {s.hyperliquid_coin: s.name for s in ASSETS.values() if s.hyperliquid_coin}
    if kind == "allMids":
        if faults.malformed:
            return _json(["fake", "not an object"], faults)
        mids = {}
        for coin, asset in by_coin.items():
            newest = market.newest_closed(asset, faults) if market.has(asset) else None
            if newest is not None:
                mids[coin] = str(_bad(newest[1], faults, True))
        return _json(mids, faults)
    if kind != "candleSnapshot" or not isinstance(body.get("req"), dict):
        return _hl_bad_request()
    req = body["req"]
    step = KLINE_INTERVALS.get(str(req.get("interval")))
    coin = req.get("coin")
    if step is None or not isinstance(req.get("startTime"), int) or not isinstance(coin, str):
        return _hl_bad_request()
    if down := _page_down(faults, int(req["startTime"]) // 1000):
        return down
    if faults.malformed:
        return _json({"candles": "fake: not a list"}, faults)
    hl_asset = by_coin.get(coin)
    if hl_asset is None or not market.has(hl_asset):
        return _json([], faults)
    asset = hl_asset
    end_ms = req.get("endTime") if isinstance(req.get("endTime"), int) else 2 ** 62
    # Hyperliquid keeps only its newest 5000 candles; a reply holds at most 5000 of them.
    kept_from = int(market.clock()) // step * step - (HYPERLIQUID_MAX_CANDLES - 1) * step
    lo = max(-(-int(req["startTime"]) // 1000), kept_from)
    hist = market.served(asset, step, lo, int(end_ms) // 1000 + 1, faults)
    cap = min(HYPERLIQUID_MAX_CANDLES, faults.page_cap or HYPERLIQUID_MAX_CANDLES)
    hist = PriceHistory(step, hist.ts[:cap], hist.close[:cap])
    candles: list[dict[str, Any]] = []
    prev = float(hist.close[0]) if len(hist) else 0.0
    for i, (t, c) in enumerate(zip(hist.ts.tolist(), hist.close.tolist())):
        c = _bad(c, faults, i == len(hist) - 1, t)
        candles.append({"t": t * 1000, "T": t * 1000 + step * 1000 - 1, "s": coin, "i": req["interval"],
                        "o": str(prev), "c": str(c), "h": str(max(prev, c)), "l": str(min(prev, c)),
                        "v": "0.0", "n": 0})
        prev = c
    if faults.mismatched and candles:
        del candles[-1]["c"]
    return _json(candles, faults)


# --- Pyth Benchmarks (TradingView shim) and Hermes ----------------------------------------------------------
async def _benchmarks_history(request: web.Request) -> web.Response:
    faults, market = request.app[FAULTS_KEY], request.app[MARKET_KEY]
    by_symbol = {s.pyth_symbol: s.name for s in ASSETS.values() if s.pyth_symbol}
    asset = by_symbol.get(request.query.get("symbol", ""))
    step = UDF_RESOLUTIONS.get(request.query.get("resolution", ""))
    start, end = _int_param(request, "from"), _int_param(request, "to")
    if asset is None:
        return _json({"s": "error", "errmsg": f"Symbol {request.query.get('symbol')!r} not found"}, faults)
    if step is None or start is None or end is None:
        return _json({"s": "error", "errmsg": "resolution, from and to are required"}, faults)
    if down := _page_down(faults, start):
        return down
    if faults.malformed:
        return _json({"s": "ok", "t": "fake: not an array"}, faults)
    hist = market.served(asset, step, start, end + 1, faults) if market.has(asset) else PriceHistory.empty(step)
    if faults.page_cap is not None:
        hist = PriceHistory(step, hist.ts[: faults.page_cap], hist.close[: faults.page_cap])
    if not len(hist):
        return _json({"s": "no_data"}, faults)
    close = [_bad(c, faults, i == len(hist) - 1, t) for i, (t, c) in enumerate(zip(hist.ts.tolist(),
                                                                                 hist.close.tolist()))]
    opens = [close[0], *close[:-1]]
    reply = {"s": "ok", "t": hist.ts.tolist(), "o": opens, "h": [max(o, c) for o, c in zip(opens, close)],
             "l": [min(o, c) for o, c in zip(opens, close)], "c": close, "v": [0.0] * len(close)}
    if faults.mismatched:
        reply["c"] = close[:-1]
    return _json(reply, faults)


async def _hermes_latest(request: web.Request) -> web.Response:
    faults, market = request.app[FAULTS_KEY], request.app[MARKET_KEY]
    by_id = {s.hermes_id: s.name for s in ASSETS.values() if s.hermes_id}
    ids = [i.lower().removeprefix("0x") for i in request.query.getall("ids[]", [])]
    if not ids:
        return web.Response(status=400, text="Missing query parameter ids[]")
    found = {i: market.newest_closed(by_id[i], faults) for i in ids if i in by_id and market.has(by_id[i])}
    missing = [i for i in ids if found.get(i) is None]
    if missing:
        return web.Response(status=404, text=f"Price ids not found: {', '.join(missing)}")
    if faults.malformed:
        return _json({"parsed": {"id": ids[0]}}, faults)
    parsed = []
    for feed, newest in found.items():
        assert newest is not None
        publish_time, price = newest
        price = _bad(price, faults, True)
        mantissa = str(round(price * 1e8)) if math.isfinite(price) else "NaN"
        quote = {"price": mantissa, "conf": str(max(1, round(abs(price) * 1e8 * 1e-4))) if math.isfinite(price)
                 else "0", "expo": -8, "publish_time": publish_time}
        if faults.mismatched:
            del quote["expo"]
        parsed.append({"id": feed, "price": quote, "ema_price": dict(quote),
                       "metadata": {"slot": publish_time * 3, "proof_available_time": publish_time + 1,
                                    "prev_publish_time": publish_time - 1}})
    return _json({"binary": {"encoding": "hex", "data": ["504e4155" + "00" * 16]}, "parsed": parsed}, faults)


# --- admin ---------------------------------------------------------------------------------------------
async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[FAULTS_KEY].as_dict())


async def _set_faults(request: web.Request) -> web.Response:
    try:
        changes = orjson.loads(await request.read())
        if not isinstance(changes, dict):
            raise TypeError("expected a JSON object of fault fields")
        request.app[FAULTS_KEY].set(**changes)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        return web.Response(status=400, text=str(exc))
    return web.json_response(request.app[FAULTS_KEY].as_dict())


async def _reset_faults(request: web.Request) -> web.Response:
    request.app[FAULTS_KEY].reset()
    return web.json_response(request.app[FAULTS_KEY].as_dict())


def build_app(provider: FakeProvider, market: FakeMarket, faults: Faults | None = None) -> web.Application:
    """The fake for one provider ("pyth" = Benchmarks and Hermes), or "all" of them on one port."""
    if provider not in FAKE_PROVIDERS:
        raise ValueError(f"unknown fake provider {provider!r}; known: {', '.join(FAKE_PROVIDERS)}")
    app = web.Application(middlewares=[_fault_middleware])
    app[FAULTS_KEY] = faults or Faults()
    app[MARKET_KEY] = market
    if provider in ("binance", "all"):
        app.router.add_get("/api/v3/klines", _binance_klines)
        app.router.add_get("/api/v3/ticker/price", _binance_ticker)
    if provider in ("hyperliquid", "all"):
        app.router.add_post("/info", _hyperliquid_info)
    if provider in ("pyth", "all"):
        app.router.add_get("/v1/shims/tradingview/history", _benchmarks_history)
        app.router.add_get("/v2/updates/price/latest", _hermes_latest)
    app.router.add_get("/_faults", _get_faults)
    app.router.add_post("/_faults", _set_faults)
    app.router.add_post("/_faults/reset", _reset_faults)
    return app


@dataclass
class FakeServer:
    runner: web.AppRunner
    url: str
    faults: Faults

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_fake(provider: FakeProvider, market: FakeMarket, host: str = "127.0.0.1", port: int = 0,
                     faults: Faults | None = None) -> FakeServer:
    """Serve a fake on ``host:port`` (0 = a free port) in the running event loop."""
    app = build_app(provider, market, faults)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0]
    return FakeServer(runner, f"http://{host}:{bound[1]}", app[FAULTS_KEY])


class FakeServerThread:
    """A fake served from its own thread and event loop, for synchronous callers (CLI runs, sync wrappers)."""

    def __init__(self, provider: FakeProvider, market: FakeMarket, host: str = "127.0.0.1", port: int = 0,
                 faults: Faults | None = None) -> None:
        self._args = (provider, market, host, port, faults)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fake-{provider}", daemon=True)
        self._server: FakeServer | None = None
        self._error: Exception | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(start_fake(*self._args))
        except Exception as exc:  # noqa: BLE001 - any start failure is re-raised in the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._server.stop())
        self._loop.close()

    def start(self, timeout_s: float = 10.0) -> Self:
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError("fake provider did not start")
        if self._error is not None:
            raise self._error
        return self

    @property
    def server(self) -> FakeServer:
        if self._server is None:
            raise RuntimeError("fake provider not started")
        return self._server

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def faults(self) -> Faults:
        return self.server.faults

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

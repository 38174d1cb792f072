"""HTTP plumbing shared by the provider clients: one session, per-host limits, retries, strict errors.

Every way a provider can hand us a wrong price ends in a subclass of ``ProviderError``: a client
either returns history and prices it has checked, or raises. Nothing is silently repaired: a few
unusable rows in a history page are dropped as gaps, and logged (``build_history``).
"""

import asyncio
import datetime
import email.utils
import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec

import aiohttp
import numpy as np
import orjson
from yarl import URL

from core.assets import ASSETS, AssetSpec
from core.constants import BAR_CLOSE_GRACE_S, MAX_REPLY_BYTES, PROVIDER_CLOCK_AHEAD_TOLERANCE_S
from core.prices import MAX_EPOCH_S, LatestPrice, PriceDataError, PriceHistory
from core.settings import Settings
from core.sources.base import ProviderError
from core.sources.holds import HostHolds, LocalHostHolds

log = logging.getLogger(__name__)

Clock = Callable[[], float]
_P = ParamSpec("_P")
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32, about 1.2e-38
FLOAT32_MAX = float(np.finfo(np.float32).max)  # about 3.4e38


# --- typed errors ------------------------------------------------------------------------------------
class ProviderHTTPError(ProviderError):
    """The provider refused the request (a 4xx other than 429) or redirected it: retrying would not help."""

    def __init__(self, url: str, status: int, body: str) -> None:
        super().__init__(f"{url}: HTTP {status}: {body[:200]}")
        self.status = status


class ProviderUnavailable(ProviderError):
    """Timeouts, 429 or 5xx answers, or broken connections on every attempt."""


class ProviderTimeout(ProviderUnavailable):
    """The last attempt ran past the per-call timeout."""


class MalformedReplyError(ProviderError):
    """The body is not what the provider's wire format promises (bad JSON, wrong shape, lengths...)."""


class ClockAheadError(MalformedReplyError):
    """The provider stamps its prices later than our clock allows: its clock runs ``ahead_s`` seconds ahead
    (at least). Its history bars are mislabelled by as much, so the refresh stores none of them."""

    def __init__(self, message: str, ahead_s: float) -> None:
        super().__init__(message)
        self.ahead_s = ahead_s


class ProviderRejected(ProviderError):
    """The provider answered with an explicit error object (e.g. UDF ``s: "error"``)."""


class BadPriceError(ProviderError):
    """A price that is zero, negative, NaN or infinite."""


class StalePriceError(ProviderError):
    """The latest price is older than ``Settings.max_price_age_s``."""


class UnsupportedAssetError(ProviderError):
    """The provider has no symbol for this asset, or not at this step."""


class PartialHistoryError(ProviderError):
    """A page of a history request failed after the pages before it succeeded.

    ``partial`` holds every bar of those earlier pages: complete up to ``missing[0]``, so a caller that
    stores it and resumes from its newest bar loses nothing. ``missing`` is the ``[start, end)`` not
    fetched and ``cause`` the failed page's own error. Pages after the failed one are never kept: a
    hole behind newer bars would never be fetched again (the refresh resumes after its newest bar).
    """

    def __init__(self, partial: PriceHistory, missing: tuple[int, int], cause: ProviderError) -> None:
        super().__init__(f"{cause} (bars before {missing[0]} fetched: {len(partial)}; "
                         f"[{missing[0]}, {missing[1]}) missing)")
        self.partial = partial
        self.missing = missing
        self.cause = cause


# --- configuration -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpConfig:
    timeout_s: float = 10.0  # per attempt
    retries: int = 4  # extra attempts after the first
    concurrency_per_host: int = 4
    backoff_s: float = 0.25  # base of the exponential backoff
    backoff_max_s: float = 5.0
    max_price_age_s: float = 180.0
    max_reply_bytes: int = MAX_REPLY_BYTES  # decompressed

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retries < 0 or self.concurrency_per_host < 1 or self.max_reply_bytes < 1:
            raise ValueError(f"invalid HTTP config {self}")

    @classmethod
    def from_settings(cls, settings: Settings) -> "HttpConfig":
        return cls(timeout_s=settings.http_timeout_s, retries=settings.http_retries,
                   concurrency_per_host=settings.http_concurrency_per_host,
                   backoff_s=settings.http_backoff_s, backoff_max_s=settings.http_backoff_max_s,
                   max_price_age_s=settings.max_price_age_s)


@dataclass
class _LoopState:
    """aiohttp sessions and asyncio semaphores belong to one event loop; Celery runs a new one per call."""

    loop: asyncio.AbstractEventLoop
    session: aiohttp.ClientSession
    limits: dict[str, asyncio.Semaphore] = field(default_factory=dict)


class HttpClient:
    """JSON over HTTP with per-call timeouts, jittered exponential backoff, a per-host limit, and a per-host
    hold while a server's Retry-After runs (every later call waits it out or is refused, not only the retry).

    The holds are this process's unless ``holds`` shares them (``RedisHostHolds``: the whole fleet's)."""

    def __init__(self, name: str, config: HttpConfig, rng: random.Random | None = None,
                 holds: HostHolds | None = None) -> None:
        self.name = name
        self.config = config
        self._rng = rng or random.Random()
        self._state: _LoopState | None = None
        self.holds = holds or LocalHostHolds()

    def _current(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._state
        if state is None or state.loop is not loop or state.session.closed:
            connector = aiohttp.TCPConnector(limit_per_host=self.config.concurrency_per_host)
            state = _LoopState(loop, aiohttp.ClientSession(connector=connector))
            self._state = state
        return state

    def _limit(self, state: _LoopState, host: str) -> asyncio.Semaphore:
        if host not in state.limits:
            state.limits[host] = asyncio.Semaphore(self.config.concurrency_per_host)
        return state.limits[host]

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Full jitter: uniform(0, min(cap, base * 2**attempt)); a server's Retry-After is a floor.

        A Retry-After beyond ``backoff_max_s`` is never shortened (Binance bans IPs that ignore it):
        ``_request`` gives up instead of calling this with one.
        """
        cap = min(self.config.backoff_max_s, self.config.backoff_s * 2 ** attempt)
        delay = self._rng.uniform(0, cap)
        return delay if retry_after is None else max(delay, retry_after)

    async def _wait_for_host(self, origin: str, what: str) -> None:
        """Sleep out what is left of a host's Retry-After; refuse at once when that is beyond ``backoff_max_s``.

        Looked up again after each sleep: meanwhile another request, or another process, may have been told to
        wait longer (a 418 ban after a short 429)."""
        while (left := await self.holds.left(origin)) > 0:
            if left > self.config.backoff_max_s:
                raise ProviderUnavailable(f"{self.name}: {what} not sent: the host asked for no requests for "
                                          f"{left:.0f} s more (Retry-After), beyond the "
                                          f"{self.config.backoff_max_s:g} s we may wait")
            await asyncio.sleep(left)

    async def get_json(self, url: str, params: Sequence[tuple[str, str]]) -> Any:
        return await self._request("GET", url, params=params)

    async def post_json(self, url: str, payload: Any) -> Any:
        return await self._request("POST", url, payload=payload)

    async def _request(self, method: str, url: str, params: Sequence[tuple[str, str]] | None = None,
                       payload: Any = None) -> Any:
        state = self._current()
        parsed = URL(url)
        host = parsed.host or ""
        origin = f"{parsed.scheme}://{host}:{parsed.port}"  # what a Retry-After hold is kept for
        timeout = aiohttp.ClientTimeout(total=self.config.timeout_s)
        data = orjson.dumps(payload) if payload is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        failure: ProviderError = ProviderUnavailable(f"{self.name}: no attempt made")
        for attempt in range(self.config.retries + 1):
            retry_after: float | None = None
            try:
                async with self._limit(state, host):
                    await self._wait_for_host(origin, f"{method} {url}")
                    # Redirects are not followed: prices are trusted from the configured host only, and one
                    # to another host would escape its Retry-After hold and per-host limit.
                    async with state.session.request(method, url, params=params, data=data, headers=headers,
                                                     timeout=timeout, allow_redirects=False) as resp:
                        body = await self._read(resp, f"{method} {url}")
                        status = resp.status
                        retry_after = _retry_after(resp.headers.get("Retry-After"))
                        location = resp.headers.get("Location")
                if retry_after is not None and status >= 400:  # 429, 5xx, Binance's 418 ban
                    await self.holds.hold(origin, retry_after, status, self.name)
            except TimeoutError:
                failure = ProviderTimeout(f"{self.name}: {method} {url} timed out after {self.config.timeout_s} s "
                                          f"({attempt + 1} attempts)")
            except aiohttp.ClientError as exc:
                failure = ProviderUnavailable(f"{self.name}: {method} {url} failed: {type(exc).__name__}: {exc}")
            else:
                if status == 429 or status >= 500:
                    failure = ProviderUnavailable(f"{self.name}: {method} {url} answered HTTP {status} "
                                                  f"({attempt + 1} attempts)")
                elif status >= 400:
                    raise ProviderHTTPError(f"{self.name}: {method} {url}", status, body.decode("utf-8", "replace"))
                elif status >= 300:  # a 3xx body is no reply of ours, even when it parses as JSON
                    raise ProviderHTTPError(f"{self.name}: {method} {url}", status,
                                            f"redirect to {location!r} not followed: configure the URL it names")
                else:
                    return _decode(self.name, url, body)
            if attempt < self.config.retries:
                if retry_after is not None and retry_after > self.config.backoff_max_s:
                    # Waiting less would re-hit a server that asked us not to; waiting more is not ours to do.
                    raise ProviderUnavailable(f"{failure}; Retry-After {retry_after:g} s exceeds the "
                                              f"{self.config.backoff_max_s:g} s we may wait: not retried")
                delay = self.backoff(attempt, retry_after)
                log.debug("%s; retrying in %.2f s", failure, delay)
                await asyncio.sleep(delay)
        raise failure

    async def _read(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        """The whole body, decompressed, or MalformedReplyError past ``max_reply_bytes`` (the connection is then
        dropped unread: retrying would only download it again)."""
        limit = self.config.max_reply_bytes
        too_large = MalformedReplyError(f"{self.name}: {what}: reply larger than {limit} bytes: not read")
        if resp.content_length is not None and resp.content_length > limit:
            raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():  # decompressed as it arrives: a gzip bomb is counted too
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def close(self) -> None:
        state, self._state = self._state, None
        if state is not None and not state.session.closed:
            try:
                if state.loop is asyncio.get_running_loop():
                    await state.session.close()
            except RuntimeError:  # no running loop: nothing left to close cleanly
                pass


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds, given as seconds or as an HTTP date (RFC 9110; a past date is 0).

    A negative, non-finite or unreadable value counts as absent."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": UTC by RFC 5322
            when = when.replace(tzinfo=datetime.UTC)
        seconds = max(0.0, when.timestamp() - time.time())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _decode(name: str, url: str, body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedReplyError(f"{name}: {url}: body is not JSON ({exc}); starts {body[:80]!r}") from exc


# --- reply validation ----------------------------------------------------------------------------------
def parse_price(value: object, what: str) -> float:
    """A price from a JSON number or decimal string; anything not finite, > 0 and within float32's range raises."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MalformedReplyError(f"{what}: price {value!r} is not a number")
    try:
        price = float(value)
    except ValueError:
        raise MalformedReplyError(f"{what}: price {value!r} is not a number") from None
    if not math.isfinite(price) or price <= 0:
        raise BadPriceError(f"{what}: price {value!r} is not finite and positive")
    if not FLOAT32_TINY <= price <= FLOAT32_MAX:  # answers are scored as float32: 1e-320 would be 0 there
        raise BadPriceError(f"{what}: price {value!r} is outside the float32 range paths are scored in")
    return price


def parse_int(value: object, what: str) -> int:
    """An integer field (timestamps, exponents); floats with a fraction and bools are refused."""
    if isinstance(value, bool):
        raise MalformedReplyError(f"{what}: {value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise MalformedReplyError(f"{what}: {value!r} is not an integer")


def parse_time(value: object, what: str) -> int:
    """A timestamp (s or ms) as an integer that fits int64: larger ones overflow numpy and float maths."""
    t = parse_int(value, what)
    if not 0 <= t < 2 ** 63:
        raise MalformedReplyError(f"{what}: timestamp {value!r:.40} is out of range")
    return t


def scaled(mantissa: int, expo: int, what: str) -> float:
    """``mantissa * 10**expo`` as a float; a mantissa too large for a float is malformed, not a crash."""
    try:
        return mantissa * 10.0 ** expo
    except OverflowError:
        raise MalformedReplyError(f"{what}: {str(mantissa)[:40]}... x 10^{expo} overflows a float") from None


@dataclass
class Rows:
    """The (open time, close) rows of one reply as they are read, and why any row could not be."""

    what: str
    ts: list[int] = field(default_factory=list)
    close: list[float] = field(default_factory=list)
    problems: list["MalformedReplyError | BadPriceError"] = field(default_factory=list)

    def read(self, parse: Callable[_P, tuple[int, float]], *args: _P.args, **kwargs: _P.kwargs) -> None:
        """One row, ``parse(*args, **kwargs)``: a bad one (a zero or NaN close, a field that is not a number)
        is noted, not raised."""
        try:
            t, c = parse(*args, **kwargs)
        except (MalformedReplyError, BadPriceError) as exc:
            self.problems.append(exc)
            return
        self.ts.append(t)
        self.close.append(c)

    def all_or_raise(self) -> tuple[list[int], list[float]]:
        """Every row, or the first bad row's error: a latest price is only read from a clean reply."""
        if self.problems:
            raise self.problems[0]
        return self.ts, self.close


def build_history(step: int, rows: Rows, start: int, end: int) -> PriceHistory:
    """Bars with start <= ts < end from one reply: aligned to the step, no duplicates, sorted.

    A few bad rows (a zero or NaN close, a bar off the grid or outside the range, one timestamp with two
    closes) are dropped as gaps and logged: failing the whole page kept the refresh asking for it again
    from the same bar, and the cache froze for the whole window. A reply mostly made of bad rows is
    garbage, not a bad print, and raises the first row's error.
    """
    what = rows.what
    problems: list[MalformedReplyError | BadPriceError] = list(rows.problems)  # the first is raised for garbage
    t = np.array(rows.ts, dtype=np.int64)  # parse_time keeps each within int64
    c = np.array(rows.close, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t, c = t[order], c[order]
    usable = np.ones(t.size, dtype=bool)
    for bad, why in ((t >= MAX_EPOCH_S, "not in unix seconds (milliseconds?)"),
                     (t % step != 0, f"off the {step} s grid"),
                     ((t < start) | (t >= end), f"outside the requested range [{start}, {end})")):
        problems.extend(MalformedReplyError(f"{what}: bar {ts} is {why}") for ts in t[bad & usable].tolist())
        usable &= ~bad
    t, c = t[usable], c[usable]
    same_ts = np.flatnonzero(t[1:] == t[:-1]) if t.size > 1 else np.empty(0, dtype=np.intp)
    if same_ts.size:  # the same bar twice is kept once; two different closes for one bar, neither
        conflicted = np.unique(t[same_ts][c[same_ts] != c[same_ts + 1]])
        problems.extend(MalformedReplyError(f"{what}: duplicate timestamp {ts} with different closes")
                        for ts in t[np.isin(t, conflicted)].tolist())  # one per row dropped
        first = np.ones(t.size, dtype=bool)
        first[same_ts + 1] = False
        keep = first & ~np.isin(t, conflicted)
        t, c = t[keep], c[keep]
    if problems:
        read = len(rows.ts) + len(rows.problems)
        if 2 * len(problems) > read:
            raise type(problems[0])(f"{len(problems)} of {read} rows unusable, first: {problems[0]}")
        log.warning("%s: %d of %d rows dropped as gaps: %s", what, len(problems), read,
                    "; ".join(map(str, problems[:3])))
    try:
        return PriceHistory(step, t, c)
    except PriceDataError as exc:
        raise MalformedReplyError(f"{what}: {exc}") from exc


def check_fresh(what: str, price: LatestPrice, now: float, max_age_s: float) -> LatestPrice:
    """Refuse a latest price older than ``max_age_s`` or stamped in the future."""
    age = now - price.publish_time
    if age > max_age_s:
        raise StalePriceError(f"{what}: latest price is {age:.0f} s old (limit {max_age_s:.0f} s)")
    if age < -PROVIDER_CLOCK_AHEAD_TOLERANCE_S:  # one of the two clocks is wrong
        raise ClockAheadError(f"{what}: publish_time {price.publish_time} is {-age:.0f} s in the future", -age)
    return price


def closed_end(end: int, step: int, now: float, grace_s: float = BAR_CLOSE_GRACE_S) -> int:
    """Cut ``end`` so only bars closed at least ``grace_s`` before ``now`` (ts + step + grace <= now) are asked for."""
    last_open = int(now - grace_s) // step * step - step  # the newest bar whose close is surely final
    return min(end, last_open + step)


def align_up(t: int, step: int) -> int:
    return -(-t // step) * step


def page_ranges(start: int, end: int, span: int) -> list[tuple[int, int]]:
    """[start, end) cut into consecutive ranges of at most ``span`` seconds."""
    return [(a, min(a + span, end)) for a in range(start, end, span)]


async def gather_pages(fetch: Callable[[int, int], Coroutine[Any, Any, PriceHistory]],
                       ranges: Sequence[tuple[int, int]], step: int) -> PriceHistory:
    """Fetch consecutive page ranges concurrently and merge them.

    A failed page cancels only the pages after it; the ones before it finish. When some of those hold
    bars, they come back on a ``PartialHistoryError`` (so a caller never mistakes them for the whole
    range); otherwise the page's own error is raised as is.
    """
    tasks = [asyncio.create_task(fetch(a, b)) for a, b in ranges]

    def cancel_later(index: int) -> Callable[[asyncio.Task[PriceHistory]], None]:
        def done(task: asyncio.Task[PriceHistory]) -> None:
            if not task.cancelled() and task.exception() is not None:
                for later in tasks[index + 1:]:  # their bars could not be kept: stop spending requests
                    later.cancel()
        return done

    for i, task in enumerate(tasks):
        task.add_done_callback(cancel_later(i))
    result = PriceHistory.empty(step)
    try:
        for (a, _), task in zip(ranges, tasks, strict=True):
            try:
                page = await task
            except ProviderError as exc:
                cause, missing_from = exc, a
                if isinstance(exc, PartialHistoryError):  # the range's own first bars came back
                    result = result.merge(exc.partial)
                    cause, missing_from = exc.cause, exc.missing[0]
                if not len(result):
                    raise
                raise PartialHistoryError(result, (missing_from, ranges[-1][1]), cause) from exc
            result = result.merge(page)
    finally:  # an error or the caller's cancellation: no page task outlives the call
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


async def fetch_range(fetch: Callable[[int, int], Awaitable[PriceHistory]], start: int, end: int,
                      step: int) -> PriceHistory:
    """One page range, followed up while a server answers fewer rows than the range holds.

    Pages are sized to the provider's documented limit, so a full page normally ends at the range's
    end; a server that caps lower still returns every bar, at the price of extra calls. A follow-up that
    fails (one whose only row is a bad print the page before dropped) keeps the bars read before it, on a
    ``PartialHistoryError``.
    """
    result = PriceHistory.empty(step)
    cursor = start
    while cursor < end:
        try:
            page = await fetch(cursor, end)
        except ProviderError as exc:
            if not len(result):
                raise
            raise PartialHistoryError(result, (cursor, end), exc) from exc
        if not len(page):
            break
        result = result.merge(page)
        last = page.last_ts
        assert last is not None
        cursor = last + step
    return result


# --- what the paged provider clients share -----------------------------------------------------------
def asset_code(asset: str, code: Callable[[AssetSpec], str | None], missing: str) -> str:
    """The provider's name for ``asset``; ``missing`` (e.g. "binance: no symbol") opens the error otherwise."""
    spec = ASSETS.get(asset)
    value = None if spec is None else code(spec)
    if value is None:
        raise UnsupportedAssetError(f"{missing} for asset {asset!r}")
    return value


def newest_closed(what: str, ts: Sequence[int], close: Sequence[float], now: float, max_age_s: float,
                  none_closed: ProviderError) -> LatestPrice:
    """The newest 1-minute bar already closed at ``now`` as a checked latest price; ``none_closed`` if none is.

    A bar opening past ``now`` (beyond the tolerance) is no bar in progress: the provider's clock runs ahead,
    and its closed bars are older than their stamps, so the reply is refused even when some bars closed."""
    ahead = max(ts, default=now) - now
    if ahead > PROVIDER_CLOCK_AHEAD_TOLERANCE_S:
        raise ClockAheadError(f"{what}: its newest bar opens {ahead:.0f} s after our clock, "
                              f"{len([t for t in ts if t > now])} of its {len(ts)} bars in the future", ahead)
    closed = [(t, c) for t, c in zip(ts, close) if t + 60 <= now]
    if not closed:
        raise none_closed
    t, c = max(closed)
    return check_fresh(what, LatestPrice(price=c, publish_time=t + 60), now, max_age_s)


class PagedSource(ABC):
    """One ``HttpClient``, a clock, and history from ``base_url`` in pages of ``page_bars``, fetched at once.

    A client names its steps (``intervals``) and how its errors call them (``interval_word``), the most
    bars one call returns (``page_bars``), the asset's code at the provider (``_code``) and how one page
    of ``[start, end)`` is fetched (``_page``).
    """

    name: str
    intervals: Mapping[int, str]
    interval_word: str
    page_bars: int
    # How far back the provider keeps bars at each step, where it keeps only the newest ones (None: no limit
    # known). The refresh then also fetches the coarser step, which reaches further back.
    kept_s: Mapping[int, int] | None = None

    def __init__(self, base_url: str, config: HttpConfig, clock: Clock = time.time,
                 http: HttpClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.config = config
        self.clock = clock
        self.http = http or HttpClient(self.name, config)

    @abstractmethod
    def _code(self, asset: str) -> str:
        """The symbol or coin history is asked for; ``UnsupportedAssetError`` when there is none."""

    @abstractmethod
    async def _page(self, code: str, step: int, start: int, end: int) -> PriceHistory:
        """One call for the bars in ``[start, end)``, checked."""

    @abstractmethod
    async def latest(self, asset: str) -> LatestPrice:
        """The newest price with its publish time, checked for freshness."""

    async def history(self, asset: str, start: int, end: int, step: int = 60) -> PriceHistory:
        code = self._code(asset)
        if step not in self.intervals:
            raise UnsupportedAssetError(f"{self.name}: no {self.interval_word} for step {step}")
        start, end = align_up(start, step), closed_end(end, step, self.clock())
        if start >= end:
            return PriceHistory.empty(step)

        async def page(a: int, b: int) -> PriceHistory:
            return await self._page(code, step, a, b)

        async def pages(a: int, b: int) -> PriceHistory:
            return await fetch_range(page, a, b, step)

        return await gather_pages(pages, page_ranges(start, end, self.page_bars * step), step)

    async def close(self) -> None:
        await self.http.close()

"""Incremental refresh: store -> cache first, then only the missing tail from the provider -> store -> cache.

The store makes history outlive both Redis (rebuilt from it after a FLUSHALL) and the providers'
own retention (Hyperliquid keeps about 3.5 days). A Celery task calls ``refresh_assets_sync``.
"""

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

import redis
from redis.lock import Lock

from core.cache import HistoryCache
from core.cache_redis import CacheError, RedisHistoryCache
from core.constants import (
    LATEST_PRICE_KEY,
    PROVIDER_CLOCK_AHEAD_TOLERANCE_S,
    REFRESH_LOCK_POLL_S,
    SECONDS_PER_DAY,
)
from core.history_store import HistoryStore, HistoryStoreError
from core.price_checks import plausible_latest, screen_bars
from core.prices import LatestPrice, PriceDataError, PriceHistory
from core.settings import Settings
from core.sources.base import PriceSource, ProviderError
from core.sources.http import ClockAheadError, PartialHistoryError, UnsupportedAssetError
from core.sources.registry import sources_for

log = logging.getLogger(__name__)

# (source name, asset) pairs whose "no data for this asset" was logged at WARNING in this process. Permanent,
# it was logged every minute (three lines per asset: ~17k a day for the assets a replay folder lacks).
_no_data_reported: set[tuple[str, str]] = set()


class RefreshConfigError(ValueError):
    """The settings lack what a refresh needs (a Redis URL for the shared cache)."""


@dataclass(frozen=True)
class StepRefresh:
    step: int
    window_s: int
    from_store: int  # bars the cache lacked and the store had
    fetched: int  # bars the provider returned for the missing tail
    new_in_store: int
    new_in_cache: int
    span: tuple[int, int] | None  # the cache's (first ts, last ts) after the refresh
    dropped: int = 0  # implausible lone prints refused (core.price_checks)
    held_back: int = 0  # newest bars whose jump awaits confirmation: fetched again next refresh


@dataclass(frozen=True)
class RefreshReport:
    asset: str
    provider: str
    steps: tuple[StepRefresh, ...]
    latest: LatestPrice | None
    errors: tuple[str, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.errors


class _Errors(list[str]):
    """A refresh's error lines; ``no_data`` holds those saying the source has no data for the asset at all."""

    def __init__(self) -> None:
        super().__init__()
        self.no_data: set[str] = set()

    def add(self, what: str, exc: Exception) -> None:
        line = f"{what}: {type(exc).__name__}: {exc}"
        self.append(line)
        if isinstance(exc, UnsupportedAssetError):
            self.no_data.add(line)


def replays_prices(settings: Settings) -> bool:
    """Whether these settings serve replayed prices (SYNTH_PRICE_PROVIDER=replay).

    Replayed prices are old rows shifted in time so the newest is "now": written to the durable store
    they would pass for real history and feed calibration and retraining. The one rule both the miner
    (``miner.runtime.build_store``) and the refresh job follow."""
    return settings.price_provider == "replay"


def durable_store(settings: Settings) -> HistoryStore | None:
    """The history store a refresh under these settings may read and write: None when prices are replayed."""
    return None if replays_prices(settings) else HistoryStore.from_settings(settings)


def default_steps(source: PriceSource, settings: Settings) -> tuple[int, ...]:
    """Replayed folders carry native 5-minute files; live providers are read at 1 minute only, unless they
    keep too few 1-minute bars for the 24 h window: Hyperliquid's 3.5 days of them left a new fleet serving
    the equities' and gold's 24 h prompts from the fallback until the store held a week (the 24 h models
    read 5 sessions / 2 weeks of 5-minute bars), while its 5-minute candles reach back 17 days."""
    if source.name == "replay":
        return (60, 300)
    kept: Mapping[int, int] = getattr(source, "kept_s", None) or {}
    short = kept.get(60, SECONDS_PER_DAY * 10_000) < settings.cache_days_lf * SECONDS_PER_DAY
    return (60, 300) if short and 300 in getattr(source, "intervals", {}) else (60,)


def cache_windows(settings: Settings, steps: Sequence[int]) -> dict[int, int]:
    """Seconds of history kept per step: 1-minute bars serve 5-minute prompts too unless 5m is cached."""
    hf, lf = int(settings.cache_days_hf * SECONDS_PER_DAY), int(settings.cache_days_lf * SECONDS_PER_DAY)
    if 300 in steps:
        return {step: (hf if step == 60 else lf) for step in steps}
    return {step: max(hf, lf) for step in steps}


@asynccontextmanager
async def _asset_lock(cache: HistoryCache, asset: str, settings: Settings) -> AsyncIterator[None]:
    """Hold the per-asset Redis lock when there is one; writes are idempotent, so a timeout goes on without.

    Waited for with short non-blocking tries, not a blocking acquire on a thread: while a provider hangs,
    its lock is held for up to a minute, and a blocked thread per waiting asset filled asyncio's default
    executor, where the miner's other blocking calls queue too."""
    if not isinstance(cache, RedisHistoryCache):
        yield
        return
    lock = cache.refresh_lock(asset, ttl_s=settings.refresh_lock_s, wait_s=0.0)
    give_up = time.monotonic() + settings.refresh_lock_s / 2
    held = False
    try:
        while not (held := await _try_lock(lock)):
            if time.monotonic() >= give_up:
                break
            await asyncio.sleep(REFRESH_LOCK_POLL_S)
    except redis.RedisError as exc:
        log.warning("refresh lock for %s unavailable (%s): going on without it", asset, exc)
    try:
        yield
    finally:
        if held:
            try:
                await asyncio.to_thread(lock.release)
            except redis.RedisError as exc:  # expired while we worked: someone else may hold it now
                log.warning("refresh lock for %s lost: %s", asset, exc)


async def _try_lock(lock: Lock) -> bool:
    """One non-blocking try, on a thread. Cancelled meanwhile (a miner stopping), the thread goes on: a lock it
    takes after the refresh has gone is released at once, where it was left to block every other refresher
    of the asset until its TTL."""
    attempt = asyncio.ensure_future(asyncio.to_thread(lock.acquire, blocking=False))
    try:
        return bool(await asyncio.shield(attempt))
    except asyncio.CancelledError:
        attempt.add_done_callback(functools.partial(_release_if_taken, lock))
        raise


def _release_if_taken(lock: Lock, attempt: "asyncio.Future[bool]") -> None:
    if not attempt.cancelled() and attempt.exception() is None and attempt.result():
        threading.Thread(target=_release_quietly, args=(lock,), name="refresh-lock-release", daemon=True).start()


def _release_quietly(lock: Lock) -> None:
    """Off the event loop (a done callback runs on it)."""
    try:
        lock.release()
    except redis.RedisError as exc:
        log.warning("refresh lock taken after its refresh was cancelled not released: %s", exc)


async def refresh_asset(asset: str, source: PriceSource, cache: HistoryCache, store: HistoryStore | None,
                        settings: Settings, now: int | None = None,
                        steps: Sequence[int] | None = None) -> RefreshReport:
    """Bring the cache (and the store, unless the source replays) up to ``now`` for one asset; failures are
    reported, not raised."""
    started = time.perf_counter()
    if source.name == "replay":  # one asset replayed (a per-asset override): its rows never reach the store
        store = None
    now = int(time.time()) if now is None else int(now)
    steps = tuple(steps) if steps is not None else default_steps(source, settings)
    windows = cache_windows(settings, steps)
    errors = _Errors()
    async with _asset_lock(cache, asset, settings):
        try:
            await asyncio.to_thread(_forget_other_sources, asset, source.name, cache)
            done, latest = await _refresh_steps(asset, steps, windows, source, cache, store, now, errors, settings)
        except (CacheError, redis.ResponseError) as exc:
            if not _damaged_cache(cache, exc):
                raise
            # Something the cache could not have written (a day of the wrong size, a span or key of another
            # type): left in place it failed every refresh, and every forecast read, until someone cleared it.
            # The store and the provider refill the window (a second failure is raised and reported).
            dropped = await asyncio.to_thread(cast(RedisHistoryCache, cache).drop, asset)
            log.warning("%s: cached history unusable (%s: %s): its %d keys dropped and rebuilt", asset,
                        type(exc).__name__, exc, dropped)
            errors = _Errors()
            errors.append(f"cache: {type(exc).__name__}: {exc} (dropped and rebuilt)")
            await asyncio.to_thread(_forget_other_sources, asset, source.name, cache)
            done, latest = await _refresh_steps(asset, steps, windows, source, cache, store, now, errors, settings)
    _log_errors(asset, source.name, errors)
    return RefreshReport(asset, source.name, tuple(done), latest, tuple(errors), time.perf_counter() - started)


async def _refresh_steps(asset: str, steps: Sequence[int], windows: Mapping[int, int], source: PriceSource,
                         cache: HistoryCache, store: HistoryStore | None, now: int, errors: _Errors,
                         settings: Settings) -> tuple[list[StepRefresh], LatestPrice | None]:
    """The latest price first (it shows a provider whose clock runs ahead: none of its bars is then stored),
    every step's bars, then the latest price checked against the newest close before it anchors."""
    if isinstance(cache, RedisHistoryCache):
        held = await asyncio.to_thread(cache.latest, asset)
        if held is not None and _past_now(held.publish_time, now) > PROVIDER_CLOCK_AHEAD_TOLERANCE_S:
            # set_latest keeps the newest publish time: this one refused every real print until our clock passed it.
            raise CacheError(f"{LATEST_PRICE_KEY.format(asset=asset)}: the cached latest price is published "
                             f"{_past_now(held.publish_time, now)} s after our clock")
    latest: LatestPrice | None = None
    clock_ahead = False
    # A Retry-After on ``latest`` holds this run's history back too where it comes from the same host: the host
    # asked for no requests, not for fewer of one kind (Binance weighs and bans per IP, every endpoint alike).
    # Pyth's history comes from another host (Benchmarks) and is still fetched.
    try:
        latest = await source.latest(asset)
        _check_clock(latest.publish_time, now, "its latest price is published")
    except ClockAheadError as exc:
        latest, clock_ahead = None, True
        errors.append(_clock_ahead_line(source.name, "latest", exc))
    except ProviderError as exc:
        latest = None
        errors.add("latest", exc)
    done = [await _refresh_step(asset, step, windows[step], source, cache, store, now, errors, settings,
                                fetch=not clock_ahead)
            for step in steps]
    if latest is not None:
        try:
            newest = await asyncio.to_thread(_newest_bar, asset, steps, cache)
            if not plausible_latest(latest, newest, settings.price_max_jump):
                raise ProviderError(f"latest price {latest.price:g} is implausibly far from the newest close "
                                    f"{float(newest.close[-1]):g}: not used as the anchor")
            await asyncio.to_thread(cache.set_latest, asset, latest)
        except ProviderError as exc:
            latest = None
            errors.add("latest", exc)
    return done, latest


def _check_clock(stamp: int, now: int, what: str) -> None:
    """ClockAheadError when ``stamp`` lies beyond the tolerance past our clock. Sources check their replies against
    their own clock; this holds for any source (a replay too) and for a refresh that waited for its lock, whose
    ``now`` is older than the clock: the later of the two counts."""
    ahead = _past_now(stamp, now)
    if ahead > PROVIDER_CLOCK_AHEAD_TOLERANCE_S:
        raise ClockAheadError(f"{what} {ahead} s after our clock", ahead)


def _past_now(stamp: int, now: int) -> int:
    """Seconds ``stamp`` lies after our clock: the refresh's ``now`` or, after a wait for the lock, the clock."""
    return stamp - max(now, int(time.time()))


def _clock_ahead_line(source: str, what: str, exc: ClockAheadError) -> str:
    return (f"{what}: {source} clock runs {exc.ahead_s:.0f} s ahead of our clock: its bars are not stored "
            f"until the clocks agree ({exc})")


def _damaged_cache(cache: HistoryCache, exc: Exception) -> bool:
    """Whether ``exc`` says the shared cache holds an entry it could not have written (not Redis being down)."""
    return isinstance(cache, RedisHistoryCache) and (isinstance(exc, CacheError) or "WRONGTYPE" in str(exc))


def _forget_other_sources(asset: str, source: str, cache: HistoryCache) -> None:
    """A shared cache filled by another source (replayed prices in a Redis the live fleet uses next, or
    the asset's provider switched) is cleared: the refresh resumed after the other source's newest bar,
    and the join (a replayed level against the live one) passed for a real move for the whole window.
    The store, never written by a replay, refills what is real."""
    if not isinstance(cache, RedisHistoryCache):
        return  # a process's own memory: one source per process
    before = cache.claim_source(asset, source)
    if before is not None and before != source:
        log.warning("%s: the cached history came from %s, now from %s: cleared and rebuilt", asset, before, source)
        cache.clear([asset])


def _log_errors(asset: str, source: str, errors: _Errors) -> None:
    """Every error at WARNING, except "no data for this asset": once per (source, asset) and process, then at
    DEBUG (the report still carries it). The miner already lists at start the assets it has no price for."""
    for error in errors:
        if error not in errors.no_data:
            log.warning("refresh %s via %s: %s", asset, source, error)
    no_data = [e for e in errors if e in errors.no_data]
    if not no_data:
        return
    if (source, asset) in _no_data_reported:
        log.debug("refresh %s via %s: %s", asset, source, "; ".join(no_data))
        return
    _no_data_reported.add((source, asset))
    log.warning("refresh %s via %s: %s (%s has no data for %s: from now on reported at DEBUG)", asset, source,
                "; ".join(no_data), source, asset)


def _newest_bar(asset: str, steps: Sequence[int], cache: HistoryCache) -> PriceHistory:
    """The cache's newest accepted bar at the finest step that has one (empty if none)."""
    for step in sorted(steps):
        span = cache.span(asset, step)
        if span is not None:
            return cache.read(asset, step, span[1], span[1] + step)
    return PriceHistory.empty(min(steps, default=60))


async def _refresh_step(asset: str, step: int, window: int, source: PriceSource, cache: HistoryCache,
                        store: HistoryStore | None, now: int, errors: _Errors, settings: Settings,
                        fetch: bool = True) -> StepRefresh:
    lo = -(-(now - window) // step) * step
    span = await asyncio.to_thread(cache.span, asset, step)
    if isinstance(cache, RedisHistoryCache):  # damage raises CacheError: the caller drops and rebuilds the asset
        await asyncio.to_thread(cache.verify, asset, step)
        ahead = -1 if span is None else _past_now(span[1] + step, now)
        if ahead > PROVIDER_CLOCK_AHEAD_TOLERANCE_S:
            # A bar not closed yet by our clock (a replay or a process whose clock ran ahead wrote it): the tail
            # starts after the newest bar, so nothing was fetched again until our clock passed it.
            raise CacheError(f"{cache.meta_key(asset, step)}: the newest cached bar closes {ahead} s after our "
                             "clock")
    tail = lo if span is None or span[1] < lo else span[1] + step

    # 1. The store first: after a restart it holds everything up to the last refresh.
    from_store = 0
    if store is not None:
        try:
            stored = (await asyncio.to_thread(store.read, asset, step, tail, now)).known_at(now)
            if span is not None and span[0] > lo:
                # The head of the window too: history imported or synced after the cache filled (from a
                # provider keeping only days), or a larger window, would otherwise never reach the cache.
                head = await asyncio.to_thread(store.read, asset, step, lo, span[0])
                stored = head.merge(stored) if len(head) else stored
            if len(stored):
                from_store = await asyncio.to_thread(cache.write, asset, stored)
                tail = max(tail, int(stored.ts[-1]) + step)
        except (HistoryStoreError, PriceDataError) as exc:
            errors.append(f"store read {step}s: {type(exc).__name__}: {exc}")

    # 2. The provider fills only what is still missing, store first so history outlives Redis.
    fetched = PriceHistory.empty(step)
    if tail < now and fetch:
        try:
            try:
                fetched = await source.history(asset, tail, now, step)
            except PartialHistoryError as exc:
                # The bars before the failed page are unbroken from ``tail``: kept through the same screening,
                # store and cache as a full fetch, the next refresh resumes right after them. Still an error.
                fetched = exc.partial
                errors.add(f"history {step}s", exc)
            if len(fetched):
                _check_clock(int(fetched.ts[-1]), now, "its newest bar opens")
            fetched = fetched.known_at(now)
        except ClockAheadError as exc:
            fetched = PriceHistory.empty(step)
            errors.append(_clock_ahead_line(source.name, f"history {step}s", exc))
        except (ProviderError, PriceDataError) as exc:
            errors.add(f"history {step}s", exc)
    # 3. Garbage prints never reach the store or the cache (core.price_checks).
    previous = await asyncio.to_thread(_newest_bar, asset, (step,), cache)
    screened = screen_bars(fetched, float(previous.close[-1]) if len(previous) else None,
                           settings.price_max_jump, settings.price_confirm_bars)
    kept = screened.kept
    if len(screened.dropped):
        errors.append(f"history {step}s: {screened.describe()}")
    if screened.held_back:
        log.info("%s %ss: %d newest bar(s) held back until the next bars confirm their jump",
                 asset, step, screened.held_back)
    new_in_store = new_in_cache = 0
    if store is not None:
        # Bars the cache got while the store could not be written are owed to the store too.
        owed = PriceHistory.empty(step)
        try:
            owed = await asyncio.to_thread(_owed_to_store, asset, step, lo, cache, store)
        except HistoryStoreError as exc:  # a corrupt partition: the cache is still updated below
            errors.append(f"store span {step}s: {type(exc).__name__}: {exc}")
        to_store = owed.merge(kept) if len(owed) else kept
        if len(to_store):
            try:
                merged = await asyncio.to_thread(store.merge, asset, to_store, source.name)  # joins recorded
                new_in_store = merged.new
            except HistoryStoreError as exc:
                new_in_store = exc.stored  # the other days' bars were written
                errors.append(f"store write {step}s: {type(exc).__name__}: {exc}")
    if len(kept):
        new_in_cache = await asyncio.to_thread(cache.write, asset, kept)
    await asyncio.to_thread(cache.trim, asset, step, lo)
    span = await asyncio.to_thread(cache.span, asset, step)
    return StepRefresh(step, window, from_store, len(fetched), new_in_store, new_in_cache, span,
                       len(screened.dropped), screened.held_back)


def _owed_to_store(asset: str, step: int, lo: int, cache: HistoryCache, store: HistoryStore) -> PriceHistory:
    """Cached bars the store lacks within the window: those newer than its newest (a failed write left them
    behind), and those of the days before that it holds no partition for (a torn day that compaction set
    aside: nothing newer than the store's newest would ever bring it back)."""
    cached = cache.span(asset, step)
    if cached is None:
        return PriceHistory.empty(step)
    stored = store.span(asset, step)
    owed = PriceHistory.empty(step)
    if stored is None or stored[1] < cached[1]:
        start = lo if stored is None else max(lo, stored[1] + step)
        owed = cache.read(asset, step, start, cached[1] + step)
    if stored is not None:
        held = set(store.days(asset, step))
        first, last = max(lo, cached[0]) // SECONDS_PER_DAY, min(stored[1], cached[1]) // SECONDS_PER_DAY
        for day in (d for d in range(first, last + 1) if d not in held):  # a listing; days without bars are cheap
            owed = owed.merge(cache.read(asset, step, max(lo, day * SECONDS_PER_DAY), (day + 1) * SECONDS_PER_DAY))
    return owed


async def refresh_assets(assets: Sequence[str], settings: Settings, cache: HistoryCache,
                         store: HistoryStore | None, now: int | None = None) -> list[RefreshReport]:
    """Refresh several assets concurrently with sources built from settings (closed at the end). With a Redis in
    the settings their Retry-After holds are the fleet's (core.sources.holds): another process's 429 or ban keeps
    these sources off that host too."""
    sources = sources_for(settings)
    try:
        async def one(asset: str) -> RefreshReport:
            try:
                return await refresh_asset(asset, sources(asset), cache, store, settings, now)
            except Exception as exc:  # one broken asset must not stop the others
                log.exception("refresh of %s failed", asset)
                return RefreshReport(asset, settings.provider_for(asset), (), None,
                                     (f"{type(exc).__name__}: {exc}",), 0.0)

        return list(await asyncio.gather(*(one(a) for a in assets)))
    finally:
        await sources.close()


def refresh_assets_sync(assets: Sequence[str], settings: Settings, now: int | None = None) -> list[RefreshReport]:
    """What the Celery task calls: Redis cache and disk store from settings, one event loop per call.

    Replayed prices (``replays_prices``) refresh the cache only: the store is neither read nor written."""
    if not settings.redis_url:
        raise RefreshConfigError("refreshing the shared cache needs SYNTH_REDIS_URL")
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=10.0, socket_connect_timeout=5.0)
    try:
        cache = RedisHistoryCache(client)
        return asyncio.run(refresh_assets(assets, settings, cache, durable_store(settings), now))
    finally:
        client.close()

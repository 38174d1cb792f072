"""Market data for the miner: the shared cache when it works, and a private copy for the fallback.

The fallback must answer even when Redis is dead, so every snapshot the miner builds is kept in
memory per asset; when the shared cache fails, the kept snapshot is reused with a fresh anchor
from the price source, and a miner that never had one reads the source directly.
"""

import asyncio
import logging
import time
from dataclasses import replace

from core.cache import MemoryHistoryCache
from core.logs import reason
from core.market_data import MarketData, build_snapshot
from core.price_checks import plausible_latest
from core.prices import MarketSnapshot, PriceDataError, PriceHistory
from core.sources.base import ProviderError

log = logging.getLogger(__name__)

SHARED_TIMEOUT_S = 3.0  # a cache read slower than this is treated as down
CACHED_TIMEOUT_S = 1.0  # the shared cache read as it is, without the refresh that was too slow
ANCHOR_TIMEOUT_S = 2.0


class MinerData:
    def __init__(self, shared: MarketData, emergency: MarketData | None = None) -> None:
        self.shared = shared
        self.emergency = emergency or MarketData(MemoryHistoryCache(), shared.sources, 86_400, shared.steps_for,
                                                 settings=shared.settings)
        self._last: dict[str, MarketSnapshot] = {}  # the newest snapshot of each asset, whatever its window
        # ... and of each (asset, window) asked for: a 24 h request's fallback read the 1 h request's 4 days of
        # history when that one came last, where its own window is 14.
        self._by_window: dict[tuple[str, int], MarketSnapshot] = {}
        self._inflight: dict[str, asyncio.Future[MarketSnapshot]] = {}

    def _shared(self, asset: str, lookback_s: int | None) -> "tuple[asyncio.Future[MarketSnapshot], bool]":
        """The shared snapshot of this asset in flight (the warm-up's, another request's), or a new one.
        A second fetch would only compete with the first for the provider, and find the cache empty."""
        task = self._inflight.get(asset)
        if task is not None and not task.done():
            return task, True
        task = asyncio.ensure_future(self.shared.snapshot(asset, lookback_s))
        task.add_done_callback(_consume)
        self._inflight[asset] = task
        return task, False

    async def snapshot(self, asset: str, lookback_s: int | None = None,
                       deadline: float | None = None) -> MarketSnapshot:
        """The freshest snapshot to be had by ``deadline`` (epoch seconds), or PriceDataError."""
        shared, joined = self._shared(asset, lookback_s)
        try:
            # Shielded: a slow refresh goes on in the background and fills the cache for the next one.
            snap = await asyncio.wait_for(asyncio.shield(shared), _left(deadline, SHARED_TIMEOUT_S))
            if joined:  # refreshed for another window: read this request's own
                snap = await self._cached(asset, lookback_s, deadline) or snap
        except Exception as exc:  # Redis down, provider down or slow with a stale or empty cache...
            cached = await self._cached(asset, lookback_s, deadline)
            log.warning("shared market data failed for %s (%s); using %s", asset, reason(exc),
                        "the shared cache as it is" if cached else "the miner's own copy")
            if cached is not None:
                snap = cached
            elif asset in self._last or shared.done():
                return await self.fallback_snapshot(asset, deadline, lookback_s)
            else:  # slow, not dead, and nothing else known: the same fetch gets the rest of the time
                left = (deadline if deadline is not None else time.time() + SHARED_TIMEOUT_S) - time.time()
                try:
                    snap = await asyncio.wait_for(asyncio.shield(shared), max(0.0, left))
                    if joined:
                        snap = await self._cached(asset, lookback_s, deadline) or snap
                except Exception as late:
                    raise PriceDataError(f"no price for {asset} in time: {reason(late)}") from late
        self._last[asset] = snap
        if lookback_s is not None:
            self._by_window[asset, lookback_s] = snap
        return snap

    async def _cached(self, asset: str, lookback_s: int | None,
                      deadline: float | None = None) -> MarketSnapshot | None:
        """The shared cache without a refresh: a slow provider must not cost the request its deadline
        (the pool reads this same cache, so it can still answer)."""
        lookback = lookback_s or self.shared.window_for(asset)
        budget = _left(deadline, CACHED_TIMEOUT_S)
        if budget <= 0:
            return None
        try:
            return await asyncio.wait_for(asyncio.to_thread(build_snapshot, self.shared.cache, asset,
                                                            int(time.time()), lookback), budget)
        except Exception:
            return None

    async def fallback_snapshot(self, asset: str, deadline: float | None = None,
                                lookback_s: int | None = None) -> MarketSnapshot:
        """A kept snapshot (of ``lookback_s`` seconds when one is, else the asset's newest) with a fresh
        anchor when one comes in time; the provider read directly when none is kept."""
        kept = self._by_window.get((asset, lookback_s)) if lookback_s is not None else None
        kept = kept or self._last.get(asset)
        if kept is not None:
            budget = _left(deadline, ANCHOR_TIMEOUT_S)
            if budget <= 0:  # no time for a fresh anchor: the kept price is the best there is by the deadline
                return kept
            try:
                latest = await asyncio.wait_for(self.shared.sources(asset).latest(asset), budget)
                if latest.publish_time > kept.anchor_time:
                    # The refresh's check (core.refresh): a garbage print must not anchor the fallback either.
                    if not plausible_latest(latest, _newest_bar(kept), self.shared.settings.price_max_jump):
                        raise ProviderError(f"latest price {latest.price:g} is implausibly far from the "
                                            "newest close: not used as the anchor")
                    return replace(kept, anchor=latest.price, anchor_time=latest.publish_time)
            except Exception as exc:
                log.warning("fresh anchor for %s unavailable (%s); keeping %ss-old price", asset, reason(exc),
                            int(time.time() - kept.anchor_time))
            return kept
        budget = SHARED_TIMEOUT_S * 2 if deadline is None else max(0.0, deadline - time.time())
        try:
            return await asyncio.wait_for(self.emergency.snapshot(asset), budget)
        except (ProviderError, PriceDataError, TimeoutError) as exc:
            raise PriceDataError(f"no price for {asset}: {reason(exc)}") from exc

    async def warm(self, assets: list[str]) -> None:
        """Fill the shared cache for every asset at start-up so the first answers use real history."""
        async def one(asset: str) -> str | None:
            try:  # the shared cache only: the emergency path is for requests, not for warm-up
                shared, _ = self._shared(asset, None)  # requests arriving meanwhile join it
                self._last[asset] = await asyncio.wait_for(asyncio.shield(shared), SHARED_TIMEOUT_S * 4)
                return None
            except Exception as exc:
                return f"{asset} ({reason(exc)})"

        failed = [f for f in await asyncio.gather(*(one(a) for a in assets)) if f]
        log.info("warm-up: %d of %d assets have prices", len(assets) - len(failed), len(assets))
        if failed:
            log.warning("no price yet for: %s", "; ".join(failed))


def _left(deadline: float | None, cap: float) -> float:
    """Seconds a step may wait: its own cap, and never past the request's deadline (epoch seconds)."""
    return cap if deadline is None else max(0.0, min(cap, deadline - time.time()))


def _newest_bar(snap: MarketSnapshot) -> PriceHistory:
    """The snapshot's newest bar at the finest step that has one (empty if none), as refresh compares to."""
    for hist in (snap.m1, snap.m5):
        if hist is not None and len(hist):
            return PriceHistory(hist.step, hist.ts[-1:], hist.close[-1:])
    return PriceHistory.empty(60)


def _consume(task: "asyncio.Future[MarketSnapshot]") -> None:
    """A shared snapshot left running in the background may fail unseen: retrieve it, log nothing twice."""
    if not task.cancelled():
        task.exception()

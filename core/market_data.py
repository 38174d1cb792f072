"""History and anchor prices for forecasts: read from the rolling cache, filled from a source on a miss."""

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from core.cache import HistoryCache
from core.history_store import HistoryStore
from core.prices import LatestPrice, MarketSnapshot, PriceDataError, PriceHistory
from core.refresh import RefreshReport, default_steps, refresh_asset
from core.settings import Settings
from core.sources.base import PriceSource

log = logging.getLogger(__name__)

FRESH_S = 150  # a cache whose next bar is overdue by more than this is refreshed before use
RETRY_S = 30  # ...but at most this often: a market that is closed, or a lagging source, stays "old"
EMPTY_RETRY_S = 3  # an asset with nothing cached is retried this often (it has no answer at all)


class MarketData:
    """Keeps the cache warm for each asset and builds the snapshot an engine forecasts from."""

    def __init__(self, cache: HistoryCache, sources: Callable[[str], PriceSource],
                 window_s: Mapping[str, int] | int, steps_for: Callable[[str], tuple[int, ...]] | None = None,
                 clock: Callable[[], float] = time.time, store: "HistoryStore | None" = None,
                 settings: Settings | None = None) -> None:
        self.cache = cache
        self.sources = sources
        self.window_s = window_s
        self.steps_for = steps_for or (lambda asset: default_steps(self.sources(asset), self.settings))
        self.clock = clock
        self.store = store
        self.settings = settings or Settings()
        self._attempted: dict[str, float] = {}  # asset -> last refresh attempt (monotonic)

    def window_for(self, asset: str) -> int:
        return self.window_s if isinstance(self.window_s, int) else self.window_s.get(asset, 14 * 86_400)

    async def refresh(self, asset: str) -> "RefreshReport":
        """Store first, then only the missing tail from the provider; failures are in the report."""
        return await refresh_asset(asset, self.sources(asset), self.cache, self.store, self.settings,
                                   now=int(self.clock()), steps=self.steps_for(asset))

    async def _stale(self, asset: str, now: int) -> bool:
        # Off the loop: a hung Redis blocks each read for its socket timeout, and the miner's requests with it.
        span = await asyncio.to_thread(self._span, asset)
        # Nothing cached: nothing to answer from, so retry soon; merely old: retry at most every RETRY_S.
        pause = EMPTY_RETRY_S if span is None else RETRY_S
        if time.monotonic() - self._attempted.get(asset, -pause) < pause:
            return False
        if span is None:
            return True
        step, (_, newest_open) = span
        return newest_open + 2 * step < now - FRESH_S  # the bar after the newest closes at newest_open + 2 steps

    def _span(self, asset: str) -> tuple[int, tuple[int, int]] | None:
        """(step, span) of the finest history cached, or None."""
        for step in (60, 300):
            span = self.cache.span(asset, step)
            if span is not None:
                return step, span
        return None

    async def snapshot(self, asset: str, lookback_s: int | None = None) -> MarketSnapshot:
        """History known now plus the anchor price; refreshes first if the cache is empty or stale."""
        now = int(self.clock())
        if await self._stale(asset, now):
            self._attempted[asset] = time.monotonic()
            report = await self.refresh(asset)
            if report.errors:
                log.debug("refresh of %s incomplete, using what is cached: %s", asset, "; ".join(report.errors))
            # A refresh may take seconds (retries, the asset lock): the latest price it fetched, published
            # after the "now" taken before it, would otherwise read as from the future and be dropped.
            now = int(self.clock())
        return await asyncio.to_thread(build_snapshot, self.cache, asset, now, lookback_s or self.window_for(asset))


def build_snapshot(cache: HistoryCache, asset: str, now: int, lookback_s: int) -> MarketSnapshot:
    """Assemble a snapshot from the cache alone (what a worker does). Raises if there is no price."""
    m1 = cache.read(asset, 60, now - lookback_s, now).known_at(now)
    m5 = cache.read(asset, 300, now - lookback_s, now).known_at(now)
    latest = cache.latest(asset)
    anchor = choose_anchor(latest, m1, m5, now)
    if anchor is None:
        raise PriceDataError(f"no price known for {asset}")
    return MarketSnapshot(asset, m1 if len(m1) else None, m5 if len(m5) else None, anchor.price,
                          anchor.publish_time)


def choose_anchor(latest: LatestPrice | None, m1: PriceHistory, m5: PriceHistory,
                  now: int) -> LatestPrice | None:
    """The newest trustworthy price: the provider's latest print or the newest close, whichever is newer."""
    candidates = [latest] if latest is not None and latest.publish_time <= now + 5 else []
    for hist in (m1, m5):
        if len(hist) and hist.last_close_time is not None:
            candidates.append(LatestPrice(float(hist.close[-1]), hist.last_close_time))
    return max(candidates, key=lambda p: p.publish_time) if candidates else None

"""Per-process worker state: loaded once (models, calibration, Redis clients), reloaded between tasks.

Loaded from ``worker_process_init``, which fires in each prefork child and, for the solo pool, in
the worker itself, so the parent process never touches the model (or CUDA).
"""

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import redis

from core.cache_redis import RedisHistoryCache
from core.engines_registry import LiveForecaster
from core.forecast import Forecaster
from core.market_data import build_snapshot
from core.prices import MarketSnapshot
from core.settings import Settings, get_settings

log = logging.getLogger(__name__)

SNAPSHOT_MEMO = 32  # (asset, window, minute) snapshots kept per worker process


@dataclass
class WorkerRuntime:
    settings: Settings
    redis: "redis.Redis"
    cache: RedisHistoryCache
    live: LiveForecaster
    _snapshots: "OrderedDict[tuple[str, int, int], tuple[object, MarketSnapshot]]" = field(
        default_factory=OrderedDict)

    def snapshot(self, asset: str, now: int, lookback_s: int) -> MarketSnapshot:
        """History and anchor per (asset, window, minute): requests in the same minute share one read, as long
        as the cache has not changed since. The miner refreshes it (new anchor, newly closed bar) right before
        it sends a request, so a memo keyed on the minute alone served an anchor up to a minute old."""
        key = (asset, lookback_s, now // 60)
        # Three small reads (the newest price and both spans) instead of days of bars.
        version = (self.cache.latest(asset), self.cache.span(asset, 60), self.cache.span(asset, 300))
        memo = self._snapshots.get(key)
        if memo is not None and memo[0] == version:
            snap = memo[1]
        else:
            snap = build_snapshot(self.cache, asset, now, lookback_s)
            self._snapshots[key] = (version, snap)
            self._snapshots.move_to_end(key)
            while len(self._snapshots) > SNAPSHOT_MEMO:
                self._snapshots.popitem(last=False)
        return snap

    @classmethod
    def load(cls, settings: Settings) -> "WorkerRuntime":
        client: "redis.Redis" = redis.Redis.from_url(settings.pool_redis_url, socket_timeout=5.0)
        runtime = cls(settings, client, RedisHistoryCache(client), LiveForecaster(settings))
        log.info("worker runtime loaded in pid %d: engine %s, artifacts %s", os.getpid(),
                 runtime.forecaster.default, runtime.artifact_version)
        return runtime

    @property
    def forecaster(self) -> Forecaster:
        """The current forecaster; a newly published artifact is loaded here, between tasks."""
        return self.live.current()

    @property
    def artifact_version(self) -> str | None:
        return self.live.version


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = WorkerRuntime.load(get_settings())
        return _runtime

"""The rolling history cache interface, and its in-process implementation (embedded mode).

The Redis implementation (shared by the miner and the workers) lives in ``core.cache_redis``.
"""

import threading
from typing import Protocol

from core.prices import LatestPrice, PriceHistory


class HistoryCache(Protocol):
    def read(self, asset: str, step: int, start: int, end: int) -> PriceHistory:
        """Cached bars with start <= ts < end (gaps stay gaps)."""
        ...

    def write(self, asset: str, history: PriceHistory) -> int:
        """Insert or overwrite bars; returns how many timestamps were new. Idempotent."""
        ...

    def span(self, asset: str, step: int) -> tuple[int, int] | None:
        """(first ts, last ts) cached, or None when nothing is cached."""
        ...

    def trim(self, asset: str, step: int, before: int) -> None:
        """Drop bars older than ``before`` (the rolling window)."""
        ...

    def set_latest(self, asset: str, price: LatestPrice) -> None:
        ...

    def latest(self, asset: str) -> LatestPrice | None:
        ...


class MemoryHistoryCache:
    """A dict of PriceHistory per (asset, step), guarded by a lock for the thread-pool executor."""

    def __init__(self) -> None:
        self._data: dict[tuple[str, int], PriceHistory] = {}
        self._latest: dict[str, LatestPrice] = {}
        self._lock = threading.Lock()

    def read(self, asset: str, step: int, start: int, end: int) -> PriceHistory:
        with self._lock:
            hist = self._data.get((asset, step))
        return hist.between(start, end) if hist is not None else PriceHistory.empty(step)

    def write(self, asset: str, history: PriceHistory) -> int:
        with self._lock:
            old = self._data.get((asset, history.step), PriceHistory.empty(history.step))
            merged = old.merge(history)
            self._data[(asset, history.step)] = merged
            return len(merged) - len(old)

    def span(self, asset: str, step: int) -> tuple[int, int] | None:
        with self._lock:
            hist = self._data.get((asset, step))
        if hist is None or not len(hist):
            return None
        return int(hist.ts[0]), int(hist.ts[-1])

    def trim(self, asset: str, step: int, before: int) -> None:
        with self._lock:
            hist = self._data.get((asset, step))
            if hist is not None and hist.last_ts is not None:
                self._data[(asset, step)] = hist.between(before, hist.last_ts + 1)

    def set_latest(self, asset: str, price: LatestPrice) -> None:
        with self._lock:
            current = self._latest.get(asset)
            if current is None or price.publish_time >= current.publish_time:
                self._latest[asset] = price

    def latest(self, asset: str) -> LatestPrice | None:
        with self._lock:
            return self._latest.get(asset)

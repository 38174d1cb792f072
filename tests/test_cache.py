"""MemoryHistoryCache, the embedded miner's cache: the rules the Redis cache keeps (tests/test_cache_redis.py)."""

import numpy as np

from core.cache import MemoryHistoryCache
from core.prices import LatestPrice, PriceHistory


def test_an_older_latest_price_never_replaces_a_newer_one() -> None:
    """Two refreshes racing (the warm-up's and a request's), or a lagging feed, may store their latest price
    out of order: the anchor must not step back to the older print."""
    cache = MemoryHistoryCache()
    cache.set_latest("BTC", LatestPrice(65_000.0, 1_000))
    cache.set_latest("BTC", LatestPrice(64_000.0, 940))
    assert cache.latest("BTC") == LatestPrice(65_000.0, 1_000)
    cache.set_latest("BTC", LatestPrice(65_100.0, 1_060))
    assert cache.latest("BTC") == LatestPrice(65_100.0, 1_060)


def test_trim_drops_only_bars_before_the_window() -> None:
    """The rolling window's trim keeps the newest bar: it is the one the next refresh resumes after."""
    cache = MemoryHistoryCache()
    ts = np.arange(0, 600, 60, dtype=np.int64)
    cache.write("BTC", PriceHistory(60, ts, np.arange(1.0, 11.0)))
    cache.trim("BTC", 60, 120)
    assert cache.span("BTC", 60) == (120, 540)
    np.testing.assert_array_equal(cache.read("BTC", 60, 0, 600).close, np.arange(3.0, 11.0))

"""RedisHistoryCache against a real redis-server: layout, gaps, idempotence, trim, concurrency."""

import threading
from functools import partial

import numpy as np
import pytest
import redis

from core.cache_redis import CacheError, RedisHistoryCache, slots_per_day
from core.constants import LATEST_PRICE_KEY, SECONDS_PER_DAY
from core.market_data import build_snapshot
from core.prices import LatestPrice, PriceHistory
from tests.provider_fixtures import random_walk_bars, redis_cache_fixtures

DAY0 = 20_600 * SECONDS_PER_DAY  # a UTC midnight

client, cache = redis_cache_fixtures()
bars = partial(random_walk_bars, level=100.0)


def test_roundtrip_across_days_keeps_gaps_and_exact_floats(cache: RedisHistoryCache) -> None:
    hist = bars(DAY0 - 300 * 60, 2000, drop=(5, 6, 7, 1500))  # spans three UTC days
    assert cache.write("BTC", hist) == len(hist)
    back = cache.read("BTC", 60, DAY0 - 10 * SECONDS_PER_DAY, DAY0 + 10 * SECONDS_PER_DAY)
    np.testing.assert_array_equal(back.ts, hist.ts)
    np.testing.assert_array_equal(back.close, hist.close)  # float64 in, float64 out
    part = cache.read("BTC", 60, int(hist.ts[3]), int(hist.ts[9]))
    np.testing.assert_array_equal(part.ts, hist.ts[3:9])  # [start, end), the gap still a gap
    assert cache.span("BTC", 60) == (hist.first_ts, hist.last_ts)
    np.testing.assert_array_equal(cache.read("BTC", 60, 0, 2 ** 40).ts, hist.ts)  # a huge range reads the span
    assert cache.span("BTC", 300) is None and len(cache.read("ETH", 60, DAY0, DAY0 + 600)) == 0


def test_writes_are_idempotent_and_count_only_new_bars(cache: RedisHistoryCache) -> None:
    hist = bars(DAY0, 500)
    assert cache.write("BTC", hist) == 500
    assert cache.write("BTC", hist) == 0
    more = bars(DAY0 + 400 * 60, 200, seed=1)  # 100 overlap (overwritten) + 100 new
    assert cache.write("BTC", more) == 100
    back = cache.read("BTC", 60, DAY0, DAY0 + SECONDS_PER_DAY)
    assert len(back) == 600
    np.testing.assert_array_equal(back.close[400:], more.close)  # the later write wins


def test_steps_are_separate_and_5_minute_days_are_288_slots(cache: RedisHistoryCache,
                                                             client: redis.Redis) -> None:
    cache.write("BTC", bars(DAY0, 288, step=300))
    cache.write("BTC", bars(DAY0, 1440))
    assert client.strlen(cache.day_key("BTC", 300, DAY0 // SECONDS_PER_DAY)) == 288 * 8
    assert client.strlen(cache.day_key("BTC", 60, DAY0 // SECONDS_PER_DAY)) == 1440 * 8
    assert len(cache.read("BTC", 300, DAY0, DAY0 + SECONDS_PER_DAY)) == 288
    with pytest.raises(ValueError):
        slots_per_day(7)


def test_trim_drops_old_days_and_moves_the_span(cache: RedisHistoryCache, client: redis.Redis) -> None:
    hist = bars(DAY0, 3 * 1440, drop=tuple(range(1440, 1450)))  # day 2 starts with a 10-minute gap
    cache.write("BTC", hist)
    cache.trim("BTC", 60, DAY0 + SECONDS_PER_DAY)
    assert not client.exists(cache.day_key("BTC", 60, DAY0 // SECONDS_PER_DAY))
    assert cache.span("BTC", 60) == (DAY0 + SECONDS_PER_DAY + 600, hist.last_ts)
    cache.trim("BTC", 60, DAY0 + SECONDS_PER_DAY + 3600 + 30)  # mid-day, off the grid: rounded up
    back = cache.read("BTC", 60, DAY0, DAY0 + 4 * SECONDS_PER_DAY)
    assert back.first_ts == DAY0 + SECONDS_PER_DAY + 3660 and len(back) == 2 * 1440 - 61
    cache.trim("BTC", 60, DAY0 + 10 * SECONDS_PER_DAY)  # everything
    assert cache.span("BTC", 60) is None and not client.keys("synth:cache*")


def test_latest_keeps_the_newest_publish_time(cache: RedisHistoryCache) -> None:
    assert cache.latest("BTC") is None
    cache.set_latest("BTC", LatestPrice(65000.5, 1_000, 1.25))
    cache.set_latest("BTC", LatestPrice(64000.0, 900))  # older: ignored
    assert cache.latest("BTC") == LatestPrice(65000.5, 1_000, 1.25)
    cache.set_latest("BTC", LatestPrice(65100.0, 1_060))
    assert cache.latest("BTC") == LatestPrice(65100.0, 1_060, None)


def test_concurrent_writers_from_several_clients(redis_url: str) -> None:
    """Eight connections write overlapping runs at once: the union lands and each bar counts once."""
    full = bars(DAY0 - 2000 * 60, 6000)
    chunks = [PriceHistory(60, full.ts[i:i + 2000], full.close[i:i + 2000]) for i in range(0, 4001, 500)]
    counts: list[int] = []
    lock = threading.Lock()

    def writer(part: PriceHistory) -> None:
        c = redis.Redis.from_url(redis_url)
        n = RedisHistoryCache(c).write("BTC", part)
        with lock:
            counts.append(n)
        c.close()

    threads = [threading.Thread(target=writer, args=(p,)) for p in chunks for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = redis.Redis.from_url(redis_url)
    cache = RedisHistoryCache(c)
    back = cache.read("BTC", 60, int(full.ts[0]), int(full.ts[-1]) + 60)
    np.testing.assert_array_equal(back.ts, full.ts)
    np.testing.assert_array_equal(back.close, full.close)
    assert sum(counts) == len(full)  # atomic check-and-set: no bar counted twice
    assert cache.span("BTC", 60) == (full.first_ts, full.last_ts)
    c.close()


def test_a_full_day_costs_about_its_payload(cache: RedisHistoryCache, client: redis.Redis) -> None:
    cache.write("BTC", bars(DAY0, 1440))
    used = client.memory_usage(cache.day_key("BTC", 60, DAY0 // SECONDS_PER_DAY))
    assert used is not None and 1440 * 8 <= used <= 1.5 * 1440 * 8


def test_refuses_text_clients_and_corrupt_days(redis_url: str, cache: RedisHistoryCache,
                                               client: redis.Redis) -> None:
    text = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        RedisHistoryCache(text)
    text.close()
    client.set(cache.day_key("BTC", 60, DAY0 // SECONDS_PER_DAY), b"x" * 13)
    with pytest.raises(CacheError, match="13 bytes"):
        cache.read("BTC", 60, DAY0, DAY0 + 600)


@pytest.mark.parametrize("price", [b"nan", b"inf", b"-2500.0", b"0", b"abc"])
def test_a_latest_price_that_is_no_price_is_refused_not_made_the_anchor(cache: RedisHistoryCache,
                                                                       client: redis.Redis, price: bytes) -> None:
    """Before: NaN, inf, a negative price or 0 in the latest-price hash was returned as is and, being newer than
    the newest close, became the anchor of every path (NaN or negative paths, refused only when the reply was
    built); a price that is no number raised a bare ValueError. A CacheError sends the miner to its own copy."""
    hist = bars(DAY0, 100)
    cache.write("BTC", hist)
    now = DAY0 + 101 * 60  # a minute after the newest close
    client.hset(LATEST_PRICE_KEY.format(asset="BTC"), mapping={"price": price, "publish_time": now - 1,
                                                               "confidence": b""})
    with pytest.raises(CacheError, match=f"{LATEST_PRICE_KEY.format(asset='BTC')} holds price"):
        cache.latest("BTC")
    with pytest.raises(CacheError):
        build_snapshot(cache, "BTC", now, SECONDS_PER_DAY)  # what a worker serves from
    cache.set_latest("BTC", LatestPrice(100.5, now))  # the next refresh's print replaces it
    assert build_snapshot(cache, "BTC", now, SECONDS_PER_DAY).anchor == 100.5


def test_a_span_that_is_no_bar_times_is_refused_by_name(cache: RedisHistoryCache, client: redis.Redis) -> None:
    """Before: a bare ValueError ("invalid literal for int()") from every refresh and snapshot of the asset."""
    hist = bars(DAY0, 100)
    cache.write("BTC", hist)
    client.hset(cache.meta_key("BTC", 60), "hi", b"1.7e9")
    with pytest.raises(CacheError, match=f"{cache.meta_key('BTC', 60)} holds span"):
        cache.span("BTC", 60)
    assert cache.write("BTC", hist) == 0  # the next write replaces it
    assert cache.span("BTC", 60) == (hist.first_ts, hist.last_ts)


def test_refresh_lock_is_exclusive(cache: RedisHistoryCache) -> None:
    first = cache.refresh_lock("BTC", ttl_s=5, wait_s=0.1)
    second = cache.refresh_lock("BTC", ttl_s=5, wait_s=0.1)
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()


def test_trim_through_a_closed_market_leaves_no_orphan_day(cache: RedisHistoryCache, client: redis.Redis) -> None:
    """A cut inside a day whose bars all lie before it (a session, then the market closed): that day is
    emptied and the span moves past it, so the trim must delete it; no later trim or clear starts there."""
    friday = bars(DAY0 + 14 * 3600 + 1800, 390)  # one regular session, 14:30-21:00 UTC
    monday = bars(DAY0 + 3 * SECONDS_PER_DAY + 14 * 3600 + 1800, 390, seed=1)
    cache.write("SPYX", friday)
    cache.write("SPYX", monday)
    cache.trim("SPYX", 60, DAY0 + 22 * 3600)  # the rolling window's edge passes Friday's close
    assert cache.span("SPYX", 60) == (monday.first_ts, monday.last_ts)
    assert not client.exists(cache.day_key("SPYX", 60, DAY0 // SECONDS_PER_DAY))
    cache.clear(["SPYX"])
    assert not client.keys("synth:cache*")


def test_claim_source_says_which_source_filled_the_asset_before(cache: RedisHistoryCache) -> None:
    assert cache.claim_source("BTC", "replay") is None  # nothing cached from anywhere yet
    assert cache.claim_source("BTC", "binance") == "replay"
    assert cache.claim_source("BTC", "binance") == "binance"
    assert cache.claim_source("ETH", "binance") is None  # per asset


def _retype(client: redis.Redis, key: str, kind: str) -> None:
    """``key`` replaced by a value of another Redis type (a wrong SET by hand, a partial restore)."""
    client.delete(key)
    if kind == "hash":
        client.hset(key, "slot", b"100.0")
    elif kind == "list":
        client.rpush(key, b"x")
    elif kind == "set":
        client.sadd(key, b"x")
    else:
        client.zadd(key, {b"x": 1.0})


@pytest.mark.parametrize("kind", ["hash", "list", "set", "zset"])
def test_a_day_of_another_type_is_refused_by_name_not_read_as_a_gap(cache: RedisHistoryCache, client: redis.Redis,
                                                                    kind: str) -> None:
    """MGET answers nil for a key of another type: the day read as a whole day of gaps, and the forecast went on
    without it (its returns and session features computed across a missing day) until a later write into that
    day failed with WRONGTYPE, which for a day already past never came. A CacheError names the key instead."""
    hist = bars(DAY0, 3 * 1440)
    cache.write("BTC", hist)
    key = cache.day_key("BTC", 60, DAY0 // SECONDS_PER_DAY + 1)
    _retype(client, key, kind)
    with pytest.raises(CacheError, match=f"{key} is a Redis {kind}, not a day of bars"):
        cache.read("BTC", 60, DAY0, DAY0 + 3 * SECONDS_PER_DAY)
    with pytest.raises(CacheError, match=f"{key} is a Redis {kind}"):
        build_snapshot(cache, "BTC", DAY0 + 3 * SECONDS_PER_DAY, 3 * SECONDS_PER_DAY)
    assert len(cache.read("BTC", 60, DAY0, DAY0 + SECONDS_PER_DAY)) == 1440  # the days around it still read
    client.delete(key)  # a day simply absent is a gap, as before
    assert len(cache.read("BTC", 60, DAY0, DAY0 + 3 * SECONDS_PER_DAY)) == 2 * 1440


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -2500.0])
def test_a_slot_holding_no_price_is_refused_not_read_as_a_gap(cache: RedisHistoryCache, client: redis.Redis,
                                                              value: float) -> None:
    """The cache writes 0.0 (a gap) or a checked price: NaN, inf or a negative slot came from elsewhere (bytes
    set by hand, a restore of another layout) and read as a silent gap."""
    cache.write("BTC", bars(DAY0, 100))
    key = cache.day_key("BTC", 60, DAY0 // SECONDS_PER_DAY)
    client.setrange(key, 7 * 8, np.array([value], dtype="<f8").tobytes())
    with pytest.raises(CacheError, match=f"{key} slot 7 holds {value!r}, not a price"):
        cache.read("BTC", 60, DAY0, DAY0 + 600)


@pytest.mark.parametrize(("ts", "why"), [(DAY0 * 1000, "milliseconds"), (-60, "before 1970")])
def test_bars_not_in_unix_seconds_are_refused_before_anything_is_written(cache: RedisHistoryCache,
                                                                         client: redis.Redis, ts: int,
                                                                         why: str) -> None:
    """Before: a bar stamped in milliseconds was written to day 20,600,000 and the span's end moved to the year
    52,000, so every later refresh asked for nothing (its tail lay past now) and the cache froze. The store
    already refused such bars; the cache now does too, and writes none of the batch."""
    good = bars(DAY0, 10)
    bad = PriceHistory(60, np.r_[good.ts, ts] if ts > 0 else np.r_[ts, good.ts], np.r_[good.close, 1.0])
    with pytest.raises(ValueError, match=why):
        cache.write("BTC", bad)
    assert cache.span("BTC", 60) is None and not client.keys("synth:cache*")


def test_a_day_longer_than_its_slots_is_refused_by_name_not_read_into_the_next_day(cache: RedisHistoryCache,
                                                                                  client: redis.Redis) -> None:
    """A day string of whole slots but more of them than the day holds (a restore of another layout): its slots past
    the day read as bars of the next day, on top of that day's own. Refused with the key named, as a torn one is."""
    cache.write("BTC", bars(DAY0, 100))
    key = cache.day_key("BTC", 60, DAY0 // SECONDS_PER_DAY)
    client.setrange(key, 1440 * 8, np.array([100.0], dtype="<f8").tobytes())  # one slot past the day's 1440
    with pytest.raises(CacheError, match=f"{key} holds {1441 * 8} bytes, not 1440 slots"):
        cache.read("BTC", 60, DAY0, DAY0 + 2 * SECONDS_PER_DAY)


def test_verify_reads_every_cached_day_the_newest_bars_too(cache: RedisHistoryCache, client: redis.Redis) -> None:
    """The refresh verifies the whole span each run: a day holding only the newest bar (the first minute after
    midnight) is read too, and the count is every bar cached."""
    hist = bars(DAY0 - 100 * 60, 101)  # the last bar opens at DAY0, alone in its day
    cache.write("BTC", hist)
    assert cache.verify("BTC", 60) == 101
    client.setrange(cache.day_key("BTC", 60, DAY0 // SECONDS_PER_DAY), 0,
                    np.array([float("nan")], dtype="<f8").tobytes())
    with pytest.raises(CacheError, match="slot 0 holds nan"):
        cache.verify("BTC", 60)

"""The rolling history cache in Redis, shared by the miner and the workers (sync redis-py client).

Layout: one Redis string per asset, step and UTC day (``CACHE_KEY``, ``day`` = unix day number
``ts // 86400``) holding every bar slot of that day as a little-endian float64: 1440 slots (11,520 B)
at 60 s, 288 at 300 s, allocated whole on the first write. A slot of 0.0 is a gap: prices are > 0.
Reading 14 days is one MGET of 14 strings; a write is one Lua script that SETRANGEs each run of
bars, counts the slots that were empty and updates the span in ``CACHE_META_KEY`` atomically, so
concurrent refreshes from several processes are idempotent and never leave the span wrong.
"""

import math
import re
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import redis
from redis.lock import Lock

from core.constants import (
    CACHE_KEY,
    CACHE_META_KEY,
    CACHE_SOURCE_KEY,
    LATEST_PRICE_KEY,
    REFRESH_LOCK_KEY,
    SECONDS_PER_DAY,
)
from core.prices import LatestPrice, PriceHistory, bar_time_problem

SLOT = np.dtype("<f8")
SLOT_BYTES = SLOT.itemsize
WIDE_READ_DAYS = 64

# KEYS[1] meta, KEYS[2..] days; ARGV: first ts, last ts, bytes per full day, then (key index, offset, data)...
_WRITE = """
local zero = string.rep(string.char(0), 8)
local full = tonumber(ARGV[3])
local new = 0
for i = 4, #ARGV, 3 do
  local key = KEYS[tonumber(ARGV[i])]
  local offset = tonumber(ARGV[i + 1])
  local data = ARGV[i + 2]
  if redis.call('STRLEN', key) < full then
    -- Allocate the whole day once: strings grown by SETRANGE get up to 2x greedy headroom.
    local old = redis.call('GET', key) or ''
    redis.call('SET', key, old .. string.rep(string.char(0), full - #old))
  end
  local old = redis.call('GETRANGE', key, offset, offset + #data - 1)
  for s = 1, #data, 8 do
    if #old < s + 7 or string.sub(old, s, s + 7) == zero then new = new + 1 end
  end
  redis.call('SETRANGE', key, offset, data)
end
local lo = tonumber(redis.call('HGET', KEYS[1], 'lo'))
local hi = tonumber(redis.call('HGET', KEYS[1], 'hi'))
if not lo or tonumber(ARGV[1]) < lo then redis.call('HSET', KEYS[1], 'lo', ARGV[1]) end
if not hi or tonumber(ARGV[2]) > hi then redis.call('HSET', KEYS[1], 'hi', ARGV[2]) end
return new
"""

# KEYS[1] meta; ARGV: day-key prefix, step, before (a multiple of step), seconds per day.
_TRIM = """
local prefix, step, before, per_day = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lo = tonumber(redis.call('HGET', KEYS[1], 'lo'))
local hi = tonumber(redis.call('HGET', KEYS[1], 'hi'))
if not lo or before <= lo then return 0 end
local function key(day) return prefix .. string.format('%d', day) end
local first_day = math.floor(lo / per_day)
local cut_day = math.floor(before / per_day)
if before > hi then
  for d = first_day, math.floor(hi / per_day) do redis.call('DEL', key(d)) end
  redis.call('DEL', KEYS[1])
  return 1
end
for d = first_day, cut_day - 1 do redis.call('DEL', key(d)) end
local cut_slot = (before - cut_day * per_day) / step
if cut_slot > 0 and redis.call('EXISTS', key(cut_day)) == 1 then
  redis.call('SETRANGE', key(cut_day), 0, string.rep(string.char(0), cut_slot * 8))
end
local zero = string.rep(string.char(0), 8)
for d = cut_day, math.floor(hi / per_day) do
  local blob = redis.call('GET', key(d))
  if blob then
    for s = 1, #blob - 7, 8 do
      if string.sub(blob, s, s + 7) ~= zero then
        redis.call('HSET', KEYS[1], 'lo', string.format('%d', d * per_day + (s - 1) / 8 * step))
        return 1
      end
    end
    -- Every slot empty (the cut took all its bars, e.g. a closed market's last session): the new lo lies
    -- beyond this day, where no later trim or clear starts, so drop the day now or it stays forever.
    redis.call('DEL', key(d))
  end
end
redis.call('DEL', KEYS[1])
return 1
"""

# Keep the newest latest price: an older publish time never overwrites a newer one.
_SET_LATEST = """
local current = tonumber(redis.call('HGET', KEYS[1], 'publish_time'))
if current and tonumber(ARGV[2]) < current then return 0 end
redis.call('HSET', KEYS[1], 'price', ARGV[1], 'publish_time', ARGV[2], 'confidence', ARGV[3])
return 1
"""


class CacheError(RuntimeError):
    """The cache holds something it could not have written (a day string of the wrong size, a price NaN)."""


def slots_per_day(step: int) -> int:
    if step <= 0 or SECONDS_PER_DAY % step:
        raise ValueError(f"step {step} does not divide a day")
    return SECONDS_PER_DAY // step


class RedisHistoryCache:
    """``HistoryCache`` over Redis; the client must return bytes (``decode_responses=False``)."""

    def __init__(self, client: redis.Redis) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisHistoryCache needs a client with decode_responses=False (it stores binary)")
        self.client = client
        self._write = client.register_script(_WRITE)
        self._trim = client.register_script(_TRIM)
        self._set_latest = client.register_script(_SET_LATEST)

    # --- keys ------------------------------------------------------------------------------------------
    @staticmethod
    def day_key(asset: str, step: int, day: int) -> str:
        return CACHE_KEY.format(asset=asset, step=step, day=day)

    @staticmethod
    def meta_key(asset: str, step: int) -> str:
        return CACHE_META_KEY.format(asset=asset, step=step)

    @staticmethod
    def _prefix(asset: str, step: int) -> str:
        key = CACHE_KEY.format(asset=asset, step=step, day="")
        if CACHE_KEY.format(asset=asset, step=step, day=0) != key + "0":
            raise ValueError("CACHE_KEY must end with {day} for the trim script")
        return key

    # --- HistoryCache ------------------------------------------------------------------------------------
    def read(self, asset: str, step: int, start: int, end: int) -> PriceHistory:
        if end - start > WIDE_READ_DAYS * SECONDS_PER_DAY:  # a wide range: only the days the span covers
            span = self.span(asset, step)
            if span is None:
                return PriceHistory.empty(step)
            start, end = max(start, span[0]), min(end, span[1] + step)
        if end <= start:
            return PriceHistory.empty(step)
        per_day = slots_per_day(step)
        days = list(range(start // SECONDS_PER_DAY, (end - 1) // SECONDS_PER_DAY + 1))
        keys = [self.day_key(asset, step, d) for d in days]
        blobs = cast(list[bytes | None], self.client.mget(keys))
        self._check_absent([key for key, blob in zip(keys, blobs) if blob is None])
        ts_parts: list[np.ndarray[Any, np.dtype[np.int64]]] = []
        close_parts: list[np.ndarray[Any, np.dtype[np.float64]]] = []
        for day, key, blob in zip(days, keys, blobs):
            if not blob:
                continue
            if len(blob) % SLOT_BYTES or len(blob) > per_day * SLOT_BYTES:
                raise CacheError(f"{key} holds {len(blob)} bytes, not {per_day} slots")
            values = np.frombuffer(blob, dtype=SLOT).astype(np.float64)
            # The cache writes 0.0 (a gap) or a checked price: NaN, inf or a negative slot came from elsewhere.
            bad = np.flatnonzero(~((values == 0.0) | (np.isfinite(values) & (values > 0))))
            if bad.size:
                raise CacheError(f"{key} slot {int(bad[0])} holds {float(values[bad[0]])!r}, not a price "
                                 f"({bad.size} such slot(s))")
            present = np.flatnonzero(values > 0)
            ts_parts.append(day * SECONDS_PER_DAY + present.astype(np.int64) * step)
            close_parts.append(values[present])
        if not ts_parts:
            return PriceHistory.empty(step)
        hist = PriceHistory(step, np.concatenate(ts_parts), np.concatenate(close_parts))
        return hist.between(start, end)

    def _check_absent(self, keys: Sequence[str]) -> None:
        """MGET answers nil for a key of another type as for a missing one: such a day (a hash SET by hand, a
        partial restore) read as a day of gaps, found only once bars were written into it again, which for a day
        already past never happens. One TYPE per day MGET found nothing for, pipelined."""
        if not keys:
            return
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        for key, kind in zip(keys, cast(list[bytes], pipe.execute())):
            if kind not in (b"none", b"string"):  # "string": created between the MGET and the TYPE, read next time
                raise CacheError(f"{key} is a Redis {kind.decode(errors='replace')}, not a day of bars")

    def verify(self, asset: str, step: int) -> int:
        """Read every cached day of ``asset`` at ``step``; a CacheError names the first damaged one. Returns the
        bars cached. What the refresh runs each time: a day inside the window is read by forecasts but never
        written or trimmed again, so its damage would otherwise last until it left the window (14 days)."""
        span = self.span(asset, step)
        return 0 if span is None else len(self.read(asset, step, span[0], span[1] + step))

    def write(self, asset: str, history: PriceHistory) -> int:
        """Set every bar of ``history``; returns how many of its slots were empty before. Atomic."""
        if not len(history):
            return 0
        step = history.step
        # As the store: a bar in milliseconds landed in the year 52,000 and moved the span's end there, so every
        # later refresh asked for nothing (its tail lay past now) and the cache froze.
        problem = bar_time_problem(step, history.ts)
        if problem is not None:
            raise ValueError(f"{asset} {step} s: {problem}; nothing cached")
        keys: list[str] = [self.meta_key(asset, step)]
        args: list[Any] = [int(history.ts[0]), int(history.ts[-1]), slots_per_day(step) * SLOT_BYTES]
        for day, offset, payload in _runs(history):
            keys.append(self.day_key(asset, step, day))
            args += [len(keys), offset * SLOT_BYTES, payload]
        return int(cast(int, self._write(keys=keys, args=args)))

    def span(self, asset: str, step: int) -> tuple[int, int] | None:
        lo, hi = cast(list[bytes | None], self.client.hmget(self.meta_key(asset, step), ["lo", "hi"]))
        if lo is None or hi is None:
            return None
        try:
            return int(lo), int(hi)
        except ValueError:  # a bare "invalid literal for int()" named neither the key nor the cache
            raise CacheError(f"{self.meta_key(asset, step)} holds span {lo!r}..{hi!r}, not bar times") from None

    def trim(self, asset: str, step: int, before: int) -> None:
        before = -(-before // step) * step
        self._trim(keys=[self.meta_key(asset, step)],
                   args=[self._prefix(asset, step), step, before, SECONDS_PER_DAY])

    def set_latest(self, asset: str, price: LatestPrice) -> None:
        confidence = "" if price.confidence is None else repr(float(price.confidence))
        self._set_latest(keys=[LATEST_PRICE_KEY.format(asset=asset)],
                         args=[repr(float(price.price)), int(price.publish_time), confidence])

    def latest(self, asset: str) -> LatestPrice | None:
        fields = cast(list[bytes | None], self.client.hmget(LATEST_PRICE_KEY.format(asset=asset),
                                                            ["price", "publish_time", "confidence"]))
        price, publish_time, confidence = fields
        if price is None or publish_time is None:
            return None
        key = LATEST_PRICE_KEY.format(asset=asset)
        try:
            latest = LatestPrice(price=float(price), publish_time=int(publish_time),
                                 confidence=float(confidence) if confidence else None)
        except ValueError:
            raise CacheError(f"{key} holds price {price!r} at {publish_time!r}, not a price and a time") from None
        # set_latest writes only checked prints: NaN, inf or <= 0 here became every path's anchor (paths
        # no reply could carry) where a refusal sends the miner to its own copy.
        if not (math.isfinite(latest.price) and latest.price > 0):
            raise CacheError(f"{key} holds price {latest.price!r}, not a price")
        return latest

    # --- beyond the protocol ---------------------------------------------------------------------------
    def refresh_lock(self, asset: str, ttl_s: float, wait_s: float) -> Lock:
        """A per-asset lock so concurrent refreshers do not all call the provider for the same tail."""
        # thread_local=False: the refresh acquires and releases from different worker threads.
        return cast(Lock, self.client.lock(REFRESH_LOCK_KEY.format(asset=asset), timeout=ttl_s,
                                           blocking_timeout=wait_s, thread_local=False))

    def claim_source(self, asset: str, source: str) -> str | None:
        """Record that ``source`` fills the asset's cache from now on; returns the one that did before."""
        key = CACHE_SOURCE_KEY.format(asset=asset)
        pipe = self.client.pipeline()  # MULTI/EXEC: SET ... GET needs Redis 6.2, and GETSET is deprecated
        pipe.get(key)
        pipe.set(key, source)
        before = cast(list[bytes | None], pipe.execute())[0]
        return None if before is None else before.decode(errors="replace")

    def day_keys(self, asset: str, step: int) -> list[str]:
        """Keys of the days the span covers (for memory reports and operators)."""
        span = self.span(asset, step)
        if span is None:
            return []
        return [self.day_key(asset, step, d) for d in range(span[0] // SECONDS_PER_DAY,
                                                             span[1] // SECONDS_PER_DAY + 1)]

    def clear(self, assets: Sequence[str], steps: Sequence[int] = (60, 300)) -> None:
        """Forget assets entirely (days, span and latest price; the source they came from stays)."""
        for asset in assets:
            for step in steps:
                self.trim(asset, step, 2 ** 62)
            self.client.delete(LATEST_PRICE_KEY.format(asset=asset))


    def drop(self, asset: str) -> int:
        """Delete every cached key of ``asset`` (days, spans, latest price, source), whatever they hold.
        ``clear`` goes by the span, which a damaged entry makes unreadable: this is how one is repaired."""
        name = re.sub(r"([*?\[\]\\])", r"\\\1", asset)  # a glob pattern: the asset matched literally
        patterns = (CACHE_KEY.format(asset=name, step="*", day="*"), CACHE_META_KEY.format(asset=name, step="*"))
        keys = [key for pattern in patterns for key in self.client.scan_iter(match=pattern, count=1000)]
        return int(self.client.delete(*keys, LATEST_PRICE_KEY.format(asset=asset),
                                      CACHE_SOURCE_KEY.format(asset=asset)))


def _runs(history: PriceHistory) -> list[tuple[int, int, bytes]]:
    """(day, first slot, packed closes) for each run of consecutive bars within one UTC day."""
    step = history.step
    day = history.ts // SECONDS_PER_DAY
    slot = (history.ts - day * SECONDS_PER_DAY) // step
    breaks = np.flatnonzero((np.diff(day) != 0) | (np.diff(slot) != 1)) + 1
    bounds = np.r_[0, breaks, history.ts.size]
    packed = history.close.astype(SLOT).tobytes()
    return [(int(day[a]), int(slot[a]), packed[a * SLOT_BYTES: b * SLOT_BYTES])
            for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]

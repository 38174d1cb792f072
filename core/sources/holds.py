"""Retry-After holds: the provider hosts that asked (429, 5xx, Binance's 418 ban) to be sent nothing for a while.

``LocalHostHolds`` keeps them in this process: embedded mode, no Redis. ``RedisHostHolds`` shares them with every
process of the fleet: the cpu worker's prefork children, and refreshes on other hosts behind the same IP, call the
same providers, and Binance bans an IP longer each time it ignores a Retry-After. A shared hold is a key per origin
(``HOST_HOLD_KEY``) whose TTL is the wait left, by Redis's clock, so hosts whose clocks disagree still agree on it;
it only ever grows. Every hold is kept in the process too: with Redis unreachable the holds are this process's own,
as they were before Redis shared them, never fewer.
"""

import asyncio
import json
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core.constants import HOST_HOLD_KEY, HOST_HOLD_MAX_S, HOST_HOLD_REDIS_RETRY_S, HOST_HOLD_REDIS_TIMEOUT_S

log = logging.getLogger(__name__)

# origin -> monotonic time before which it asked (Retry-After) not to be called again. Kept across calls,
# event loops and clients: a refresh's ``latest`` right after its failed ``history``, another asset's page,
# or the next run of the refresh job (which builds new clients every minute) would otherwise hit a host that
# just answered 429 or 418 (Binance bans such IPs, longer for each repeat). The wait is asked of this address,
# not of one client.
HOST_HOLDS: dict[str, float] = {}

# Set while this process has said that its holds are its own (Redis unreachable): one line per outage, not one
# per refresh run (each builds its own holds) or per request.
_OUTAGE_SAID = threading.Event()

# KEYS[1] the origin's hold; ARGV: its length in ms, the document. A hold is extended, never shortened; whatever
# else the key holds (another type, a value that is no hold, no expiry) is replaced. "No hold" as parse_hold reads
# it: an asked_s that is negative or not finite was kept here while every reader ignored it, so the fleet shared
# no real Retry-After for that host until the key lapsed.
_HOLD = """
local left = redis.call('PTTL', KEYS[1])
if left >= tonumber(ARGV[1]) and redis.call('TYPE', KEYS[1]).ok == 'string' then
  local ok, doc = pcall(cjson.decode, redis.call('GET', KEYS[1]))
  local asked = ok and type(doc) == 'table' and doc.asked_s
  if type(asked) == 'number' and asked >= 0 and asked < math.huge then return left end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
return tonumber(ARGV[1])
"""


@dataclass(frozen=True)
class Hold:
    """A shared hold in force, as ``synth-miner status`` shows it."""

    origin: str
    left_s: float
    asked_s: float  # the Retry-After the host sent
    status: int | None  # the HTTP status it came with (418: Binance banned the IP)
    by: str | None  # the client that was told (binance, pyth, hyperliquid)


def hold_key(origin: str) -> str:
    return HOST_HOLD_KEY.format(origin=origin)


def parse_hold(origin: str, raw: object, pttl: object) -> Hold | str | None:
    """The hold a key's value and PTTL make, None when the key is gone, or why it is no hold."""
    if isinstance(pttl, Exception) or not isinstance(pttl, int):
        return f"its TTL is unreadable ({pttl!r})"
    if pttl == -2 or raw is None:
        return None  # expired between two reads
    if isinstance(raw, Exception):  # WRONGTYPE: a hash or a list under our name
        return f"it is not a string ({raw})"
    try:
        doc = json.loads(cast(bytes | str, raw))
    except (TypeError, ValueError):
        doc = None
    asked = doc.get("asked_s") if isinstance(doc, dict) else None
    if isinstance(asked, bool) or not isinstance(asked, (int, float)) or not math.isfinite(asked) or asked < 0:
        return f"its value {raw!r:.80} is no hold"
    if pttl < 0:  # every hold is written with an expiry: one without would hold the host forever
        return "it never expires"
    status, by = cast(dict[str, Any], doc).get("status"), cast(dict[str, Any], doc).get("by")
    return Hold(origin, pttl / 1000, float(asked), status if isinstance(status, int) else None,
                by if isinstance(by, str) else None)


class HostHolds(ABC):
    """Where an ``HttpClient`` keeps and looks up its hosts' Retry-After holds."""

    @abstractmethod
    async def left(self, origin: str) -> float:
        """Seconds ``origin`` asked to be sent nothing more for (0 when none)."""

    @abstractmethod
    async def hold(self, origin: str, seconds: float, status: int, by: str) -> None:
        """``origin`` answered ``status`` with a Retry-After of ``seconds``: extend its hold to that, if longer."""

    def close(self) -> None:
        """Release what the holds keep open (a Redis connection)."""


class LocalHostHolds(HostHolds):
    """The holds of this process (by default ``HOST_HOLDS``, shared by every client in it)."""

    def __init__(self, until: dict[str, float] | None = None) -> None:
        self.until = HOST_HOLDS if until is None else until

    def left_now(self, origin: str) -> float:
        return max(0.0, self.until.get(origin, 0.0) - time.monotonic())

    def extend(self, origin: str, seconds: float) -> None:
        until = time.monotonic() + seconds
        if until > self.until.get(origin, 0.0):
            self.until[origin] = until

    async def left(self, origin: str) -> float:
        return self.left_now(origin)

    async def hold(self, origin: str, seconds: float, status: int, by: str) -> None:
        self.extend(origin, seconds)


class RedisHostHolds(HostHolds):
    """Holds shared through Redis, each kept in ``local`` too.

    A host held in ``local`` costs no Redis trip; any other is one pipelined GET and PTTL (the hold found is then
    kept in ``local`` for as long as Redis says). Redis failing (down, slow, refusing) is logged once, and for
    ``retry_s`` the holds are ``local``'s alone: a refresh never waits on it, and never holds fewer hosts than one
    without Redis."""

    def __init__(self, client: redis.Redis, local: LocalHostHolds | None = None,
                 retry_s: float = HOST_HOLD_REDIS_RETRY_S) -> None:
        self.client = client
        self.local = local or LocalHostHolds()
        self.retry_s = retry_s
        self._script = client.register_script(_HOLD)
        self._skip_until = 0.0  # monotonic: Redis failed, ask it again from then
        self._unreadable: set[str] = set()  # keys already said to hold no hold

    @classmethod
    def from_url(cls, url: str, local: LocalHostHolds | None = None,
                 retry_s: float = HOST_HOLD_REDIS_RETRY_S) -> "RedisHostHolds":
        # One immediate retry: a Redis restart closes the pooled connection, and the first command after it would
        # fail. redis-py's default (10 retries, backoff to 1 s) kept a dead Redis's callers for seconds.
        client = redis.Redis.from_url(url, socket_timeout=HOST_HOLD_REDIS_TIMEOUT_S,
                                      socket_connect_timeout=HOST_HOLD_REDIS_TIMEOUT_S, retry=Retry(NoBackoff(), 1),
                                      retry_on_error=[redis.ConnectionError])
        return cls(client, local, retry_s)

    async def left(self, origin: str) -> float:
        known = self.local.left_now(origin)
        if known > 0 or time.monotonic() < self._skip_until:
            return known
        key = hold_key(origin)
        try:
            raw, pttl = await asyncio.to_thread(self._read, key)
        except redis.RedisError as exc:
            self._failed(exc)
            return known
        if isinstance(pttl, Exception):  # the server refused the read itself (NOAUTH, LOADING...)
            self._failed(pttl)
            return known
        self._answered()
        found = parse_hold(origin, raw, pttl)
        if isinstance(found, str):
            if key not in self._unreadable:
                self._unreadable.add(key)
                log.warning("%s ignored: %s (a Retry-After hold is a JSON document with asked_s, and an expiry); "
                            "the next Retry-After from %s replaces it", key, found, origin)
            return known
        if found is None:
            return known
        self.local.extend(origin, found.left_s)
        return found.left_s

    def _read(self, key: str) -> tuple[object, object]:
        """The key's value and PTTL in one round trip; a reply that is an error (WRONGTYPE) comes back as one."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            raw, pttl = pipe.execute(raise_on_error=False)
        return raw, pttl

    async def hold(self, origin: str, seconds: float, status: int, by: str) -> None:
        self.local.extend(origin, seconds)  # first: kept whatever becomes of Redis
        ms = math.ceil(min(seconds, HOST_HOLD_MAX_S) * 1000)
        if ms <= 0 or time.monotonic() < self._skip_until:
            return
        doc = json.dumps({"asked_s": seconds, "status": status, "by": by})
        try:
            kept = await asyncio.to_thread(self._script, keys=[hold_key(origin)], args=[ms, doc])
        except redis.RedisError as exc:
            self._failed(exc)
            return
        self._answered()
        self.local.extend(origin, int(cast(int, kept)) / 1000)  # a longer hold another process took

    def _failed(self, exc: Exception) -> None:
        self._skip_until = time.monotonic() + self.retry_s
        if not _OUTAGE_SAID.is_set():
            _OUTAGE_SAID.set()
            log.warning("Retry-After holds are kept in this process only, not shared with the fleet: Redis failed "
                        "(%s: %s); asked again every %.0f s", type(exc).__name__, exc, self.retry_s)

    def _answered(self) -> None:
        if _OUTAGE_SAID.is_set():
            _OUTAGE_SAID.clear()
            log.info("Retry-After holds are shared through Redis again")

    def close(self) -> None:
        self.client.close()


def host_holds(redis_url: str | None) -> HostHolds:
    """The fleet's holds when there is a Redis (``redis_url``), else this process's."""
    if not redis_url:
        return LocalHostHolds()
    try:
        return RedisHostHolds.from_url(redis_url)
    except ValueError:  # redis-py's message may quote the URL (its password): not repeated
        log.warning("Retry-After holds are kept in this process only: SYNTH_REDIS_URL is not a Redis URL")
        return LocalHostHolds()


def read_holds(client: redis.Redis, scan_count: int = 1000) -> tuple[list[Hold], list[str]]:
    """Every shared hold in force, longest first, and a line for each hold key that holds none. One SCAN, then
    one pipelined read for them all."""
    pattern = hold_key("*")
    prefix = pattern[:-1]
    keys = [k.decode(errors="replace") if isinstance(k, bytes) else str(k)
            for k in client.scan_iter(pattern, count=scan_count)]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.get(key)
            pipe.pttl(key)
        replies = pipe.execute(raise_on_error=False)
    holds: list[Hold] = []
    problems: list[str] = []
    for key, raw, pttl in zip(keys, replies[::2], replies[1::2]):
        found = parse_hold(key.removeprefix(prefix), raw, pttl)
        if isinstance(found, Hold):
            holds.append(found)
        elif found is not None:
            problems.append(f"{key} is no Retry-After hold ({found}): ignored")
    return sorted(holds, key=lambda h: -h.left_s), sorted(problems)

"""Where forecasts are computed: an in-process executor (embedded mode) or the Celery pool on Redis."""

import asyncio
import logging
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timezone
from typing import Protocol

import redis.asyncio as aioredis
from celery import Celery
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from core.constants import (
    CLOCK_AHEAD_MARGIN_S,
    CLOCK_SKEW_LOG_EVERY_S,
    CLOCK_SKEW_WARN_S,
    HEARTBEAT_STALE_AFTER_S,
    HEARTBEAT_TTL_S,
    LIVE_READERS_CHECK_S,
    LOST_TASK_RESEND_MIN_S,
    RESULT_KEY,
    TASK_FORECAST,
)
from core.forecast import ForecasterSource, ForecastResult
from core.heartbeats import HEARTBEAT_PATTERN, Reading, key_age, live_readers, parse_heartbeat
from core.prices import MarketSnapshot
from core.prompts import ForecastRequest
from core.settings import Settings
from core.transport import ComputedPaths, decode_result
from miner.result_wait import PoolError, TaskLost, await_result

__all__ = ["CeleryPool", "EmbeddedPool", "ForecastPool", "PoolError", "celery_client"]

log = logging.getLogger(__name__)


class ForecastPool(Protocol):
    name: str

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        """Paths for the request and the engine that made them, or PoolError; must return or raise by
        ``deadline`` (epoch seconds)."""
        ...

    async def close(self) -> None:
        ...


class EmbeddedPool:
    """No Redis, no GPU: the forecaster runs on a small thread pool beside the event loop."""

    name = "embedded"

    def __init__(self, forecaster: ForecasterSource, threads: int = 2, max_overrun: int = 4) -> None:
        self.forecaster = forecaster
        # A thread cannot be stopped: a forecast still running when its caller gave up keeps its thread.
        # Such overruns get threads of their own (up to max_overrun) instead of the ``threads`` slots, or a
        # few slow forecasts left every later request queued behind them until it timed out too.
        self.max_overrun = max_overrun
        self.executor = ThreadPoolExecutor(max_workers=threads + max_overrun, thread_name_prefix="forecast")
        self.threads = threads
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None  # bound to one loop
        self._overrun: set[Future[ForecastResult]] = set()

    def _slots_here(self) -> asyncio.Semaphore:
        """The slots of the running event loop (an asyncio semaphore works in the loop it first waited in)."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(self.threads))
        return self._slots[1]

    def _run(self, request: ForecastRequest, snapshot: MarketSnapshot) -> ForecastResult:
        # current() may load a newly published artifact (models): in the thread, never on the event loop.
        return self.forecaster.current().run(request, snapshot)

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        left = deadline - time.time()
        if left <= 0:  # a job started now would only take a thread past its deadline
            raise PoolError("embedded forecast: no time left")
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + left):
                async with self._slots_here():
                    self._overrun = {f for f in self._overrun if not f.done()}
                    if len(self._overrun) >= self.max_overrun:  # fail now: the fallback answers at once
                        raise PoolError(f"embedded pool: {len(self._overrun)} forecasts still running "
                                        "past their deadline")
                    job = self.executor.submit(self._run, request, snapshot)
                    try:
                        result = await asyncio.wrap_future(job)
                    finally:
                        if not job.done():  # timed out or cancelled while it runs: its slot is freed
                            self._overrun.add(job)
        except TimeoutError:
            raise PoolError("embedded forecast timed out") from None
        return ComputedPaths(result.paths, result.engine, result.fallback_reason)

    async def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def celery_client(settings: Settings) -> Celery:
    """A producer-only Celery app: sends tasks by name, so the miner never imports the workers."""
    app = Celery("synth-miner-client", broker=settings.redis_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_publish_retry=False,  # a dead broker must fail fast: the fallback answers instead
        broker_connection_timeout=1.0,
        broker_connection_retry=False,
        broker_transport_options={"socket_timeout": 1.0, "socket_connect_timeout": 1.0, "max_retries": 0},
        task_ignore_result=True,
    )
    return app


class CeleryPool:
    """Sends the request to a worker queue and awaits float32 bytes on a Redis list (BLPOP)."""

    name = "celery"

    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url, "CeleryPool needs SYNTH_REDIS_URL"
        self.settings = settings
        self.app = celery_client(settings)
        # One immediate retry on a dropped connection: after a Redis restart the pooled connection is
        # closed by the server, and without it the first request's read failed although its task was
        # queued and computed. A Redis that is really down still fails within the 1 s connect timeout.
        self.redis = aioredis.Redis.from_url(settings.redis_url, socket_timeout=None, socket_connect_timeout=1.0,
                                             health_check_interval=30, retry=Retry(NoBackoff(), 1),
                                             retry_on_error=[RedisConnectionError])
        # When the heartbeats were read, and what they said (see _check_reader).
        self._live: tuple[float, list[Reading]] | None = None
        self._live_lock = asyncio.Lock()
        self._skew_warned: dict[str, float] = {}  # worker name -> when its clock was last warned of (monotonic)
        # Worker name -> when (time.time) a forecast's lease showed it stopped mid-task: its heartbeat stays fresh
        # for up to HEARTBEAT_STALE_AFTER_S more, and forecasts sent its way meanwhile waited out their deadline.
        self._lost: dict[str, float] = {}

    async def _check_reader(self, queue: str, deadline: float) -> None:
        """PoolError unless a live worker process that would run it reads ``queue``. Without one, a task sent now
        would sit in the queue, or be discarded as expired by a worker whose clock runs ahead, while the miner
        waits up to max_wait_s: the fallback answers at once instead. Liveness is the heartbeat key's age in
        Redis, not the worker's clock. Read at most every LIVE_READERS_CHECK_S, so a worker that comes up is used
        within that. A worker seen to stop mid-task (see _await_result) reads nothing until it beats again."""
        async with self._live_lock:  # one read for a burst of requests
            now = time.time()
            if self._live is None or now - self._live[0] >= LIVE_READERS_CHECK_S:
                try:
                    readings = await asyncio.wait_for(self._read_readers(),
                                                      timeout=max(0.05, min(1.0, deadline - now)))
                except TimeoutError:
                    raise PoolError("pool unavailable: worker heartbeats not read within 1 s") from None
                self._live = (now, readings)
            ahead = live_readers(self._live[1], self._lost).get(queue)
        if ahead is None:
            raise PoolError(f"no live worker reads queue {queue} (none has announced itself in the last "
                            f"{HEARTBEAT_STALE_AFTER_S:.0f} s)")
        left = deadline - time.time()
        # A lead under the margin is measurement noise: a synced fleet keeps the deadlines it always had.
        if ahead >= CLOCK_AHEAD_MARGIN_S and left - ahead < CLOCK_AHEAD_MARGIN_S:
            raise PoolError(f"every live worker reading queue {queue} has its clock {ahead:.0f} s or more ahead of "
                            f"the miner's: it would discard a task with {left:.1f} s left as expired")

    async def _read_readers(self) -> list[Reading]:
        """The heartbeats and their keys' TTL left, in one pipelined round trip after the SCAN."""
        keys = [key async for key in self.redis.scan_iter(match=HEARTBEAT_PATTERN, count=1000)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            replies = await pipe.execute(raise_on_error=False) if keys else []
        now = time.time()
        readings = []
        for raw, pttl in zip(replies[::2], replies[1::2]):
            beat = None if isinstance(raw, Exception) else parse_heartbeat(raw)
            if beat is not None:  # a key gone between SCAN and GET, or not a heartbeat: skipped
                readings.append(Reading(beat, key_age(pttl), now))
        self._warn_of_skewed_clocks(readings)
        return readings

    def _warn_of_skewed_clocks(self, readings: list[Reading]) -> None:
        """A warning per live worker whose clock is off, at most every CLOCK_SKEW_LOG_EVERY_S per worker."""
        now = time.monotonic()
        self._skew_warned = {name: at for name, at in self._skew_warned.items()
                             if now - at < CLOCK_SKEW_LOG_EVERY_S}  # names of processes long gone are dropped
        for reading in readings:
            skew, name = reading.skew_s, str(reading.beat.get("name") or "?")
            if not reading.alive or skew is None or abs(skew) <= CLOCK_SKEW_WARN_S or name in self._skew_warned:
                continue
            self._skew_warned[name] = now
            if skew > 0:
                log.warning("worker %s: its clock is %.0f s ahead of the miner's: it discards as expired every task "
                            "sent with less than that left, so it is sent none of those (the fallback answers "
                            "them): sync the clocks (NTP)", name, skew)
            else:
                log.warning("worker %s: its clock is %.0f s behind the miner's: still used (its heartbeat's age in "
                            "Redis says it is alive), but it runs tasks past their expiry by as much: sync the "
                            "clocks (NTP)", name, -skew)

    def _send(self, request: ForecastRequest, deadline: float, request_id: str, result_key: str) -> None:
        self.app.send_task(
            TASK_FORECAST,
            kwargs={"request": request.__dict__, "result_key": result_key, "deadline": deadline,
                    "request_id": request_id},
            queue=self.settings.infer_queue(request.time_increment),
            expires=datetime.fromtimestamp(deadline, tz=timezone.utc),  # revoked, not run, once useless
            task_id=request_id,
        )

    async def _enqueue(self, request: ForecastRequest, deadline: float, request_id: str) -> str:
        """Send the task (kombu blocks: off the loop, for at most 2 s); its result key."""
        result_key = RESULT_KEY.format(request_id=request_id)
        await asyncio.wait_for(asyncio.to_thread(self._send, request, deadline, request_id, result_key),
                               timeout=max(0.05, min(2.0, deadline - time.time())))
        return result_key

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        request_id = request_id or uuid.uuid4().hex  # it names the task, its result and its lease
        queue = self.settings.infer_queue(request.time_increment)
        try:
            await self._check_reader(queue, deadline)
            result_key = await self._enqueue(request, deadline, request_id)
            remaining = deadline - time.time()
            if remaining <= 0:
                raise PoolError("no time left after enqueue")
            async with asyncio.timeout(remaining + 0.5):  # a hung Redis answers no BLPOP (and no lease check)
                blob, resent_after = await self._await_result(request, queue, deadline, request_id, result_key)
        except TimeoutError:
            raise PoolError("pool did not answer before the deadline") from None
        except PoolError:
            raise
        except Exception as exc:  # broker or Redis down, connection reset...
            raise PoolError(f"pool unavailable: {type(exc).__name__}: {exc}") from exc
        try:
            computed = await asyncio.to_thread(decode_result, blob)
        except ValueError as exc:
            raise PoolError(str(exc)) from exc
        return replace(computed, resent_after=resent_after) if resent_after else computed

    async def _await_result(self, request: ForecastRequest, queue: str, deadline: float, request_id: str,
                            result_key: str) -> tuple[bytes, str | None]:
        """The result, and why the request was sent again (None: it was not). A task whose result cannot come (its
        worker stopped mid-task, or Redis lost it in a restart: see miner/result_wait.py) is sent again once, under
        a new id, if a live reader other than a lost worker exists and LOST_TASK_RESEND_MIN_S are left; else
        PoolError now, and the fallback answers, instead of after the whole wait. The re-sent task expires at the
        same deadline, so the fallback's time is never touched."""
        keys, attempt, resent_after = [result_key], request_id, None
        while True:
            try:
                return await await_result(self.redis, keys, attempt, queue, deadline), resent_after
            except TaskLost as exc:
                lost = exc
            except PoolError as exc:
                if resent_after is None:
                    raise
                raise PoolError(f"{exc} (sent again after {resent_after})") from None
            if lost.worker is not None:
                self._lost_worker(lost.worker)
            if resent_after is not None:
                raise PoolError(f"{lost.reason}, after it was sent again because {resent_after}")
            left = deadline - time.time()
            if left < LOST_TASK_RESEND_MIN_S:
                raise PoolError(f"{lost.reason}; {left:.1f} s left, too little to send it again")
            attempt = f"{request_id}-2"  # a new task id and result key: nothing of the lost run can land in it
            try:
                await self._check_reader(queue, deadline)
                # Both keys from now on: a frozen worker that resumes may still answer the first.
                keys.insert(0, await self._enqueue(request, deadline, attempt))
            except Exception as exc:  # noqa: BLE001 - any failure to re-send: the fallback answers now
                why = str(exc) if isinstance(exc, PoolError) else f"{type(exc).__name__}: {exc}"
                raise PoolError(f"{lost.reason}; not sent again: {why}") from exc
            resent_after = lost.short
            log.warning("request %s: %s: sent again as %s with %.1f s left", request_id, lost.reason, attempt, left)

    def _lost_worker(self, worker: str) -> None:
        now = time.time()
        # Past HEARTBEAT_TTL_S the heartbeat of a worker that never beat again has expired: nothing to hide.
        self._lost = {name: at for name, at in self._lost.items() if now - at < HEARTBEAT_TTL_S}
        self._lost[worker] = now

    async def close(self) -> None:
        await self.redis.aclose()

"""One request from receipt to a checked reply: check, share, enqueue, await, fall back, round, check.

Identical requests (same asset, start time, grid and path count), as several validators send in the
same minute, are computed once and the pool's rendered reply is reused until the prompt starts (for
at most ``DONE_MAX_AGE_S``: a forecast kept longer is stale). A fallback reply is not reused (the pool
may be back for the next asker), nor one a worker's stand-in engine computed (its model may serve the
next), and a request that joins a computation working to a later deadline than its own falls back by its
own deadline. One that joined a computation with an earlier deadline, which fell back because the pool
was late, asks the pool again while its own deadline leaves time for it (``JOINER_POOL_RETRY_MIN_S``).
"""

import asyncio
import functools
import logging
import math
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from core.constants import JOINER_POOL_RETRY_MIN_S, POOL_LATE_SLACK_S
from core.forecast import ForecasterSource
from core.prices import MarketSnapshot
from core.prompts import ForecastRequest
from core.response import check_paths, render_json, round_for_wire
from core.settings import Settings
from miner.data import MinerData
from miner.pool import ForecastPool

log = logging.getLogger(__name__)
_Out = TypeVar("_Out")


DONE_CACHE_SIZE = 256
# A 24 h answer of 1000 paths keeps ~2.9 MB (its rendered body); 10 000 paths, ~29 MB. Distinct
# prompts starting far ahead stay until evicted, so the count alone let memory grow to gigabytes.
DONE_CACHE_BYTES = 256 * 2**20
# Validators ask a prompt 50-120 s before it starts, so identical requests come within a minute or two of
# the first. A kept answer older than this was forecast from prices a fresh one would not use: a prompt
# asked hours ahead kept its forecast, anchored then, for every validator asking it at the usual time.
DONE_MAX_AGE_S = 120.0
# Replies are rendered on the service's own threads: asyncio's default executor also runs the market
# data's blocking calls (a refresh waiting up to a minute on an asset's Redis lock while its provider is
# down), and a few stuck assets there left every other asset's reply, fallback included, queued past its
# deadline.
REPLY_THREADS = 4
# One pool for the process (threads start on demand): a service per test or tool does not leave idle
# threads behind, and nothing shuts it down under a computation still in flight at exit.
_REPLIES = ThreadPoolExecutor(max_workers=REPLY_THREADS, thread_name_prefix="reply")


@dataclass(frozen=True)
class Answer:
    request: ForecastRequest
    body: bytes  # the rendered response list as JSON
    source: str  # "pool" or "fallback"
    reason: str | None  # why the fallback answered, or why the pool's engine stood in for the one asked for
    compute_s: float
    shared: bool = False  # taken from an identical request's computation (kept or in flight)
    as_of: float = 0.0  # time.time() when its computation read the market data: kept for sharing while recent
    engine: str = ""  # the engine that computed the paths ("" if a worker of an earlier release did not say)
    pool_late: bool = False  # the fallback answered because the pool ran out of time (not because it failed)
    resent_after: str | None = None  # the pool sent it again, and why (the worker running it stopped)
    # Unix time of the newest price its forecast started from (the miner's snapshot's anchor; a worker reads the
    # same cache a moment later): the axon turns it into synth_price_age_seconds. None: no snapshot was read.
    price_time: float | None = None


class MinerService:
    def __init__(self, settings: Settings, data: MinerData, pool: ForecastPool, fallback: ForecasterSource) -> None:
        self.settings = settings
        self.data = data
        self.pool = pool
        self.fallback = fallback
        # Each computation in flight, with the deadline it works to (its first caller's).
        self._inflight: dict[str, tuple[asyncio.Task[Answer], float]] = {}
        self._snapshots: dict[str, MarketSnapshot] = {}  # the market data each computation forecasts from
        self._done: OrderedDict[str, Answer] = OrderedDict()
        self.counters: dict[str, int] = {"requests": 0, "fallbacks": 0, "shared": 0}

    def deadline_for(self, received: float, timeout: float | None) -> float:
        """When the reply must be ready: the caller's timeout less the margin to send it."""
        # A non-finite one (a body's 1e999) is no timeout: it made the deadline, and its metric, infinite.
        budget = float(timeout) if timeout and math.isfinite(timeout) and timeout > 0 else self.settings.max_wait_s
        return received + budget - self.settings.reply_margin_s

    async def answer(self, request: ForecastRequest, deadline: float) -> Answer:
        self.counters["requests"] += 1
        return await self._answer(request, deadline, retried=False)

    async def _answer(self, request: ForecastRequest, deadline: float, retried: bool) -> Answer:
        key = request.key()
        done = self._done.get(key)
        if done is not None and time.time() - done.as_of > DONE_MAX_AGE_S:
            del self._done[key]
            done = None
        if done is not None:
            self.counters["shared"] += 1
            return replace(done, shared=True)
        inflight = self._inflight.get(key)
        if inflight is None:
            task = asyncio.create_task(self._compute(request, deadline))
            self._inflight[key] = (task, deadline)
            task.add_done_callback(functools.partial(self._finish, key))
            return await asyncio.shield(task)
        self.counters["shared"] += 1
        task, works_to = inflight
        if works_to <= deadline:
            shared = await asyncio.shield(task)
            # Its first caller's deadline left the pool too little time; this caller's may not. Retried once,
            # as a new computation (or by joining one another joiner started). A pool that failed at once
            # (no live worker, Redis down) would fail again: only a late one is asked.
            if shared.pool_late and not retried and self._pool_deadline(deadline) - max(
                    self._pool_deadline(works_to), time.time()) >= JOINER_POOL_RETRY_MIN_S:
                return await self._answer(request, deadline, retried=True)
            return replace(shared, shared=True)
        # The shared computation may answer after this caller has gone: wait for it only while this
        # request's own fallback still fits before its deadline.
        await asyncio.wait([task], timeout=max(0.0, deadline - self.settings.fallback_budget_s - time.time()))
        if task.done():
            return replace(task.result(), shared=True)
        began = time.perf_counter()
        snapshot = self._snapshots.get(key)  # the shared computation's, when it has one by now
        if snapshot is None:
            # Half the fallback's budget for market data, half to compute: up to the deadline, a hung
            # provider's anchor fetch left the fallback to be computed after it.
            snapshot = await self.data.fallback_snapshot(request.asset, deadline - self.settings.fallback_budget_s / 2,
                                                         self._lookback(request))
        return await self._fallback(request, snapshot, "shared forecast not ready by this request's deadline",
                                    began, "shared")

    def _finish(self, key: str, task: "asyncio.Task[Answer]") -> None:
        self._inflight.pop(key, None)
        self._snapshots.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        answer = task.result()
        if answer.source != "pool" or answer.reason is not None:  # EWMA-t stood in (pool late or down, or the
            return  # worker's model unusable for it): the next asker tries the pool again
        self._done[key] = answer
        now = time.time()
        # Its prompt has begun (no validator asks for it any more), or it is too old to be shared.
        for gone in [k for k, a in self._done.items() if a.request.start_ts < now or now - a.as_of > DONE_MAX_AGE_S]:
            del self._done[gone]
        kept = sum(len(a.body) for a in self._done.values())
        while self._done and (len(self._done) > DONE_CACHE_SIZE or kept > DONE_CACHE_BYTES):
            _, dropped = self._done.popitem(last=False)
            kept -= len(dropped.body)

    async def _compute(self, request: ForecastRequest, deadline: float) -> Answer:
        began, as_of = time.perf_counter(), time.time()
        request_id = uuid.uuid4().hex
        pool_deadline = self._pool_deadline(deadline)
        snapshot = await self.data.snapshot(request.asset, self._lookback(request), deadline=pool_deadline)
        self._snapshots[request.key()] = snapshot
        reason: str | None
        try:
            # The pool promises to be done by pool_deadline; held to it, with half the fallback's time as
            # grace: a pool step off the loop (the Celery pool decodes on asyncio's default executor) can
            # wait there behind stuck threads, and the request then had no answer at all.
            computed = await asyncio.wait_for(self.pool.forecast(request, snapshot, pool_deadline, request_id),
                                              max(0.0, pool_deadline - time.time())
                                              + self.settings.fallback_budget_s / 2)
            body = await self._off_loop(functools.partial(self._checked_reply, computed.paths, request))
            return Answer(request, body, "pool", computed.fallback_reason, time.perf_counter() - began, as_of=as_of,
                          engine=computed.engine, resent_after=computed.resent_after, price_time=snapshot.anchor_time)
        except Exception as exc:  # noqa: BLE001 - any pool failure: the fallback answers
            # The wait above ending it says nothing ("TimeoutError: " in the log): say what happened.
            reason = f"{type(exc).__name__}: {str(exc) or 'the pool held past its deadline (Redis or the worker hung)'}"
            late = time.time() >= pool_deadline - POOL_LATE_SLACK_S
        return replace(await self._fallback(request, snapshot, reason, began, request_id), pool_late=late)

    async def _fallback(self, request: ForecastRequest, snapshot: MarketSnapshot, reason: str, began: float,
                        request_id: str) -> Answer:
        self.counters["fallbacks"] += 1
        log.warning("fallback for %s (request %s): %s", request.key(), request_id, reason)
        body, engine = await self._off_loop(functools.partial(self._fallback_reply, request, snapshot))
        return Answer(request, body, "fallback", reason, time.perf_counter() - began, as_of=time.time(),
                      engine=engine, price_time=snapshot.anchor_time)

    async def _off_loop(self, work: "functools.partial[_Out]") -> _Out:
        return await asyncio.get_running_loop().run_in_executor(_REPLIES, work)

    def _fallback_reply(self, request: ForecastRequest, snapshot: MarketSnapshot) -> tuple[bytes, str]:
        result = self.fallback.current().run(request, snapshot)
        return self._checked_reply(result.paths, request), result.engine

    def _pool_deadline(self, deadline: float) -> float:
        """When the pool must be done, so that the fallback still fits before ``deadline``."""
        return min(deadline - self.settings.fallback_budget_s, time.time() + self.settings.max_wait_s)

    def _lookback(self, request: ForecastRequest) -> int:
        return self.settings.cache_window_s(request.time_increment)

    @staticmethod
    def _checked_reply(paths: npt.NDArray[np.float32], request: ForecastRequest) -> bytes:
        """Round, self-check and render in one hop off the event loop; only the rendered reply is kept."""
        rounded = round_for_wire(paths)
        check_paths(rounded, request)
        return render_json(request, rounded)

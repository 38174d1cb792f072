"""Waiting for one forecast task's result in Redis, and telling early when it can no longer come.

The worker running a task holds its claim and a short lease (workers/lease.py). Between BLPOPs of
TASK_LEASE_CHECK_S the claim, the lease, whether a result waits and the queue's length are read in one
transaction: a claimed task whose lease lapsed has lost its worker (killed, crashed, frozen), and after a Redis
restart a task neither queued, claimed nor answered was lost with it. A Redis that restarts is reconnected to
until the deadline: the result a worker pushes once it is back still arrives.
"""

import asyncio
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.constants import REDIS_RECONNECT_S, TASK_CLAIM_KEY, TASK_LEASE_CHECK_S, TASK_LEASE_KEY, TASK_LEASE_MS

log = logging.getLogger(__name__)


class PoolError(RuntimeError):
    """The pool could not produce paths in time (timeout, broker down, worker error)."""


class TaskLost(Exception):
    """The task's result cannot come: ``reason`` says why, ``worker`` names the process that stopped (None: the
    task was lost with Redis), ``short`` is what the answer of a re-sent task records."""

    def __init__(self, reason: str, short: str, worker: str | None = None) -> None:
        super().__init__(reason)
        self.reason, self.short, self.worker = reason, short, worker


def _text(raw: Any) -> str | None:
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else None if raw is None else str(raw)


async def await_result(client: aioredis.Redis, keys: list[str], attempt: str, queue: str, deadline: float) -> bytes:
    """The first result pushed on ``keys`` (an earlier attempt's key may answer too) before ``deadline``, or
    PoolError; TaskLost as soon as the task ``attempt`` (its claim and lease) shows its result cannot come."""
    claimed: str | None = None  # the worker that claimed the attempt, once seen
    down: Exception | None = None  # the last connection error while Redis is unreachable
    restarted = False  # Redis was unreachable during this wait: its data may be older than the task, or gone
    backoff = REDIS_RECONNECT_S[0]
    judge_from = 0.0  # monotonic: no verdict before (Redis just came back; the worker renews within a tick)
    while True:
        left = deadline - time.time()
        if left <= 0:
            if down is not None:
                raise PoolError(f"pool unavailable: {type(down).__name__}: {down} (Redis unreachable until the "
                                "deadline)")
            raise PoolError("pool did not answer before the deadline")
        try:
            # Never 0: BLPOP's 0 waits for ever.
            reply = await client.blpop(keys, timeout=max(0.01, min(TASK_LEASE_CHECK_S, left)))
            if reply is not None:
                return bytes(reply[1])  # type: ignore[arg-type]
            # One transaction, so one instant: the worker removes the claim and lease in the one that pushes the
            # result, and a worker taking the task from the queue claims it at once.
            async with client.pipeline(transaction=True) as pipe:
                pipe.mget([TASK_CLAIM_KEY.format(request_id=attempt), TASK_LEASE_KEY.format(request_id=attempt)])
                pipe.exists(*keys)
                pipe.llen(queue)
                (claim, lease), answered, queued = await pipe.execute()
        except (RedisConnectionError, RedisTimeoutError) as exc:  # Redis restarting, or down: the deadline decides
            if down is None:
                log.warning("Redis unreachable while waiting for %s (%s): reconnecting until the deadline, %.1f s",
                            attempt, exc, left)
            down, restarted = exc, True
            await asyncio.sleep(min(backoff, max(0.0, deadline - time.time())))
            backoff = min(2 * backoff, REDIS_RECONNECT_S[1])
            continue
        if down is not None:
            log.warning("Redis back while waiting for %s", attempt)
            down, backoff = None, REDIS_RECONNECT_S[0]
            judge_from = time.monotonic() + TASK_LEASE_MS / 1000
        claimed = _text(claim) or claimed
        if answered or time.monotonic() < judge_from:
            continue
        if claim is not None and lease is None:
            raise TaskLost(f"worker {claimed} stopped while running the forecast (its lease lapsed)",
                           f"worker {claimed} stopped while running it", claimed)
        # Gone with no result, not renewed since Redis came back: the worker stopped, or it finished during the
        # outage and its result was lost with Redis. Sent again, but the worker is not set aside: an alive one
        # would be skipped until its next beat (up to 10 s) and, both workers alike, every request fell back.
        if claim is None and claimed is not None:
            raise TaskLost(f"the forecast's claim by worker {claimed} is gone with no result (its result lost with "
                           "Redis's restart, or the worker stopped)", "its result was lost with Redis's restart")
        # Not judged without a restart: a worker of an earlier release claims nothing.
        if restarted and claim is None and not queued:
            raise TaskLost("the task was lost with Redis's restart (neither queued, claimed nor answered)",
                           "the task was lost with Redis's restart")

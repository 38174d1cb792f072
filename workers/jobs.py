"""Periodic jobs on the cpu queue. Each claims its (job, slot) once in Redis, so duplicates are no-ops.

A claim is ``running`` while its job works, on a lease the job keeps renewing, then ``done``. A job
whose process dies (OOM, SIGKILL at deploy) stops renewing: its lease lapses and the re-delivered task
(``reject_on_worker_lost``; when the whole worker died, the beat leader's copy, see
``workers.beat.LeaderScheduler._resend_orphans``) runs the slot again, at most JOB_MAX_ATTEMPTS
times; a ``done`` slot stays a duplicate. The minute's cache refresh is not re-delivered: the next
minute's run does its work.

A Redis that is away for a moment (a restart, a failover) costs no run: the claim, the finish and the record
are tried again while it is unreachable, for a share of the job's period (``redis_retry_s``); the work is not.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis

from core.constants import (
    CALIBRATE_TIME_LIMIT_S,
    COMPACT_TIME_LIMIT_S,
    JOB_ATTEMPTS_KEY,
    JOB_KILL_GRACE_S,
    JOB_LAST_RUN_KEY,
    JOB_MAX_ATTEMPTS,
    JOB_REDIS_BACKOFF_S,
    JOB_REDIS_RETRY_MAX_S,
    JOB_REDIS_RETRY_SHARE,
    JOB_RUNS_KEPT,
    JOB_RUNS_KEY,
    JOB_SLOT_KEY,
    REFRESH_TIME_LIMIT_S,
    RETRAIN_TIME_LIMIT_S,
    TASK_CALIBRATE,
    TASK_COMPACT_STORE,
    TASK_REFRESH_CACHE,
    TASK_RETRAIN,
)
from core.settings import Settings, get_settings
from workers.app import app

log = logging.getLogger(__name__)
T = TypeVar("T")

# What a blip raises (BusyLoadingError, a restarted Redis still loading, is a ConnectionError; ReadOnlyError,
# a primary demoted in a failover until the address moves to the new one); a script's error would fail again.
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError)

CLAIMED, EXHAUSTED, RUNNING, DONE = "claimed", "exhausted", "running:", "done:"

# One script, so two claimants never both win: a held claim (done, or running on a live lease) is
# returned as it is; otherwise count a start and take a fresh lease, unless the slot ran out of starts.
# The claim of this very run (owners are unique) is a retry whose first try landed but whose reply was
# lost (a timeout): still ours, on one start.
CLAIM = """
local held = redis.call('get', KEYS[1])
if held == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 'claimed'
end
if held then return held end
local starts = redis.call('incr', KEYS[2])
redis.call('expire', KEYS[2], ARGV[3])
if starts > tonumber(ARGV[4]) then return 'exhausted' end
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
return 'claimed'
"""
# Renew our own lease; take it back if it lapsed untaken (Redis away longer than the lease: the beat leader
# would take the run for dead and send the slot again); after a lapse another process may have taken it.
RENEW = """
local held = redis.call('get', KEYS[1])
if held == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
if not held then
  redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
  return 2
end
return 0
"""
# Mark the slot done only if it is still ours (or lapsed and untaken, or done by a first try of this
# finish whose reply was lost): never over another run's claim.
FINISH = """
local held = redis.call('get', KEYS[1])
if held and held ~= ARGV[1] and held ~= ARGV[2] then return held end
redis.call('set', KEYS[1], ARGV[2], 'ex', ARGV[3])
return 'ok'
"""
# Push the run and make it its job's last, unless it is already (a retry whose first try landed).
RECORD = """
if redis.call('hget', KEYS[2], ARGV[1]) == ARGV[2] then return 0 end
redis.call('lpush', KEYS[1], ARGV[2])
redis.call('ltrim', KEYS[1], 0, tonumber(ARGV[3]) - 1)
redis.call('hset', KEYS[2], ARGV[1], ARGV[2])
return 1
"""


def _redis(settings: Settings) -> "redis.Redis":
    return redis.Redis.from_url(settings.pool_redis_url, socket_timeout=5.0)


def _text(reply: Any) -> str:
    return reply.decode() if isinstance(reply, bytes) else str(reply)


def redis_retry_s(period_s: float) -> float:
    """How long a job with this period keeps trying an unreachable Redis before it gives its run up."""
    return min(JOB_REDIS_RETRY_MAX_S, JOB_REDIS_RETRY_SHARE * period_s)


def retrying(call: Callable[[], T], within_s: float, what: str, lost: str) -> T:
    """``call()``, tried again with doubling waits while Redis is unreachable, for ``within_s`` seconds; then
    logs what giving up loses (``lost``) and raises the last error. Each try must be safe to repeat: a try
    whose reply was lost may have landed."""
    give_up, wait = time.monotonic() + within_s, JOB_REDIS_BACKOFF_S[0]
    while True:
        try:
            return call()
        except REDIS_DOWN as exc:
            left = give_up - time.monotonic()
            if left <= 0:
                log.error("%s: Redis unreachable for %.0f s (%s): %s", what, within_s, exc, lost)
                raise
            log.warning("%s: Redis unreachable (%s); trying again in %.1f s", what, exc, min(wait, left))
            time.sleep(min(wait, left))
            wait = min(2 * wait, JOB_REDIS_BACKOFF_S[1])


def slot_ttl_s(period_s: float) -> int:
    """How long a slot's claim and start count are kept: past the slot, so a late duplicate is refused."""
    return int(max(60, 3 * period_s))


def claim_slot(client: "redis.Redis", job: str, slot: int, period_s: float, owner: str, lease_s: float) -> str:
    """CLAIMED for a claimant that may run the slot now; else what holds it (``done:…``, ``running:…``)
    or EXHAUSTED."""
    held = client.eval(CLAIM, 2, JOB_SLOT_KEY.format(name=job, slot=slot), JOB_ATTEMPTS_KEY.format(name=job, slot=slot),
                       RUNNING + owner, int(lease_s * 1000), slot_ttl_s(period_s), JOB_MAX_ATTEMPTS)
    return _text(held)


def take_slot(client: "redis.Redis", job: str, slot: int, period_s: float, owner: str, lease_s: float,
              retry_s: float) -> str:
    """Claim the slot, each try through a Redis blip of up to ``retry_s``. A running claim may be a dead
    process's (this task re-delivered after it was killed): wait one lease for it to lapse before calling
    this task a duplicate."""
    give_up = time.monotonic() + lease_s + 1
    while True:
        held = retrying(lambda: claim_slot(client, job, slot, period_s, owner, lease_s), retry_s,
                        f"job {job} slot {slot}: claim", "not claimed, not run: this slot's run is lost")
        if not held.startswith(RUNNING) or time.monotonic() > give_up:
            return held
        time.sleep(min(1.0, lease_s / 4))


@contextmanager
def lease_renewed(client: "redis.Redis", job: str, slot: int, owner: str, lease_s: float) -> Iterator[None]:
    """Renew the running claim every third of the lease while the work runs (a killed process stops)."""
    key, stop = JOB_SLOT_KEY.format(name=job, slot=slot), threading.Event()

    def renew() -> None:
        lost = False
        while not stop.wait(lease_s / 3):
            try:
                renewed = client.eval(RENEW, 1, key, RUNNING + owner, int(lease_s * 1000))
            except redis.RedisError as exc:
                log.warning("job %s slot %d: lease not renewed (%s)", job, slot, exc)
                continue
            if renewed == 2:
                log.warning("job %s slot %d: lease of %s had lapsed; taken back", job, slot, owner)
            elif not renewed and not lost:  # taken over: say so once (a re-delivered copy may run the slot too)
                lost = True
                log.error("job %s slot %d: lease of %s lapsed and the slot was taken over", job, slot, owner)

    thread = threading.Thread(target=renew, name=f"lease-{job}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def record_run(client: "redis.Redis", record: dict[str, Any]) -> None:
    client.eval(RECORD, 2, JOB_RUNS_KEY, JOB_LAST_RUN_KEY, str(record["job"]), json.dumps(record, default=str),
                JOB_RUNS_KEPT)


def finish_slot(client: "redis.Redis", job: str, slot: int, period_s: float, owner: str) -> str:
    """'ok' once the slot is marked done for this run; else the claim of the run that took it over."""
    return _text(client.eval(FINISH, 1, JOB_SLOT_KEY.format(name=job, slot=slot), RUNNING + owner, DONE + owner,
                             slot_ttl_s(period_s)))


def finish_run(client: "redis.Redis", job: str, slot: int, period_s: float, owner: str,
               record: dict[str, Any]) -> None:
    """Mark the slot done and record the run, each through a Redis blip; one that outlasts the bound loses
    them, and the log keeps the record."""
    where, retry_s = f"job {job} slot {slot}", redis_retry_s(period_s)
    # A failed run is done too: only a process that died runs its slot again. A run whose lease lapsed
    # and whose slot another run took over leaves that run's claim alone (it marks the slot itself).
    held = retrying(lambda: finish_slot(client, job, slot, period_s, owner), retry_s, f"{where}: finish",
                    "the slot is not marked done (its claim lapses unrenewed: a later delivery may run it again) "
                    f"and the run is not recorded: {json.dumps(record, default=str)}")
    if held != "ok":
        log.error("job %s slot %d: lease lost while running; the slot is held by %s", job, slot, held)
        record["lease_lost_to"] = held
    retrying(lambda: record_run(client, record), retry_s, f"{where}: record",
             f"the run is not recorded: {json.dumps(record, default=str)}")


def run_once(job: str, slot: int | None, period_s: float, work: Callable[[Settings], dict[str, Any]]) -> dict[str, Any]:
    settings = get_settings()
    client = _redis(settings)
    slot = int(time.time() // period_s * period_s) if slot is None else slot
    # Unique per run: two runs in one process (a thread pool) must not pass for each other's lease.
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    retry_s = redis_retry_s(period_s)
    held = take_slot(client, job, slot, period_s, owner, settings.job_lease_s, retry_s)
    if held == EXHAUSTED:
        log.error("job %s slot %d: its process died %d times; not started again", job, slot, JOB_MAX_ATTEMPTS)
        abandoned = {"job": job, "slot": slot, "status": "abandoned", "started": time.time()}
        retrying(lambda: record_run(client, abandoned), retry_s, f"job {job} slot {slot}: record",
                 "its 'abandoned' record is lost")
        return {"job": job, "slot": slot, "status": "abandoned"}
    if held != CLAIMED:
        log.info("job %s slot %d already claimed (%s): skipping duplicate", job, slot, held)
        return {"job": job, "slot": slot, "status": "duplicate"}
    began = time.monotonic()  # the run's length in real time: a clock step mid-run recorded hours (or < 0)
    record: dict[str, Any] = {"job": job, "slot": slot, "worker": socket.gethostname(), "pid": os.getpid(),
                              "started": time.time()}
    with lease_renewed(client, job, slot, owner, settings.job_lease_s):
        try:
            record.update(status="ok", result=work(settings))
        except Exception as exc:
            log.exception("job %s slot %d failed", job, slot)
            record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    record["seconds"] = round(time.monotonic() - began, 3)  # the work's: not a blip's wait at the finish
    finish_run(client, job, slot, period_s, owner, record)
    return record


def time_limits(hard_s: int) -> dict[str, int]:
    """A periodic task's Celery limits: the soft one raises in the run (recorded, slot done) before the kill."""
    return {"soft_time_limit": hard_s - JOB_KILL_GRACE_S, "time_limit": hard_s}


def refresh_work(settings: Settings) -> dict[str, Any]:
    from core.assets import ASSETS
    from core.refresh import refresh_assets_sync

    # The cache the workers forecast from: the pool's Redis, this host's when SYNTH_REDIS_URL is unset.
    reports = refresh_assets_sync(sorted(ASSETS), settings.model_copy(update={"redis_url": settings.pool_redis_url}))
    failed = {r.asset: list(r.errors) for r in reports if r.errors}
    return {"assets": len(reports), "failed": failed}


def calibrate_work(settings: Settings) -> dict[str, Any]:
    from core.calibration import run_calibration_job

    return dict(run_calibration_job(settings))


def retrain_work(settings: Settings) -> dict[str, Any]:
    from core.retraining import run_retrain_job

    return dict(run_retrain_job(settings))


def compact_work(settings: Settings) -> dict[str, Any]:
    from core.history_store import compact_store

    return dict(compact_store(settings))


@app.task(name=TASK_REFRESH_CACHE, ignore_result=True, acks_late=True, **time_limits(REFRESH_TIME_LIMIT_S))
def refresh_cache(job: str = "refresh-cache", period_s: float = 60.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, refresh_work)


@app.task(name=TASK_CALIBRATE, ignore_result=True, acks_late=True, reject_on_worker_lost=True, **time_limits(CALIBRATE_TIME_LIMIT_S))
def calibrate(job: str = "calibrate", period_s: float = 3600.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, calibrate_work)


@app.task(name=TASK_RETRAIN, ignore_result=True, acks_late=True, reject_on_worker_lost=True, **time_limits(RETRAIN_TIME_LIMIT_S))
def retrain(job: str = "retrain", period_s: float = 604_800.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, retrain_work)


@app.task(name=TASK_COMPACT_STORE, ignore_result=True, acks_late=True, reject_on_worker_lost=True, **time_limits(COMPACT_TIME_LIMIT_S))
def compact_store(job: str = "compact-store", period_s: float = 86_400.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, compact_work)

"""Periodic jobs on the cpu queue. Each claims its (job, slot) once in Redis, so duplicates are no-ops.

A claim is ``running`` while its job works, on a lease the job keeps renewing, then ``done``. A job
whose process dies (OOM, SIGKILL at deploy) stops renewing: its lease lapses and the re-delivered task
(``reject_on_worker_lost``, or the visibility timeout) runs the slot again, at most JOB_MAX_ATTEMPTS
times; a ``done`` slot stays a duplicate. The minute's cache refresh is not re-delivered: the next
minute's run does its work.
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
from typing import Any

import redis

from core.constants import (
    JOB_ATTEMPTS_KEY,
    JOB_LAST_RUN_KEY,
    JOB_MAX_ATTEMPTS,
    JOB_RUNS_KEPT,
    JOB_RUNS_KEY,
    JOB_SLOT_KEY,
    TASK_CALIBRATE,
    TASK_COMPACT_STORE,
    TASK_REFRESH_CACHE,
    TASK_RETRAIN,
)
from core.settings import Settings, get_settings
from workers.app import app

log = logging.getLogger(__name__)

CLAIMED, EXHAUSTED, RUNNING, DONE = "claimed", "exhausted", "running:", "done:"

# One script, so two claimants never both win: a held claim (done, or running on a live lease) is
# returned as it is; otherwise count a start and take a fresh lease, unless the slot ran out of starts.
CLAIM = """
local held = redis.call('get', KEYS[1])
if held then return held end
local starts = redis.call('incr', KEYS[2])
redis.call('expire', KEYS[2], ARGV[3])
if starts > tonumber(ARGV[4]) then return 'exhausted' end
redis.call('set', KEYS[1], ARGV[1], 'px', ARGV[2])
return 'claimed'
"""
# Renew only our own lease: after a lapse another process may have taken the slot over.
RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
# Mark the slot done only if it is still ours (or lapsed and untaken): never over another run's claim.
FINISH = """
local held = redis.call('get', KEYS[1])
if held and held ~= ARGV[1] then return held end
redis.call('set', KEYS[1], ARGV[2], 'ex', ARGV[3])
return 'ok'
"""


def _redis(settings: Settings) -> "redis.Redis":
    return redis.Redis.from_url(settings.pool_redis_url, socket_timeout=5.0)


def slot_ttl_s(period_s: float) -> int:
    """How long a slot's claim and start count are kept: past the slot, so a late duplicate is refused."""
    return int(max(60, 3 * period_s))


def claim_slot(client: "redis.Redis", job: str, slot: int, period_s: float, owner: str, lease_s: float) -> str:
    """CLAIMED for a claimant that may run the slot now; else what holds it (``done:…``, ``running:…``)
    or EXHAUSTED."""
    held = client.eval(CLAIM, 2, JOB_SLOT_KEY.format(name=job, slot=slot), JOB_ATTEMPTS_KEY.format(name=job, slot=slot),
                       RUNNING + owner, int(lease_s * 1000), slot_ttl_s(period_s), JOB_MAX_ATTEMPTS)
    return held.decode() if isinstance(held, bytes) else str(held)


def take_slot(client: "redis.Redis", job: str, slot: int, period_s: float, owner: str, lease_s: float) -> str:
    """Claim the slot. A running claim may be a dead process's (this task re-delivered after it was
    killed): wait one lease for it to lapse before calling this task a duplicate."""
    give_up = time.monotonic() + lease_s + 1
    while True:
        held = claim_slot(client, job, slot, period_s, owner, lease_s)
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
            if not renewed and not lost:  # lapsed: say so once (a re-delivered copy may run the slot too)
                lost = True
                log.error("job %s slot %d: lease of %s lapsed; not renewed", job, slot, owner)

    thread = threading.Thread(target=renew, name=f"lease-{job}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def record_run(client: "redis.Redis", record: dict[str, Any]) -> None:
    pipe = client.pipeline()
    doc = json.dumps(record, default=str)
    pipe.lpush(JOB_RUNS_KEY, doc)
    pipe.ltrim(JOB_RUNS_KEY, 0, JOB_RUNS_KEPT - 1)
    pipe.hset(JOB_LAST_RUN_KEY, str(record["job"]), doc)
    pipe.execute()


def run_once(job: str, slot: int | None, period_s: float, work: Callable[[Settings], dict[str, Any]]) -> dict[str, Any]:
    settings = get_settings()
    client = _redis(settings)
    slot = int(time.time() // period_s * period_s) if slot is None else slot
    # Unique per run: two runs in one process (a thread pool) must not pass for each other's lease.
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    held = take_slot(client, job, slot, period_s, owner, settings.job_lease_s)
    if held == EXHAUSTED:
        log.error("job %s slot %d: its process died %d times; not started again", job, slot, JOB_MAX_ATTEMPTS)
        record_run(client, {"job": job, "slot": slot, "status": "abandoned", "started": time.time()})
        return {"job": job, "slot": slot, "status": "abandoned"}
    if held != CLAIMED:
        log.info("job %s slot %d already claimed (%s): skipping duplicate", job, slot, held)
        return {"job": job, "slot": slot, "status": "duplicate"}
    began = time.time()
    record: dict[str, Any] = {"job": job, "slot": slot, "worker": socket.gethostname(), "pid": os.getpid(),
                              "started": began}
    with lease_renewed(client, job, slot, owner, settings.job_lease_s):
        try:
            record.update(status="ok", result=work(settings))
        except Exception as exc:
            log.exception("job %s slot %d failed", job, slot)
            record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    # A failed run is done too: only a process that died runs its slot again. A run whose lease lapsed
    # and whose slot another run took over leaves that run's claim alone (it marks the slot itself).
    finished = client.eval(FINISH, 1, JOB_SLOT_KEY.format(name=job, slot=slot), RUNNING + owner, DONE + owner,
                           slot_ttl_s(period_s))
    held = finished.decode() if isinstance(finished, bytes) else str(finished)
    if held != "ok":
        log.error("job %s slot %d: lease lost while running; the slot is held by %s", job, slot, held)
        record["lease_lost_to"] = held
    record["seconds"] = round(time.time() - began, 3)
    record_run(client, record)
    return record


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


@app.task(name=TASK_REFRESH_CACHE, ignore_result=True, acks_late=True, time_limit=300)
def refresh_cache(job: str = "refresh-cache", period_s: float = 60.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, refresh_work)


@app.task(name=TASK_CALIBRATE, ignore_result=True, acks_late=True, reject_on_worker_lost=True, time_limit=3000)
def calibrate(job: str = "calibrate", period_s: float = 3600.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, calibrate_work)


@app.task(name=TASK_RETRAIN, ignore_result=True, acks_late=True, reject_on_worker_lost=True, time_limit=4 * 3600)
def retrain(job: str = "retrain", period_s: float = 604_800.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, retrain_work)


@app.task(name=TASK_COMPACT_STORE, ignore_result=True, acks_late=True, reject_on_worker_lost=True, time_limit=1800)
def compact_store(job: str = "compact-store", period_s: float = 86_400.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, compact_work)

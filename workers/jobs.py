"""Periodic jobs on the cpu queue. Each claims its (job, slot) once in Redis, so duplicates are no-ops."""

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import redis

from core.constants import (
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


def _redis(settings: Settings) -> "redis.Redis":
    return redis.Redis.from_url(settings.redis_url or "", socket_timeout=5.0)


def claim_slot(client: "redis.Redis", job: str, slot: int, period_s: float) -> bool:
    """True for the first claimant of this slot; the key outlives the slot so a late duplicate is refused."""
    key = JOB_SLOT_KEY.format(name=job, slot=slot)
    return bool(client.set(key, f"{socket.gethostname()}:{os.getpid()}", nx=True, ex=int(max(60, 3 * period_s))))


def run_once(job: str, slot: int | None, period_s: float, work: Callable[[Settings], dict[str, Any]]) -> dict[str, Any]:
    settings = get_settings()
    client = _redis(settings)
    slot = int(time.time() // period_s * period_s) if slot is None else slot
    if not claim_slot(client, job, slot, period_s):
        log.info("job %s slot %d already claimed: skipping duplicate", job, slot)
        return {"job": job, "slot": slot, "status": "duplicate"}
    began = time.time()
    record: dict[str, Any] = {"job": job, "slot": slot, "worker": socket.gethostname(), "pid": os.getpid(),
                              "started": began}
    try:
        record.update(status="ok", result=work(settings))
    except Exception as exc:
        log.exception("job %s slot %d failed", job, slot)
        record.update(status="error", error=f"{type(exc).__name__}: {exc}")
    record["seconds"] = round(time.time() - began, 3)
    pipe = client.pipeline()
    pipe.lpush(JOB_RUNS_KEY, json.dumps(record, default=str))
    pipe.ltrim(JOB_RUNS_KEY, 0, JOB_RUNS_KEPT - 1)
    pipe.execute()
    return record


def refresh_work(settings: Settings) -> dict[str, Any]:
    from core.assets import ASSETS
    from core.refresh import refresh_assets_sync

    reports = refresh_assets_sync(sorted(ASSETS), settings)
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


@app.task(name=TASK_CALIBRATE, ignore_result=True, acks_late=True, time_limit=3000)
def calibrate(job: str = "calibrate", period_s: float = 3600.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, calibrate_work)


@app.task(name=TASK_RETRAIN, ignore_result=True, acks_late=True, reject_on_worker_lost=True, time_limit=4 * 3600)
def retrain(job: str = "retrain", period_s: float = 604_800.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, retrain_work)


@app.task(name=TASK_COMPACT_STORE, ignore_result=True, acks_late=True, time_limit=1800)
def compact_store(job: str = "compact-store", period_s: float = 86_400.0, slot: int | None = None) -> dict[str, Any]:
    return run_once(job, slot, period_s, compact_work)

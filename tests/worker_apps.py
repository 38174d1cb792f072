"""The production Celery app (workers.app: its settings, routes and tasks) with test-only work, for real
worker processes started as ``celery -A tests.worker_apps worker``.

- ``test.sleep``: a task with the forecast's delivery options that sleeps and logs how long it waited;
- the weekly retrain's work replaced by one that logs each start and, on the first (or while
  ``RETRAIN_HANG_KEY`` is set), hangs until killed or stopped by its time limit;
- while ``HOLD_FORECAST_KEY`` is set (to seconds), the first forecast to start takes it (the key is removed) and its
  engine runs that much longer, as a long torch call would: a test kills or stops the process meanwhile, or restarts
  Redis under it;
- with ``CLOCK_OFFSET_ENV`` set (seconds, negative: behind), a process whose wall clock is that far off the
  host's, as seen by Python: its heartbeats' "at", its tasks' deadline checks and Celery's ``expires`` check.
  (libfaketime would skew the whole process, but it is not installed where the tests run.)
"""

import json
import os
import time
from datetime import datetime, tzinfo
from typing import Any

import celery.worker.request
import redis
from celery.signals import worker_init

from core.forecast import Forecaster, ForecastResult
from core.prices import MarketSnapshot
from core.prompts import ForecastRequest
from core.settings import Settings
from workers import jobs
from workers.app import app

__all__ = ["app", "SLEEP_LOG_KEY", "RETRAIN_STARTS_KEY", "RETRAIN_HANG_KEY", "HOLD_FORECAST_KEY", "CLOCK_OFFSET_ENV"]

SLEEP_LOG_KEY = "test:sleep:log"
RETRAIN_STARTS_KEY = "test:retrain:starts"
RETRAIN_HANG_KEY = "test:retrain:hang"
HOLD_FORECAST_KEY = "test:forecast:hold"
CLOCK_OFFSET_ENV = "TEST_CLOCK_OFFSET_S"


def _client() -> "redis.Redis":
    return redis.Redis.from_url(os.environ["SYNTH_REDIS_URL"])


@app.task(name="test.sleep", ignore_result=True, acks_late=False)
def sleep(seconds: float, tag: str, sent: float) -> None:
    started = time.time()
    time.sleep(seconds)
    _client().rpush(SLEEP_LOG_KEY, json.dumps({"tag": tag, "pid": os.getpid(), "waited": started - sent}))


def retrain_that_hangs(settings: Settings) -> dict[str, Any]:
    starts = int(_client().rpush(RETRAIN_STARTS_KEY, os.getpid()))
    if starts == 1 or _client().exists(RETRAIN_HANG_KEY):
        time.sleep(600)  # the test SIGKILLs this process here, or the task's soft time limit stops it
    return {"starts": starts}


jobs.retrain_work = retrain_that_hangs

_run_forecast = Forecaster.run


def forecast_that_may_hang(self: Forecaster, request: ForecastRequest, snapshot: MarketSnapshot,
                           engine: str | None = None) -> ForecastResult:
    held = _client().getdel(HOLD_FORECAST_KEY)  # one forecast only: a re-sent one runs as usual
    if held:
        time.sleep(float(held))
    return _run_forecast(self, request, snapshot, engine)


@worker_init.connect
def _hold_forecasts(**_: Any) -> None:
    """In a worker only: the test processes that import this module for its names run their forecasts unchanged."""
    Forecaster.run = forecast_that_may_hang  # type: ignore[method-assign]


def skew_clock(offset_s: float) -> None:
    """This process's wall clock ``offset_s`` off the host's: ``time.time`` (heartbeats, workers.tasks' deadline
    check) and the ``datetime.now`` Celery judges a task's ``expires`` by (celery.worker.request)."""
    real = time.time

    def skewed() -> float:
        return real() + offset_s

    class SkewedDatetime(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> "SkewedDatetime":
            return cls.fromtimestamp(skewed(), tz)

    time.time = skewed
    celery.worker.request.datetime = SkewedDatetime  # type: ignore[misc]


if os.environ.get(CLOCK_OFFSET_ENV):
    skew_clock(float(os.environ[CLOCK_OFFSET_ENV]))

"""The production Celery app (workers.app: its settings, routes and tasks) with test-only work, for real
worker processes started as ``celery -A tests.worker_apps worker``.

- ``test.sleep``: a task with the forecast's delivery options that sleeps and logs how long it waited;
- the weekly retrain's work replaced by one that logs each start and, on the first, hangs until killed.
"""

import json
import os
import time
from typing import Any

import redis

from core.settings import Settings
from workers import jobs
from workers.app import app

__all__ = ["app", "SLEEP_LOG_KEY", "RETRAIN_STARTS_KEY"]

SLEEP_LOG_KEY = "test:sleep:log"
RETRAIN_STARTS_KEY = "test:retrain:starts"


def _client() -> "redis.Redis":
    return redis.Redis.from_url(os.environ["SYNTH_REDIS_URL"])


@app.task(name="test.sleep", ignore_result=True, acks_late=False)
def sleep(seconds: float, tag: str, sent: float) -> None:
    started = time.time()
    time.sleep(seconds)
    _client().rpush(SLEEP_LOG_KEY, json.dumps({"tag": tag, "pid": os.getpid(), "waited": started - sent}))


def retrain_killed_on_first_start(settings: Settings) -> dict[str, Any]:
    starts = int(_client().rpush(RETRAIN_STARTS_KEY, os.getpid()))
    if starts == 1:
        time.sleep(600)  # the test SIGKILLs this process here
    return {"starts": starts}


jobs.retrain_work = retrain_killed_on_first_start

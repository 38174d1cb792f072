"""The periodic jobs, as data: Celery beat replaces the seed design's cron.

Each entry runs its task once per slot (the scheduled time floored to the period). The task claims
the slot in Redis before working, so a second beat started by mistake, or a re-delivered message,
never runs a job twice; and only the beat holding the Redis leader lock schedules at all
(``workers.beat.LeaderScheduler``).
"""

from dataclasses import dataclass
from typing import Any

from core.constants import TASK_CALIBRATE, TASK_COMPACT_STORE, TASK_REFRESH_CACHE, TASK_RETRAIN
from core.settings import Settings


@dataclass(frozen=True)
class Job:
    name: str
    task: str
    period_s: float


def jobs(settings: Settings) -> list[Job]:
    return [
        Job("refresh-cache", TASK_REFRESH_CACHE, settings.beat_refresh_s),
        Job("calibrate", TASK_CALIBRATE, settings.beat_calibrate_s),
        Job("retrain", TASK_RETRAIN, settings.beat_retrain_s),
        Job("compact-store", TASK_COMPACT_STORE, settings.beat_compact_s),
    ]


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule`` mapping; a job expires after one period (a stale run is useless)."""
    return {
        job.name: {
            "task": job.task,
            "schedule": job.period_s,
            "kwargs": {"job": job.name, "period_s": job.period_s},
            "options": {"queue": settings.queue_cpu, "expires": job.period_s},
        }
        for job in jobs(settings)
    }

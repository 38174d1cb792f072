"""The Celery application: broker and results on Redis, routes per queue, the settings that matter.

Why each setting (Celery docs, reference notes §3): prefetch disabled so a busy worker never holds
a request an idle worker could run (prefetch 1 still reserved one: a fast forecast waited 3.6 s behind
a slow one); a new worker process may take a minute to load torch and the models; early ack for
inference (a re-delivery after the deadline is useless) and ``expires`` on every task; a visibility
timeout longer than the longest job so a retrain is not run twice; results ignored or kept minutes,
never the 1-day default.
"""

from celery import Celery

from beat_schedule import beat_schedule
from core.constants import TASK_CALIBRATE, TASK_COMPACT_STORE, TASK_REFRESH_CACHE, TASK_RETRAIN
from core.settings import InsecureRedisError, Settings, check_redis_url, get_settings

LONGEST_JOB_S = 4 * 3600  # retraining; the visibility timeout must exceed it


def create_app(settings: Settings) -> Celery:
    url = settings.pool_redis_url
    check_redis_url(url)  # raises InsecureRedisError: never a password-less Redis beyond this host
    app = Celery("synth_miner", broker=url, backend=url, include=["workers.tasks", "workers.jobs"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json", "msgpack"],
        result_accept_content=["json", "msgpack"],
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,  # Celery >= 5.7, Redis broker: reserve a task only for a free process
        worker_proc_alive_timeout=settings.worker_proc_alive_timeout_s,
        task_acks_late=False,
        task_ignore_result=True,
        result_expires=300,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": LONGEST_JOB_S + 600},
        result_backend_transport_options={"visibility_timeout": LONGEST_JOB_S + 600},
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        task_routes={
            TASK_REFRESH_CACHE: {"queue": settings.queue_cpu},
            TASK_CALIBRATE: {"queue": settings.queue_cpu},
            TASK_RETRAIN: {"queue": settings.queue_cpu},
            TASK_COMPACT_STORE: {"queue": settings.queue_cpu},
        },
        task_default_queue=settings.queue_cpu,
        beat_schedule=beat_schedule(settings),
        beat_scheduler="workers.beat:LeaderScheduler",
        beat_max_loop_interval=max(1.0, settings.beat_lock_ttl_s / 3),
    )
    return app


try:
    app = create_app(get_settings())
except InsecureRedisError as exc:  # every worker, beat and Flower imports this: a clear refusal, no traceback
    raise SystemExit(f"refusing to start: {exc}") from None

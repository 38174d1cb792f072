"""Celery tasks. Forecast: read history from the Redis cache, run the engine, push float32 paths."""

import atexit
import logging
import math
import time
from datetime import datetime, timezone
from typing import Any

import redis
from celery.signals import celeryd_init, task_revoked, worker_process_init, worker_process_shutdown, worker_shutdown

from core.constants import FORECAST_KILL_GRACE_S, LATE_RESULT_TTL_S, TASK_FORECAST
from core.prompts import ForecastRequest, RequestError, check_request
from core.settings import get_settings
from core.transport import encode_error, encode_paths
from workers.app import app
from workers.lease import TaskLease
from workers.metrics import HEARTBEAT, TASK_SECONDS, TASKS, count_expired, serve_metrics, serving
from workers.runtime import WorkerRuntime, get_runtime

log = logging.getLogger(__name__)

# The miner never waits longer than max_wait_s for a result: past that a forecast only keeps the
# worker's one process (its GPU) from the requests queued behind it.
FORECAST_SOFT_LIMIT_S = get_settings().max_wait_s


REQUEST_FIELDS = frozenset(ForecastRequest.__dataclass_fields__)


def checked_request(request: object, max_num_simulations: int) -> ForecastRequest:
    """The task's request, held to what the miner accepts (asset, grid, ``SYNTH_MAX_NUM_SIMULATIONS``): anything
    that can write to the queue reaches the engine otherwise, and an oversized ``num_simulations`` (10^9 paths)
    took the process, and the GPU behind it, down instead of failing this one task."""
    if not isinstance(request, dict) or set(request) != REQUEST_FIELDS:
        raise RequestError(f"a request is a mapping of {', '.join(sorted(REQUEST_FIELDS))}")
    start_ts = request["start_ts"]
    if not isinstance(start_ts, int) or isinstance(start_ts, bool):
        raise RequestError(f"start_ts must be an integer, got {start_ts!r}")
    try:
        start_time = datetime.fromtimestamp(start_ts, timezone.utc).isoformat()
    except (OverflowError, OSError, ValueError):
        raise RequestError(f"start_ts {start_ts} is not a time") from None
    return check_request(request["asset"], start_time, request["time_increment"], request["time_length"],
                         request["num_simulations"], max_num_simulations)


def finite_deadline(deadline: object) -> float:
    """The unix time the miner stops waiting; anything else (NaN, infinity, a string) fails the task with a
    result, instead of a TTL that cannot be computed and no result at all (the miner waited out its wait)."""
    if isinstance(deadline, bool) or not isinstance(deadline, (int, float)) or not math.isfinite(deadline):
        raise RequestError(f"deadline must be a unix time, got {deadline!r}")
    return float(deadline)


def consumed_queues() -> str:
    """The queues this worker reads (``-Q``, selected before the pool forks)."""
    return ",".join(sorted(app.amqp.queues.consume_from))


def announce(runtime: WorkerRuntime) -> None:
    """The heartbeat `synth-miner status` lists: engine, device, models and artifact this process serves."""
    forecaster = runtime.forecaster
    version = runtime.artifact_version  # after the forecaster: the version it was (re)loaded from
    serving(version, forecaster.default)
    HEARTBEAT.announce(runtime.redis, forecaster.default, version, consumed_queues(),
                       device=forecaster.device, models=forecaster.models)


def consumes_inference() -> bool:
    """Whether this worker reads an inference queue: a cpu-only worker never forecasts, so its processes
    skip loading torch and the models."""
    settings = get_settings()
    return bool(set(app.amqp.queues.consume_from) & {settings.queue_infer_hf, settings.queue_infer_lf})


def announce_jobs_only() -> None:
    """A cpu-only worker's heartbeat: it runs the periodic jobs and serves no model."""
    client = redis.Redis.from_url(get_settings().pool_redis_url, socket_timeout=5.0)
    HEARTBEAT.announce(client, "jobs", None, consumed_queues())


@celeryd_init.connect
def _remember_node_name(sender: str, **_: Any) -> None:
    """Heartbeats carry the worker's ``--hostname`` (as Flower shows it): set before any pool exists (a solo
    pool announces while the worker is still being set up, before ``celeryd_after_setup``)."""
    HEARTBEAT.node = str(sender)


@worker_process_init.connect
def _load_runtime(**_: Any) -> None:
    if not consumes_inference():
        announce_jobs_only()
        return
    runtime = get_runtime()
    serve_metrics(runtime.settings.worker_metrics_port)
    announce(runtime)


_discards: "redis.Redis | None" = None  # the client of the process that discards expired tasks (prefork: the parent)


@task_revoked.connect
def _count_expired(request: Any = None, expired: bool = False, **_: Any) -> None:
    """A task whose ``expires`` passed while it waited is discarded unrun where it is received (a prefork
    worker's parent process): each one is a request the miner answered without the fleet, or not at all."""
    global _discards
    if not expired:
        return
    delivery = getattr(request, "delivery_info", None) or {}
    queue = str(delivery.get("routing_key") or "?")
    if _discards is None:  # short timeouts: this runs on the worker's consumer thread
        _discards = redis.Redis.from_url(get_settings().pool_redis_url, socket_timeout=1.0,
                                         socket_connect_timeout=1.0)
    count_expired(_discards, queue)


@worker_process_shutdown.connect  # a prefork child
@worker_shutdown.connect  # the worker itself: a solo pool's only process (a prefork parent never announced)
def _retire_heartbeat(**_: Any) -> None:
    HEARTBEAT.retire()


# A cold shutdown (SIGQUIT, a second Ctrl-C) sends no worker_shutdown: a solo worker left its heartbeat behind,
# alive to the miner (forecasts sent to nobody, each waiting out its pool wait) and to `status` for 25 s.
atexit.register(HEARTBEAT.retire)


@app.task(name=TASK_FORECAST, ignore_result=True, acks_late=False, soft_time_limit=FORECAST_SOFT_LIMIT_S,
          time_limit=FORECAST_SOFT_LIMIT_S + FORECAST_KILL_GRACE_S)
def forecast(request: dict[str, Any], result_key: str, deadline: float, request_id: str) -> None:
    runtime = get_runtime()
    # Claimed before anything else: from here on the miner can tell this process died (its lease lapses).
    lease = TaskLease(runtime.redis, str(request_id), HEARTBEAT.name,
                      runtime.settings.max_wait_s + LATE_RESULT_TTL_S).start()
    try:
        _forecast(runtime, lease, request, result_key, deadline, request_id)
    finally:  # whatever escapes (a BaseException): no renewal thread left behind, the lease then lapses
        lease.stop()


def _forecast(runtime: WorkerRuntime, lease: TaskLease, request: dict[str, Any], result_key: str, deadline: float,
              request_id: str) -> None:
    due = time.time()  # until the deadline is read: a result is then kept only LATE_RESULT_TTL_S
    try:
        due = finite_deadline(deadline)
        if time.time() > due:
            raise TimeoutError("deadline passed before the task started")
        req = checked_request(request, runtime.settings.max_num_simulations)
        snapshot = runtime.snapshot(req.asset, int(time.time()), runtime.settings.cache_window_s(req.time_increment))
        result = runtime.forecaster.run(req, snapshot)
        blob = encode_paths(result.paths, result.engine, result.fallback_reason)
        TASK_SECONDS.labels(req.prompt.name, result.engine).observe(result.seconds)
        TASKS.labels("fallback" if result.fallback_reason else "ok").inc()
        log.info("request %s %s: %s in %.0f ms", request_id, req.key(), result.engine, result.seconds * 1e3)
    except Exception as exc:  # the miner must learn at once that it has to fall back
        log.warning("request %s failed: %s", request_id, exc)
        blob = encode_error(f"{type(exc).__name__}: {exc}")
        TASKS.labels("error").inc()
    ttl = min(runtime.settings.result_ttl_s, max(0, math.ceil(due - time.time())) + LATE_RESULT_TTL_S)
    pipe = runtime.redis.pipeline()  # one transaction: the result appears as the claim and lease go
    pipe.rpush(result_key, blob)
    pipe.expire(result_key, ttl)
    lease.release(pipe)
    pipe.execute()
    announce(runtime)

"""Worker-side observability: Prometheus series and a heartbeat in Redis that `synth-miner status` reads."""

import json
import logging
import os
import socket
import threading
import time

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from core.constants import (
    EXPIRED_TASKS_KEY,
    HEARTBEAT_EVERY_S,
    HEARTBEAT_RETRY_S,
    HEARTBEAT_TTL_S,
    WORKER_HEARTBEAT_KEY,
)

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
TASK_SECONDS = Histogram("synth_worker_task_seconds", "forecast task time", ["prompt", "engine"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=REGISTRY)
TASKS = Counter("synth_worker_tasks", "forecast tasks by outcome", ["outcome"], registry=REGISTRY)
# Served by a solo worker only: a prefork worker discards expired tasks in its parent, which serves no metrics,
# so every discard is also counted in Redis (EXPIRED_TASKS_KEY), for `status` and the miner's metrics.
EXPIRED = Counter("synth_worker_expired_tasks", "tasks discarded unrun, their expiry passed in the queue", ["queue"],
                  registry=REGISTRY)
MODEL_VERSION = Gauge("synth_worker_model_info", "artifact version served (value 1)", ["version", "engine"],
                      registry=REGISTRY)


_serving: tuple[str, str] | None = None


def serving(version: str | None, engine: str) -> None:
    """Point ``synth_worker_model_info`` at what this process serves now: a reload replaces the old series."""
    global _serving
    labels = (version or "none", engine)
    if labels != _serving:
        if _serving is not None:
            MODEL_VERSION.remove(*_serving)
        MODEL_VERSION.labels(*labels).set(1)
        _serving = labels


def count_expired(client: redis.Redis, queue: str) -> None:
    """One task discarded unrun (the miner had stopped waiting for it): counted here and in Redis."""
    EXPIRED.labels(queue).inc()
    try:
        client.hincrby(EXPIRED_TASKS_KEY, queue, 1)
    except Exception as exc:  # Redis away: the task is lost either way, the count only undercounts
        log.warning("expired task on %s not counted in Redis: %s", queue, exc)


def serve_metrics(port: int | None) -> None:
    if not port:
        return
    try:
        start_http_server(port, registry=REGISTRY)
    except OSError as exc:  # a second process on one host (prefork --concurrency > 1): it serves no metrics
        log.warning("worker metrics not served on :%d (%s): one process per port", port, exc)
        return
    log.info("worker metrics on :%d/metrics", port)


class Heartbeat:
    """This process's announcement in Redis (engine, device, the checkpoint of each model, artifact version,
    queues, pid). A daemon thread re-sends the latest one while the process is idle, so a worker that has
    had no task for a while (a cpu-only worker, a quiet GPU worker) stays listed."""

    def __init__(self) -> None:
        self.node = socket.gethostname()  # the Celery node name once the worker is set up (gpu0@host)
        self._client: object | None = None
        self._payload: dict[str, object] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._failures = 0  # beats failed in a row: retried every second, so only the first is a warning
        self._sent_at = 0.0  # monotonic time of the last beat Redis took, from any thread

    @property
    def name(self) -> str:
        """This process's name in its heartbeat (and in the leases of the forecasts it runs)."""
        return f"{self.node}:{os.getpid()}"

    def announce(self, client: object, engine: str, version: str | None, queues: str = "",
                 device: str = "cpu", models: dict[str, str] | None = None) -> None:
        name = self.name
        with self._lock:
            self._client = client
            self._payload = {"name": name, "engine": engine, "device": device, "models": models or {},
                             "artifact_version": version, "pid": os.getpid(), "queues": queues}
        self.send()
        if self._thread is None or not self._thread.is_alive():  # a forked child starts its own
            self._thread = threading.Thread(target=self._resend, name="heartbeat", daemon=True)
            self._thread.start()

    def send(self) -> None:
        """Announce now; a failure is counted (``_failures``) and retried within a second by ``_resend``."""
        # Under the lock, so a send racing retire() cannot put the key back after it was removed.
        with self._lock:
            client, payload = self._client, {**self._payload, "at": time.time()}
            if client is None:
                return
            try:
                client.set(WORKER_HEARTBEAT_KEY.format(name=payload["name"]), json.dumps(payload),  # type: ignore[attr-defined]
                           ex=HEARTBEAT_TTL_S)
            except Exception as exc:  # Redis down: the next beat tries again
                self._failures += 1
                log.log(logging.WARNING if self._failures == 1 else logging.DEBUG,
                        "heartbeat failed: %s (retried every %.0f s, logged again once it is back)", exc,
                        HEARTBEAT_RETRY_S)
                return
            self._sent_at = time.monotonic()
            if self._failures:
                log.warning("heartbeat back after %d failed attempt(s)", self._failures)
                self._failures = 0

    def stop(self) -> None:
        self._stopped.set()

    def retire(self) -> None:
        """Stop announcing and remove this process's heartbeat as it shuts down: `status` and the miner see it
        gone at once, instead of a live-looking key for up to HEARTBEAT_STALE_AFTER_S (the miner would keep
        sending it forecasts that nobody computes)."""
        self.stop()
        with self._lock:
            client, name = self._client, self._payload.get("name")
            self._client = None
            if client is None or not name or self._payload.get("pid") != os.getpid():
                return  # nothing announced, or a fork of the process that did (at exit): its key is not ours
            try:
                client.delete(WORKER_HEARTBEAT_KEY.format(name=name))  # type: ignore[attr-defined]
            except Exception as exc:  # Redis down: the key expires on its own
                log.warning("heartbeat not removed: %s", exc)

    def _resend(self) -> None:
        # Looks every retry interval, beats every interval: a beat that failed outside this thread (the first
        # announcement of a worker started while Redis was down, the one after a task) is tried again within
        # a second too, not a whole interval later (the worker, ready, looked dead for 10 s more).
        while not self._stopped.wait(min(HEARTBEAT_RETRY_S, HEARTBEAT_EVERY_S)):
            if self._failures or time.monotonic() - self._sent_at >= HEARTBEAT_EVERY_S or self._key_gone():
                self.send()

    def _key_gone(self) -> bool:
        """Whether Redis lost this process's beat between two of them (restarted empty, flushed), with no beat
        failing: the miner then saw no live worker and answered from the fallback (``no_worker``) until the next
        beat, up to HEARTBEAT_EVERY_S. One EXISTS a retry interval makes that a second at most."""
        with self._lock:
            client, name = self._client, self._payload.get("name")
        if client is None or not name:
            return False
        try:
            return not client.exists(WORKER_HEARTBEAT_KEY.format(name=name))  # type: ignore[attr-defined]
        except Exception:  # Redis away: send() tries, counts and logs it
            return True


HEARTBEAT = Heartbeat()  # one per process

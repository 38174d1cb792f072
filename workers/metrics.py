"""Worker-side observability: Prometheus series and a heartbeat in Redis that `synth-miner status` reads."""

import json
import logging
import os
import socket
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from core.constants import WORKER_HEARTBEAT_KEY

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
TASK_SECONDS = Histogram("synth_worker_task_seconds", "forecast task time", ["prompt", "engine"],
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=REGISTRY)
TASKS = Counter("synth_worker_tasks", "forecast tasks by outcome", ["outcome"], registry=REGISTRY)
MODEL_VERSION = Gauge("synth_worker_model_info", "artifact version served (value 1)", ["version", "engine"],
                      registry=REGISTRY)
HEARTBEAT_TTL_S = 120


def serve_metrics(port: int | None) -> None:
    if port:
        start_http_server(port, registry=REGISTRY)
        log.info("worker metrics on :%d/metrics", port)


def heartbeat(client: object, engine: str, version: str | None, queues: str | None = None,
              device: str = "cpu", models: dict[str, str] | None = None) -> None:
    """Announce this worker process (engine, its device, the checkpoint of each model, artifact version,
    pid) for a minute or two."""
    name = f"{socket.gethostname()}:{os.getpid()}"
    payload = {"name": name, "engine": engine, "device": device, "models": models or {},
               "artifact_version": version, "pid": os.getpid(),
               "queues": queues or os.environ.get("SYNTH_WORKER_QUEUES", ""), "at": time.time()}
    try:
        client.set(WORKER_HEARTBEAT_KEY.format(name=name), json.dumps(payload), ex=HEARTBEAT_TTL_S)  # type: ignore[attr-defined]
    except Exception as exc:
        log.warning("heartbeat failed: %s", exc)

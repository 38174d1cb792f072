"""Prometheus metrics of the miner: what operators watch to know every answer is valid and in time."""

import asyncio
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from core.constants import EXPIRED_TASKS_KEY

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 60, 120)
# Every value fallback_reason() returns, and what answers a lost forecast: exported at 0 from the start, so
# the first fallback or lost worker after a restart is an increase Prometheus sees (a series born at 1 has
# no earlier sample, and increase() reads no rise in it: deploy/prometheus/alerts.yml would stay silent).
FALLBACK_REASONS = ("worker_error", "worker_lost", "redis_down", "no_worker", "timeout", "invalid_paths", "other")
LOST_ANSWERED_BY = ("resent", "fallback")


class MinerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("synth_requests", "Simulation requests answered or refused",
                                ["asset", "prompt", "outcome"], registry=r)
        self.latency = Histogram("synth_request_seconds", "receipt to reply ready", ["prompt"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.deadline_margin = Histogram("synth_deadline_margin_seconds", "time left before the caller's deadline",
                                         ["prompt"], buckets=LATENCY_BUCKETS, registry=r)
        self.fallbacks = Counter("synth_fallbacks", "answers from the in-process fallback", ["reason"], registry=r)
        for why in FALLBACK_REASONS:
            self.fallbacks.labels(why)
        # Which engine computed each answer: a worker whose model could not serve a request answers with its
        # own EWMA-t, which the outcome above counts as "pool".
        self.engines = Counter("synth_answers_by_engine", "answers by the engine that computed them",
                               ["prompt", "source", "engine"], registry=r)
        # How old the newest price was that an answer's forecast started from (its snapshot's anchor), set at
        # each answer: a frozen feed degrades every forecast while fallbacks and valid replies look healthy.
        self.price_age = Gauge("synth_price_age_seconds", "age of the newest price the last answer of the "
                               "asset was forecast from", ["asset"], registry=r)
        # Forecasts whose worker stopped mid-task (their lease lapsed), by what answered them: the re-sent task's
        # worker ("resent") or the fallback ("fallback", also counted above as reason worker_lost).
        self.lost = Counter("synth_lost_forecasts", "forecasts whose worker stopped while running them",
                            ["answered_by"], registry=r)
        for by in LOST_ANSWERED_BY:
            self.lost.labels(by)
        self.invalid = Counter("synth_invalid_replies", "replies refused by the self-check (never sent)", registry=r)
        self.shared = Counter("synth_shared_requests", "requests answered from an identical one", registry=r)
        self.queue_depth = Gauge("synth_queue_depth", "messages waiting per Celery queue", ["queue"], registry=r)
        # The workers' count in Redis (a prefork worker discards them in its parent, which serves no metrics).
        self.expired = Gauge("synth_expired_tasks", "tasks the workers discarded unrun, past their expiry "
                             "(since Redis was last emptied)", ["queue"], registry=r)

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, port)


def fallback_reason(reason: str | None) -> str:
    """A small, stable label set for the free-text reason."""
    text = (reason or "").lower()
    # Where it failed before how: a Redis that drops packets fails with "pool unavailable: TimeoutError:
    # Timeout connecting", and a worker's error may name a timeout; both were counted as pool timeouts.
    if "worker error" in text:  # the worker's own message follows: it may name anything
        return "worker_error"
    if "stopped while running" in text:  # a worker killed or frozen mid-task (its lease lapsed), re-sent or not
        return "worker_lost"
    if "lost with redis" in text:  # Redis restarted without the task: neither queued, claimed nor answered
        return "redis_down"
    if "no live worker" in text:  # nothing sent: no process announces the queue (stopped, killed, hung)
        return "no_worker"
    if "unavailable" in text or "connection" in text:
        return "redis_down"
    if "deadline" in text or "timed out" in text or "timeout" in text:
        return "timeout"
    if "digits" in text or "shape" in text or "nan" in text or "prices" in text:
        return "invalid_paths"
    return "other"


async def watch_queue_depth(metrics: MinerMetrics, redis_url: str, queues: list[str], every_s: float = 5.0) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, socket_timeout=2.0)
    try:
        while True:
            for queue in queues:
                try:
                    metrics.queue_depth.labels(queue).set(await client.llen(queue))
                except Exception:
                    metrics.queue_depth.labels(queue).set(float("nan"))
            try:
                expired = await client.hgetall(EXPIRED_TASKS_KEY)
            except Exception:  # Redis away: the depths above say so (NaN); the counts stay as last read
                expired = None
            if expired is not None:
                # A watched queue with no field has lost nothing since Redis was emptied: 0, not absent, so
                # the first discard is a rise an alert sees.
                counts = {queue: 0 for queue in queues}
                counts |= {(f.decode() if isinstance(f, bytes) else f): int(c) for f, c in expired.items()}
                for queue, count in counts.items():
                    metrics.expired.labels(queue).set(count)
            await asyncio.sleep(every_s)
    finally:  # cancelled at shutdown: close the connection rather than leave the socket to the collector
        await client.aclose()

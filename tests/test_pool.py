"""The miner's Celery pool against a real Redis that restarts under it."""

import asyncio
import json
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import redis

from core.constants import HEARTBEAT_STALE_AFTER_S, HEARTBEAT_TTL_S, RESULT_KEY, WORKER_HEARTBEAT_KEY
from core.forecast import ForecastResult
from core.prompts import ForecastRequest
from core.settings import Settings
from core.transport import encode_paths
from miner import pool as pool_module
from miner.pool import CeleryPool, EmbeddedPool, PoolError
from synth_miner.devstack import RedisServer


async def test_the_first_read_after_a_redis_restart_reconnects(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    pool = CeleryPool(Settings(_env_file=None, redis_url=server.url))  # type: ignore[call-arg]
    try:
        await pool.redis.ping()  # a pooled connection, as every earlier request leaves one
        server.stop()
        server.start()  # same port: the pooled connection is now closed by the server
        announce(server.url, "infer.hf")  # the worker's next heartbeat (the restarted server kept no keys)
        paths = np.full((3, 5), 100.0, np.float32)
        # The worker's answer is already there, so the read alone decides the outcome.
        redis.Redis.from_url(server.url).rpush(RESULT_KEY.format(request_id="r1"), encode_paths(paths))
        request = ForecastRequest("BTC", int(time.time()) + 600, 60, 240, 3)
        got = await pool.forecast(request, None, time.time() + 5.0, "r1")  # type: ignore[arg-type]
        np.testing.assert_array_equal(got.paths, paths)
    finally:
        await pool.close()
        server.stop()


def announce(url: str, queues: str, silent_s: float = 0.0, name: str = "w1@host:1") -> None:
    """A worker process's heartbeat, last sent ``silent_s`` ago (as workers/metrics.py writes it)."""
    redis.Redis.from_url(url).set(WORKER_HEARTBEAT_KEY.format(name=name),
                                  json.dumps({"name": name, "queues": queues, "at": time.time() - silent_s}),
                                  ex=HEARTBEAT_TTL_S)


async def test_a_queue_no_live_worker_reads_fails_at_once_and_sends_nothing(tmp_path: Path) -> None:
    """Without a live reader the task would wait in the queue until the miner gave up (max_wait_s, 30 s by
    default) while the fallback could have answered at once. A worker that stopped announcing (killed, or
    hung) keeps its key for a while: only a recent heartbeat counts."""
    server = RedisServer(tmp_path).start()
    settings = Settings(_env_file=None, redis_url=server.url)  # type: ignore[call-arg]
    pool = CeleryPool(settings)
    client = redis.Redis.from_url(server.url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 300, 86_400, 3)
    try:
        announce(server.url, f"{settings.queue_infer_hf},{settings.queue_cpu}")  # reads the other queues only
        announce(server.url, settings.queue_infer_lf, silent_s=HEARTBEAT_STALE_AFTER_S + 5, name="w2@host:2")
        client.set(WORKER_HEARTBEAT_KEY.format(name="w3@host:3"), b"not json")  # skipped, not fatal
        began = time.monotonic()
        with pytest.raises(PoolError, match=f"no live worker reads queue {settings.queue_infer_lf}"):
            await pool.forecast(request, None, time.time() + 20.0, "r1")  # type: ignore[arg-type]
        assert time.monotonic() - began < 10.0  # well before the 20 s deadline
        assert client.llen(settings.queue_infer_lf) == 0  # nothing left queued for nobody
    finally:
        await pool.close()
        server.stop()


async def test_a_worker_that_comes_up_is_used_within_the_check_period(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "LIVE_READERS_CHECK_S", 0.2)
    server = RedisServer(tmp_path).start()
    settings = Settings(_env_file=None, redis_url=server.url)  # type: ignore[call-arg]
    pool = CeleryPool(settings)
    client = redis.Redis.from_url(server.url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 300, 86_400, 3)
    paths = np.full((3, 289), 100.0, np.float32)
    try:
        with pytest.raises(PoolError, match="no live worker"):
            await pool.forecast(request, None, time.time() + 5.0, "r1")  # type: ignore[arg-type]
        announce(server.url, settings.queue_infer_lf)
        await asyncio.sleep(0.3)
        client.rpush(RESULT_KEY.format(request_id="r2"), encode_paths(paths))  # the worker's answer
        got = await pool.forecast(request, None, time.time() + 5.0, "r2")  # type: ignore[arg-type]
        np.testing.assert_array_equal(got.paths, paths)
        assert client.llen(settings.queue_infer_lf) == 1  # this time the task was sent
    finally:
        await pool.close()
        server.stop()


async def test_a_task_expires_when_the_miner_stops_waiting(tmp_path: Path) -> None:
    """A task still queued once the miner has fallen back must be revoked, not run: computed late, it holds the
    worker (its GPU) from the requests queued behind it, which then fall back too."""
    server = RedisServer(tmp_path).start()
    settings = Settings(_env_file=None, redis_url=server.url)
    pool = CeleryPool(settings)
    client = redis.Redis.from_url(server.url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 300, 86_400, 3)
    try:
        announce(server.url, settings.queue_infer_lf)
        client.rpush(RESULT_KEY.format(request_id="r1"), encode_paths(np.full((3, 289), 100.0, np.float32)))
        deadline = time.time() + 5.0
        await pool.forecast(request, None, deadline, "r1")  # type: ignore[arg-type]
        raw = client.lindex(settings.queue_infer_lf, 0)
        assert isinstance(raw, bytes)
        headers = json.loads(raw)["headers"]
        assert headers["id"] == "r1" and headers["expires"] is not None
        assert datetime.fromisoformat(headers["expires"]).timestamp() == pytest.approx(deadline, abs=1e-3)
    finally:
        await pool.close()
        server.stop()


class SlowForecaster:
    """A forecaster source whose runs take ``delay[asset]`` seconds and whose ``current()`` takes ``reload_s``
    (a newly published artifact being loaded)."""

    def __init__(self, delay: dict[str, float] | None = None, reload_s: float = 0.0) -> None:
        self.delay = delay or {}
        self.reload_s = reload_s

    def current(self) -> "SlowForecaster":
        time.sleep(self.reload_s)
        return self

    def run(self, request: ForecastRequest, snapshot: object) -> ForecastResult:
        time.sleep(self.delay.get(request.asset, 0.0))
        return ForecastResult(np.ones((request.num_simulations, request.n_points), np.float32), "test", None, 0.0)


def small_request(asset: str) -> ForecastRequest:
    return ForecastRequest(asset, int(time.time()) + 600, 60, 240, 3)


async def test_embedded_forecasts_past_their_deadline_leave_the_threads_to_later_ones() -> None:
    """Two forecasts that overrun their deadline (a thread cannot be stopped) used to hold both threads, and a
    fast request behind them timed out as well."""
    pool = EmbeddedPool(SlowForecaster({"SLOW": 4.0}), threads=2)  # type: ignore[arg-type]
    try:
        slow = await asyncio.gather(*(pool.forecast(small_request("SLOW"), None, time.time() + 0.3, f"s{i}")  # type: ignore[arg-type]
                                      for i in range(2)), return_exceptions=True)
        assert all(isinstance(r, PoolError) for r in slow), slow
        served = await pool.forecast(small_request("BTC"), None, time.time() + 2.0, "fast")  # type: ignore[arg-type]
        assert served.paths.shape == (3, 5) and served.engine == "test"  # the forecaster's engine, not "pool"
    finally:
        await pool.close()


async def test_embedded_pool_with_too_many_overruns_fails_at_once() -> None:
    """Past ``max_overrun`` stuck forecasts the pool refuses at once (the fallback answers), never queues."""
    pool = EmbeddedPool(SlowForecaster({"SLOW": 4.0}), threads=1, max_overrun=1)  # type: ignore[arg-type]
    try:
        with pytest.raises(PoolError, match="timed out"):
            await pool.forecast(small_request("SLOW"), None, time.time() + 0.2, "s")  # type: ignore[arg-type]
        began = time.monotonic()
        with pytest.raises(PoolError, match="past their deadline"):
            await pool.forecast(small_request("BTC"), None, time.time() + 3.0, "f")  # type: ignore[arg-type]
        assert time.monotonic() - began < 1.0
    finally:
        await pool.close()


async def test_embedded_pool_loads_a_new_artifact_off_the_event_loop() -> None:
    """``current()`` loads a newly published artifact (models): run on the loop, it stalled every request."""
    pool = EmbeddedPool(SlowForecaster(reload_s=1.5))  # type: ignore[arg-type]
    lag = 0.0

    async def ticker() -> None:
        nonlocal lag
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            lag = max(lag, time.monotonic() - before)

    tick = asyncio.create_task(ticker())
    try:
        await asyncio.sleep(0.05)
        served = await pool.forecast(small_request("BTC"), None, time.time() + 10.0, "r")  # type: ignore[arg-type]
        assert served.paths.shape == (3, 5)
        assert lag < 0.75, f"event loop stalled {lag:.2f} s"
    finally:
        tick.cancel()
        await pool.close()

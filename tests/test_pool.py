"""The miner's Celery pool against a real Redis that restarts under it."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from core.constants import RESULT_KEY
from core.forecast import ForecastResult
from core.prompts import ForecastRequest
from core.settings import Settings
from core.transport import encode_paths
from miner.pool import CeleryPool, EmbeddedPool, PoolError
from synth_miner.devstack import RedisServer


async def test_the_first_read_after_a_redis_restart_reconnects(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    pool = CeleryPool(Settings(_env_file=None, redis_url=server.url))  # type: ignore[call-arg]
    try:
        await pool.redis.ping()  # a pooled connection, as every earlier request leaves one
        server.stop()
        server.start()  # same port: the pooled connection is now closed by the server
        paths = np.full((3, 5), 100.0, np.float32)
        # The worker's answer is already there, so the read alone decides the outcome.
        redis.Redis.from_url(server.url).rpush(RESULT_KEY.format(request_id="r1"), encode_paths(paths))
        request = ForecastRequest("BTC", int(time.time()) + 600, 60, 240, 3)
        got = await pool.forecast(request, None, time.time() + 5.0, "r1")  # type: ignore[arg-type]
        np.testing.assert_array_equal(got, paths)
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
        paths = await pool.forecast(small_request("BTC"), None, time.time() + 2.0, "fast")  # type: ignore[arg-type]
        assert paths.shape == (3, 5)
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
        paths = await pool.forecast(small_request("BTC"), None, time.time() + 10.0, "r")  # type: ignore[arg-type]
        assert paths.shape == (3, 5)
        assert lag < 0.75, f"event loop stalled {lag:.2f} s"
    finally:
        tick.cancel()
        await pool.close()

"""The miner's Celery pool against a real Redis that restarts under it."""

import time
from pathlib import Path

import numpy as np
import redis

from core.constants import RESULT_KEY
from core.prompts import ForecastRequest
from core.settings import Settings
from core.transport import encode_paths
from miner.pool import CeleryPool
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

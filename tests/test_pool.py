"""The miner's Celery pool against a real Redis that restarts under it."""

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import redis

from core.cache_redis import RedisHistoryCache
from core.constants import (
    EXPIRED_TASKS_KEY,
    HEARTBEAT_STALE_AFTER_S,
    HEARTBEAT_TTL_S,
    RESULT_KEY,
    WORKER_HEARTBEAT_KEY,
)
from core.forecast import ForecastResult
from core.prompts import ForecastRequest
from core.settings import Settings
from core.sources.replay import ReplaySource
from core.transport import encode_paths
from miner import pool as pool_module
from miner.pool import CeleryPool, EmbeddedPool, PoolError
from synth_miner.devstack import Proc, RedisServer, spawn
from tests.worker_apps import CLOCK_OFFSET_ENV


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
    """A worker process's heartbeat, last sent ``silent_s`` ago (as workers/metrics.py writes it: its TTL left is
    what Redis measures the age by)."""
    redis.Redis.from_url(url).set(WORKER_HEARTBEAT_KEY.format(name=name),
                                  json.dumps({"name": name, "queues": queues, "at": time.time() - silent_s}),
                                  px=int((HEARTBEAT_TTL_S - silent_s) * 1000))


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


async def test_a_worker_on_time_is_sent_a_request_with_little_time_left(tmp_path: Path) -> None:
    """The clock check must not cost a synced fleet its short requests: a skew of milliseconds measured "ahead" is
    noise, not a worker that would discard the task."""
    server = RedisServer(tmp_path).start()
    settings = Settings(_env_file=None, redis_url=server.url)  # type: ignore[call-arg]
    pool = CeleryPool(settings)
    client = redis.Redis.from_url(server.url)
    try:
        announce(server.url, settings.queue_infer_lf)
        client.rpush(RESULT_KEY.format(request_id="r1"), encode_paths(np.full((3, 289), 100.0, np.float32)))
        request = ForecastRequest("BTC", int(time.time()) + 600, 300, 86_400, 3)
        got = await pool.forecast(request, None, time.time() + 0.4, "r1")  # type: ignore[arg-type]
        assert got.paths.shape == (3, 289) and client.llen(settings.queue_infer_lf) == 1
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


# --- workers whose clock is off ----------------------------------------------------------------------------


@pytest.fixture
def btc_cache(redis_url: str, shared_data: Path) -> str:
    """Three days of BTC minutes in the cache, so a worker computes real paths."""
    now = int(time.time())
    history = ReplaySource(shared_data).shifted("BTC", 60).between(now - 3 * 86_400, now)
    RedisHistoryCache(redis.Redis.from_url(redis_url)).write("BTC", history)
    return redis_url


def start_skewed_worker(tmp_path: Path, redis_url: str, offset_s: float) -> Proc:
    """A real Celery worker (the production forecast task, ewma_t) reading infer.hf, whose wall clock is
    ``offset_s`` off this host's (tests/worker_apps.py skews it); returns once its first heartbeat is in Redis."""
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_ENGINE": "ewma_t", "SYNTH_SEED": "3", "SYNTH_LOG_LEVEL": "INFO",
           "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           CLOCK_OFFSET_ENV: str(offset_s)}
    worker = spawn([sys.executable, "-m", "celery", "-A", "tests.worker_apps", "worker", "-Q", "infer.hf", "-P",
                    "solo", "-n", "skewed@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
                   env, tmp_path / "worker.log")
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 90
    while not any(client.scan_iter(WORKER_HEARTBEAT_KEY.format(name="skewed@*"))) or " ready." not in worker.text():
        if worker.proc.poll() is not None or time.monotonic() > deadline:
            worker.stop()
            raise AssertionError(f"worker not ready:\n{worker.text()[-4000:]}")
        time.sleep(0.2)
    return worker


@pytest.fixture
def pool(btc_cache: str) -> Iterator[CeleryPool]:
    yield CeleryPool(Settings(_env_file=None, redis_url=btc_cache))  # type: ignore[call-arg]


async def ask(pool: CeleryPool, left_s: float, n: int, tag: str) -> tuple[int, list[float], list[str]]:
    """``n`` requests in turn, each with ``left_s`` to the pool's deadline (the task's ``expires``): how many the
    pool served, the seconds each took, and why the others fell back."""
    served, seconds, reasons = 0, [], []
    for i in range(n):
        request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 50)
        began = time.monotonic()
        try:
            got = await pool.forecast(request, None, time.time() + left_s, f"{tag}-{i}")  # type: ignore[arg-type]
            assert got.paths.shape == (50, 61) and got.engine == "ewma_t"
            served += 1
        except PoolError as exc:
            reasons.append(str(exc))
        seconds.append(time.monotonic() - began)
    print(f"{tag}: {left_s:.0f} s left: served {served}/{n}, fallback {1 - served / n:.0%}, "
          f"{max(seconds):.2f} s at most; {sorted(set(reasons))}")
    return served, seconds, reasons


def skew_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "miner.pool" and "clock" in r.getMessage()]


async def test_a_worker_whose_clock_is_behind_is_used(tmp_path: Path, pool: CeleryPool, caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A healthy worker whose clock is 40 s behind wrote heartbeats 40 s "old" by the miner's clock: the miner took
    it for dead and answered every request from its fallback. Its key's age in Redis says it beat just now."""
    monkeypatch.setattr(pool_module, "LIVE_READERS_CHECK_S", 0.0)  # the heartbeats read for every request
    worker = start_skewed_worker(tmp_path, pool.settings.redis_url or "", -40.0)
    try:
        served, _, reasons = await ask(pool, 10.0, 5, "behind")
        assert served == 5, reasons
        warned = skew_warnings(caplog)  # named once, not per read
        assert len(warned) == 1 and warned[0].startswith("worker skewed@") and "40 s behind" in warned[0], warned
    finally:
        await pool.close()
        worker.stop()


async def test_a_worker_whose_clock_is_ahead_is_not_waited_for_on_tasks_it_would_expire(
        tmp_path: Path, pool: CeleryPool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker 15 s ahead discards as expired (by its own clock) every task with less than 15 s to its expiry:
    the miner took it for live and waited out each such request before falling back. It now falls back at once
    for those, and still sends the worker the requests it has time for."""
    monkeypatch.setattr(pool_module, "LIVE_READERS_CHECK_S", 0.0)
    worker = start_skewed_worker(tmp_path, pool.settings.redis_url or "", 15.0)
    client = redis.Redis.from_url(pool.settings.redis_url or "")
    try:
        served, seconds, reasons = await ask(pool, 6.0, 3, "ahead-short")
        assert served == 0 and max(seconds) < 1.0, (seconds, reasons)
        assert all("clock" in r and "ahead" in r for r in reasons), reasons
        assert not client.hgetall(EXPIRED_TASKS_KEY)  # none sent for the worker to discard
        served, _, reasons = await ask(pool, 25.0, 2, "ahead-long")
        assert served == 2, reasons
        warned = skew_warnings(caplog)
        assert len(warned) == 1 and warned[0].startswith("worker skewed@") and "15 s ahead" in warned[0], warned
    finally:
        await pool.close()
        worker.stop()

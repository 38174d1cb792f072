"""The miner's Celery pool against a real Redis that restarts under it."""

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from core.cache_redis import RedisHistoryCache
from core.constants import (
    EXPIRED_TASKS_KEY,
    HEARTBEAT_STALE_AFTER_S,
    HEARTBEAT_TTL_S,
    RESULT_KEY,
    TASK_CLAIM_KEY,
    TASK_LEASE_CHECK_S,
    TASK_LEASE_KEY,
    TASK_LEASE_MS,
    WORKER_HEARTBEAT_KEY,
)
from core.forecast import ForecastResult
from core.prompts import ForecastRequest
from core.settings import Settings
from core.sources.replay import ReplaySource
from core.transport import ComputedPaths, encode_paths
from miner import pool as pool_module
from miner.pool import CeleryPool, EmbeddedPool, PoolError
from synth_miner.devstack import Proc, RedisServer, spawn
from tests.worker_apps import CLOCK_OFFSET_ENV, HOLD_FORECAST_KEY
from workers.lease import TaskLease


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


def cache_btc(redis_url: str, shared_data: Path) -> str:
    """Three days of BTC minutes in the cache, so a worker computes real paths."""
    now = int(time.time())
    history = ReplaySource(shared_data).shifted("BTC", 60).between(now - 3 * 86_400, now)
    RedisHistoryCache(redis.Redis.from_url(redis_url)).write("BTC", history)
    return redis_url


@pytest.fixture
def btc_cache(redis_url: str, shared_data: Path) -> str:
    return cache_btc(redis_url, shared_data)


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


# --- a worker that stops while it runs a forecast (its lease lapses) ---------------------------------------


def lost_pool(url: str, **settings: object) -> CeleryPool:
    """A pool that waits up to a minute: a lost task noticed only at its deadline fails the test's guard instead."""
    return CeleryPool(Settings(_env_file=None, redis_url=url, max_wait_s=60.0, **settings))  # type: ignore[call-arg]


async def queued_task(client: "redis.Redis", queue: str, n: int = 1) -> dict[str, Any]:
    """The ``n``-th task the pool sent to ``queue`` (its Celery message headers), once it is there."""
    while client.llen(queue) < n:
        await asyncio.sleep(0.01)
    raw = client.lindex(queue, 0)  # LPUSHed: the newest first
    assert isinstance(raw, bytes)
    headers: dict[str, Any] = json.loads(raw)["headers"]
    return headers


def claim_and_stop(client: "redis.Redis", request_id: str, worker: str) -> TaskLease:
    """What a worker does as it starts the task, then dies: the claim is written, the lease no longer renewed."""
    lease = TaskLease(client, request_id, worker, claim_s=60).start()
    lease.stop()
    return lease


async def test_a_task_whose_worker_stops_fails_at_once_and_its_queue_waits_for_its_next_beat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed mid-task (kill -9, OOM, a GPU crash) pushes nothing: the miner waited out the deadline
    (max_wait_s, 30 s) for each such request and for every one sent to the dead worker's queue while its
    heartbeat still looked fresh. The lapsed lease ends the wait at once, and its queue has no live reader until
    that worker beats again."""
    monkeypatch.setattr(pool_module, "LIVE_READERS_CHECK_S", 0.0)  # the heartbeats read for every request
    server = RedisServer(tmp_path).start()
    pool = lost_pool(server.url)
    client = redis.Redis.from_url(server.url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 3)
    try:
        announce(server.url, "infer.hf", name="w1@host:1")
        waiting = asyncio.create_task(pool.forecast(request, None, time.time() + 50.0, "r1"))  # type: ignore[arg-type]
        headers = await queued_task(client, "infer.hf")
        claim_and_stop(client, headers["id"], "w1@host:1")
        async with asyncio.timeout(20):  # far under the deadline: the lapse ended the wait, not the deadline
            with pytest.raises(PoolError, match=r"worker w1@host:1 stopped while running the forecast \(its lease "
                                                r"lapsed\); not sent again: no live worker reads queue infer.hf"):
                await waiting
        assert client.llen("infer.hf") == 1  # not sent again to nobody
        with pytest.raises(PoolError, match="no live worker reads queue infer.hf"):  # its heartbeat is still fresh
            await pool.forecast(request, None, time.time() + 50.0, "r2")  # type: ignore[arg-type]
        announce(server.url, "infer.hf", name="w1@host:1")  # it beats again (a frozen process resumed)
        client.rpush(RESULT_KEY.format(request_id="r3"), encode_paths(np.full((3, 61), 100.0, np.float32)))
        got = await pool.forecast(request, None, time.time() + 50.0, "r3")  # type: ignore[arg-type]
        assert got.paths.shape == (3, 61) and got.resent_after is None
    finally:
        await pool.close()
        server.stop()


async def test_a_task_whose_lease_is_renewed_is_waited_for(tmp_path: Path) -> None:
    """A forecast running longer than one lease (renewed meanwhile) is not taken for lost, and its result, pushed
    as its claim and lease are removed, is returned."""
    server = RedisServer(tmp_path).start()
    pool = lost_pool(server.url)
    client = redis.Redis.from_url(server.url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 3)
    paths = np.full((3, 61), 100.0, np.float32)

    def worker(request_id: str) -> None:
        lease = TaskLease(client, request_id, "w1@host:1", claim_s=60).start()
        time.sleep(2 * TASK_LEASE_MS / 1000)
        pipe = client.pipeline()
        pipe.rpush(RESULT_KEY.format(request_id=request_id), encode_paths(paths, "test"))
        lease.release(pipe)
        pipe.execute()

    try:
        announce(server.url, "infer.hf")
        waiting = asyncio.create_task(pool.forecast(request, None, time.time() + 50.0, "r1"))  # type: ignore[arg-type]
        headers = await queued_task(client, "infer.hf")
        await asyncio.to_thread(worker, headers["id"])
        got = await waiting
        np.testing.assert_array_equal(got.paths, paths)
        assert (got.engine, got.resent_after) == ("test", None)
        assert client.llen("infer.hf") == 1  # sent once
        assert not client.exists(TASK_CLAIM_KEY.format(request_id="r1"), TASK_LEASE_KEY.format(request_id="r1"))
    finally:
        await pool.close()
        server.stop()


async def test_a_lost_task_is_sent_again_once_to_another_live_worker(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With another live reader and time left the request is sent again, under a new id (nothing the lost run, or
    a re-delivery of it, pushes can land in the new result key), and its answer says why. A second loss ends it."""
    monkeypatch.setattr(pool_module, "LIVE_READERS_CHECK_S", 0.0)
    server = RedisServer(tmp_path).start()
    pool = lost_pool(server.url)
    client = redis.Redis.from_url(server.url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 3)
    paths = np.full((3, 61), 100.0, np.float32)
    try:
        announce(server.url, "infer.hf", name="w1@host:1")
        announce(server.url, "infer.hf", name="w2@host:2")
        waiting = asyncio.create_task(pool.forecast(request, None, time.time() + 50.0, "r1"))  # type: ignore[arg-type]
        claim_and_stop(client, (await queued_task(client, "infer.hf"))["id"], "w1@host:1")
        again = await queued_task(client, "infer.hf", 2)
        first = json.loads(client.lindex("infer.hf", 1) or b"{}")["headers"]
        assert (first["id"], again["id"]) == ("r1", "r1-2") and again["expires"] == first["expires"]  # same deadline
        client.rpush(RESULT_KEY.format(request_id="r1-2"), encode_paths(paths, "test"))
        got = await waiting
        np.testing.assert_array_equal(got.paths, paths)
        assert got.resent_after == "worker w1@host:1 stopped while running it"

        waiting = asyncio.create_task(pool.forecast(request, None, time.time() + 50.0, "r2"))  # type: ignore[arg-type]
        claim_and_stop(client, (await queued_task(client, "infer.hf", 3))["id"], "w2@host:2")
        announce(server.url, "infer.hf", name="w1@host:1")  # back, so it can be sent again
        claim_and_stop(client, (await queued_task(client, "infer.hf", 4))["id"], "w1@host:1")
        async with asyncio.timeout(20):
            with pytest.raises(PoolError, match=r"worker w1@host:1 stopped while running the forecast \(its lease "
                                                r"lapsed\), after it was sent again because worker w2@host:2 stopped"):
                await waiting
        assert client.llen("infer.hf") == 4  # once only
    finally:
        await pool.close()
        server.stop()


async def test_a_lost_task_is_not_sent_again_without_the_time_for_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "LOST_TASK_RESEND_MIN_S", 100.0)  # more than the deadline leaves
    server = RedisServer(tmp_path).start()
    pool = lost_pool(server.url)
    client = redis.Redis.from_url(server.url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 3)
    try:
        announce(server.url, "infer.hf", name="w1@host:1")
        announce(server.url, "infer.hf", name="w2@host:2")
        waiting = asyncio.create_task(pool.forecast(request, None, time.time() + 50.0, "r1"))  # type: ignore[arg-type]
        claim_and_stop(client, (await queued_task(client, "infer.hf"))["id"], "w1@host:1")
        async with asyncio.timeout(20):
            with pytest.raises(PoolError, match=r"worker w1@host:1 stopped while running the forecast \(its lease "
                                                r"lapsed\); 4\d\.\d s left, too little to send it again"):
                await waiting
        assert client.llen("infer.hf") == 1
    finally:
        await pool.close()
        server.stop()


def start_test_worker(tmp_path: Path, redis_url: str, name: str, queues: str = "infer.hf",
                      **env: str) -> Proc:
    """A real solo Celery worker (the production forecast task, ewma_t; tests/worker_apps.py's hooks) that has not
    announced itself yet: see ready()."""
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_ENGINE": "ewma_t", "SYNTH_SEED": "3", "SYNTH_LOG_LEVEL": "INFO",
           "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"), **env}
    return spawn([sys.executable, "-m", "celery", "-A", "tests.worker_apps", "worker", "-Q", queues, "-P", "solo",
                  "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
                 env, tmp_path / f"worker-{name}.log")


def ready(worker: Proc, redis_url: str, name: str) -> Proc:
    """``worker`` once its first heartbeat is in Redis (it is stopped if it never comes)."""
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 90
    while not any(client.scan_iter(WORKER_HEARTBEAT_KEY.format(name=f"{name}@*"))) or " ready." not in worker.text():
        if worker.proc.poll() is not None or time.monotonic() > deadline:
            worker.stop()
            raise AssertionError(f"worker not ready:\n{worker.text()[-4000:]}")
        time.sleep(0.2)
    return worker


async def claimed_by(client: "redis.Redis", request_id: str) -> str:
    """The name of the worker process that started the task (its claim), once it has."""
    while (claim := client.get(TASK_CLAIM_KEY.format(request_id=request_id))) is None:
        await asyncio.sleep(0.01)
    return claim.decode()


async def test_a_worker_frozen_mid_forecast_is_given_up_at_once(tmp_path: Path, btc_cache: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A real worker stopped (SIGSTOP) while it runs a forecast renews no lease: it counts as lost, and with no
    other worker the fallback answers now, not after the whole wait."""
    monkeypatch.setattr(pool_module, "LIVE_READERS_CHECK_S", 0.0)
    url = btc_cache
    pool = lost_pool(url)
    worker = ready(start_test_worker(tmp_path, url, "frozen"), url, "frozen")
    client = redis.Redis.from_url(url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 50)
    try:
        got = await pool.forecast(request, None, time.time() + 50.0, "warm")  # type: ignore[arg-type]
        assert got.engine == "ewma_t"
        client.set(HOLD_FORECAST_KEY, 600)  # longer than the test: it is frozen, then killed
        waiting = asyncio.create_task(pool.forecast(request, None, time.time() + 50.0, "r1"))  # type: ignore[arg-type]
        name = await claimed_by(client, "r1")
        assert name.startswith("frozen@") and name.endswith(f":{worker.proc.pid}")
        os.killpg(worker.proc.pid, signal.SIGSTOP)
        async with asyncio.timeout(20):
            with pytest.raises(PoolError, match=f"worker {name} stopped while running the forecast"):
                await waiting
        with pytest.raises(PoolError, match="no live worker reads queue infer.hf"):  # nothing sent to it meanwhile
            await pool.forecast(request, None, time.time() + 50.0, "r2")  # type: ignore[arg-type]
    finally:
        if worker.proc.poll() is None:
            os.killpg(worker.proc.pid, signal.SIGCONT)
        worker.stop(signal.SIGKILL)
        await pool.close()


# --- Redis restarting while a request waits for its result ---------------------------------------------------


def restart(server: RedisServer) -> RedisServer:
    """A fresh redis-server on the same port and folder: it loads the dump there, if any (a production Redis
    loads its AOF)."""
    fresh = RedisServer(server.workdir)
    fresh.port = server.port
    return fresh.start()


async def test_a_forecast_running_while_redis_restarts_still_answers(tmp_path: Path, shared_data: Path) -> None:
    """Redis restarts (with its data) while a real worker computes: the worker pushes its result once Redis is
    back, and the miner, reconnecting, gets it. It used to fail at the first failed read, and the fallback answered.
    The restart outlasts the lease kept in the dump: the lapse read right after it is not a lost worker."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    url = cache_btc(server.url, shared_data)
    worker = ready(start_test_worker(tmp_path, url, "steady"), url, "steady")
    pool = lost_pool(url)
    client = redis.Redis.from_url(url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 50)
    try:
        assert (await pool.forecast(request, None, time.time() + 50.0, "warm")).engine == "ewma_t"  # type: ignore[arg-type]
        downtime_s = TASK_LEASE_MS / 1000 + 0.5
        client.set(HOLD_FORECAST_KEY, downtime_s + 2.5)  # the forecast ends after Redis is back
        waiting = asyncio.create_task(pool.forecast(request, None, time.time() + 50.0, "r1"))  # type: ignore[arg-type]
        await claimed_by(client, "r1")
        while client.exists(HOLD_FORECAST_KEY):  # until its engine runs: its market data read, nothing left to read
            await asyncio.sleep(0.01)
        client.save()
        server.stop()  # SIGKILL
        await asyncio.sleep(downtime_s)
        server = restart(server)
        async with asyncio.timeout(30):
            got = await waiting
        assert got.paths.shape == (50, 61) and got.engine == "ewma_t" and got.resent_after is None
        assert "Task synth.forecast[r1-2]" not in worker.text()  # the same task answered, not a second one
    finally:
        worker.stop(signal.SIGKILL)
        await pool.close()
        server.stop()


def asking_one_worker(pool: CeleryPool, url: str) -> "asyncio.Task[ComputedPaths]":
    """One worker announced on the Redis at ``url``, and a 1 h BTC request r1 of 3 paths waiting on ``pool``."""
    announce(url, "infer.hf")
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 3)
    return asyncio.create_task(pool.forecast(request, None, time.time() + 50.0, "r1"))  # type: ignore[arg-type]


async def resent_and_answered(url: str, waiting: "asyncio.Task[ComputedPaths]", paths: np.ndarray) -> ComputedPaths:
    """After an empty restart of the Redis at ``url``: the worker's heartbeat back, the request sent again as r1-2
    and answered with ``paths``."""
    announce(url, "infer.hf")
    client = redis.Redis.from_url(url)
    again = await asyncio.wait_for(queued_task(client, "infer.hf"), 20)
    assert again["id"] == "r1-2"
    client.rpush(RESULT_KEY.format(request_id="r1-2"), encode_paths(paths, "test"))
    got = await asyncio.wait_for(waiting, 20)
    np.testing.assert_array_equal(got.paths, paths)
    return got


async def test_a_task_lost_with_an_empty_redis_restart_is_sent_again(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarted empty (no persistence, a new instance) loses the queued task: neither queued, claimed nor
    answered once it is back, the request is sent again instead of waiting out the deadline."""
    monkeypatch.setattr(pool_module, "LIVE_READERS_CHECK_S", 0.0)
    server = RedisServer(tmp_path).start()
    pool = lost_pool(server.url)
    paths = np.full((3, 61), 100.0, np.float32)
    try:
        waiting = asking_one_worker(pool, server.url)
        await queued_task(redis.Redis.from_url(server.url), "infer.hf")
        server.stop()
        await asyncio.sleep(0.5)
        server = restart(server)  # empty: nothing was saved
        got = await resent_and_answered(server.url, waiting, paths)  # the worker's next heartbeat
        assert got.resent_after == "the task was lost with Redis's restart"
    finally:
        await pool.close()
        server.stop()


async def test_a_claimed_task_whose_result_redis_lost_is_sent_again_to_the_same_live_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker finished while Redis was down (its result never landed) and Redis came back empty: the claim is
    gone with no result. That is no proof the worker stopped, so the request is sent again without setting it
    aside; set aside, an alive worker read nothing until its next beat (up to 10 s), and with every worker alike
    each request fell back (no_worker: 42 in one chaos soak's empty-restart phase)."""
    monkeypatch.setattr(pool_module, "LIVE_READERS_CHECK_S", 0.0)
    server = RedisServer(tmp_path).start()
    pool = lost_pool(server.url)
    paths = np.full((3, 61), 100.0, np.float32)
    try:
        waiting = asking_one_worker(pool, server.url)
        first = redis.Redis.from_url(server.url)
        lease = TaskLease(first, (await queued_task(first, "infer.hf"))["id"], "w1@host:1", claim_s=60).start()
        await asyncio.sleep(3 * TASK_LEASE_CHECK_S)  # the miner has read the claim between its BLPOPs
        lease.stop()  # the forecast is done; its result push meets the outage
        server.stop()
        await asyncio.sleep(0.5)
        server = restart(server)  # empty: claim, lease and result gone
        # The same worker, alive: its heartbeat is back at once, and it is sent the request again.
        got = await resent_and_answered(server.url, waiting, paths)
        assert got.resent_after == "its result was lost with Redis's restart"
    finally:
        await pool.close()
        server.stop()


async def test_a_redis_down_until_the_deadline_fails_there(tmp_path: Path) -> None:
    """Reconnecting is bounded by the pool's deadline, which leaves the fallback its time."""
    server = RedisServer(tmp_path).start()
    pool = lost_pool(server.url)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 3)
    try:
        announce(server.url, "infer.hf")
        waiting = asyncio.create_task(pool.forecast(request, None, time.time() + 3.0, "r1"))  # type: ignore[arg-type]
        await queued_task(redis.Redis.from_url(server.url), "infer.hf")
        server.stop()
        with pytest.raises(PoolError, match=r"pool unavailable: ConnectionError: .* \(Redis unreachable until the "
                                            r"deadline\)"):
            await asyncio.wait_for(waiting, 20)
    finally:
        await pool.close()
        server.stop()

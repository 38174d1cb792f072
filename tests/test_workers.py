"""Celery worker settings that decide where a task waits, and how long a new worker process may take to start."""

import json
import logging
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from core.constants import (
    LATE_RESULT_TTL_S,
    RESULT_KEY,
    TASK_CLAIM_KEY,
    TASK_LEASE_KEY,
    TASK_LEASE_MS,
    TASK_LEASE_RENEW_S,
    WORKER_HEARTBEAT_KEY,
)
from core.prompts import ForecastRequest
from core.settings import Settings
from core.transport import TransportError, decode_result
from synth_miner.devstack import Proc, RedisServer, spawn
from tests.worker_apps import SLEEP_LOG_KEY
from workers import metrics
from workers.app import create_app


def test_a_new_worker_process_has_a_minute_to_load_its_models() -> None:
    # Celery's 4 s default killed a child still loading torch and the models on busy CPUs, three times in a
    # row (the load cannot be made to take that long on demand here, so the setting itself is checked).
    conf = create_app(Settings()).conf
    assert conf.worker_proc_alive_timeout == Settings().worker_proc_alive_timeout_s >= 60


def test_a_busy_worker_holds_no_task_an_idle_worker_could_run(redis_url: str, tmp_path: Path) -> None:
    """Two single-process inference workers (as on two GPUs): while one runs a slow task, the fast tasks
    sent after it all go to the idle one. With prefetch 1 the busy one reserved one and it waited behind."""
    (tmp_path / "no-models").mkdir()
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_MODELS_DIR": str(tmp_path / "no-models"), "SYNTH_LOG_LEVEL": "INFO",
           "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "SYNTH_DATA_DIR": str(tmp_path / "data")}
    workers: list[Proc] = []
    for name in ("a", "b"):
        workers.append(spawn([sys.executable, "-m", "celery", "-A", "tests.worker_apps", "worker", "-Q", "infer.hf",
                              "-c", "1", "-P", "prefork", "-n", f"{name}@%h", "--without-gossip", "--without-mingle",
                              "-l", "INFO"], env, tmp_path / f"worker-{name}.log"))
    client = redis.Redis.from_url(redis_url)
    sender = create_app(Settings(redis_url=redis_url))
    try:
        deadline = time.monotonic() + 90
        while not all("worker runtime loaded" in w.text() for w in workers):  # an inference worker loads at start
            assert time.monotonic() < deadline and all(w.proc.poll() is None for w in workers), \
                "\n".join(w.text()[-3000:] for w in workers)
            time.sleep(0.2)
        for round_ in range(2):
            sender.send_task("test.sleep", args=[3.0, f"slow{round_}", time.time()], queue="infer.hf")
            for i in range(3):
                time.sleep(0.2)
                sender.send_task("test.sleep", args=[0.05, f"fast{round_}.{i}", time.time()], queue="infer.hf")
            deadline = time.monotonic() + 60  # the round's four tasks done (the slow one last, 3 s)
            while client.llen(SLEEP_LOG_KEY) < 4 * (round_ + 1):
                assert time.monotonic() < deadline and all(w.proc.poll() is None for w in workers), \
                    "\n".join(w.text()[-3000:] for w in workers)
                time.sleep(0.1)
    finally:
        for worker in workers:
            worker.stop()
    runs = [json.loads(r) for r in client.lrange(SLEEP_LOG_KEY, 0, -1)]
    assert len(runs) == 8, runs
    pid = {r["tag"]: r["pid"] for r in runs}
    # A busy process that had reserved a fast task would run it after its slow one, in its own process.
    for round_ in range(2):
        fast = {tag: p for tag, p in pid.items() if tag.startswith(f"fast{round_}.")}
        assert len(fast) == 3 and pid[f"slow{round_}"] not in fast.values(), (round_, pid, runs)


def test_an_idle_process_keeps_announcing_itself(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heartbeat outlives its TTL while the process is idle: a thread re-sends the latest announcement."""
    monkeypatch.setattr(metrics, "HEARTBEAT_EVERY_S", 0.05)
    client = redis.Redis.from_url(redis_url)
    beat = metrics.Heartbeat()
    beat.announce(client, "patchtst", "v1", "infer.hf", models={"hf": "models/hf.pt"})
    key = WORKER_HEARTBEAT_KEY.format(name=f"{socket.gethostname()}:{os.getpid()}")
    first = json.loads(client.get(key))  # type: ignore[arg-type]
    assert first["engine"] == "patchtst" and first["queues"] == "infer.hf" and first["models"] == {"hf": "models/hf.pt"}
    client.delete(key)  # as if the TTL had run out while no task came
    deadline = time.monotonic() + 5
    while client.get(key) is None:
        assert time.monotonic() < deadline, "the idle process never re-announced itself"
        time.sleep(0.02)
    again = json.loads(client.get(key))  # type: ignore[arg-type]
    assert again["at"] > first["at"] and again["artifact_version"] == "v1"
    assert 0 < client.ttl(key) <= metrics.HEARTBEAT_TTL_S
    beat.announce(client, "patchtst", "v2", "infer.hf")  # a reload: the thread sends the new version
    time.sleep(0.2)
    assert json.loads(client.get(key))["artifact_version"] == "v2"  # type: ignore[arg-type]
    beat.stop()


def announced(beat: metrics.Heartbeat, url: str) -> tuple[redis.Redis, str]:
    """``beat`` announcing an inference worker to the Redis at ``url``: a client of it, and the heartbeat's key."""
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    beat.announce(client, "patchtst", "v1", "infer.hf")
    key = WORKER_HEARTBEAT_KEY.format(name=f"{beat.node}:{os.getpid()}")
    assert client.get(key) is not None
    return client, key


def test_a_worker_announces_itself_again_as_soon_as_redis_is_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """After a failed beat the next one waited a whole interval: a live, idle worker was missing from Redis
    for up to 10 s after it came back (restarted empty here), so the miner fell back as if no worker were
    there (``no_worker``) and `status` called it stopped or stuck."""
    monkeypatch.setattr(metrics, "HEARTBEAT_EVERY_S", 2.0)
    monkeypatch.setattr(metrics, "HEARTBEAT_RETRY_S", 0.1)
    server = RedisServer(tmp_path).start()
    beat = metrics.Heartbeat()
    try:
        client, key = announced(beat, server.url)
        server.stop()
        deadline = time.monotonic() + 5
        while "heartbeat failed" not in caplog.text:  # the idle thread's beat met the outage
            assert time.monotonic() < deadline, "no beat was tried while Redis was down"
            time.sleep(0.02)
        time.sleep(0.5)  # several retries meet the outage: one warning, not one a retry
        server.start()  # the same port, empty: the key is gone
        back = time.monotonic()
        while client.get(key) is None:
            assert time.monotonic() - back < 1.0, "the worker stayed unannounced after Redis came back"
            time.sleep(0.02)
        failed = [r for r in caplog.records if r.levelno >= logging.WARNING and "heartbeat failed" in r.message]
        assert len(failed) == 1, [r.message for r in failed]
        deadline = time.monotonic() + 2
        while "heartbeat back after" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
    finally:
        beat.stop()
        server.stop()


def test_a_worker_started_while_redis_is_down_announces_itself_as_soon_as_redis_is_up(tmp_path: Path) -> None:
    """A real worker (prefork, as deployed) started before its Redis: its first announcement fails, and the next
    one came a whole interval (10 s) later, the retry after a failure being the idle thread's alone; the worker,
    connected and ready, looked dead to the miner and to `status` all that time."""
    server = RedisServer(tmp_path)  # its port chosen, not started yet
    env = {"SYNTH_REDIS_URL": server.url, "SYNTH_LOG_LEVEL": "INFO", "SYNTH_DATA_DIR": str(tmp_path / "data"),
           "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts")}
    worker = spawn([sys.executable, "-m", "celery", "-A", "tests.worker_apps", "worker", "-Q", "cpu", "-c", "1",
                    "-P", "prefork", "-n", "early@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
                   env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 60
        while "heartbeat failed" not in worker.text():
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.text()[-3000:]
            time.sleep(0.05)
        server.start()
        up = time.monotonic()
        client = redis.Redis.from_url(server.url)
        while not list(client.scan_iter(WORKER_HEARTBEAT_KEY.format(name="early@*"))):
            assert time.monotonic() - up < 2.5, f"no heartbeat {time.monotonic() - up:.1f} s after Redis came up:\n" \
                                                f"{worker.text()[-3000:]}"
            time.sleep(0.05)
        assert worker.proc.poll() is None
        client.close()
    finally:
        worker.stop()
        server.stop()


def test_a_beat_redis_lost_between_two_beats_is_sent_again_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarted empty (or flushed) between two beats, none failing: the idle worker stayed missing until its
    next beat, 10 s on, and the miner answered every request meanwhile from the fallback (``no_worker``; 42 in one
    chaos soak's empty-restart phase). The beat interval here is far longer than the test may wait."""
    monkeypatch.setattr(metrics, "HEARTBEAT_EVERY_S", 60.0)
    monkeypatch.setattr(metrics, "HEARTBEAT_RETRY_S", 0.1)
    server = RedisServer(tmp_path).start()
    beat = metrics.Heartbeat()
    try:
        client, key = announced(beat, server.url)
        client.flushall()
        deadline = time.monotonic() + 20  # a third of the beat interval: only the check can bring it back
        while client.get(key) is None:
            assert time.monotonic() < deadline, "the lost heartbeat waited for the next beat"
            time.sleep(0.02)
        assert json.loads(client.get(key))["queues"] == "infer.hf"
    finally:
        beat.stop()
        server.stop()


def test_a_process_shutting_down_removes_its_heartbeat(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped worker's key would look alive for over a minute: the miner would keep sending it forecasts
    that nobody computes, waiting out each one before the fallback answers."""
    monkeypatch.setattr(metrics, "HEARTBEAT_EVERY_S", 0.05)
    client = redis.Redis.from_url(redis_url)
    beat = metrics.Heartbeat()
    beat.node = "retiring@host"
    beat.announce(client, "patchtst", "v1", "infer.lf")
    key = WORKER_HEARTBEAT_KEY.format(name=f"retiring@host:{os.getpid()}")
    assert client.get(key) is not None
    beat.retire()
    assert client.get(key) is None
    beat.send()  # a late re-send (the idle thread, a task finishing) does not bring it back
    time.sleep(0.2)
    assert client.get(key) is None
    beat.retire()  # twice (both shutdown signals of a solo worker): harmless


@pytest.mark.parametrize("signals", [("SIGQUIT",), ("SIGINT", "SIGINT")])
def test_a_solo_worker_stopped_cold_removes_its_heartbeat(redis_url: str, tmp_path: Path,
                                                           signals: tuple[str, ...]) -> None:
    """A cold shutdown (SIGQUIT, a second Ctrl-C) sends no ``worker_shutdown``: a real solo worker exited and left
    its heartbeat, fresh, so the miner sent its queue forecasts nobody would compute for 25 s more and `status`
    listed it alive (a warm stop and a prefork worker's children already removed theirs)."""
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_LOG_LEVEL": "INFO", "SYNTH_DATA_DIR": str(tmp_path / "data"),
           "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts")}
    worker = spawn([sys.executable, "-m", "celery", "-A", "tests.worker_apps", "worker", "-Q", "cpu", "-P", "solo",
                    "-n", "cold@%h", "--without-gossip", "--without-mingle", "-l", "INFO"], env, tmp_path / "worker.log")
    client = redis.Redis.from_url(redis_url)
    pattern = WORKER_HEARTBEAT_KEY.format(name=f"cold@*:{worker.proc.pid}")
    try:
        deadline = time.monotonic() + 60
        while " ready." not in worker.text() or not list(client.scan_iter(pattern)):
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.text()[-3000:]
            time.sleep(0.05)
        for name in signals:
            os.kill(worker.proc.pid, getattr(signal, name))
            time.sleep(0.3)
        assert worker.proc.wait(30) == 0
        assert "Cold shutdown" in worker.text() or "cold shutdown" in worker.text(), worker.text()[-3000:]
        assert not list(client.scan_iter(pattern)), "the stopped worker's heartbeat is still there"
    finally:
        worker.stop()
        client.close()


def test_a_fork_of_an_announced_process_leaves_its_heartbeat_alone(redis_url: str) -> None:
    """The heartbeat is also retired at interpreter exit: a process forked from an announced one (a pool of its
    own) inherits that hook, and its exit must not remove the announcement of the process that is still serving."""
    client = redis.Redis.from_url(redis_url)
    beat = metrics.Heartbeat()
    beat.node = "parent@host"
    beat.announce(client, "patchtst", "v1", "infer.hf")
    key = WORKER_HEARTBEAT_KEY.format(name=f"parent@host:{os.getpid()}")
    try:
        pid = os.fork()
        if pid == 0:  # the fork: what its exit hook would do, then out without the test runner's own exit
            beat.retire()
            os._exit(0)
        assert os.waitpid(pid, 0)[1] == 0
        assert client.get(key) is not None
    finally:
        beat.retire()
    assert client.get(key) is None


def test_a_second_process_on_the_metrics_port_serves_on_without_them(caplog: pytest.LogCaptureFixture) -> None:
    """Prefork children each start the endpoint: the second bind failed, and with it the process's set-up."""
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        with caplog.at_level("WARNING"):
            metrics.serve_metrics(taken.getsockname()[1])
    assert "worker metrics not served" in caplog.text


def test_the_model_info_metric_follows_a_reload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``synth_worker_model_info`` names the artifact version served: after a worker reloads a newly published
    one, the series names the new version (and only it), not the version the process started with."""
    from tests.test_worker_reload import publish_scale
    from workers import tasks
    from workers.runtime import WorkerRuntime

    class NoRedis:
        def set(self, *_: object, **__: object) -> None:
            pass

        def delete(self, *_: object) -> None:  # the heartbeat is retired at interpreter exit too
            pass

    def served() -> list[dict[str, str]]:
        return [s.labels for m in metrics.REGISTRY.collect() if m.name == "synth_worker_model_info" for s in m.samples
                if s.value == 1]

    artifacts = tmp_path / "artifacts"
    first = publish_scale(artifacts, 1.0)
    runtime = WorkerRuntime.load(Settings(redis_url="redis://127.0.0.1:1/0", artifacts_dir=artifacts,
                                          engine="ewma_t"))
    runtime.redis = NoRedis()  # type: ignore[assignment]
    monkeypatch.setattr(tasks, "get_runtime", lambda: runtime)
    monkeypatch.setattr(tasks, "consumes_inference", lambda: True)
    tasks._load_runtime()  # worker_process_init
    assert served() == [{"version": first, "engine": "ewma_t"}]
    second = publish_scale(artifacts, 2.0)
    tasks.announce(runtime)  # after a task: the forecaster reloaded the new version
    assert runtime.artifact_version == second
    assert served() == [{"version": second, "engine": "ewma_t"}]


def test_without_a_redis_url_broker_jobs_beat_and_heartbeats_meet_on_one_redis(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``celery -A workers.app worker`` started by hand without SYNTH_REDIS_URL: the broker falls back to this
    host's Redis, and so must the jobs' claims, the beat lock and the cache refresh (not an empty URL that
    fails only once a job runs). Nothing here connects: the clients are only built."""
    from celery.beat import PersistentScheduler

    from core.settings import get_settings
    from workers import jobs
    from workers.beat import LeaderScheduler

    monkeypatch.delenv("SYNTH_REDIS_URL", raising=False)
    get_settings.cache_clear()
    settings = Settings(data_dir=tmp_path)
    app = create_app(settings)

    def where(client: redis.Redis) -> tuple[object, object, object]:
        kw = client.connection_pool.connection_kwargs
        return kw["host"], kw["port"], kw["db"]

    try:
        scheduler = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "beat.db"))
        beat_redis = where(scheduler.redis)
        PersistentScheduler.close(scheduler)  # the schedule file only: no lock to release in Redis
    finally:
        get_settings.cache_clear()
    assert app.conf.broker_url == settings.pool_redis_url == "redis://127.0.0.1:6379/0"
    assert where(jobs._redis(settings)) == beat_redis == ("127.0.0.1", 6379, 0)
    refreshed: list[str | None] = []  # the refresh job fills that same Redis (it used to refuse: no URL)
    monkeypatch.setattr("core.refresh.refresh_assets_sync", lambda assets, s: refreshed.append(s.redis_url) or [])
    assert jobs.refresh_work(settings) == {"assets": 0, "failed": {}}
    assert refreshed == ["redis://127.0.0.1:6379/0"]


def test_a_worker_snapshot_follows_a_cache_refreshed_within_the_minute(redis_url: str) -> None:
    """The miner refreshes the cache (new anchor, newly closed bar) right before it sends a request; a worker that
    served the snapshot memoised earlier in the same minute forecast from the older anchor and history."""
    from core.cache_redis import RedisHistoryCache
    from core.prices import LatestPrice, PriceHistory
    from workers.runtime import WorkerRuntime

    client = redis.Redis.from_url(redis_url)
    cache = RedisHistoryCache(client)
    minute = int(time.time()) // 60 * 60
    ts = np.arange(minute - 86_400, minute, 60, dtype=np.int64)
    history = PriceHistory(60, ts, 60_000.0 + np.arange(len(ts), dtype=np.float64))
    cache.write("BTC", history.between(minute - 86_400, minute - 60))  # the newest bar is not cached yet
    cache.set_latest("BTC", LatestPrice(50_000.0, minute - 30))
    runtime = WorkerRuntime(Settings(redis_url=redis_url), client, cache, None)  # type: ignore[arg-type]
    first = runtime.snapshot("BTC", minute + 5, 86_400)
    assert first.anchor == 50_000.0
    cache.write("BTC", history.between(minute - 60, minute))  # the miner's refresh, 20 s into the minute
    cache.set_latest("BTC", LatestPrice(51_000.0, minute + 20))
    second = runtime.snapshot("BTC", minute + 30, 86_400)
    assert (second.anchor, second.anchor_time) == (51_000.0, minute + 20)
    assert second.m1 is not None and first.m1 is not None and len(second.m1) == len(first.m1) + 1
    assert runtime.snapshot("BTC", minute + 40, 86_400) is second  # unchanged cache: the memo is still used


def test_a_result_finished_after_the_deadline_does_not_stay_in_redis_for_minutes(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody reads a result pushed after the miner stopped waiting: it was kept ``result_ttl_s`` (120 s), 1.16 MB
    for a 24 h forecast, so a backlogged worker filled Redis with throughput x 120 s of orphans."""
    from core.forecast import ForecastResult
    from workers import tasks
    from workers.runtime import WorkerRuntime

    class Late:
        def current(self) -> "Late":
            return self

        def run(self, request: ForecastRequest, snapshot: object) -> ForecastResult:
            time.sleep(1.0)  # past the deadline below
            return ForecastResult(np.ones((request.num_simulations, request.n_points), np.float32), "test", None, 1.0)

    client = redis.Redis.from_url(redis_url)
    runtime = WorkerRuntime(Settings(redis_url=redis_url), client, None, Late())  # type: ignore[arg-type]
    monkeypatch.setattr(runtime, "snapshot", lambda *_: None)
    monkeypatch.setattr(tasks, "get_runtime", lambda: runtime)
    monkeypatch.setattr(tasks, "announce", lambda _: None)
    request = ForecastRequest("BTC", int(time.time()) + 600, 300, 86_400, 1000)
    key = RESULT_KEY.format(request_id="late")
    tasks.forecast.run(request.__dict__, key, time.time() + 0.3, "late")
    assert client.llen(key) == 1
    assert 0 < client.ttl(key) <= tasks.LATE_RESULT_TTL_S < runtime.settings.result_ttl_s
    key = RESULT_KEY.format(request_id="in-time")  # one in time keeps the time left plus that grace
    tasks.forecast.run(request.__dict__, key, time.time() + 20.0, "in-time")
    assert 18 + tasks.LATE_RESULT_TTL_S <= client.ttl(key) <= 20 + tasks.LATE_RESULT_TTL_S


@pytest.mark.parametrize(("name", "change", "deadline_in_s", "refused"), [
    ("oversized", {"num_simulations": 10**9}, 20.0, "num_simulations must be in"),
    ("grid", {"time_increment": 7, "time_length": 70}, 20.0, "unsupported grid"),
    ("asset", {"asset": "NOPE"}, 20.0, "unknown asset"),
    ("extra-field", {"seed": 1}, 20.0, "a request is a mapping of"),
    ("start", {"start_ts": "soon"}, 20.0, "start_ts must be an integer"),
    ("nan-deadline", {}, math.nan, "deadline must be a unix time"),
    ("inf-deadline", {}, math.inf, "deadline must be a unix time"),
    ("expired", {}, -1.0, "deadline passed before the task started"),  # the miner has stopped waiting
])
def test_a_malformed_or_oversized_task_fails_with_a_result_and_never_reaches_the_engine(
        redis_url: str, monkeypatch: pytest.MonkeyPatch, name: str, change: dict[str, object], deadline_in_s: float,
        refused: str) -> None:
    """The worker took the task's request as it came: 10^9 paths went to the engine (the process, and its GPU,
    lost to a MemoryError or the OOM killer), and a NaN or infinite deadline ran the forecast, then failed on
    the result's TTL, so nothing was pushed and the miner waited out its whole wait."""
    from workers import tasks
    from workers.runtime import WorkerRuntime

    class Engine:
        def current(self) -> "Engine":
            return self

        def run(self, request: ForecastRequest, snapshot: object) -> None:
            raise AssertionError(f"the engine was given {request}")

    client = redis.Redis.from_url(redis_url)
    runtime = WorkerRuntime(Settings(redis_url=redis_url), client, None, Engine())  # type: ignore[arg-type]
    monkeypatch.setattr(runtime, "snapshot", lambda *_: None)
    monkeypatch.setattr(tasks, "get_runtime", lambda: runtime)
    monkeypatch.setattr(tasks, "announce", lambda _: None)
    request = {**ForecastRequest("BTC", int(time.time()) + 600, 300, 86_400, 1000).__dict__, **change}
    key = RESULT_KEY.format(request_id=name)
    deadline = time.time() + deadline_in_s if math.isfinite(deadline_in_s) else deadline_in_s
    tasks.forecast.run(request, key, deadline, name)
    blob = client.lpop(key)
    assert isinstance(blob, bytes)
    with pytest.raises(TransportError, match=refused):
        decode_result(blob)
    if not math.isfinite(deadline_in_s):  # nobody can be waiting on it past the grace
        client.rpush(key, b"x")
        tasks.forecast.run(request, key, deadline, name)
        assert 0 < client.ttl(key) <= LATE_RESULT_TTL_S


def test_expired_forecasts_a_prefork_worker_discards_are_counted_in_redis(redis_url: str, tmp_path: Path) -> None:
    """A forecast that waited in the queue past its deadline (``expires``) is discarded by the worker's parent
    process, which serves no metrics: those lost requests showed nowhere. They are counted per queue in Redis,
    where `status` and the miner's metrics read them."""
    from datetime import datetime, timezone

    from core.constants import EXPIRED_TASKS_KEY, TASK_FORECAST
    from synth_miner.status import collect

    (tmp_path / "no-models").mkdir()
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_MODELS_DIR": str(tmp_path / "no-models"), "SYNTH_LOG_LEVEL": "INFO",
           "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "SYNTH_DATA_DIR": str(tmp_path / "data")}
    worker = spawn([sys.executable, "-m", "celery", "-A", "tests.worker_apps", "worker", "-Q", "infer.hf", "-c", "1",
                    "-P", "prefork", "-n", "expiry@%h", "--without-gossip", "--without-mingle", "-l", "INFO"], env,
                   tmp_path / "worker.log")
    client = redis.Redis.from_url(redis_url)
    sender = create_app(Settings(redis_url=redis_url))
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3_600, 100).__dict__
    try:
        deadline = time.monotonic() + 90
        while "worker runtime loaded" not in worker.text():
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.text()[-3000:]
            time.sleep(0.2)
        sender.send_task("test.sleep", args=[2.0, "busy", time.time()], queue="infer.hf")  # its only process
        for i in range(3):  # as the miner sends them: expiring at the deadline it waits until
            due = time.time() + 0.5
            sender.send_task(TASK_FORECAST, kwargs={"request": request, "result_key": f"test:r{i}", "deadline": due,
                                                    "request_id": f"late{i}"},
                             queue="infer.hf", expires=datetime.fromtimestamp(due, tz=timezone.utc), task_id=f"late{i}")
        deadline = time.monotonic() + 30
        while worker.text().count("Discarding revoked task") < 3:
            assert time.monotonic() < deadline and worker.proc.poll() is None, worker.text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.3)  # the counter is written right after the discard's log line
    finally:
        worker.stop()
    assert not any(client.exists(f"test:r{i}") for i in range(3))  # never computed
    assert {k.decode(): int(v) for k, v in client.hgetall(EXPIRED_TASKS_KEY).items()} == {"infer.hf": 3}
    report = collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path / "artifacts"))
    assert report["expired"] == {"infer.hf": 3, "infer.lf": 0, "cpu": 0}, report


def test_a_forecast_holds_a_lease_while_it_runs_and_drops_it_with_its_result(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The miner tells a worker still computing from one killed mid-task by the task's lease: renewed for as long as
    the forecast (a blocking call) runs, however long, and removed with the claim as the result is pushed."""
    from core.forecast import ForecastResult
    from workers import tasks
    from workers.runtime import WorkerRuntime

    client = redis.Redis.from_url(redis_url)
    claim, lease = TASK_CLAIM_KEY.format(request_id="r1"), TASK_LEASE_KEY.format(request_id="r1")
    seen: dict[str, object] = {}

    class Slow:
        def current(self) -> "Slow":
            return self

        def run(self, request: ForecastRequest, snapshot: object) -> ForecastResult:
            seen["claim"] = client.get(claim)
            time.sleep(2 * TASK_LEASE_MS / 1000)  # two leases long: it must have been renewed meanwhile
            seen["lease"] = client.get(lease)
            return ForecastResult(np.ones((request.num_simulations, request.n_points), np.float32), "test", None, 1.0)

    runtime = WorkerRuntime(Settings(redis_url=redis_url), client, None, Slow())  # type: ignore[arg-type]
    monkeypatch.setattr(runtime, "snapshot", lambda *_: None)
    monkeypatch.setattr(tasks, "get_runtime", lambda: runtime)
    monkeypatch.setattr(tasks, "announce", lambda _: None)
    request = ForecastRequest("BTC", int(time.time()) + 600, 300, 86_400, 10)
    tasks.forecast.run(request.__dict__, RESULT_KEY.format(request_id="r1"), time.time() + 20.0, "r1")
    name = metrics.HEARTBEAT.name.encode()
    assert seen == {"claim": name, "lease": name}
    assert decode_result(client.lpop(RESULT_KEY.format(request_id="r1")) or b"").engine == "test"
    assert not client.exists(claim, lease)
    time.sleep(2 * TASK_LEASE_RENEW_S)
    assert not client.exists(claim, lease)  # no renewal brought them back


def test_a_lease_no_longer_renewed_lapses_and_leaves_the_claim(redis_url: str) -> None:
    """A worker that dies (or freezes) mid-task stops renewing: the lease lapses within TASK_LEASE_MS, on Redis's
    clock (PX, whatever the worker's clock says), while the claim outlasts the miner's wait and names the worker."""
    from workers.lease import TaskLease

    client = redis.Redis.from_url(redis_url)
    lease = TaskLease(client, "r1", "w1@host:7", claim_s=45.2).start()
    assert 0 < client.pttl(TASK_LEASE_KEY.format(request_id="r1")) <= TASK_LEASE_MS
    lease.stop()
    deadline = time.monotonic() + 3 * TASK_LEASE_MS / 1000
    while client.exists(TASK_LEASE_KEY.format(request_id="r1")):
        assert time.monotonic() < deadline, "the lease outlived its TTL"
        time.sleep(0.05)
    assert client.get(TASK_CLAIM_KEY.format(request_id="r1")) == b"w1@host:7"
    assert 40 < client.ttl(TASK_CLAIM_KEY.format(request_id="r1")) <= 46


def test_a_forecast_whose_worker_died_is_not_run_again_by_celery() -> None:
    """Acked as it starts: a worker killed mid-task loses it (the miner sends it again under a new id if it has the
    time). Acked late, Celery would re-deliver it after the visibility timeout, hours past any deadline."""
    from workers import tasks

    conf = create_app(Settings()).conf
    assert tasks.forecast.acks_late is False and conf.task_acks_late is False
    assert not conf.task_reject_on_worker_lost

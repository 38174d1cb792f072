"""Periodic-job slot claims against a real Redis: a slot runs once, and again only if its process died."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from core.constants import (
    JOB_ATTEMPTS_KEY,
    JOB_KILL_GRACE_S,
    JOB_MAX_ATTEMPTS,
    JOB_RUNS_KEY,
    JOB_SLOT_KEY,
    TASK_RETRAIN,
    WORKER_HEARTBEAT_KEY,
)
from core.settings import Settings, get_settings
from synth_miner.devstack import ROOT, RedisServer, spawn
from tests.conftest import free_port
from tests.worker_apps import RETRAIN_HANG_KEY, RETRAIN_STARTS_KEY

WEEK = 604_800.0
SLOT = 1_767_225_600
LEASE_S = 1.0


@pytest.fixture
def job_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_JOB_LEASE_S": str(LEASE_S)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


def work_done(calls: list[int]) -> Any:
    def work(_: Settings) -> dict[str, Any]:
        calls.append(os.getpid())
        return {"trained": True}

    return work


def test_a_slot_whose_process_died_runs_again_and_a_done_slot_is_a_duplicate(job_env: dict[str, str]) -> None:
    from workers.jobs import run_once

    # The first delivery claims the slot, then its process dies mid-work (os._exit stands in for the OOM killer).
    code = f"from workers import jobs; import os; jobs.run_once('retrain', {SLOT}, {WEEK}, lambda s: os._exit(137))"
    died = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **job_env})
    assert died.returncode == 137
    calls: list[int] = []
    began = time.monotonic()
    rerun = run_once("retrain", SLOT, WEEK, work_done(calls))  # the re-delivered message
    assert rerun["status"] == "ok" and calls, rerun
    assert time.monotonic() - began < LEASE_S + 2  # it waited for the dead process's lease, no longer
    assert run_once("retrain", SLOT, WEEK, work_done(calls))["status"] == "duplicate"
    assert len(calls) == 1


def test_a_done_slot_and_its_start_count_outlast_the_period(job_env: dict[str, str], redis_url: str) -> None:
    """A duplicate can come late in its slot (a copy the broker re-delivers hours on, a beat's catch-up): the
    done claim and the start count must outlive the whole period, or that late copy runs the week's retrain
    again (and a slot whose process keeps dying gets its starts back)."""
    from workers.jobs import run_once

    calls: list[int] = []
    assert run_once("retrain", SLOT, WEEK, work_done(calls))["status"] == "ok"
    client = redis.Redis.from_url(redis_url)
    for key in (JOB_SLOT_KEY.format(name="retrain", slot=SLOT), JOB_ATTEMPTS_KEY.format(name="retrain", slot=SLOT)):
        assert client.ttl(key) > WEEK, (key, client.ttl(key))  # claimed within the slot: kept past its end
    assert run_once("retrain", SLOT, WEEK, work_done(calls))["status"] == "duplicate" and len(calls) == 1


def test_a_slot_running_in_a_live_process_is_a_duplicate(job_env: dict[str, str]) -> None:
    from workers.jobs import run_once

    release, calls = threading.Event(), []

    def long_work(_: Settings) -> dict[str, Any]:
        calls.append(1)
        release.wait(30)
        return {}

    first: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: first.update(run_once("calibrate", SLOT, 3600.0, long_work)))
    runner.start()
    try:
        while not calls:
            time.sleep(0.01)
        # Longer than one lease: the running job keeps renewing its claim, so this one gives up.
        assert run_once("calibrate", SLOT, 3600.0, work_done([]))["status"] == "duplicate"
    finally:
        release.set()
        runner.join()
    assert first["status"] == "ok" and calls == [1]


def test_a_slot_whose_process_keeps_dying_is_abandoned(job_env: dict[str, str], redis_url: str) -> None:
    from workers.jobs import CLAIMED, claim_slot, run_once

    client = redis.Redis.from_url(redis_url)
    for attempt in range(JOB_MAX_ATTEMPTS):  # each start dies without renewing: its lease lapses
        assert claim_slot(client, "retrain", SLOT, WEEK, f"dead:{attempt}", 0.1) == CLAIMED
        time.sleep(0.15)
    calls: list[int] = []
    assert run_once("retrain", SLOT, WEEK, work_done(calls))["status"] == "abandoned" and not calls
    runs = [json.loads(r) for r in client.lrange(JOB_RUNS_KEY, 0, -1)]
    assert [r["status"] for r in runs] == ["abandoned"]


def test_a_retrain_sigkilled_in_a_real_worker_is_redelivered_and_run(redis_url: str, tmp_path: Path) -> None:
    """The production app and retrain task in a prefork worker: its process is SIGKILLed mid-run; the
    task comes back (reject_on_worker_lost) to a fresh process, which runs the slot once the lease lapses."""
    from workers.app import create_app

    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_JOB_LEASE_S": "2", "SYNTH_DATA_DIR": str(tmp_path / "data"),
           "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "SYNTH_LOG_LEVEL": "INFO"}
    worker = spawn([sys.executable, "-m", "celery", "-A", "tests.worker_apps", "worker", "-Q", "cpu", "-c", "1",
                    "-P", "prefork", "-n", "jobs@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
                   env, tmp_path / "worker.log")
    client = redis.Redis.from_url(redis_url)
    sender = create_app(Settings(redis_url=redis_url))

    def wait_for(what: str, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline or worker.proc.poll() is not None:
                raise AssertionError(f"{what} did not happen:\n{worker.text()[-4000:]}")
            time.sleep(0.1)

    def retrain() -> None:
        sender.send_task(TASK_RETRAIN, kwargs={"job": "retrain", "period_s": WEEK, "slot": SLOT}, queue="cpu")

    try:
        wait_for("worker ready", lambda: " ready." in worker.text(), 60)
        beats = [json.loads(client.get(k)) for k in client.scan_iter(WORKER_HEARTBEAT_KEY.format(name="*"))]  # type: ignore[arg-type]
        assert [(b["engine"], b["queues"], b["models"]) for b in beats] == [("jobs", "cpu", {})], beats
        assert beats[0]["name"].startswith("jobs@"), beats  # the node name Flower shows, then the pid
        retrain()
        wait_for("first start", lambda: client.llen(RETRAIN_STARTS_KEY) == 1, 30)
        os.kill(int(client.lindex(RETRAIN_STARTS_KEY, 0)), signal.SIGKILL)  # type: ignore[arg-type]
        wait_for("the re-delivered retrain", lambda: client.llen(JOB_RUNS_KEY) == 1, 60)
        record = json.loads(client.lindex(JOB_RUNS_KEY, 0))  # type: ignore[arg-type]
        assert record["status"] == "ok" and record["result"] == {"starts": 2}, record
        retrain()  # the slot is done now: a duplicate
        wait_for("the duplicate skipped", lambda: "skipping duplicate" in worker.text(), 30)
        assert client.llen(RETRAIN_STARTS_KEY) == 2 and client.llen(JOB_RUNS_KEY) == 1
        assert "worker runtime loaded" not in worker.text()  # a cpu-only worker never loads the models

        # A run past its time limit: the soft limit stops the work, and the run is recorded with the slot
        # done, where the hard limit's kill alone left no trace. Limits given at send time, as short as a
        # test allows; the production ones are the tasks' own (test_periodic_tasks_stop_softly_first).
        client.set(RETRAIN_HANG_KEY, 1)
        sender.send_task(TASK_RETRAIN, kwargs={"job": "retrain", "period_s": WEEK, "slot": SLOT + int(WEEK)},
                         queue="cpu", soft_time_limit=2, time_limit=20)
        wait_for("the overrunning retrain's record", lambda: client.llen(JOB_RUNS_KEY) == 2, 30)
        overrun = json.loads(client.lindex(JOB_RUNS_KEY, 0))  # type: ignore[arg-type]
        assert overrun["status"] == "error" and "SoftTimeLimitExceeded" in overrun["error"], overrun
        claim = client.get(JOB_SLOT_KEY.format(name="retrain", slot=SLOT + int(WEEK)))
        assert claim is not None and bytes(claim).startswith(b"done:"), claim  # type: ignore[arg-type]
    finally:
        worker.stop()


def test_periodic_tasks_stop_softly_first() -> None:
    """Each periodic job has a soft limit before its hard one, with room left to record the run."""
    import workers.jobs as job_tasks

    for task in (job_tasks.refresh_cache, job_tasks.calibrate, job_tasks.retrain, job_tasks.compact_store):
        assert task.soft_time_limit is not None and task.time_limit is not None, task.name
        assert 0 < task.soft_time_limit <= task.time_limit - JOB_KILL_GRACE_S, task.name


def test_a_run_whose_lease_lapsed_leaves_the_claim_of_the_run_that_took_over(job_env: dict[str, str],
                                                                             redis_url: str) -> None:
    """A run that outlived its lease (renewals failed through a Redis outage) must not mark done, on its
    way out, a slot a re-delivered copy has claimed since: that copy's claim is its own."""
    from workers.jobs import CLAIMED, RUNNING, claim_slot, run_once

    client = redis.Redis.from_url(redis_url)
    key = JOB_SLOT_KEY.format(name="retrain", slot=SLOT)

    def outlived(_: Settings) -> dict[str, Any]:
        client.delete(key)  # the lease lapsed...
        assert claim_slot(client, "retrain", SLOT, WEEK, "other:1", 600) == CLAIMED  # ...and a copy took over
        return {}

    record = run_once("retrain", SLOT, WEEK, outlived)
    assert client.get(key) == (RUNNING + "other:1").encode()  # still the copy's running claim
    assert record["status"] == "ok" and record["lease_lost_to"] == RUNNING + "other:1", record
    # A run that still owns its claim (or whose lapsed lease nobody took) marks its slot done.
    assert run_once("retrain", SLOT + 1, WEEK, work_done([]))["status"] == "ok"
    done = client.get(JOB_SLOT_KEY.format(name="retrain", slot=SLOT + 1))
    assert isinstance(done, bytes) and done.startswith(b"done:"), done


def test_a_live_run_whose_lease_lapsed_untaken_takes_it_back(job_env: dict[str, str], redis_url: str) -> None:
    """Redis away longer than the lease (its keys kept): the claim expired while the run went on. Left so, the
    beat leader would take the run for dead and send its slot again, a twin of a running retrain."""
    from workers.jobs import RUNNING, run_once

    client = redis.Redis.from_url(redis_url)
    key = JOB_SLOT_KEY.format(name="retrain", slot=SLOT + 7)
    seen: list[bytes | None] = []

    def lapses(_: Settings) -> dict[str, Any]:
        owner = client.get(key)
        client.delete(key)  # the lease lapsed, and nobody took the slot
        time.sleep(LEASE_S)  # a renewal comes every third of a lease
        seen.append(client.get(key))  # type: ignore[arg-type]
        return {"owner": owner}

    record = run_once("retrain", SLOT + 7, WEEK, lapses)
    assert record["status"] == "ok" and "lease_lost_to" not in record, record
    assert seen[0] is not None and seen[0].startswith(RUNNING.encode()), seen
    assert seen[0] == record["result"]["owner"]  # the same run's claim, back


def test_jobs_that_wait_an_hour_or_more_come_back_when_their_process_dies() -> None:
    """The calibration and the compaction were acknowledged when an OOM kill took their process, so that
    hour's calibration (that day's compaction) was lost; the retrain's re-delivery is run for real above.
    The minute's refresh is left to the next minute."""
    from core.constants import TASK_CALIBRATE, TASK_COMPACT_STORE, TASK_REFRESH_CACHE
    from workers.jobs import app

    for name in (TASK_CALIBRATE, TASK_RETRAIN, TASK_COMPACT_STORE):
        task = app.tasks[name]
        assert task.acks_late and task.reject_on_worker_lost, name
    assert not app.tasks[TASK_REFRESH_CACHE].reject_on_worker_lost


# --- A Redis blip (a restart, a stall) at a job's claim or at its record -------------------------------------

BLIP_S = 1.5  # Redis is away this long: no longer than a refresh's bound (it waits seconds, the others minutes)
FAST_BACKOFF_S = (0.1, 0.4)  # tests try again every few tenths of a second, not every few seconds


@pytest.fixture
def own_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RedisServer]:
    """A private redis-server these tests stop and start again (the session's server stays up for the others).
    Started from the test's thread: its processes die with the thread that started them (PR_SET_PDEATHSIG)."""
    from workers import jobs

    server = RedisServer(tmp_path).start()
    monkeypatch.setenv("SYNTH_REDIS_URL", server.url)
    monkeypatch.setenv("SYNTH_JOB_LEASE_S", "30")  # the claim outlives a blip: a restart hands it back as it was
    monkeypatch.setattr(jobs, "JOB_REDIS_BACKOFF_S", FAST_BACKOFF_S)
    get_settings.cache_clear()
    yield server
    get_settings.cache_clear()
    server.stop()


def shut_down(server: RedisServer) -> None:
    """Stop the server as a restart does, its data saved (SHUTDOWN SAVE): it holds the same keys when back."""
    redis.Redis.from_url(server.url).shutdown(save=True)
    assert server.proc is not None
    server.proc.wait(10)


def runs(client: "redis.Redis") -> list[dict[str, Any]]:
    return [json.loads(r) for r in client.lrange(JOB_RUNS_KEY, 0, -1)]


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "workers.jobs" and r.levelno >= logging.ERROR]


def test_a_claim_made_while_redis_restarts_waits_for_it_and_the_job_runs_once(
        own_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """The slot is claimed while Redis is away (a restart): the claim is tried again until it is back, within
    the job's bound, and the run goes on as usual. A refresh's bound is seconds: it runs every minute."""
    from workers import jobs

    calls: list[int] = []
    shut_down(own_redis)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(jobs.run_once, "refresh-cache", SLOT, 60.0, work_done(calls))
        time.sleep(BLIP_S)
        own_redis.start()
        record = running.result(30)
    assert record["status"] == "ok" and calls, record
    assert any("Redis unreachable" in r.getMessage() for r in caplog.records)  # it did meet the outage
    client = redis.Redis.from_url(own_redis.url)
    assert [r["status"] for r in runs(client)] == ["ok"]
    assert jobs.run_once("refresh-cache", SLOT, 60.0, work_done(calls))["status"] == "duplicate"
    assert len(calls) == 1
    assert jobs.redis_retry_s(60.0) <= 15.0 and jobs.redis_retry_s(WEEK) <= 300.0  # a refresh waits seconds


def test_a_claim_while_redis_stays_down_fails_and_says_the_run_is_lost(
        own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from workers import jobs

    monkeypatch.setattr(jobs, "JOB_REDIS_RETRY_MAX_S", 1.0)
    own_redis.stop()
    calls: list[int] = []
    began = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        jobs.run_once("retrain", SLOT, WEEK, work_done(calls))
    assert time.monotonic() - began >= 1.0  # it kept trying for its bound first
    assert not calls
    lost = errors(caplog)
    assert len(lost) == 1 and f"retrain slot {SLOT}" in lost[0] and "lost" in lost[0], lost


def test_a_claim_while_the_primary_is_demoted_waits_for_it_and_the_job_runs(own_redis: RedisServer) -> None:
    """A failover demotes the primary the URL names: every write is refused READONLY until it is promoted
    again (or the address moves). That error was not retried, and the slot's run was dropped."""
    from workers import jobs

    client = redis.Redis.from_url(own_redis.url)
    client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # a replica of nothing: read-only
    with pytest.raises(redis.exceptions.ReadOnlyError):
        client.set("probe", 1)
    promote = threading.Timer(BLIP_S, lambda: client.execute_command("REPLICAOF", "NO", "ONE"))
    promote.start()
    try:
        calls: list[int] = []
        record = jobs.run_once("calibrate", SLOT, 3600.0, work_done(calls))
    finally:
        promote.join()
    assert record["status"] == "ok" and calls, record
    assert [r["status"] for r in runs(client)] == ["ok"]


def test_a_record_made_while_redis_restarts_still_lands(own_redis: RedisServer) -> None:
    """Redis restarts as the work ends (hours of retraining): the slot is still marked done and the run recorded."""
    from workers import jobs

    down = threading.Event()

    def work(_: Settings) -> dict[str, Any]:
        shut_down(own_redis)
        down.set()
        return {"trained": True}

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(jobs.run_once, "retrain", SLOT, WEEK, work)
        assert down.wait(30)
        time.sleep(BLIP_S)
        own_redis.start()
        record = running.result(30)
    assert record["status"] == "ok" and "lease_lost_to" not in record, record
    client = redis.Redis.from_url(own_redis.url)
    assert [(r["status"], r["result"]) for r in runs(client)] == [("ok", {"trained": True})]
    done = client.get(JOB_SLOT_KEY.format(name="retrain", slot=SLOT))
    assert isinstance(done, bytes) and done.startswith(b"done:"), done


def test_a_record_while_redis_stays_down_fails_and_logs_the_record(
        own_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from workers import jobs

    monkeypatch.setattr(jobs, "JOB_REDIS_RETRY_MAX_S", 1.0)

    def work(_: Settings) -> dict[str, Any]:
        own_redis.stop()
        return {"trained": True}

    began = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        jobs.run_once("retrain", SLOT, WEEK, work)
    assert time.monotonic() - began >= 1.0
    lost = errors(caplog)
    # What the record would have held is in the log: the run's outcome is not lost with it.
    assert len(lost) == 1 and f"retrain slot {SLOT}" in lost[0] and '"trained": true' in lost[0], lost


def test_a_finish_whose_reply_was_lost_still_marks_the_slot_done_for_this_run(own_redis: RedisServer) -> None:
    """A stalled Redis (SIGSTOP stands in for a hung host) runs, once it resumes, the finish the client timed
    out on: the finish tried again finds the slot done by this very run, not taken by another."""
    from workers import jobs

    timeout = jobs._redis(get_settings()).connection_pool.connection_kwargs["socket_timeout"]
    stalled = threading.Event()

    def work(_: Settings) -> dict[str, Any]:
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        stalled.set()
        return {"trained": True}

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(jobs.run_once, "retrain", SLOT, WEEK, work)
        try:
            assert stalled.wait(30)
            time.sleep(timeout + 0.5)  # the finish times out, and is kept in the stalled server
        finally:
            assert own_redis.proc is not None
            own_redis.proc.send_signal(signal.SIGCONT)
        record = running.result(30)
    assert record["status"] == "ok" and "lease_lost_to" not in record, record
    client = redis.Redis.from_url(own_redis.url)
    assert [r["status"] for r in runs(client)] == ["ok"]
    done = client.get(JOB_SLOT_KEY.format(name="retrain", slot=SLOT))
    assert isinstance(done, bytes) and done.startswith(b"done:"), done


def test_a_call_tried_again_after_its_first_try_landed_is_not_done_twice(redis_url: str) -> None:
    """A reply lost to a blip does not mean the call was lost: the claim, the finish and the record tried
    again find their own first try, and take nothing from another run."""
    from workers import jobs

    client = redis.Redis.from_url(redis_url)
    for _ in range(2):
        assert jobs.claim_slot(client, "retrain", SLOT, WEEK, "me:1", 600) == jobs.CLAIMED
    assert client.get(JOB_ATTEMPTS_KEY.format(name="retrain", slot=SLOT)) == b"1"
    assert jobs.claim_slot(client, "retrain", SLOT, WEEK, "other:2", 600) == jobs.RUNNING + "me:1"
    for _ in range(2):
        assert jobs.finish_slot(client, "retrain", SLOT, WEEK, "me:1") == "ok"
    assert jobs.finish_slot(client, "retrain", SLOT, WEEK, "other:2") == jobs.DONE + "me:1"
    record = {"job": "retrain", "slot": SLOT, "status": "ok", "started": 1.5}
    for _ in range(2):
        jobs.record_run(client, record)
    assert runs(client) == [record]


def test_a_run_goes_on_through_a_redis_outage_and_takes_its_lapsed_lease_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Redis dies mid-run and comes back empty (no persistence): the renewals that fail are logged and the work
    goes on; the first renewal that reaches it again finds no claim and takes it back, so the beat leader does
    not take the run for dead, and the run marks its slot done."""
    from workers import jobs

    server = RedisServer(tmp_path).start()
    monkeypatch.setenv("SYNTH_REDIS_URL", server.url)
    monkeypatch.setenv("SYNTH_JOB_LEASE_S", str(LEASE_S))
    get_settings.cache_clear()
    key = JOB_SLOT_KEY.format(name="retrain", slot=SLOT)
    held: list[bytes | None] = []

    def through_an_outage(_: Settings) -> dict[str, Any]:
        server.stop()
        time.sleep(LEASE_S)  # renewals come every third of a lease: these fail
        server.start()
        time.sleep(LEASE_S)  # ...and these reach the empty server
        held.append(redis.Redis.from_url(server.url).get(key))  # type: ignore[arg-type]
        return {"went_on": True}

    try:
        with caplog.at_level(logging.WARNING, logger="workers.jobs"):
            record = jobs.run_once("retrain", SLOT, WEEK, through_an_outage)
        done = redis.Redis.from_url(server.url).get(key)
    finally:
        server.stop()
        get_settings.cache_clear()
    assert record["status"] == "ok" and record["result"] == {"went_on": True} and "lease_lost_to" not in record
    messages = [r.getMessage() for r in caplog.records if r.name == "workers.jobs"]
    assert any(f"retrain slot {SLOT}: lease not renewed" in m for m in messages), messages
    assert any("had lapsed; taken back" in m for m in messages), messages
    assert held[0] is not None and held[0].startswith(jobs.RUNNING.encode())  # its own claim, back while it ran
    assert isinstance(done, bytes) and done.startswith(b"done:"), done


def test_a_run_whose_slot_was_taken_over_says_so_once(job_env: dict[str, str], redis_url: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Its lease lapsed and a re-delivered copy claimed the slot: every later renewal finds the copy's claim,
    and the run says so once (an error: two copies of the job may be running), not at each renewal."""
    from workers.jobs import CLAIMED, claim_slot, run_once

    client = redis.Redis.from_url(redis_url)
    key = JOB_SLOT_KEY.format(name="retrain", slot=SLOT + 9)

    def taken_over(_: Settings) -> dict[str, Any]:
        client.delete(key)
        assert claim_slot(client, "retrain", SLOT + 9, WEEK, "other:2", 600) == CLAIMED
        time.sleep(2 * LEASE_S)  # several renewals, each finding the copy's claim
        return {}

    record = run_once("retrain", SLOT + 9, WEEK, taken_over)
    assert record["lease_lost_to"].endswith("other:2"), record
    said = [m for m in errors(caplog) if "lapsed and the slot was taken over" in m]
    assert len(said) == 1, errors(caplog)


def test_a_runs_recorded_seconds_are_real_time_whatever_the_wall_clock_does(
        job_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` shows each run's seconds: they were the wall clock's difference, so a clock stepped an hour
    forward (or back) mid-run recorded a 0.1 s job as 3600 s (or negative)."""
    import types

    from workers import jobs

    def work(_: Settings) -> dict[str, Any]:
        monkeypatch.setattr(jobs, "time", types.SimpleNamespace(time=lambda: time.time() + 3600,
                                                                monotonic=time.monotonic, sleep=time.sleep))
        time.sleep(0.1)
        return {}

    record = jobs.run_once("retrain", SLOT, WEEK, work)
    assert record["status"] == "ok" and 0.1 <= record["seconds"] < 5, record

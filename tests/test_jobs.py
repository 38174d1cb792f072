"""Periodic-job slot claims against a real Redis: a slot runs once, and again only if its process died."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from core.constants import JOB_MAX_ATTEMPTS, JOB_RUNS_KEY, JOB_SLOT_KEY, TASK_RETRAIN, WORKER_HEARTBEAT_KEY
from core.settings import Settings, get_settings
from synth_miner.devstack import ROOT, spawn
from tests.worker_apps import RETRAIN_STARTS_KEY

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
    finally:
        worker.stop()


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

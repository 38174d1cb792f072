"""Two beat processes against one real Redis: each job runs exactly once per slot."""

import base64
import json
import logging
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from celery.utils.time import maybe_make_aware

from core.constants import BEAT_LAST_RUN_KEY, BEAT_LOCK_KEY, BEAT_SCHEDULE_FILE, JOB_RUNS_KEY, TASK_RETRAIN
from core.settings import Settings, get_settings
from synth_miner.devstack import Proc, cli, spawn, start_worker
from tests.conftest import RedisServer

if TYPE_CHECKING:
    from workers.beat import LeaderScheduler

SENDING = "Sending due task"  # Celery beat logs it for each task it sends
LEADER = re.compile(r"^\[([\d-]+ [\d:,]+): INFO/MainProcess\] beat \S+ is now the leader", re.M)
DUPLICATE = re.compile(r"^\[([\d-]+ [\d:,]+): INFO/MainProcess\] job refresh-cache slot (\d+) already claimed .*"
                       r": skipping duplicate", re.M)


def run_beat(beat: "LeaderScheduler", seconds: float) -> None:
    """Tick ``beat`` for ``seconds``, sleeping what each tick asks, as celery.beat.Service.start does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        interval = beat.tick()
        if interval and interval > 0:
            time.sleep(min(interval, max(0.0, end - time.monotonic())))


def test_two_beats_run_each_slot_once(redis_server: RedisServer, redis_url: str, tmp_path: Path,
                                      shared_data: Path) -> None:
    """Only the beat holding the lock sends: the jobs' slot claim would hide a second sender, so the worker
    log must show no skipped duplicates (bar a takeover's one catch-up). When the leader dies the other
    takes over."""
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_BEAT_REFRESH_S": "3", "SYNTH_BEAT_CALIBRATE_S": "100000",
           "SYNTH_BEAT_RETRAIN_S": "100000", "SYNTH_BEAT_COMPACT_S": "100000", "SYNTH_BEAT_LOCK_TTL_S": "3",
           "SYNTH_PRICE_PROVIDER": "replay", "SYNTH_REPLAY_DIR": str(shared_data),
           "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "SYNTH_CALIBRATION_ASSETS": '["BTC"]', "SYNTH_LOG_LEVEL": "INFO"}  # INFO: "skipping duplicate"
    worker = start_worker(tmp_path, env, queues="cpu", name="cpu1")
    beats = [spawn(cli("beat", "--schedule-file", str(tmp_path / f"beat{i}.db")), env, tmp_path / f"beat{i}.log")
             for i in range(2)]
    client = redis.Redis.from_url(redis_url)

    def sends(beat: Proc) -> int:
        return beat.text().count(SENDING)

    def runs() -> list[dict[str, Any]]:
        return [json.loads(r) for r in client.lrange(JOB_RUNS_KEY, 0, -1)]

    def wait_for(what: str, done: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            logs = "\n".join(f"--- {p.log.name}\n{p.text()[-2000:]}" for p in [worker, *beats])
            assert time.monotonic() < deadline, f"{what} did not happen:\n{logs}"
            assert worker.proc.poll() is None, f"the worker exited:\n{logs}"
            time.sleep(0.2)

    def holder() -> Proc | None:
        value = (client.get(BEAT_LOCK_KEY) or b"").decode()
        return next((b for b in beats if f":{b.proc.pid}:" in value), None)

    try:
        wait_for("a leader sending 3 refreshes", lambda: (leader := holder()) is not None and sends(leader) >= 3
                 and sum(r["job"] == "refresh-cache" for r in runs()) >= 3)
        leader = holder()
        assert leader is not None
        standby = next(b for b in beats if b is not leader)
        standby_before_kill = standby.text()
        # Kill the leader: the other beat takes over within the lock TTL and nothing runs twice.
        leader.stop()
        killed_at = time.time()
        wait_for("the standby taking over", lambda: holder() is standby and sends(standby) >= 3
                 and sum(r["job"] == "refresh-cache" and r["slot"] > killed_at for r in runs()) >= 2)
    finally:
        for proc in beats:
            proc.stop()
        worker.stop()
    # Before the kill only the lock holder sent anything; after it, only the new holder could.
    assert SENDING not in standby_before_kill, standby_before_kill[-3000:]
    standby_log = standby.text()
    assert standby_log.index(SENDING) > standby_log.index("is now the leader"), standby_log[-3000:]
    # The worker never had to drop a second sender's copy. The one duplicate a takeover may cause: the new
    # leader's overdue entry fires at once and can name the slot the dead leader had just run.
    skipped = DUPLICATE.findall(worker.text())
    took_over = LEADER.search(standby_log)
    assert took_over is not None and len(skipped) <= 1, (skipped, worker.text()[-3000:])
    for stamp, slot in skipped:
        assert stamp >= took_over.group(1) and int(slot) <= killed_at, (skipped, took_over.group(0), killed_at)
    assert worker.text().count("'status': 'duplicate'") == len(skipped), worker.text()[-3000:]
    per_slot = Counter((r["job"], r["slot"]) for r in runs())
    assert max(per_slot.values()) == 1, per_slot
    refresh_slots = sorted(slot for job, slot in per_slot if job == "refresh-cache")
    assert len(refresh_slots) >= 5, refresh_slots


def test_a_restarted_beat_keeps_its_last_run_times(redis_url: str, tmp_path: Path) -> None:
    """The schedule file keeps its name across restarts (a new pid, a new container hostname), so the
    weekly retrain stays due a week after it last ran, not a week after each restart. A second beat on
    the same host waits for the file instead of writing it at the same time."""
    import shelve

    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_BEAT_LOCK_TTL_S": "3"}
    client = redis.Redis.from_url(redis_url)

    def wait_leader(beat: Proc) -> float:
        deadline = time.monotonic() + 30
        while f":{beat.proc.pid}:" not in (client.get(BEAT_LOCK_KEY) or b"").decode():
            assert time.monotonic() < deadline and beat.proc.poll() is None, beat.text()[-3000:]
            time.sleep(0.1)
        return time.time()

    first = spawn(cli("beat"), env, tmp_path / "beat1.log")
    second: Proc | None = None
    try:
        wait_leader(first)
        second = spawn(cli("beat"), env, tmp_path / "beat2.log")  # same host, same data dir: same file
        deadline = time.monotonic() + 30
        while "waiting for it to stop" not in second.text():
            assert time.monotonic() < deadline and second.proc.poll() is None, second.text()[-3000:]
            time.sleep(0.1)
        first.stop()
        second_began = wait_leader(second)
    finally:
        first.stop()
        if second is not None:
            second.stop()
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert all(name.startswith(BEAT_SCHEDULE_FILE) for name in files), files
    with shelve.open(str(tmp_path / "data" / BEAT_SCHEDULE_FILE), flag="r") as store:
        retrain = store["entries"]["retrain"]
    assert retrain.last_run_at.timestamp() < second_began - 1, retrain  # the first beat's time, kept


def retrain_only_app(monkeypatch: pytest.MonkeyPatch, redis_url: str, retrain_s: float) -> tuple[Any, redis.Redis]:
    """A Celery app whose beat schedules only the retrain (every ``retrain_s``), with a 3 s leader lock."""
    from workers.app import create_app

    monkeypatch.setenv("SYNTH_REDIS_URL", redis_url)
    monkeypatch.setenv("SYNTH_BEAT_LOCK_TTL_S", "3")
    get_settings.cache_clear()
    app = create_app(Settings(redis_url=redis_url, beat_retrain_s=retrain_s, beat_refresh_s=100_000,
                              beat_calibrate_s=100_000, beat_compact_s=100_000))
    return app, redis.Redis.from_url(redis_url)


def test_a_standby_taking_over_does_not_rerun_a_job_the_leader_just_sent(redis_url: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Each beat keeps its own schedule file, so a standby's last-run times are as old as its last time as the
    leader. Taking over, it must not send at once a job the dead leader sent a moment ago (an hourly
    calibration, a weekly 4-hour retrain): that is a second run within one period, in the next slot."""
    from workers.beat import LeaderScheduler

    period = 8.0
    app, client = retrain_only_app(monkeypatch, redis_url, period)
    leader, standby = (LeaderScheduler(app=app, schedule_filename=str(tmp_path / f"beat{i}.db")) for i in range(2))
    stale = datetime.now(timezone.utc) - timedelta(seconds=10 * period)
    for scheduler in (leader, standby):  # retrain due in both (the standby's file is old); nothing else is
        scheduler.schedule["retrain"].last_run_at = stale

    def retrain_slots() -> list[int]:
        messages = [json.loads(m) for m in client.lrange(Settings().queue_cpu, 0, -1)]
        return [json.loads(base64.b64decode(m["body"]))[1]["slot"] for m in messages
                if m["headers"]["task"] == TASK_RETRAIN]

    try:
        # The leader sends 2-2.5 s into a slot; the standby takes over 0.3 s into the next one, so the job
        # is not due again for another 1.7 s at least: its ticks have that long, even on a loaded machine.
        while not 2.0 <= time.time() % period <= 2.5:
            time.sleep(0.05)
        for _ in range(5):
            leader.tick()
        assert len(retrain_slots()) == 1
        leader.close()  # ...and stops (a deploy, a crash)
        time.sleep(period - time.time() % period + 0.3)  # the standby takes over early in the next slot
        for _ in range(5):
            standby.tick()
        assert standby.leader
    finally:
        leader.close()
        standby.close()
        get_settings.cache_clear()
    assert len(retrain_slots()) == 1, f"retrain sent twice within {period} s: slots {retrain_slots()}"


def test_a_beat_with_a_fresh_schedule_file_goes_on_from_the_leaders_last_sends(redis_url: str, tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh schedule file (a new host, a Celery upgrade or a corrupt file resets it) dates every entry
    to the beat's start, a time it never sent anything at: the sends the leader recorded in Redis must win,
    or each such start puts the weekly retrain off by up to a week."""
    from workers.beat import LeaderScheduler

    period = 8.0
    app, client = retrain_only_app(monkeypatch, redis_url, period)
    client.hset(BEAT_LAST_RUN_KEY, "retrain", time.time() - period + 1)  # the old leader's send: due in 1 s
    beat = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "fresh.db"))

    def retrain_sent() -> bool:
        return any(json.loads(m)["headers"]["task"] == TASK_RETRAIN for m in client.lrange(Settings().queue_cpu, 0, -1))

    try:
        deadline = time.monotonic() + 3.0  # well before the fresh file's own date makes it due (8 s)
        while not retrain_sent() and time.monotonic() < deadline:
            beat.tick()
            time.sleep(0.1)
        assert beat.leader
    finally:
        beat.close()
        get_settings.cache_clear()
    assert retrain_sent(), "the retrain the old leader left due was put off by the fresh schedule file"


def test_a_send_that_fails_is_retried_on_the_next_tick_not_a_period_later(redis_url: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's beat advances an entry before it sends it: a broker error at that moment used to skip the
    job until its next period (a week for the retrain)."""
    from celery.beat import PersistentScheduler, SchedulingError

    from workers.beat import LeaderScheduler

    app, client = retrain_only_app(monkeypatch, redis_url, 7 * 86_400)
    beat = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "beat.db"))
    beat.schedule["retrain"].last_run_at = datetime.now(timezone.utc) - timedelta(days=7, seconds=5)  # due
    send = PersistentScheduler.apply_async
    failures: list[str] = []

    def flaky(self: PersistentScheduler, entry: Any, *args: Any, **kwargs: Any) -> Any:
        if entry.name == "retrain" and not failures:
            failures.append(entry.name)
            raise SchedulingError("Couldn't apply scheduled task retrain: broker restarting")  # as Celery wraps it
        return send(self, entry, *args, **kwargs)

    monkeypatch.setattr(PersistentScheduler, "apply_async", flaky)

    def retrain_sent() -> bool:
        return any(json.loads(m)["headers"]["task"] == TASK_RETRAIN for m in client.lrange(Settings().queue_cpu, 0, -1))

    try:
        deadline = time.monotonic() + 5.0
        while not retrain_sent() and time.monotonic() < deadline:
            beat.tick()
            time.sleep(0.1)
    finally:
        beat.close()
        get_settings.cache_clear()
    assert failures == ["retrain"], "the first send did not fail: the test proves nothing"
    assert retrain_sent(), "a failed send skipped the weekly retrain until next week"


def test_a_send_that_keeps_failing_is_retried_with_a_backoff_not_in_a_busy_loop(redis_url: str, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's beat ticks again at once after a send, and a failed send is put back due: a send that keeps
    failing (here the queue's key holds a string, so every LPUSH is refused) was retried hundreds of times a
    second, each with a logged traceback. It backs off instead, and goes out once the broker takes it again."""
    from celery.beat import PersistentScheduler

    from workers.beat import LeaderScheduler, send_retry_delay

    app, client = retrain_only_app(monkeypatch, redis_url, 7 * 86_400)
    beat = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "beat.db"))
    beat.schedule["retrain"].last_run_at = datetime.now(timezone.utc) - timedelta(days=7, seconds=5)  # due
    queue = Settings().queue_cpu
    client.set(queue, b"not a list")  # WRONGTYPE for every send, while the leader lock works
    send = PersistentScheduler.apply_async
    attempts: list[float] = []

    def counted(self: PersistentScheduler, entry: Any, *args: Any, **kwargs: Any) -> Any:
        if entry.name == "retrain":
            attempts.append(time.monotonic())
        return send(self, entry, *args, **kwargs)

    monkeypatch.setattr(PersistentScheduler, "apply_async", counted)
    due_since = beat.schedule["retrain"].last_run_at
    saved: list[datetime] = []  # the retrain's last run each time the schedule file is saved
    save = PersistentScheduler.sync

    def recorded(self: PersistentScheduler) -> None:
        saved.append(self.schedule["retrain"].last_run_at)
        save(self)

    monkeypatch.setattr(PersistentScheduler, "sync", recorded)

    try:
        run_beat(beat, 3.5)
        failed = len(attempts)
        # Celery saves the advanced entry around a send: the put-back is saved too, or a beat killed now
        # would restart believing the retrain ran, and skip it for a week.
        assert saved and saved[-1] == due_since, saved
        client.delete(queue)  # the broker takes messages again
        run_beat(beat, min(send_retry_delay(failed, 7 * 86_400), 4.0) + 1.0)  # the last failure was before this
        sent = [json.loads(m)["headers"]["task"] for m in client.lrange(queue, 0, -1)]
    finally:
        beat.close()
        get_settings.cache_clear()
    assert beat.leader
    assert 2 <= failed <= 3, f"{failed} sends in 3.5 s: no backoff"  # at 0, 1 and 3 s
    assert sent == [TASK_RETRAIN], sent  # sent once the broker recovered, once
    assert [send_retry_delay(n, 7 * 86_400) for n in (1, 2, 3, 10, 50)] == [1.0, 2.0, 4.0, 300.0, 300.0]
    assert send_retry_delay(10, 60.0) == 60.0  # never later than the job's own period


def test_a_run_whose_whole_worker_was_killed_is_sent_again_by_the_leader(redis_url: str, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """kill -9 of the whole worker (main process and child: an OOM kill of the container, a lost host) leaves
    the task unacknowledged until the broker's visibility timeout, hours away: nothing re-queues it
    (reject_on_worker_lost needs a live main process). The leader sees the slot started with no claim left,
    and sends it again; a new worker runs it, once."""
    from core.constants import JOB_ATTEMPTS_KEY, JOB_SLOT_KEY
    from tests.worker_apps import RETRAIN_STARTS_KEY
    from workers.beat import LeaderScheduler

    week = 7 * 86_400.0
    app, client = retrain_only_app(monkeypatch, redis_url, week)
    monkeypatch.setenv("SYNTH_JOB_LEASE_S", "2")  # the beat's, too: it waits a lease before calling a run dead
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_JOB_LEASE_S": "2", "SYNTH_DATA_DIR": str(tmp_path / "data"),
           "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "SYNTH_LOG_LEVEL": "INFO"}

    def worker(name: str) -> Proc:
        proc = spawn([sys.executable, "-m", "celery", "-A", "tests.worker_apps", "worker", "-Q", "cpu", "-c", "1",
                      "-P", "prefork", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-l", "INFO"],
                     env, tmp_path / f"{name}.log")
        wait_for(f"{name} ready", lambda: " ready." in proc.text(), 60, proc)
        return proc

    def wait_for(what: str, done: Callable[[], bool], timeout: float, proc: Proc | None = None) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline or (proc is not None and proc.proc.poll() is not None):
                raise AssertionError(f"{what} did not happen:\n{proc.text()[-4000:] if proc else ''}")
            time.sleep(0.1)

    slot = int(time.time() // week * week)
    beat = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "beat.db"))  # fresh file: nothing due
    first = worker("first")
    second: Proc | None = None
    try:
        app.send_task(TASK_RETRAIN, kwargs={"job": "retrain", "period_s": week, "slot": slot}, queue="cpu")
        wait_for("first start", lambda: client.llen(RETRAIN_STARTS_KEY) == 1, 30, first)  # it hangs there
        beat.tick()
        assert client.llen(Settings().queue_cpu) == 0  # a live run: nothing sent again
        first.stop(signal.SIGKILL)  # the whole process group, main process included
        wait_for("the lease to lapse", lambda: not client.exists(JOB_SLOT_KEY.format(name="retrain", slot=slot)), 10)
        second = worker("second")

        def tick_until_run() -> bool:
            beat.tick()  # sent once, however often the leader ticks before the copy is claimed
            time.sleep(0.2)
            return bool(client.llen(JOB_RUNS_KEY) == 1)

        with caplog.at_level(logging.WARNING, logger="workers.beat"):
            wait_for("the copy's run", tick_until_run, 60, second)
        assert caplog.text.count("its run is gone (its worker died): sent again") == 1, caplog.text
        record = json.loads(client.lindex(JOB_RUNS_KEY, 0))  # type: ignore[arg-type]
        assert record["status"] == "ok" and record["result"] == {"starts": 2}, record
        assert int(client.get(JOB_ATTEMPTS_KEY.format(name="retrain", slot=slot))) == 2  # type: ignore[arg-type]
        beat.tick()  # done: nothing more
        time.sleep(1.0)
        assert client.llen(RETRAIN_STARTS_KEY) == 2 and client.llen(Settings().queue_cpu) == 0
    finally:
        beat.close()
        get_settings.cache_clear()
        first.stop(signal.SIGKILL)
        if second is not None:
            second.stop()


def test_the_leader_sends_an_orphaned_run_again_only_unclaimed_for_a_lease_and_once(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A started slot with no claim is a run whose worker died, but only once a whole lease has gone by
    unclaimed: a live run whose lease lapsed while Redis was away takes it back within a third of one, and
    a copy sent before that would be its twin. A claim held (a live run) is never sent again, and a dead run
    is sent again once, however often the leader ticks before a worker claims the copy."""
    from core.constants import JOB_ATTEMPTS_KEY, JOB_SLOT_KEY
    from workers.beat import LeaderScheduler

    week = 7 * 86_400.0
    app, client = retrain_only_app(monkeypatch, redis_url, week)
    slot = int(time.time() // week * week)
    claim = JOB_SLOT_KEY.format(name="retrain", slot=slot)
    queue = Settings().queue_cpu
    beat = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "beat.db"))  # fresh file: nothing due

    def ticks(n: int) -> list[int]:
        """The retrain slots sent after ``n`` ticks of the leader."""
        for _ in range(n):
            beat.tick()
        bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in client.lrange(queue, 0, -1)]
        return [body[1]["slot"] for body in bodies]

    try:
        client.set(JOB_ATTEMPTS_KEY.format(name="retrain", slot=slot), 1)
        client.set(claim, "running:live:1", px=600_000)
        beat.lease_s = 0.0  # whatever the wait, a held claim is a live run
        assert ticks(3) == []
        client.delete(claim)  # its lease lapsed: the run died, or Redis was away and it will take it back
        beat.lease_s = 600.0
        assert ticks(3) == []  # not before a whole lease without a claim
        beat.lease_s = 0.0  # the lease has gone by: the run is gone
        assert ticks(1) == [slot]
        assert ticks(4) == [slot]  # once: the copy's own claim counts the next start
    finally:
        beat.close()
        get_settings.cache_clear()


def test_a_clock_jumping_forward_does_not_cut_short_the_lease_an_orphaned_run_is_given(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait of a whole lease before a started, unclaimed run is sent again was timed with the wall clock: a
    forward step (NTP, a VM resumed) during that wait sent a copy at once, a twin of a live run whose lease had
    only lapsed while Redis was away. The wait is real time now; the slot still follows the wall clock."""
    import types

    from core.constants import JOB_ATTEMPTS_KEY
    from workers import beat as beat_module
    from workers.beat import LeaderScheduler

    week, jump, lease = 7 * 86_400.0, 120.0, 60.0
    app, client = retrain_only_app(monkeypatch, redis_url, week)
    slot = int(time.time() // week * week)
    if int((time.time() + jump) // week * week) != slot:
        pytest.skip("the jump would cross a week's slot boundary")
    queue = Settings().queue_cpu
    beat = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "beat.db"))  # fresh file: nothing due

    def sent_slots() -> list[int]:
        bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in client.lrange(queue, 0, -1)]
        return [body[1]["slot"] for body in bodies]

    try:
        client.set(JOB_ATTEMPTS_KEY.format(name="retrain", slot=slot), 1)  # started; its claim lapsed
        beat.lease_s = lease
        beat.tick()  # the leader sees the slot unclaimed: the lease's wait starts
        ahead = types.SimpleNamespace(time=lambda: time.time() + jump, monotonic=time.monotonic,
                                      time_ns=time.time_ns)
        monkeypatch.setattr(beat_module, "time", ahead)  # the wall clock steps two minutes forward
        for _ in range(3):
            beat.tick()
        assert sent_slots() == [], "sent again after a second of real time: the clock's jump was taken as the lease"
        beat.lease_s = 0.5  # a real lease goes by: the run is gone and is sent again, in the wall clock's slot
        time.sleep(0.6)
        beat.tick()
        assert sent_slots() == [slot]
    finally:
        beat.close()
        get_settings.cache_clear()


def test_a_leader_whose_redis_goes_down_stops_scheduling_and_leads_again_once_it_is_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Its own Redis, which this test stops: while it is down every tick returns (no crash, no send, no
    leadership claimed), and once it is back the beat takes the lock again and sends what is due."""
    from workers.beat import LeaderScheduler

    server = RedisServer(tmp_path).start()
    period = 3600.0
    app, client = retrain_only_app(monkeypatch, server.url, period)
    beat = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "beat.db"))

    def make_due() -> None:
        beat.schedule["retrain"].last_run_at = datetime.now(timezone.utc) - timedelta(seconds=2 * period)

    def retrain_sends() -> int:
        return sum(json.loads(m)["headers"]["task"] == TASK_RETRAIN for m in client.lrange(Settings().queue_cpu, 0, -1))

    try:
        make_due()
        beat.tick()
        assert beat.leader and retrain_sends() == 1
        server.stop()
        make_due()
        with caplog.at_level(logging.WARNING, logger="workers.beat"):
            waits = [beat.tick() for _ in range(3)]
        assert not beat.leader and all(0 < wait <= 1.0 for wait in waits)
        assert "beat lock unavailable" in caplog.text and "not scheduling" in caplog.text
        server.start()  # the same port, empty: nothing survived the outage
        beat.tick()
        assert beat.leader and retrain_sends() == 1, "the due retrain was not sent once Redis was back"
        assert client.get(BEAT_LOCK_KEY) == beat.identity.encode()
    finally:
        beat.close()
        client.close()
        server.stop()
        get_settings.cache_clear()


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_broken_schedule_file_is_replaced_and_beat_goes_on_from_the_sends_in_redis(
        damage: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A crash or a full disk mid-write leaves the dumb-dbm data file cut short or garbled: Celery recovers some
    such files, but these raised EOFError or UnpicklingError from the scheduler's constructor, and beat exited
    at every restart until someone deleted the file. It starts on a fresh file and goes on from Redis."""
    from workers.beat import LeaderScheduler

    period = 8.0
    app, client = retrain_only_app(monkeypatch, redis_url, period)
    filename = str(tmp_path / "beat.db")
    LeaderScheduler(app=app, schedule_filename=filename).close()
    data = Path(filename + ".dat")  # dbm.dumb's; gdbm's own errors are ones Celery already recovers from
    if damage == "truncated":
        data.write_bytes(b"")
    else:
        data.write_bytes((bytes(range(256)) * (data.stat().st_size // 256 + 1))[:data.stat().st_size])
    client.hset(BEAT_LAST_RUN_KEY, "retrain", time.time() - period + 1)  # the leader's last send: due in 1 s

    def retrain_sent() -> bool:
        return any(json.loads(m)["headers"]["task"] == TASK_RETRAIN for m in client.lrange(Settings().queue_cpu, 0, -1))

    with caplog.at_level(logging.ERROR, logger="workers.beat"):
        beat = LeaderScheduler(app=app, schedule_filename=filename)
    try:
        assert f"schedule file {filename} is unreadable" in caplog.text, caplog.text
        assert set(beat.schedule) >= {"retrain", "refresh-cache", "calibrate", "compact-store"}
        deadline = time.monotonic() + 3.0  # before the fresh file's own date makes it due (8 s)
        while not retrain_sent() and time.monotonic() < deadline:
            beat.tick()
            time.sleep(0.1)
        assert beat.leader and retrain_sent(), "the retrain the leader left due was not sent"
    finally:
        beat.close()
        get_settings.cache_clear()
    import shelve

    with shelve.open(filename, flag="r") as store:  # a sound file again
        assert store["entries"]["retrain"].total_run_count == 1


def test_a_beat_whose_schedule_file_cannot_be_written_schedules_from_memory(redis_url: str, tmp_path: Path) -> None:
    """A data folder on a read-only mount (or a path that cannot be created): `synth-miner beat` died on the
    folder or the file lock with a traceback at every restart, and no job ran. It says so and leads anyway,
    with its last runs in memory and in Redis."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # mkdir and open under it fail with ENOTDIR, as a read-only mount fails with EROFS
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_BEAT_LOCK_TTL_S": "3"}
    client = redis.Redis.from_url(redis_url)
    beat = spawn(cli("beat", "--schedule-file", str(blocker / "beat.db")), env, tmp_path / "beat.log")
    try:
        deadline = time.monotonic() + 30
        while f":{beat.proc.pid}:" not in (client.get(BEAT_LOCK_KEY) or b"").decode():
            assert time.monotonic() < deadline and beat.proc.poll() is None, beat.text()[-3000:]
            time.sleep(0.1)
    finally:
        beat.stop()
    assert "cannot write beside the schedule file" in beat.text(), beat.text()[-3000:]
    assert "Traceback" not in beat.text(), beat.text()[-3000:]


def test_a_standby_taking_over_after_redis_restarted_empty_does_not_rerun_what_the_leader_sent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarted without persistence loses the lock and the leader's last sends together, and a standby
    (ticking every second, the leader up to every 10 s) usually takes the free lock first. It went on from its
    own file, as old as its last time as the leader, and sent at once the retrain the leader had just sent (the
    slot claims were lost too: it ran twice). A standby follows the leader's sends while it waits."""
    from workers.beat import LeaderScheduler

    server = RedisServer(tmp_path).start()
    period = 3600.0
    app, client = retrain_only_app(monkeypatch, server.url, period)
    leader, standby = (LeaderScheduler(app=app, schedule_filename=str(tmp_path / f"beat{i}.db")) for i in range(2))
    stale = datetime.now(timezone.utc) - timedelta(seconds=2 * period)
    for scheduler in (leader, standby):  # the retrain is due in both files
        scheduler.schedule["retrain"].last_run_at = stale

    def retrain_sends() -> int:
        return sum(json.loads(m)["headers"]["task"] == TASK_RETRAIN for m in client.lrange(Settings().queue_cpu, 0, -1))

    try:
        leader.tick()
        assert leader.leader and retrain_sends() == 1
        for _ in range(3):
            standby.tick()
        assert not standby.leader
        server.stop()
        server.start()  # the same port, empty: the lock, the last sends, the queue and the claims are gone
        for _ in range(5):
            standby.tick()  # first to find the lock free
        assert standby.leader
        leader.tick()
        assert not leader.leader
        resent = retrain_sends()
    finally:
        leader.close()
        standby.close()
        client.close()
        server.stop()
        get_settings.cache_clear()
    assert resent == 0, "the new leader sent again the retrain the old one had just sent"


def test_a_clock_gone_back_more_than_a_period_does_not_stop_a_job_for_as_long(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Beat waits until a job's last run plus its period: after the clock stepped back an hour (an NTP
    correction, a VM restored from a snapshot) the last run lay an hour ahead, and the minute's refresh stopped
    for that hour. A last run more than a period ahead is taken as now: the job runs again a period later."""
    from workers.beat import LeaderScheduler

    period = 1.5
    app, client = retrain_only_app(monkeypatch, redis_url, period)
    beat = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "beat.db"))
    beat.schedule["retrain"].last_run_at = datetime.now(timezone.utc) - timedelta(seconds=2 * period)  # due

    def sends() -> int:
        return sum(json.loads(m)["headers"]["task"] == TASK_RETRAIN for m in client.lrange(Settings().queue_cpu, 0, -1))

    try:
        beat.tick()
        assert beat.leader and sends() == 1
        wall = app.now
        monkeypatch.setattr(app, "now", lambda: wall() - timedelta(hours=1))  # the clock steps back an hour
        with caplog.at_level(logging.WARNING, logger="workers.beat"):
            run_beat(beat, 2 * period + 0.5)
        after = sends() - 1
    finally:
        beat.close()
        get_settings.cache_clear()
    assert 1 <= after <= 2, f"{after} sends in the {2 * period + 0.5} s after the clock went back an hour"
    assert "ahead of the clock" in caplog.text, caplog.text


def test_the_leader_puts_back_the_last_sends_a_redis_restarted_empty_lost(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis restarted without persistence loses the leader's record of its sends. The weekly retrain's stayed
    missing until its next send, a week on: a beat on a fresh file (a new host, a broken file) leading in that
    week dated the retrain to its own start and put it off by up to a week. The leader that takes the lock
    again puts its last sends back."""
    from workers.beat import LeaderScheduler

    server = RedisServer(tmp_path).start()
    period = 7 * 86_400.0
    app, client = retrain_only_app(monkeypatch, server.url, period)
    leader = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "leader.db"))
    leader.schedule["retrain"].last_run_at = datetime.now(timezone.utc) - timedelta(seconds=period + 5)  # due
    fresh: LeaderScheduler | None = None
    try:
        leader.tick()
        assert leader.leader
        sent_at = maybe_make_aware(leader.schedule["retrain"].last_run_at)
        server.stop()
        server.start()  # the same port, empty
        for _ in range(3):
            leader.tick()
        assert leader.leader
        restored = client.hget(BEAT_LAST_RUN_KEY, "retrain")
        leader.close()  # a deploy moves beat to a new host, with a fresh schedule file
        fresh = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "fresh.db"))
        fresh.tick()
        assert fresh.leader
        adopted = maybe_make_aware(fresh.schedule["retrain"].last_run_at)
    finally:
        leader.close()
        if fresh is not None:
            fresh.close()
        client.close()
        server.stop()
        get_settings.cache_clear()
    assert restored is not None and float(restored) == sent_at.timestamp(), f"retrain's last send in Redis: {restored!r}"
    assert abs((adopted - sent_at).total_seconds()) < 0.01, f"retrain dated {adopted}, last sent {sent_at}"


def test_a_last_run_less_than_a_period_ahead_is_kept_and_one_further_ahead_is_taken_as_now(
        redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the clock went back by less than a period, the last run stays where it was: the next send then falls
    in the slot after the one that ran. Taken as now, it came up to a period early, stamped with the slot that
    had already run: a duplicate its claim drops, and the run lost for a whole period (a week for the retrain).
    Only a last run more than a period ahead (a clock gone back an hour) is taken as now."""
    from workers.beat import LeaderScheduler

    period = 600.0
    app, client = retrain_only_app(monkeypatch, redis_url, period)
    beat = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "beat.db"))
    try:
        now = app.now()
        slightly_ahead = now + timedelta(seconds=period / 2)
        beat.schedule["retrain"].last_run_at = slightly_ahead
        beat._rewind_future_runs()
        assert maybe_make_aware(beat.schedule["retrain"].last_run_at) == slightly_ahead
        beat.schedule["retrain"].last_run_at = now + timedelta(seconds=2 * period)
        beat._rewind_future_runs()
        rewound = maybe_make_aware(beat.schedule["retrain"].last_run_at)
    finally:
        beat.close()
        client.close()
        get_settings.cache_clear()
    assert now <= rewound <= app.now(), rewound


def test_a_beat_on_a_fresh_file_puts_back_no_send_it_never_made(redis_url: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Leading on an empty Redis, a beat puts back the sends it made or adopted, not the start time its fresh file
    dates an unsent job to: recorded as a send, the next leader (whose own file knew the retrain's real last send)
    adopted it as newer and put the weekly retrain off by up to a week."""
    from workers.beat import LeaderScheduler

    app, client = retrain_only_app(monkeypatch, redis_url, 7 * 86_400.0)
    fresh = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "fresh.db"))
    old: LeaderScheduler | None = None
    try:
        fresh.tick()
        assert fresh.leader
        recorded = client.hget(BEAT_LAST_RUN_KEY, "retrain")
        fresh.close()
        old = LeaderScheduler(app=app, schedule_filename=str(tmp_path / "old.db"))
        old.schedule["retrain"].last_run_at = datetime.now(timezone.utc) - timedelta(days=8)  # due since a day
        old.schedule["retrain"].total_run_count = 3
        old.tick()
        assert old.leader
        sent = sum(json.loads(m)["headers"]["task"] == TASK_RETRAIN for m in client.lrange(Settings().queue_cpu, 0, -1))
    finally:
        fresh.close()
        if old is not None:
            old.close()
        client.close()
        get_settings.cache_clear()
    assert recorded is None, f"the fresh beat recorded a retrain it never sent: {recorded!r}"
    assert sent == 1, "the retrain due since a day was put off"

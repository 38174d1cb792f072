"""Two beat processes against one real Redis: each job runs exactly once per slot."""

import json
import time
from collections import Counter
from pathlib import Path

import redis

from core.constants import BEAT_LOCK_KEY, BEAT_SCHEDULE_FILE, JOB_RUNS_KEY
from synth_miner.devstack import Proc, cli, spawn, start_worker
from tests.conftest import RedisServer


def test_two_beats_run_each_slot_once(redis_server: RedisServer, redis_url: str, tmp_path: Path,
                                      shared_data: Path) -> None:
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_BEAT_REFRESH_S": "3", "SYNTH_BEAT_CALIBRATE_S": "100000",
           "SYNTH_BEAT_RETRAIN_S": "100000", "SYNTH_BEAT_COMPACT_S": "100000", "SYNTH_BEAT_LOCK_TTL_S": "3",
           "SYNTH_PRICE_PROVIDER": "replay", "SYNTH_REPLAY_DIR": str(shared_data),
           "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "SYNTH_CALIBRATION_ASSETS": '["BTC"]'}
    worker = start_worker(tmp_path, env, queues="cpu", name="cpu1")
    beats = [spawn(cli("beat", "--schedule-file", str(tmp_path / f"beat{i}.db")), env, tmp_path / f"beat{i}.log")
             for i in range(2)]
    client = redis.Redis.from_url(redis_url)
    try:
        time.sleep(14)
        assert client.get(BEAT_LOCK_KEY) is not None
        # Kill the leader: the other beat takes over within the lock TTL and nothing runs twice.
        holder = client.get(BEAT_LOCK_KEY).decode()  # type: ignore[union-attr]
        leader = next(b for b in beats if f":{b.proc.pid}:" in holder)
        leader.stop()
        killed_at = time.time()
        time.sleep(10)
    finally:
        for proc in beats:
            proc.stop()
        worker.stop()
    runs = [json.loads(r) for r in client.lrange(JOB_RUNS_KEY, 0, -1)]
    per_slot = Counter((r["job"], r["slot"]) for r in runs)
    assert per_slot, f"no job ran:\n{worker.text()[-3000:]}"
    assert max(per_slot.values()) == 1, per_slot
    refresh_slots = sorted(slot for job, slot in per_slot if job == "refresh-cache")
    assert len(refresh_slots) >= 5, refresh_slots
    late = [s for s in refresh_slots if s > killed_at]
    assert late, "the second beat did not take over after the leader died"


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

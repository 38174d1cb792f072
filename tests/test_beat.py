"""Two beat processes against one real Redis: each job runs exactly once per slot."""

import json
import time
from collections import Counter
from pathlib import Path

import redis

from core.constants import BEAT_LOCK_KEY, JOB_RUNS_KEY
from synth_miner.devstack import cli, spawn, start_worker
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

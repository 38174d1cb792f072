"""`synth-miner status` rendering: what an operator reads off the table (the collection runs for real in
test_topology against a live stack)."""

import json
import time
from pathlib import Path

import redis
from rich.console import Console

from core.constants import JOB_RUNS_KEY
from core.settings import Settings
from synth_miner.status import collect, redacted, render


def test_render_shows_each_workers_device_and_models_and_flags_problems() -> None:
    now = time.time()
    report = {
        "artifact_version": "v7",
        "workers": [{"name": "gpu-0:11", "queues": "infer.hf,infer.lf", "engine": "patchtst", "device": "cuda",
                     "models": {"hf": "/srv/artifacts/versions/v7/hf.pt", "lf_crypto": "/srv/models/lf_crypto.pt"},
                     "artifact_version": "v7", "seen": "4s"},
                    {"name": "old:12", "queues": "cpu", "engine": "ewma_t", "artifact_version": None, "seen": "9s"}],
        "queues": {"infer.hf": 0, "infer.lf": 3, "cpu": 1},
        "jobs": [{"job": "calibrate", "slot": int(now) - 60, "status": "ok", "seconds": 2.5, "started": now - 60}],
        "cache": {"BTC": {"step": 60, "first": now - 86_400, "last": now - 120, "freshness_s": 60.0}, "SPYX": None},
        "errors": ["redis: connection refused"],
    }
    console = Console(record=True, width=160)
    render(report, console)
    text = console.export_text()
    assert "v7" in text and "patchtst" in text and "cuda" in text
    assert "?" in text.split("old:12")[1].splitlines()[0]  # a heartbeat from before devices were announced
    assert "hf:v7 lf_crypto:committed" in text  # the retrained 1 h model serves, the 24 h one is committed
    assert "empty" in text and "! redis: connection refused" in text and "last calibration" in text


def test_render_without_a_published_version_says_what_is_served() -> None:
    report = {"artifact_version": None,
              "workers": [{"name": "cpu@host:7", "queues": "cpu", "engine": "jobs", "device": "cpu", "models": {},
                           "artifact_version": None, "seen": "3s"}],
              "queues": {}, "jobs": [], "cache": {}, "errors": []}
    console = Console(record=True, width=160)
    render(report, console)
    text = console.export_text()
    assert "none published (workers serve the committed checkpoints in models/)" in text
    row = text.split("cpu@host:7")[1].splitlines()[0]
    assert "None" not in row and "jobs" in row  # no Python None in the artifact column


def test_last_calibration_is_found_behind_a_stream_of_minute_jobs(redis_url: str, tmp_path: Path) -> None:
    """The cache refresh records a run every minute: an hourly calibration 30 minutes ago is 30 runs deep."""
    client = redis.Redis.from_url(redis_url)
    now = time.time()
    client.lpush(JOB_RUNS_KEY, json.dumps({"job": "calibrate", "slot": int(now) - 1800, "status": "ok",
                                           "started": now - 1800, "seconds": 40.0}))
    for minute in range(29, -1, -1):
        client.lpush(JOB_RUNS_KEY, json.dumps({"job": "refresh-cache", "slot": int(now) - 60 * minute, "status": "ok",
                                               "started": now - 60 * minute, "seconds": 0.5}))
    report = collect(Settings(_env_file=None, redis_url=redis_url, artifacts_dir=tmp_path))  # type: ignore[call-arg]
    assert report["last_calibration"] is not None and report["last_calibration"]["status"] == "ok"
    console = Console(record=True, width=160)
    render(report, console)
    line = next(x for x in console.export_text().splitlines() if x.startswith("last calibration"))
    assert "30m ago" in line and "never" not in line, line


def test_json_report_never_shows_the_redis_password(tmp_path: Path) -> None:
    report = collect(Settings(_env_file=None, redis_url="redis://:s3cret@127.0.0.1:1/0",  # type: ignore[call-arg]
                              artifacts_dir=tmp_path))
    assert "s3cret" not in json.dumps(report, default=str)
    assert report["redis_url"] == "redis://:***@127.0.0.1:1/0"
    assert redacted("redis://user:pw@host:6380/1?password=pw2&db=1") == "redis://user:***@host:6380/1?password=***&db=1"
    assert redacted("unix:///run/redis.sock") == "unix:///run/redis.sock" and redacted(None) is None

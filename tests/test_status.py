"""`synth-miner status` rendering: what an operator reads off the table (the collection runs for real in
test_topology against a live stack)."""

import time

from rich.console import Console

from synth_miner.status import render


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

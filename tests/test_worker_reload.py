"""A running Celery worker picks up a newly published artifact between tasks, without a restart."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from core.artifacts import ArtifactStore
from core.cache_redis import RedisHistoryCache
from core.calibration import CALIBRATION_FILE, CalibrationState, Entry
from core.constants import KEY_PREFIX
from core.prompts import ForecastRequest
from core.settings import Settings
from core.sources.replay import ReplaySource
from miner.pool import CeleryPool
from synth_miner.devstack import start_worker
from tests.model_fixtures import write_checkpoints


def publish_scale(root: Path, scale: float) -> str:
    state = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=scale)}, meta={"test": True})
    store = ArtifactStore(root)
    return store.publish(store.stage({CALIBRATION_FILE: state.to_json()}))


async def test_worker_reloads_published_calibration(redis_url: str, tmp_path: Path, shared_data: Path) -> None:
    artifacts = tmp_path / "artifacts"
    first = publish_scale(artifacts, 1.0)
    client = redis.Redis.from_url(redis_url)
    now = int(time.time())
    RedisHistoryCache(client).write("BTC", ReplaySource(shared_data).shifted("BTC", 60).between(now - 3 * 86_400, now))
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_ARTIFACTS_DIR": str(artifacts), "SYNTH_SEED": "11",
           "SYNTH_ENGINE": "ewma_t",
           "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_LOG_LEVEL": "INFO"}
    worker = start_worker(tmp_path, env, queues="infer.hf")
    pool = CeleryPool(Settings(redis_url=redis_url))
    request = ForecastRequest("BTC", now + 600, 60, 3_600, 1000)

    def spread(paths: np.ndarray) -> float:
        return float(np.log(paths[:, -1] / paths[:, 0]).std())

    def versions(expected: str) -> set[str]:
        """The heartbeat's versions, once it shows ``expected``: a worker announces right after pushing a result."""
        deadline = time.monotonic() + 10
        while True:
            beats = [json.loads(client.get(k) or b"{}") for k in client.scan_iter(f"{KEY_PREFIX}:worker:*")]
            found = {str(b.get("artifact_version")) for b in beats}
            if found == {expected} or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    try:
        before = spread((await pool.forecast(request, None, time.time() + 20, "reload-1")).paths)  # type: ignore[arg-type]
        assert versions(first) == {first}
        second = publish_scale(artifacts, 2.0)
        after = spread((await pool.forecast(request, None, time.time() + 20, "reload-2")).paths)  # type: ignore[arg-type]
        assert versions(second) == {second}
        assert 1.9 < after / before < 2.1  # same seed and request: only the published scale changed
        assert worker.proc.poll() is None
        assert "reloading engines and calibration" in worker.text()
    finally:
        await pool.close()
        worker.stop()


async def test_worker_serves_a_model_published_in_an_artifact(redis_url: str, tmp_path: Path,
                                                             shared_data: Path) -> None:
    """The weekly retraining publishes models as artifacts: a serving worker switches to them between
    tasks (here a random-head 1 h model, so the paths visibly change) and keeps the committed others."""
    artifacts = tmp_path / "artifacts"
    client = redis.Redis.from_url(redis_url)
    now = int(time.time())
    RedisHistoryCache(client).write("BTC", ReplaySource(shared_data).shifted("BTC", 60).between(now - 3 * 86_400, now))
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_ARTIFACTS_DIR": str(artifacts), "SYNTH_SEED": "11",
           "SYNTH_ENGINE": "patchtst", "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_LOG_LEVEL": "INFO"}
    worker = start_worker(tmp_path, env, queues="infer.hf")
    pool = CeleryPool(Settings(redis_url=redis_url))
    request = ForecastRequest("BTC", now + 600, 60, 3_600, 1000)
    random_head = write_checkpoints(tmp_path / "retrained", ("hf",), perturb=0.3) / "hf.pt"
    try:
        served = await pool.forecast(request, None, time.time() + 30, "model-1")  # type: ignore[arg-type]
        assert (served.engine, served.fallback_reason) == ("patchtst", None)  # the worker says who computed it
        committed = served.paths
        store = ArtifactStore(artifacts)
        version = store.publish(store.stage({"hf.pt": random_head.read_bytes(),
                                             CALIBRATION_FILE: CalibrationState().to_json()}))
        retrained = (await pool.forecast(request, None, time.time() + 30, "model-2")).paths  # type: ignore[arg-type]
        again = (await pool.forecast(request, None, time.time() + 30, "model-3")).paths  # type: ignore[arg-type]
        assert committed.shape == retrained.shape == (1000, 61)
        assert not np.allclose(committed, retrained) and np.array_equal(retrained, again)
        log = worker.text()
        assert "reloading engines and calibration" in log
        assert f"hf ({artifacts / 'versions' / version / 'hf.pt'})" in log
        assert "using ewma_t" not in log  # the model served both times; no fallback hides the switch
        deadline = time.monotonic() + 10  # the heartbeat (synth-miner status) names each model's origin
        while True:
            beats = [json.loads(client.get(k) or b"{}") for k in client.scan_iter(f"{KEY_PREFIX}:worker:*")]
            models = [b.get("models", {}) for b in beats]
            if models and models[0].get("hf", "").endswith(f"{version}/hf.pt") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert models[0]["hf"] == str(artifacts / "versions" / version / "hf.pt")
        assert models[0]["lf_crypto"].endswith("models/lf_crypto.pt")  # not in the artifact: the committed one
    finally:
        await pool.close()
        worker.stop()


def test_a_reload_takes_models_and_calibration_from_one_version(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A publish landing while a worker reloads must not pair one version's models with the next one's
    calibration: the reload builds everything from the version it resolved."""
    from core.artifact_watcher import ArtifactWatcher
    from core.engines_registry import LiveForecaster

    artifacts = tmp_path / "artifacts"
    publish_scale(artifacts, 1.0)
    live = LiveForecaster(Settings(artifacts_dir=artifacts, engine="patchtst", seed=1))
    store = ArtifactStore(artifacts)
    model = write_checkpoints(tmp_path / "retrained", ("hf",), perturb=0.3) / "hf.pt"
    state = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=1.5)})
    with_model = store.publish(store.stage({"hf.pt": model.read_bytes(), CALIBRATION_FILE: state.to_json()}))

    poll = ArtifactWatcher.poll
    later: list[str] = []

    def poll_then_publish(watcher: ArtifactWatcher) -> object:
        loaded = poll(watcher)
        if loaded is not None and not later:  # the next calibration publishes right after the watcher read
            later.append(publish_scale(artifacts, 1.8))
        return loaded

    monkeypatch.setattr(ArtifactWatcher, "poll", poll_then_publish)
    reloaded = live.current()
    assert live.version == with_model and later
    assert reloaded.scale("ewma_t", "BTC", 60) == 1.5
    assert reloaded.models["hf"] == str(artifacts / "versions" / with_model / "hf.pt")
    newest = live.current()  # the next task serves the newer version, whole
    assert live.version == later[0] and newest.scale("ewma_t", "BTC", 60) == 1.8
    assert newest.models["hf"].endswith("models/hf.pt")


def test_a_calibration_publish_keeps_the_loaded_models_and_a_new_checkpoint_replaces_them(tmp_path: Path) -> None:
    """The hourly calibration copies the models forward: every worker rebuilt all its PatchTST models from
    the new version's copies on its next request, every hour. Same checkpoints now keep the loaded engine."""
    from core.engines_registry import LiveForecaster

    artifacts = tmp_path / "artifacts"
    store = ArtifactStore(artifacts)
    model = write_checkpoints(tmp_path / "retrained", ("hf",), perturb=0.3) / "hf.pt"

    def calibrated(scale: float) -> bytes:
        return CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=scale)}).to_json()

    retrained = store.publish(store.stage({"hf.pt": model.read_bytes(), CALIBRATION_FILE: calibrated(1.0)}))
    live = LiveForecaster(Settings(artifacts_dir=artifacts, engine="patchtst", seed=1))
    first = live.current()
    store.publish(store.stage({CALIBRATION_FILE: calibrated(1.4)}, inherit=True))  # the hourly job
    hourly = live.current()
    assert hourly is not first and hourly.scale("ewma_t", "BTC", 60) == 1.4
    assert hourly.engines["patchtst"] is first.engines["patchtst"]  # not loaded again
    assert hourly.models["hf"] == str(artifacts / "versions" / retrained / "hf.pt")  # the version that published it
    other = write_checkpoints(tmp_path / "again", ("hf",), perturb=0.5) / "hf.pt"
    again = store.publish(store.stage({"hf.pt": other.read_bytes()}, inherit=True))  # the next retrain
    newest = live.current()
    assert newest.engines["patchtst"] is not first.engines["patchtst"] and newest.scale("ewma_t", "BTC", 60) == 1.4
    assert newest.models["hf"] == str(artifacts / "versions" / again / "hf.pt")
    assert publish_scale(artifacts, 1.1) and live.current().models["hf"].endswith("models/hf.pt")  # committed again


def test_a_worker_whose_models_did_not_load_at_start_tries_them_again(tmp_path: Path) -> None:
    """A worker started while its checkpoints were unreadable (a volume mounted late, the GPU not ready yet) served
    the fallback engine until it was restarted, though a refused artifact is tried again every minute: the engine
    asked for is now tried again as often, and served once it loads."""
    from core.engines_registry import LiveForecaster

    models = tmp_path / "models"
    models.mkdir()
    live = LiveForecaster(Settings(models_dir=models, artifacts_dir=tmp_path / "artifacts", engine="patchtst", seed=1))
    assert live.current().default == "ewma_t"
    write_checkpoints(models, ("hf",))  # readable now
    assert live.current().default == "ewma_t"  # not tried again before the retry interval
    live.watcher.retry_s = 0.0
    served = live.current()
    assert served.default == "patchtst" and served.models == {"hf": str(models / "hf.pt")}
    assert live.current() is served  # loaded once: no retry while it serves

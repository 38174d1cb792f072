"""The miner's fallback forecaster (miner/fallback.py)."""

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pytest

import core.artifact_watcher
from core.artifacts import ArtifactStore
from core.calibration import CALIBRATION_FILE, CalibrationState, Entry
from core.forecast import FALLBACK_ENGINE, Forecaster, default_engines
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest
from core.settings import Settings
from miner.fallback import EngineView, StatisticalForecaster, fallback_source
from synth_miner.devstack import ROOT


@dataclass(frozen=True)
class Loaded:
    version: str


class SlowLinkWatcher:
    """ArtifactWatcher's poll semantics (read the link, mark it seen, load it), with one load that waits:
    a calibration file read slowly while a second version is published."""

    def __init__(self, artifacts_dir: Path) -> None:
        self.link: str | None = None  # what ``artifacts/current`` points to now
        self.current: Loaded | None = None
        self._seen: str | None = None
        self.slow_version: str | None = None
        self.loading = threading.Event()
        self.release = threading.Event()

    def poll(self) -> Loaded | None:
        version = self.link
        if version is None or version == self._seen:
            return None
        self._seen = version
        if version == self.slow_version:
            self.loading.set()
            assert self.release.wait(10)
        self.current = Loaded(version)
        return self.current


def test_a_slow_reload_does_not_undo_a_newer_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply threads call ``current`` concurrently. A thread still loading version 1 used to overwrite
    the forecaster another thread had just built from version 2; the watcher counted version 2 as seen,
    so the fallback kept version 1's calibration until the next publish."""
    monkeypatch.setattr(core.artifact_watcher, "ArtifactWatcher", SlowLinkWatcher)  # what LiveForecaster builds
    monkeypatch.setattr(StatisticalForecaster, "_build",
                        lambda self, artifact: f"forecaster-{artifact.version if artifact else None}")
    source = StatisticalForecaster(Settings(_env_file=None, artifacts_dir=tmp_path))
    watcher = cast(SlowLinkWatcher, source.watcher)

    def served() -> object:
        return source.current()

    assert served() == "forecaster-None"

    watcher.link, watcher.slow_version = "v1", "v1"
    slow = threading.Thread(target=source.current)
    slow.start()
    assert watcher.loading.wait(10)
    try:
        watcher.link = "v2"  # published while v1 is still loading
        source.current()  # another reply thread
    finally:
        watcher.release.set()
        slow.join(10)
    assert served() == "forecaster-v2"


def test_the_fallback_follows_calibration_without_loading_checkpoints(tmp_path: Path) -> None:
    """Its reloads run on a reply thread under the request's deadline: the published set's checkpoints
    (which it never serves) are hash-checked but not torch-loaded, and a corrupt one is still refused."""
    settings = Settings(_env_file=None, artifacts_dir=tmp_path / "artifacts", calibration_engine="ewma_t")
    store = ArtifactStore(settings.artifacts_dir)
    checkpoint = (ROOT / "models" / "hf.pt").read_bytes()

    def publish(scale: float, model: bytes) -> str:
        calibration = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=scale)})
        return store.publish(store.stage({CALIBRATION_FILE: calibration.to_json(), "hf.pt": model}))

    source = StatisticalForecaster(settings)
    assert source.current().scale("ewma_t", "BTC", 60) == 1.0
    first = publish(1.25, checkpoint)
    assert source.current().scale("ewma_t", "BTC", 60) == 1.25
    assert source.version == first and source.watcher.current is not None
    assert source.watcher.current.files["hf.pt"] == checkpoint  # kept as bytes, never parsed
    second = publish(0.8, checkpoint)
    (store.versions_dir / second / "hf.pt").write_bytes(checkpoint[:-1] + b"?")  # no longer its hash
    assert source.current().scale("ewma_t", "BTC", 60) == 1.25 and source.version == first


class Published:
    """The embedded pool's forecaster source: the forecaster it serves now (swapped when a new one is loaded)."""

    def __init__(self, forecaster: Forecaster) -> None:
        self.forecaster = forecaster

    def current(self) -> Forecaster:
        return self.forecaster


def test_the_embedded_fallback_runs_ewma_t_over_the_pools_engines() -> None:
    """In embedded mode the fallback shares the pool's loaded engines, but must run EWMA-t: the pool's own
    default is the model that was just too late (or failed), and run again it makes the fallback late too."""
    engines = default_engines()
    pool = Published(Forecaster(engines, default="gbm", seed=7))
    source = fallback_source(Settings(_env_file=None), pool)
    assert isinstance(source, EngineView)
    view = source.current()
    assert view.default == FALLBACK_ENGINE and view.engines[FALLBACK_ENGINE] is engines[FALLBACK_ENGINE]
    assert source.current() is view  # rebuilt only when the pool's forecaster changes
    close = 100.0 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.001, 2_000)))
    m1 = PriceHistory.from_arrays(60, np.arange(close.size) * 60, close)
    snapshot = MarketSnapshot("BTC", m1, None, float(close[-1]), int(m1.ts[-1]) + 60)
    request = ForecastRequest("BTC", int(m1.ts[-1]) + 120, 60, 3_600, 5)
    result = view.run(request, snapshot)
    assert (result.engine, result.fallback_reason, result.paths.shape) == (FALLBACK_ENGINE, None, (5, 61))
    pool.forecaster = Forecaster(default_engines(), default="gbm", seed=8)  # a new artifact loaded
    swapped = source.current()
    assert swapped is not view and swapped.default == FALLBACK_ENGINE and swapped.seed == 8

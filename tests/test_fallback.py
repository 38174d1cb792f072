"""The miner's fallback forecaster (miner/fallback.py)."""

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

import core.artifacts
from core.artifacts import CALIBRATION_FILE, ArtifactStore
from core.calibration import CalibrationState, Entry
from core.settings import Settings
from miner.fallback import StatisticalForecaster
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
    monkeypatch.setattr(core.artifacts, "ArtifactWatcher", SlowLinkWatcher)  # what LiveForecaster builds
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

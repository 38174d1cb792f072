"""Artifact sets staged for the tests of the artifact store and of its modules.

The ``store`` fixture is made by a factory and bound in each test module (``store = store_fixture()``), as in
``tests.provider_fixtures``: pytest finds it there.
"""

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.artifact_files import NORM_STATS_FILE, DataWindow
from core.artifact_sets import ArtifactSet
from core.artifacts import ArtifactStore
from core.calibration import CALIBRATION_FILE, CalibrationState, Entry

Fixture = Any  # what ``pytest.fixture`` returns (a private pytest class)

WEIGHTS = "weights.npz"


def files_for(tag: str, scale: float = 1.0) -> dict[str, bytes]:
    """Every file carries the version tag, so a reader can tell a mixed set from a whole one."""
    calibration = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=scale)}, meta={"tag": tag})
    buffer = io.BytesIO()
    np.savez(buffer, tag=np.array(tag), weights=np.full(64, len(tag), dtype=np.float32))
    return {CALIBRATION_FILE: calibration.to_json(), NORM_STATS_FILE: json.dumps({"tag": tag}).encode(),
            WEIGHTS: buffer.getvalue()}


def stage(store: ArtifactStore, tag: str, scale: float = 1.0) -> Path:
    return store.stage(files_for(tag, scale), data_window=DataWindow(1_700_000_000, 1_700_086_400),
                       notes={"tag": tag}, version=tag)


def assert_whole(artifact: ArtifactSet) -> None:
    tag = artifact.version
    assert artifact.calibration.meta["tag"] == tag
    assert artifact.files[NORM_STATS_FILE] == {"tag": tag}
    weights = artifact.files[WEIGHTS]
    assert isinstance(weights, dict) and str(weights["tag"]) == tag


def store_fixture() -> Fixture:
    """``store``: an empty store under ``tmp_path`` whose ``current`` is a plain directory made by hand."""

    @pytest.fixture
    def store(tmp_path: Path) -> ArtifactStore:
        root = tmp_path / "artifacts"
        (root / "current").mkdir(parents=True)  # a plain directory made by hand: the first publish replaces it
        (root / "current" / ".gitkeep").write_bytes(b"")
        return ArtifactStore(root, keep=5)

    return store


def stage_on_current(store: ArtifactStore, tag: str) -> Path:
    """As the hourly calibration and the weekly retrain stage: over the current set (``built_on``)."""
    return store.stage(files_for(tag), version=tag, inherit=True)

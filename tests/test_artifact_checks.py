"""Publish-time checks: a set whose models the engines cannot serve, or that an extra check refuses, is not published."""

import io
from pathlib import Path

import pytest

from core.artifact_files import ArtifactError
from core.artifact_sets import ArtifactSet
from core.artifacts import ArtifactStore
from tests.artifact_fixtures import files_for, stage, store_fixture

store = store_fixture()


def test_a_model_checkpoint_must_be_servable_as_the_kind_its_name_says(store: ArtifactStore, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from tests.model_fixtures import write_checkpoints

    models = write_checkpoints(tmp_path / "models", ("hf", "lf_crypto"))
    wrong_kind = files_for("v001") | {"hf.pt": (models / "lf_crypto.pt").read_bytes()}
    with pytest.raises(ArtifactError, match=r"hf.pt: not a servable hf model \(kind mismatch"):
        store.publish(store.stage(wrong_kind, version="v001"))
    state_dict_only = files_for("v002") | {"lf_crypto.pt": _torch_bytes({"head.weight": [1.0]})}
    with pytest.raises(ArtifactError, match="lf_crypto.pt: not a servable lf_crypto model"):
        store.publish(store.stage(state_dict_only, version="v002"))
    assert store.current_version() is None
    assert store.publish(store.stage(files_for("v003") | {"hf.pt": (models / "hf.pt").read_bytes()}, version="v003"))
    assert store.load_current().files["hf.pt"]


def _torch_bytes(obj: object) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_failing_extra_check_refuses_the_publish(tmp_path: Path) -> None:
    def no_big_scales(artifact: ArtifactSet) -> None:
        if any(e.scale > 1.5 for e in artifact.calibration.entries.values()):
            raise ValueError("scale above 1.5")

    store = ArtifactStore(tmp_path / "artifacts", checks=[no_big_scales])
    store.publish(stage(store, "v001", scale=1.4))
    with pytest.raises(ArtifactError, match="scale above 1.5"):
        store.publish(stage(store, "v002", scale=1.8))
    assert store.current_version() == "v001"

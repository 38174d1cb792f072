"""What a store keeps: the newest versions, the ways back (rollbacks, previous models) and a week of staging."""

import errno
import io
import os
import time
from pathlib import Path

import pytest
import torch

from core.artifact_files import ArtifactError
from core.artifact_retention import previous_models
from core.artifacts import ArtifactStore
from tests.artifact_fixtures import WEIGHTS, assert_whole, files_for, stage, stage_on_current, store_fixture

store = store_fixture()


def test_only_the_last_n_versions_are_kept_plus_the_current_one(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts", keep=2)
    staged = {tag: stage(store, tag) for tag in ("v001", "v002", "v003", "v004")}  # created in this order
    store.publish(staged["v002"])
    store.publish(staged["v003"])
    store.publish(staged["v004"])
    assert [v.version for v in store.list_versions()] == ["v003", "v004"]
    # The oldest-created version published last is current: it survives the prune.
    store.publish(staged["v001"])
    assert [v.version for v in store.list_versions()] == ["v001", "v003", "v004"]
    assert store.current_version() == "v001"
    assert not list((store.root / "versions").glob(".trash-*"))
    with pytest.raises(ArtifactError, match="keep must be >= 2"):
        ArtifactStore(tmp_path / "x", keep=1)


def test_staging_keeps_a_week_and_the_newest_sets_not_every_refused_calibration(store: ArtifactStore) -> None:
    """Each hour the gate refuses leaves a whole set in staging/: they went on piling up for good."""
    now = time.time()
    for i in range(8):  # eight refused sets, 30 to 16 days old, and the retrain's plain checkpoints
        os.utime(stage(store, f"v{i:03d}"), (now - (30 - 2 * i) * 86_400,) * 2)
    checkpoints = store.staging_dir / "models-20261101T0000"
    checkpoints.mkdir()
    os.utime(checkpoints, (now - 40 * 86_400,) * 2)
    recent = stage(store, "v100")
    os.utime(recent, (now - 6 * 86_400,) * 2)  # a week old less a day: kept
    latest = stage(store, "v101")  # staging it prunes the rest
    left = sorted(p.name for p in store.staging_dir.iterdir())
    # The newest five whatever their age (three of them weeks old), and nothing older than a week besides.
    assert left == ["v005", "v006", "v007", "v100", "v101"], left
    assert latest.is_dir() and store.publish(store.staging_dir / "v005") == "v005"  # what is kept still publishes


def test_a_failing_prune_does_not_fail_a_publish_that_switched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ArtifactStore(tmp_path / "artifacts", keep=2)
    for tag in ("v001", "v002"):
        store.publish(stage(store, tag))
    staged = stage(store, "v003")
    rename = os.rename

    def no_trash(src: object, dst: object) -> None:
        if ".trash-" in str(dst):
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", no_trash)
    assert store.publish(staged) == "v003"  # readers already see v003: the publish succeeded
    assert store.current_version() == "v003"
    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(ArtifactError, match="permission denied"):
        monkeypatch.setattr(os, "rename", no_trash)
        store.prune()
    monkeypatch.setattr(os, "rename", rename)
    assert store.prune() == ["v001"]


def test_pruning_keeps_the_version_that_was_current_before_the_publish(tmp_path: Path) -> None:
    """After a rollback the known-good version is the oldest one: the next publish must not prune it."""
    store = ArtifactStore(tmp_path / "artifacts", keep=2)
    for tag in ("v001", "v002"):
        store.publish(stage(store, tag))
    assert store.rollback() == "v001"
    store.publish(stage(store, "v003"))
    assert [v.version for v in store.list_versions()] == ["v001", "v002", "v003"]
    assert store.rollback(to="v001") == "v001"
    assert_whole(store.load_current())


def test_leftovers_of_a_publisher_that_died_are_cleaned_up(store: ArtifactStore) -> None:
    store.publish(stage(store, "v001"))
    incoming = store.root / "versions" / ".incoming-v002-dead"
    incoming.mkdir()
    (incoming / WEIGHTS).write_bytes(b"x" * 1000)  # a half-copied version from another file system
    os.symlink("versions/v002", store.root / ".current-123-dead")  # a switch that never happened
    store.publish(stage(store, "v002"))
    assert not incoming.exists() and not list(store.root.glob(".current-*"))
    assert store.current_version() == "v002"


MODEL = "adapter.pt"


def torch_file(value: float) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.full((4,), value)}, buffer)
    return buffer.getvalue()


def test_the_models_before_a_retrain_survive_hourly_calibrations_and_a_rollback_brings_them_back(
        store: ArtifactStore) -> None:
    """Each hourly calibration copies the current models forward, and pruning keeps the newest five: five
    hours after a retrain, no kept set served the models before it, and `rollback` only stepped back to a
    set serving the retrained ones (the README promised it returned to the previous models)."""
    old, new = torch_file(1.0), torch_file(2.0)  # a checkpoint-like torch file (a <kind>.pt is model-checked)
    store.publish(store.stage({**files_for("v000"), MODEL: old}, version="v000", inherit=True))
    store.publish(store.stage({**files_for("v001"), MODEL: new}, version="v001", inherit=True))  # the retrain
    for i in range(2, 9):  # hourly calibrations over it
        store.publish(stage_on_current(store, f"v{i:03d}"))
    kept = [v.version for v in store.list_versions()]
    assert "v000" in kept and "v001" not in kept, kept
    assert previous_models(store.list_versions(), "v008") == "v000"
    assert store.load("v007").files[MODEL]["w"][0] == 2.0  # type: ignore[index]
    assert store.rollback() == "v007"  # the set v008 was built on: the retrained model still
    with pytest.raises(ArtifactError, match="not both"):
        store.rollback(to="v008", models=True)
    assert store.rollback(models=True) == "v000"
    assert store.load_current().files[MODEL]["w"][0] == 1.0  # type: ignore[index]
    assert store.rollback(models=True) == "v008"  # and forward again: the newest serving the other models
    (store.root / "versions" / "v000" / MODEL).write_bytes(new)  # corrupt: no longer its hash
    with pytest.raises(ArtifactError):
        store.rollback(models=True)
    assert store.current_version() == "v008"


def test_pruning_keeps_the_way_back_after_a_rollback(tmp_path: Path) -> None:
    """v3 and v4 are bad: rolled back to v2, two sets are published over it. The newest-created versions
    are then the bad ones; pruning by creation alone deleted v2, and rolling back twice landed on v4."""
    store = ArtifactStore(tmp_path / "artifacts", keep=3)
    for tag in ("v001", "v002", "v003", "v004"):
        store.publish(stage_on_current(store, tag))
    assert store.rollback(to="v002") == "v002"
    for tag in ("v005", "v006"):
        store.publish(stage_on_current(store, tag))
    assert "v002" in [v.version for v in store.list_versions()]
    assert store.rollback() == "v005"
    assert store.rollback() == "v002"
    assert_whole(store.load_current())
    # A straight history keeps what it kept before: the newest `keep`, current included.
    straight = ArtifactStore(tmp_path / "straight", keep=3)
    for i in range(1, 7):
        straight.publish(stage_on_current(straight, f"v{i:03d}"))
    assert [v.version for v in straight.list_versions()] == ["v004", "v005", "v006"]

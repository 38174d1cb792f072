"""The artifact store: staging, publish, listing, loading the current set, rollback."""

import errno
import json
import os
import shutil
from datetime import datetime, timedelta, tzinfo
from pathlib import Path

import pytest

import core.artifact_files as artifact_files
import core.artifact_sets as artifact_sets
import core.artifacts as artifacts
from core.artifact_files import MANIFEST_FILE, NORM_STATS_FILE, ArtifactError, DataWindow, write_manifest
from core.artifacts import ArtifactStore, current_version, new_staging_dir, publish
from core.calibration import CALIBRATION_FILE
from tests.artifact_fixtures import WEIGHTS, assert_whole, files_for, stage, stage_on_current, store_fixture

store = store_fixture()


# ------------------------------------------------------------------------------------------ publish


def test_first_publish_replaces_the_plain_current_directory(store: ArtifactStore) -> None:
    assert store.current_version() is None
    assert store.load_current_or_none() is None
    with pytest.raises(ArtifactError, match="no artifact published"):
        store.load_current()
    staged = stage(store, "v001", scale=1.2)
    assert staged == store.root / "staging" / "v001"
    version = store.publish(staged)
    assert version == "v001" and not staged.exists()
    assert store.current_link.is_symlink() and os.readlink(store.current_link) == "versions/v001"
    current = store.load_current()
    assert_whole(current)
    assert current.scale("ewma_t", "BTC", 60) == 1.2 and current.scale("ewma_t", "ETH", 60) == 1.0
    assert current.path == store.root / "versions" / "v001"


def test_module_level_helpers_infer_the_root(store: ArtifactStore) -> None:
    staged = stage(store, "v001")
    assert publish(staged) == "v001"
    assert current_version(store.root) == "v001"
    with pytest.raises(ArtifactError, match="pass artifacts_dir"):
        publish(store.root / "elsewhere")


def test_trainer_style_staging_with_write_manifest(store: ArtifactStore) -> None:
    directory = new_staging_dir(store.root, "v010")
    for name, data in files_for("v010").items():
        (directory / name).write_bytes(data)
    write_manifest(directory, data_window=DataWindow(5, 6))
    assert store.publish(directory) == "v010"
    assert_whole(store.load_current())


def test_compare_and_swap_publish(store: ArtifactStore) -> None:
    store.publish(stage(store, "v001"))
    with pytest.raises(ArtifactError, match="re-run the comparison"):
        store.publish(stage(store, "v002"), expect_current="v000")
    assert store.publish(stage(store, "v003"), expect_current="v001") == "v003"
    with pytest.raises(ArtifactError, match="already published"):
        store.publish(stage_copy(store, "v003"))


def stage_copy(store: ArtifactStore, version: str) -> Path:
    """A staging directory whose manifest names an existing version."""
    directory = new_staging_dir(store.root, f"{version}-again")
    for name, data in files_for(version).items():
        (directory / name).write_bytes(data)
    write_manifest(directory, version=version)
    return directory


def test_publishing_through_a_symlink_moves_the_set_itself(store: ArtifactStore, tmp_path: Path) -> None:
    """`artifacts publish some/link`: the link used to be what moved into versions/ (a relative one then
    pointed at itself and was refused as missing; an absolute one was published, so the "immutable" version
    stayed an editable staging folder, and pruning it left a .trash-* link behind for good)."""
    real = stage(store, "v001")
    absolute = tmp_path / "latest"
    absolute.symlink_to(real)
    assert store.publish(absolute) == "v001"
    published = store.versions_dir / "v001"
    assert published.is_dir() and not published.is_symlink() and not real.exists()
    relative = store.staging_dir / "newest"
    relative.symlink_to(stage(store, "v002").name)
    assert store.publish(relative) == "v002"
    assert not (store.versions_dir / "v002").is_symlink()
    assert_whole(store.load_current())


# ------------------------------------------------------------------------------------------ staging


def test_staging_refuses_an_inherited_file_that_changed_after_it_was_verified(store: ArtifactStore) -> None:
    """A staged set copies the current one's other files after verifying them: a file that changed on disk in
    between (bit rot, a hand edit) must not be copied, or the new manifest would vouch for the corrupt bytes
    and the set would pass validation and be published."""
    store.publish(stage(store, "v001"))
    norm_stats = store.versions_dir / "v001" / NORM_STATS_FILE

    def corrupt_after_verification(data: bytes, name: str) -> object:
        norm_stats.write_bytes(norm_stats.read_bytes().replace(b"v001", b"v666"))  # verified, then changed
        return artifact_sets._load_npz(data, name)

    stager = ArtifactStore(store.root, loaders={".npz": corrupt_after_verification})
    with pytest.raises(ArtifactError, match="changed while being copied"):
        stager.stage({CALIBRATION_FILE: files_for("v002")[CALIBRATION_FILE]}, version="v002", inherit=True)
    assert not (store.staging_dir / "v002").exists()


def test_staging_over_an_expected_current_refuses_once_another_set_is_published(store: ArtifactStore) -> None:
    """The calibration computes its scales from the set current when it starts: inheriting (and naming as
    built_on) a set published since would let the gate publish them over a set they never saw."""
    store.publish(stage(store, "v001"))
    store.publish(stage(store, "v002"))
    with pytest.raises(ArtifactError, match="not 'v001' that the new files were computed from"):
        store.stage(files_for("v003"), version="v003", inherit=True, expect_current="v001")
    assert not (store.staging_dir / "v003").exists()
    staged = store.stage(files_for("v003"), version="v003", inherit=True, expect_current="v002")
    assert store.validate(staged).manifest.notes["built_on"] == "v002"
    fresh = ArtifactStore(store.root.parent / "fresh")
    assert fresh.stage(files_for("v001"), version="v001", inherit=True, expect_current=None).is_dir()


def test_a_full_disk_while_staging_is_a_clear_error_and_leaves_no_partial_folder(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(artifacts, "write_durably", disk_full)
    with pytest.raises(ArtifactError, match=r"cannot stage v001 .*disk is full"):
        stage(store, "v001")
    monkeypatch.undo()
    assert not (store.root / "staging" / "v001").exists()
    assert store.publish(stage(store, "v001")) == "v001"  # the same version name stages again


# ------------------------------------------------------------------------------ listing and loading


def test_list_versions_reports_a_broken_manifest(store: ArtifactStore) -> None:
    store.publish(stage(store, "v001"))
    broken = store.root / "versions" / "v000"
    broken.mkdir()
    (broken / MANIFEST_FILE).write_text("{")
    infos = {i.version: i for i in store.list_versions()}
    assert infos["v000"].problem is not None and "not valid JSON" in infos["v000"].problem
    assert infos["v001"].problem is None and infos["v001"].current


def test_current_problem_names_a_link_that_serves_nothing(store: ArtifactStore) -> None:
    """A link still read as a version after its folder went (removed or copied by hand): every process loads no
    artifact, and `artifacts list` stars nothing, so the store must be able to say why."""
    assert store.current_problem() is None  # a plain directory made by hand: nothing published yet
    store.publish(stage(store, "v001"))
    assert store.current_problem() is None
    weights = store.versions_dir / "v001" / WEIGHTS
    good = weights.read_bytes()
    weights.write_bytes(good[:-1])  # truncated: served nowhere, starred in the listing all the same
    problem = store.current_problem()
    assert problem is not None and f"{weights}: content does not match the manifest hash" in problem, problem
    weights.write_bytes(good)
    assert store.current_problem() is None
    shutil.rmtree(store.versions_dir / "v001")
    assert store.current_problem() == f"{store.current_link} points at v001, which {store.versions_dir} does not hold"
    store.current_link.unlink()
    store.current_link.symlink_to("/tmp/not a version!")
    problem = store.current_problem()
    assert problem is not None and "not a version" in problem
    store.current_link.unlink()
    assert store.current_problem() is None  # no link: nothing published, nothing wrong


def test_a_reader_whose_version_is_pruned_mid_read_reads_the_new_current_one(store: ArtifactStore) -> None:
    """The one hazard of a lock-free reader: the version it resolved is switched away from and pruned while
    it reads. Its read fails (a file gone) and it must read the new target, not fail nor mix the two sets."""
    store.publish(stage(store, "v001"))
    store.publish(stage(store, "v002"))
    store.rollback(to="v001")
    pruned: list[str] = []

    def prune_under_the_reader(data: bytes, name: str) -> object:
        if not pruned:  # the reader is halfway through v001: its first file read, the others not yet
            pruned.append(store.rollback(to="v002"))
            os.rename(store.versions_dir / "v001", store.versions_dir / ".trash-v001-0000")  # as pruning does
        return json.loads(data)

    reader = ArtifactStore(store.root, loaders={".json": prune_under_the_reader})
    artifact = reader.load_current()
    assert pruned == ["v002"] and artifact.version == "v002"
    assert_whole(artifact)


# ----------------------------------------------------------------------------------------- rollback


def test_rollback_from_a_current_version_whose_manifest_broke(store: ArtifactStore) -> None:
    """The moment a rollback is needed: the newest readable version is the way back, not an error."""
    for tag in ("v001", "v002"):
        store.publish(stage(store, tag))
    (store.root / "versions" / "v002" / MANIFEST_FILE).write_bytes(b"")
    assert store.rollback() == "v001" and store.current_version() == "v001"
    assert_whole(store.load_current())


def test_rollback_of_a_missing_store_says_so_and_creates_nothing(tmp_path: Path) -> None:
    """A mistyped --dir: the rollback names the folder instead of creating it and its lock file."""
    missing = tmp_path / "artifcats"
    with pytest.raises(ArtifactError, match="no artifact store at"):
        ArtifactStore(missing).rollback()
    assert not missing.exists()


def test_rollback_walks_back_and_can_jump_forward(store: ArtifactStore) -> None:
    for tag in ("v001", "v002", "v003"):
        store.publish(stage(store, tag))
    assert store.rollback() == "v002" and store.current_version() == "v002"
    assert_whole(store.load_current())
    assert store.rollback() == "v001"
    with pytest.raises(ArtifactError, match="no readable version older"):
        store.rollback()
    assert store.rollback(to="v003") == "v003"
    with pytest.raises(ArtifactError, match="unknown version"):
        store.rollback(to="v404")
    # A corrupted target is refused and the current one stays.
    (store.root / "versions" / "v002" / WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(ArtifactError):
        store.rollback(to="v002")
    assert store.current_version() == "v003"
    infos = store.list_versions()
    assert [i.version for i in infos] == ["v001", "v002", "v003"]
    assert [i.current for i in infos] == [False, False, True]


def test_rollback_refuses_a_version_whose_manifest_names_another(store: ArtifactStore) -> None:
    """`current` names the directory; load() insists the manifest agrees, so rollback must check it too."""
    for tag in ("v001", "v002"):
        store.publish(stage(store, tag))
    path = store.root / "versions" / "v001" / MANIFEST_FILE
    path.write_text(json.dumps(json.loads(path.read_text()) | {"version": "v777"}))
    with pytest.raises(ArtifactError, match="expected 'v001'"):
        store.rollback(to="v001")
    with pytest.raises(ArtifactError, match="nothing to roll back to"):
        store.rollback()
    assert store.current_version() == "v002"
    assert_whole(store.load_current())


def test_default_rollback_skips_a_corrupt_older_version(store: ArtifactStore) -> None:
    for tag in ("v001", "v002", "v003"):
        store.publish(stage(store, tag))
    (store.root / "versions" / "v002" / WEIGHTS).write_bytes(b"garbage")
    assert store.rollback() == "v001"
    assert_whole(store.load_current())


def test_rollback_after_a_rollback_and_a_publish_does_not_bring_back_the_version_rolled_away_from(
        store: ArtifactStore) -> None:
    """v003 is bad: rolled back to v002, the hourly calibration then publishes v004 over v002. Rolling
    v004 back must return to v002, not to v003 (created after v002, so "the newest created before")."""
    for tag in ("v001", "v002", "v003"):
        store.publish(stage_on_current(store, tag))
    assert store.rollback() == "v002"
    store.publish(stage_on_current(store, "v004"))
    assert store.rollback() == "v002"
    assert_whole(store.load_current())
    assert store.rollback() == "v001"  # and a rollback after that one walks the chain back
    assert store.rollback(to="v004") == "v004"  # --to still goes anywhere kept


def test_rollback_returns_to_the_set_published_over_whatever_the_clocks_say(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hosts share the volume; the second one's clock is an hour behind, so the set it publishes
    over v002 was "created" before v001 and v002."""
    for tag in ("v001", "v002"):
        store.publish(stage_on_current(store, tag))

    class Behind:
        @staticmethod
        def now(tz: tzinfo | None = None) -> datetime:
            return datetime.now(tz) - timedelta(hours=1)

    monkeypatch.setattr(artifact_files, "datetime", Behind)
    store.publish(stage_on_current(store, "v003-other-host"))
    monkeypatch.undo()
    assert store.rollback() == "v002"


def test_rollback_repairs_a_current_link_to_garbage_or_to_a_deleted_version(store: ArtifactStore) -> None:
    for tag in ("v001", "v002"):
        store.publish(stage(store, tag))
    link = store.current_link
    link.unlink()
    link.symlink_to("versions/v009")  # an operator's `ln -sfn` to a version that is not there
    assert store.rollback() == "v002"
    assert_whole(store.load_current())
    link.unlink()
    link.symlink_to("/tmp/not a version!")
    assert [v.version for v in store.list_versions()] == ["v001", "v002"]  # still lists what can be chosen
    assert store.rollback() == "v002"
    assert store.current_version() == "v002"

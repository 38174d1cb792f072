"""Artifact versions: staging, validation, atomic publish/rollback, pruning, locking and reloads."""

import errno
import io
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import core
import core.artifacts as artifacts
from core.artifacts import (
    MANIFEST_FILE,
    NORM_STATS_FILE,
    ArtifactError,
    ArtifactSet,
    ArtifactStore,
    ArtifactWatcher,
    DataWindow,
    Manifest,
    current_version,
    new_staging_dir,
    previous_models,
    publish,
    sha256_file,
    write_manifest,
)
from core.calibration import CALIBRATION_FILE, CalibrationState, Entry

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


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    root = tmp_path / "artifacts"
    (root / "current").mkdir(parents=True)  # a plain directory made by hand: the first publish replaces it
    (root / "current" / ".gitkeep").write_bytes(b"")
    return ArtifactStore(root, keep=5)


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


def test_manifest_records_hashes_window_and_code_version(store: ArtifactStore) -> None:
    version = store.publish(stage(store, "v001"))
    directory = store.root / "versions" / version
    manifest = Manifest.from_json((directory / MANIFEST_FILE).read_bytes())
    assert set(manifest.files) == {CALIBRATION_FILE, NORM_STATS_FILE, WEIGHTS}
    for name, entry in manifest.files.items():
        assert entry.sha256 == sha256_file(directory / name)
        assert entry.size == (directory / name).stat().st_size
    assert manifest.code_version == core.__version__
    assert manifest.data_window == DataWindow(1_700_000_000, 1_700_086_400)
    assert manifest.notes == {"tag": "v001"} and manifest.created


def test_non_empty_plain_current_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    (root / "current").mkdir(parents=True)
    (root / "current" / "model.pt").write_bytes(b"legacy")
    store = ArtifactStore(root)
    with pytest.raises(ArtifactError, match="plain directory"):
        store.publish(stage(store, "v001"))
    assert (root / "current" / "model.pt").read_bytes() == b"legacy"
    assert not list(root.glob(".current-*"))  # the temp symlink was cleaned up


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


def test_checkpoints_load_through_the_pt_hook(store: ArtifactStore) -> None:
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save({"head.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, buffer)
    files = files_for("v001") | {"model.pt": buffer.getvalue()}
    store.publish(store.stage(files, version="v001"))
    state = store.load_current().files["model.pt"]
    assert isinstance(state, dict) and state["head.weight"].shape == (2, 3)
    bad = files_for("v002") | {"model.pt": b"\x80\x02not a checkpoint"}
    with pytest.raises(ArtifactError, match="model.pt: does not load"):
        store.publish(store.stage(bad, version="v002"))
    assert store.current_version() == "v001"


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


# ------------------------------------------------------------------------------------------ refusal


def _bad_hash(directory: Path) -> None:
    path = directory / NORM_STATS_FILE
    data = path.read_bytes()
    path.write_bytes(data.replace(b"v002", b"v999"))  # same size, other content


def _truncated_json(directory: Path) -> None:
    path = directory / CALIBRATION_FILE
    path.write_bytes(path.read_bytes()[:40])
    write_manifest(directory)  # hashes match: only the parse can catch it


def _missing_file(directory: Path) -> None:
    (directory / WEIGHTS).unlink()


def _missing_manifest(directory: Path) -> None:
    (directory / MANIFEST_FILE).unlink()


def _unlisted_file(directory: Path) -> None:
    (directory / "stray.json").write_text("{}")


def _no_calibration(directory: Path) -> None:
    (directory / CALIBRATION_FILE).unlink()
    write_manifest(directory)


def _truncated_npz(directory: Path) -> None:
    path = directory / WEIGHTS
    path.write_bytes(path.read_bytes()[:100])
    write_manifest(directory)


def _edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = directory / MANIFEST_FILE
    doc = json.loads(path.read_bytes())
    edit(doc)
    path.write_text(json.dumps(doc))


def _manifest_of_another_format(directory: Path) -> None:
    _edit_manifest(directory, lambda doc: doc.update(format=doc["format"] + 1))


def _manifest_entry_without_a_size(directory: Path) -> None:
    _edit_manifest(directory, lambda doc: doc["files"][WEIGHTS].pop("size"))


def _manifest_entry_outside_the_directory(directory: Path) -> None:
    _edit_manifest(directory, lambda doc: doc["files"].update({"../current/weights.npz": doc["files"][WEIGHTS]}))


def _manifest_window_of_strings(directory: Path) -> None:
    _edit_manifest(directory, lambda doc: doc.update(data_window={"start": "2026-01-01", "end": "2026-02-01"}))


@pytest.mark.parametrize("corrupt, message", [
    (_manifest_of_another_format, "manifest must be an object with \"format\""),
    (_manifest_entry_without_a_size, "manifest entry 'weights.npz' must be"),
    (_manifest_entry_outside_the_directory, "manifest entry '../current/weights.npz' must be"),
    (_manifest_window_of_strings, "manifest 'data_window' must be null or"),
    (_bad_hash, "does not match the manifest hash"),
    (_truncated_json, "calibration.json: does not load .JSONDecodeError"),
    (_missing_file, r"missing file\(s\) \['weights.npz'\]"),
    (_missing_manifest, "missing manifest.json"),
    (_unlisted_file, r"unlisted file\(s\) \['stray.json'\]"),
    (_no_calibration, "needs calibration.json"),
    (_truncated_npz, "weights.npz: does not load"),
])
def test_corrupt_or_partial_artifact_is_refused_and_current_keeps_serving(
        store: ArtifactStore, corrupt: object, message: str) -> None:
    store.publish(stage(store, "v001"))
    staged = stage(store, "v002")
    corrupt(staged)  # type: ignore[operator]
    with pytest.raises(ArtifactError, match=message):
        store.publish(staged)
    assert store.current_version() == "v001"
    assert_whole(store.load_current())
    assert not (store.root / "versions" / "v002").exists()
    assert staged.exists()  # left where it was for inspection


def test_a_failing_extra_check_refuses_the_publish(tmp_path: Path) -> None:
    def no_big_scales(artifact: ArtifactSet) -> None:
        if any(e.scale > 1.5 for e in artifact.calibration.entries.values()):
            raise ValueError("scale above 1.5")

    store = ArtifactStore(tmp_path / "artifacts", checks=[no_big_scales])
    store.publish(stage(store, "v001", scale=1.4))
    with pytest.raises(ArtifactError, match="scale above 1.5"):
        store.publish(stage(store, "v002", scale=1.8))
    assert store.current_version() == "v001"


def test_a_version_that_goes_bad_on_disk_is_caught_when_loaded(store: ArtifactStore) -> None:
    store.publish(stage(store, "v001"))
    (store.root / "versions" / "v001" / NORM_STATS_FILE).write_text('{"tag": "v00X"}')
    with pytest.raises(ArtifactError, match="manifest hash"):
        store.load_current()


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


# ------------------------------------------------------------------------------- rollback and pruning


def test_rollback_from_a_current_version_whose_manifest_broke(store: ArtifactStore) -> None:
    """The moment a rollback is needed: the newest readable version is the way back, not an error."""
    for tag in ("v001", "v002"):
        store.publish(stage(store, tag))
    (store.root / "versions" / "v002" / MANIFEST_FILE).write_bytes(b"")
    assert store.rollback() == "v001" and store.current_version() == "v001"
    assert_whole(store.load_current())


@pytest.mark.parametrize("manifest", [b"[" * 100_000, b'{"format": ' + b"9" * 5000 + b"}"],
                         ids=["nested-too-deep", "integer-too-long"])
def test_a_manifest_json_cannot_parse_is_an_artifact_error(store: ArtifactStore, manifest: bytes) -> None:
    """Deep nesting raises RecursionError and a 5000-digit integer a plain ValueError in json.loads: both
    escaped every ArtifactError handler, rollback, listing and the watcher included."""
    watcher = ArtifactWatcher(store)
    store.publish(stage(store, "v001"))
    assert watcher.poll() is not None
    store.publish(stage(store, "v002"))
    (store.root / "versions" / "v002" / MANIFEST_FILE).write_bytes(manifest)
    assert watcher.poll() is None and watcher.version == "v001"  # refused: the loaded set keeps serving
    with pytest.raises(ArtifactError, match="not valid JSON"):
        store.load_current()
    infos = {i.version: i for i in store.list_versions()}
    assert infos["v002"].problem is not None and "not valid JSON" in infos["v002"].problem
    assert store.rollback() == "v001"
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


# ------------------------------------------------------------------------------------- concurrency


def test_readers_never_see_a_mixed_or_partial_set_during_publish_and_rollback(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    writer = ArtifactStore(root, keep=3)  # pruning runs while readers read
    writer.publish(stage(writer, "v000"))
    stop = threading.Event()
    seen: list[str] = []
    errors: list[BaseException] = []

    def reader() -> None:
        mine = ArtifactStore(root)  # a worker's own view of the directory
        while not stop.is_set():
            try:
                artifact = mine.load_current()
                assert_whole(artifact)
                seen.append(artifact.version)
            except BaseException as exc:  # noqa: BLE001 - any failure is what the test looks for
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for i in range(1, 16):
            writer.publish(stage(writer, f"v{i:03d}"))
            if i % 4 == 0:
                writer.rollback()
            time.sleep(0.005)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not errors, errors[0]
    assert len(seen) > 20 and len(set(seen)) > 3
    assert not list(root.glob(".current-*")) and not list((root / "versions").glob(".*"))


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


def test_staging_refuses_an_inherited_file_that_changed_after_it_was_verified(store: ArtifactStore) -> None:
    """A staged set copies the current one's other files after verifying them: a file that changed on disk in
    between (bit rot, a hand edit) must not be copied, or the new manifest would vouch for the corrupt bytes
    and the set would pass validation and be published."""
    store.publish(stage(store, "v001"))
    norm_stats = store.versions_dir / "v001" / NORM_STATS_FILE

    def corrupt_after_verification(data: bytes, name: str) -> object:
        norm_stats.write_bytes(norm_stats.read_bytes().replace(b"v001", b"v666"))  # verified, then changed
        return artifacts._load_npz(data, name)

    stager = ArtifactStore(store.root, loaders={".npz": corrupt_after_verification})
    with pytest.raises(ArtifactError, match="changed while being copied"):
        stager.stage({CALIBRATION_FILE: files_for("v002")[CALIBRATION_FILE]}, version="v002", inherit=True)
    assert not (store.staging_dir / "v002").exists()


def test_two_publishers_at_once_do_not_interleave(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    stores = [ArtifactStore(root, keep=50) for _ in range(2)]
    staged = [[stage(stores[k], f"p{k}-{i:02d}") for i in range(6)] for k in range(2)]
    errors: list[BaseException] = []

    def publisher(k: int) -> None:
        try:
            for directory in staged[k]:
                stores[k].publish(directory)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[0]
    assert len(stores[0].list_versions()) == 12
    current = stores[0].load_current()
    assert current.version in {"p0-05", "p1-05"}
    assert_whole(current)


def test_a_held_lock_times_out_with_a_clear_error(tmp_path: Path) -> None:
    holder = ArtifactStore(tmp_path / "artifacts")
    waiter = ArtifactStore(tmp_path / "artifacts", lock_timeout_s=0.2)
    staged = stage(waiter, "v001")
    with holder._locked():
        began = time.monotonic()
        with pytest.raises(ArtifactError, match="another publisher"):
            waiter.publish(staged)
        assert time.monotonic() - began >= 0.2
    assert waiter.publish(staged) == "v001"


# ----------------------------------------------------------------------------------------- watcher


def test_watcher_reloads_only_when_current_moves(store: ArtifactStore) -> None:
    watcher = ArtifactWatcher(store.root)
    assert watcher.poll() is None and watcher.current is None  # nothing published yet
    store.publish(stage(store, "v001"))
    first = watcher.poll()
    assert first is not None and first.version == "v001" and watcher.version == "v001"
    assert watcher.poll() is None  # unchanged: one readlink, no reload
    store.publish(stage(store, "v002", scale=1.3))
    second = watcher.poll()
    assert second is not None and second.version == "v002" and second.scale("ewma_t", "BTC", 60) == 1.3
    store.rollback()
    back = watcher.poll()
    assert back is not None and back.version == "v001"
    # A new current that fails to load is skipped; the worker keeps serving what it has.
    store.publish(stage(store, "v003"))
    (store.root / "versions" / "v003" / NORM_STATS_FILE).write_text('{"tag": "bad!"}')
    assert watcher.poll() is None
    assert watcher.version == "v001"
    assert watcher.poll() is None  # not retried on every poll


# ------------------------------------------------------------------------- failures, races, permissions


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


def test_a_switch_that_fails_on_a_full_disk_can_be_retried(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.publish(stage(store, "v001"))
    staged = stage(store, "v002")

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "symlink", disk_full)
    with pytest.raises(ArtifactError, match="disk is full"):
        store.publish(staged)
    assert store.current_version() == "v001" and staged.is_dir()
    assert not (store.root / "versions" / "v002").exists()
    monkeypatch.undo()
    assert store.publish(staged) == "v002"
    assert_whole(store.load_current())


@pytest.fixture
def other_file_system(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than ``tmp_path`` (a tmpfs), where a rename gives EXDEV for real:
    as a staging volume mounted apart from the artifact store would."""
    for candidate in ("/dev/shm", "/run/user", "/run", "/var/tmp", "/tmp"):
        try:
            if os.stat(candidate).st_dev == os.stat(tmp_path).st_dev or not os.access(candidate, os.W_OK):
                continue
            folder = Path(tempfile.mkdtemp(prefix="synth-other-fs-", dir=candidate))
        except OSError:
            continue
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
        return
    pytest.skip("no writable folder on another file system than the test's")


def test_a_set_staged_on_another_file_system_is_copied_in_and_published(
        store: ArtifactStore, other_file_system: Path) -> None:
    store.publish(stage(store, "v001"))
    staged = Path(shutil.move(str(stage(store, "v002")), other_file_system / "v002"))
    with pytest.raises(OSError) as exdev:  # the premise: a plain rename cannot move it
        os.rename(staged, store.root / "versions" / "probe")
    assert exdev.value.errno == errno.EXDEV
    umask = os.umask(0o077)  # a publisher with a private umask: workers running as another user still read it
    try:
        assert store.publish(staged) == "v002"
    finally:
        os.umask(umask)
    assert_whole(store.load_current())
    published = store.root / "versions" / "v002"
    assert os.stat(published).st_dev == os.stat(store.root).st_dev  # a copy in the store, not a link out
    assert all(path.stat().st_mode & 0o555 == 0o555 for path in [published, *published.iterdir()] if path.is_dir())
    assert all(path.stat().st_mode & 0o444 == 0o444 for path in published.iterdir())
    assert not staged.exists()  # the original goes once the copy serves
    assert not list((store.root / "versions").glob(".incoming-*"))


def test_a_copy_from_another_file_system_that_fails_leaves_nothing_half_published(
        store: ArtifactStore, other_file_system: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills mid-copy: no half-copied folder in ``versions/``, ``current`` unchanged, the staged
    original intact; once there is room the same folder publishes."""
    store.publish(stage(store, "v001"))
    staged = Path(shutil.move(str(stage(store, "v002")), other_file_system / "v002"))
    copyfile = shutil.copyfile

    def full_after_one_file(src: str, dst: str, **kwargs: Any) -> object:
        if any(Path(dst).parent.iterdir()):
            raise OSError(errno.ENOSPC, "No space left on device", dst)
        return copyfile(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", full_after_one_file)
    with pytest.raises(ArtifactError, match=r"cannot copy .*v002.*disk is full"):
        store.publish(staged)
    assert store.current_version() == "v001" and sorted(os.listdir(store.root / "versions")) == ["v001"]
    assert sorted(os.listdir(staged)) == sorted([*files_for("v002"), MANIFEST_FILE])
    monkeypatch.undo()
    assert store.publish(staged) == "v002"
    assert_whole(store.load_current())


def test_a_failed_switch_after_a_copy_keeps_the_original_and_drops_the_copy(
        store: ArtifactStore, other_file_system: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.publish(stage(store, "v001"))
    staged = Path(shutil.move(str(stage(store, "v002")), other_file_system / "v002"))

    def disk_full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "symlink", disk_full)
    with pytest.raises(ArtifactError, match="disk is full"):
        store.publish(staged)
    assert store.current_version() == "v001" and not (store.root / "versions" / "v002").exists()
    assert staged.is_dir() and (staged / MANIFEST_FILE).is_file()
    monkeypatch.undo()
    assert store.publish(staged) == "v002"
    assert_whole(store.load_current())
    assert not staged.exists()


def test_a_full_disk_while_staging_is_a_clear_error_and_leaves_no_partial_folder(
        store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(artifacts, "_write_durably", disk_full)
    with pytest.raises(ArtifactError, match=r"cannot stage v001 .*disk is full"):
        stage(store, "v001")
    monkeypatch.undo()
    assert not (store.root / "staging" / "v001").exists()
    assert store.publish(stage(store, "v001")) == "v001"  # the same version name stages again


def test_a_read_only_artifacts_folder_is_a_clear_error(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    staged = stage(store, "v001")

    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, "Read-only file system", str(store.root / ".publish.lock"))

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ArtifactError, match="cannot open the publish lock .*read-only"):
        store.publish(staged)


def test_published_files_are_readable_by_workers_running_as_another_user(tmp_path: Path) -> None:
    old = os.umask(0o077)  # a publisher with a private umask
    try:
        store = ArtifactStore(tmp_path / "artifacts")
        store.publish(stage(store, "v001"))
    finally:
        os.umask(old)
    version = store.root / "versions" / "v001"
    for folder in (store.root, store.root / "versions", version):
        assert folder.stat().st_mode & 0o055 == 0o055, folder
    for path in version.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, path
    assert (store.root / ".publish.lock").stat().st_mode & 0o044 == 0o044  # another publisher can lock


def test_an_unreadable_manifest_is_refused_and_the_watcher_keeps_serving(store: ArtifactStore) -> None:
    watcher = ArtifactWatcher(store)
    store.publish(stage(store, "v001"))
    assert watcher.poll() is not None
    store.publish(stage(store, "v002"))
    manifest = store.root / "versions" / "v002" / MANIFEST_FILE
    manifest.unlink()
    manifest.mkdir()  # reading it raises IsADirectoryError, as EACCES would for another user's file
    with pytest.raises(ArtifactError, match="unreadable"):
        store.load_current()
    assert watcher.poll() is None and watcher.version == "v001"


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


def test_watcher_retries_a_refused_version_after_a_while(store: ArtifactStore) -> None:
    """A version refused for a reason that goes away (a permission, an I/O error) is not skipped until
    the next publish: it is tried again after ``retry_s``, and not on every poll before that."""
    watcher = ArtifactWatcher(store, retry_s=3600.0)
    store.publish(stage(store, "v001"))
    assert watcher.poll() is not None
    store.publish(stage(store, "v002"))
    manifest = store.root / "versions" / "v002" / MANIFEST_FILE
    good = manifest.read_bytes()
    manifest.unlink()
    manifest.mkdir()  # unreadable for now
    assert watcher.poll() is None and watcher.version == "v001"
    manifest.rmdir()
    manifest.write_bytes(good)  # fixed
    assert watcher.poll() is None  # within retry_s: not retried on every poll
    watcher.retry_s = 0.0  # retry_s has passed
    again = watcher.poll()
    assert again is not None and again.version == "v002" and watcher.version == "v002"
    assert watcher.poll() is None  # loaded: no reload until current moves


# ------------------------------------------------------------------------- rollback targets, bad links


def stage_on_current(store: ArtifactStore, tag: str) -> Path:
    """As the hourly calibration and the weekly retrain stage: over the current set (``built_on``)."""
    return store.stage(files_for(tag), version=tag, inherit=True)


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

    monkeypatch.setattr(artifacts, "datetime", Behind)
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


def test_a_current_link_to_garbage_is_logged_once_not_on_every_poll(
        store: ArtifactStore, caplog: pytest.LogCaptureFixture) -> None:
    """Workers poll before every task: a broken link must not write an error line per request."""
    store.publish(stage(store, "v001"))
    watcher = ArtifactWatcher(store)
    assert watcher.poll() is not None
    store.current_link.unlink()
    store.current_link.symlink_to("/tmp/not a version!")
    with caplog.at_level(logging.ERROR, logger="core.artifacts"):
        for _ in range(50):
            assert watcher.poll() is None
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1
    assert watcher.version == "v001"  # keeps serving
    caplog.clear()
    store.rollback(to="v001")
    assert watcher.poll() is None  # v001 again: nothing to reload
    store.current_link.unlink()
    store.current_link.symlink_to("/tmp/still not one!")
    with caplog.at_level(logging.ERROR, logger="core.artifacts"):
        watcher.poll()
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1  # broken again: said again


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

"""The files of a set: the manifest, its parse errors, hashes, and files every user can read."""

import os
from pathlib import Path

import pytest

import core
from core.artifact_files import MANIFEST_FILE, NORM_STATS_FILE, ArtifactError, DataWindow, Manifest, sha256_file
from core.artifact_watcher import ArtifactWatcher
from core.artifacts import ArtifactStore
from core.calibration import CALIBRATION_FILE
from tests.artifact_fixtures import WEIGHTS, assert_whole, stage, store_fixture

store = store_fixture()


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

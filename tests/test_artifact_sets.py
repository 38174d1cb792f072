"""Reading a version: every file hash-checked and loaded, a corrupt or partial set refused."""

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from core.artifact_files import MANIFEST_FILE, NORM_STATS_FILE, ArtifactError, write_manifest
from core.artifacts import ArtifactStore
from core.calibration import CALIBRATION_FILE
from tests.artifact_fixtures import WEIGHTS, assert_whole, files_for, stage, store_fixture

store = store_fixture()


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


def test_a_version_that_goes_bad_on_disk_is_caught_when_loaded(store: ArtifactStore) -> None:
    store.publish(stage(store, "v001"))
    (store.root / "versions" / "v001" / NORM_STATS_FILE).write_text('{"tag": "v00X"}')
    with pytest.raises(ArtifactError, match="manifest hash"):
        store.load_current()

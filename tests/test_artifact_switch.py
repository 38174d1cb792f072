"""Making a set current: the publish lock, the move into versions/ (a copy from another file system), the switch."""

import errno
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from core.artifact_files import MANIFEST_FILE, ArtifactError
from core.artifacts import ArtifactStore
from tests.artifact_fixtures import assert_whole, files_for, stage, store_fixture

store = store_fixture()


def test_non_empty_plain_current_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    (root / "current").mkdir(parents=True)
    (root / "current" / "model.pt").write_bytes(b"legacy")
    store = ArtifactStore(root)
    with pytest.raises(ArtifactError, match="plain directory"):
        store.publish(stage(store, "v001"))
    assert (root / "current" / "model.pt").read_bytes() == b"legacy"
    assert not list(root.glob(".current-*"))  # the temp symlink was cleaned up


# -------------------------------------------------------------------------------------- concurrency


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


# ----------------------------------------------------------------------------------------- failures


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


def test_a_read_only_artifacts_folder_is_a_clear_error(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    staged = stage(store, "v001")

    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EROFS, "Read-only file system", str(store.root / ".publish.lock"))

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ArtifactError, match="cannot open the publish lock .*read-only"):
        store.publish(staged)

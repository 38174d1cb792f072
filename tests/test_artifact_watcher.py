"""The workers' watcher: reloads once current moves, keeps serving through a refused set or a broken link."""

import logging

import pytest

from core.artifact_files import MANIFEST_FILE, NORM_STATS_FILE, ArtifactError
from core.artifact_watcher import ArtifactWatcher
from core.artifacts import ArtifactStore
from tests.artifact_fixtures import stage, store_fixture

store = store_fixture()


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


def test_a_current_link_to_garbage_is_logged_once_not_on_every_poll(
        store: ArtifactStore, caplog: pytest.LogCaptureFixture) -> None:
    """Workers poll before every task: a broken link must not write an error line per request."""
    store.publish(stage(store, "v001"))
    watcher = ArtifactWatcher(store)
    assert watcher.poll() is not None
    store.current_link.unlink()
    store.current_link.symlink_to("/tmp/not a version!")
    with caplog.at_level(logging.ERROR, logger="core.artifact_watcher"):
        for _ in range(50):
            assert watcher.poll() is None
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1
    assert watcher.version == "v001"  # keeps serving
    caplog.clear()
    store.rollback(to="v001")
    assert watcher.poll() is None  # v001 again: nothing to reload
    store.current_link.unlink()
    store.current_link.symlink_to("/tmp/still not one!")
    with caplog.at_level(logging.ERROR, logger="core.artifact_watcher"):
        watcher.poll()
    assert len([r for r in caplog.records if "unreadable" in r.getMessage()]) == 1  # broken again: said again

"""The workers' side of the artifact store: a poll per task, one readlink, that loads a set once it is current."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from core.artifact_files import ArtifactError
from core.artifact_sets import ArtifactSet
from core.artifacts import ArtifactStore

log = logging.getLogger(__name__)


class ArtifactWatcher:
    """For workers: ``poll()`` between tasks returns a newly loaded set only when ``current`` moved.

    A poll that finds nothing new costs one readlink. A new version that fails to load is logged and
    skipped (the worker keeps serving the set it has); it is tried again every ``retry_s`` seconds
    (a permission fixed, a transient I/O error) or at once when ``current`` moves again.
    """

    def __init__(self, artifacts_dir: Path | ArtifactStore, retry_s: float = 60.0) -> None:
        self.store = artifacts_dir if isinstance(artifacts_dir, ArtifactStore) else ArtifactStore(artifacts_dir)
        self.current: ArtifactSet | None = None
        self.retry_s = retry_s
        self._seen: str | None = None
        self._failed_at: float | None = None  # monotonic time of the last failed load of ``_seen``
        self._link_problem: str | None = None  # logged once, not on every poll (workers poll per task)

    @property
    def version(self) -> str | None:
        return None if self.current is None else self.current.version

    def poll(self) -> ArtifactSet | None:
        try:
            version = self.store.current_version()
        except ArtifactError as exc:
            if str(exc) != self._link_problem:
                log.error("artifact link unreadable, keeping %s: %s", self.version, exc)
            self._link_problem = str(exc)
            return None
        self._link_problem = None
        if version is None:
            return None
        if version == self._seen and (self._failed_at is None
                                      or time.monotonic() - self._failed_at < self.retry_s):
            return None
        self._seen = version
        try:
            loaded = self.store.load(version)
        except ArtifactError as exc:
            self._failed_at = time.monotonic()
            log.error("artifact %s refused, keeping %s: %s", version, self.version, exc)
            return None
        self._failed_at = None
        self.current = loaded
        return loaded

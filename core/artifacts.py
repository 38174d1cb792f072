"""Versioned, hash-checked artifact sets, and the atomic switch that makes one of them current.

Layout under ``Settings.artifacts_dir``::

    artifacts/
      current -> versions/<version>   relative symlink, replaced by one os.replace of a temp symlink
      versions/<version>/             one directory per publication, never modified once published
        manifest.json                 sha256 and size of every other file, data window, code version
        calibration.json              core.calibration state (required)
        norm_stats.json, *.pt, ...    normalisation stats and model checkpoints, when there are any
      staging/<version>/              written by training or calibration, validated, then moved in
      .publish.lock                   fcntl lock: one publish / rollback / prune at a time
      .trash-<version>-<hex>          a pruned version being deleted (renamed first: all or nothing)

Why readers never see a mixed set: a version directory is complete and verified before ``current``
points at it, and never changes afterwards; a reader resolves ``current`` once (readlink) and reads
that version's directory only. The one hazard, pruning the version a slow reader is reading, makes
the read fail its hash check and ``load_current`` retries on the new target.

First use: the repository ships no ``current`` (it is git-ignored); the first publish creates the symlink.
A plain ``current/`` directory found there (one made by hand) is removed if it holds dotfiles such as
``.gitkeep`` only; a non-empty one is refused rather than deleted.

This module holds the store; beside it: ``core.artifact_files`` (names, manifest, durable writes),
``core.artifact_sets`` (reading and verifying a version), ``core.artifact_checks`` (publish-time checks),
``core.artifact_retention`` (what pruning keeps), ``core.artifact_switch`` (the lock, the move in, the switch)
and ``core.artifact_watcher`` (the workers' reloads).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path, PurePosixPath
from typing import Any

from core.artifact_checks import Check, model_checkpoint_check, sample_forecast_check
from core.artifact_files import (
    BUILT_ON_NOTE,
    CURRENT,
    FILE_NAME,
    MANIFEST_FILE,
    STAGING,
    VERSION_NAME,
    VERSIONS,
    ArtifactError,
    DataWindow,
    Manifest,
    mkdir_shared,
    new_version,
    os_failure,
    share_readable,
    write_durably,
    write_manifest,
)
from core.artifact_retention import VersionInfo, previous_models, prune_staging, prune_versions, versions_to_keep
from core.artifact_sets import DEFAULT_LOADERS, ArtifactSet, Loader, kept_as_bytes, read_set
from core.artifact_switch import move_back, move_in, publish_lock, switch_current
from core.settings import Settings

log = logging.getLogger(__name__)

LOAD_ATTEMPTS = 3  # a reader racing a prune re-resolves `current` this many times


# --------------------------------------------------------------------------------------------- store


_ANY: Any = object()  # publish() without a compare-and-swap on the current version


class ArtifactStore:
    """Publish, roll back, list and load artifact versions under one root directory."""

    def __init__(self, root: Path, keep: int = 5, loaders: Mapping[str, Loader] | None = None,
                 checks: Sequence[Check] = (), lock_timeout_s: float = 120.0) -> None:
        if keep < 2:
            raise ArtifactError(f"keep must be >= 2 so a rollback target survives, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.loaders: dict[str, Loader] = {**DEFAULT_LOADERS, **(loaders or {})}
        self.checks = tuple(checks)
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> ArtifactStore:
        return cls(settings.artifacts_dir, keep=settings.artifacts_keep, **kwargs)

    @property
    def current_link(self) -> Path:
        return self.root / CURRENT

    @property
    def versions_dir(self) -> Path:
        return self.root / VERSIONS

    @property
    def staging_dir(self) -> Path:
        return self.root / STAGING

    # --- reading (no lock: readers only ever follow the symlink) -------------------------------------
    def current_version(self) -> str | None:
        """The version ``current`` points at (one readlink), or None before the first publish."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # a plain directory made by hand: nothing published yet
                return None
            raise ArtifactError(f"{self.current_link}: unreadable ({exc})") from None
        name = PurePosixPath(target).name
        if not VERSION_NAME.match(name):
            raise ArtifactError(f"{self.current_link} points at {target!r}, not a version")
        return name

    def current_problem(self) -> str | None:
        """Why ``current`` serves nothing though it is set, or None: a link to garbage, to a version ``versions/``
        no longer holds (a folder removed or a store copied by hand), or to a set whose files fail their hashes
        (edited or truncated). Every process then loads no artifact, while the link still reads as a version.
        Hashes only: nothing is parsed but the calibration, so status and list stay quick."""
        try:
            version = self.current_version()
        except ArtifactError as exc:
            return str(exc)
        if version is None:
            return None
        if not (self.versions_dir / version).is_dir():
            return f"{self.current_link} points at {version}, which {self.versions_dir} does not hold"
        try:
            read_set(self.versions_dir / version, dict.fromkeys(self.loaders, kept_as_bytes), version)
        except ArtifactError as exc:
            return str(exc)
        return None

    def load(self, version: str) -> ArtifactSet:
        if not VERSION_NAME.match(version):
            raise ArtifactError(f"invalid version name {version!r}")
        return read_set(self.versions_dir / version, self.loaders, version)

    def load_current(self) -> ArtifactSet:
        """The current set, hash-verified and loaded; raises ArtifactError when there is none."""
        for _ in range(LOAD_ATTEMPTS):
            version = self.current_version()
            if version is None:
                raise ArtifactError(f"no artifact published under {self.root} yet")
            try:
                return self.load(version)
            except ArtifactError:
                if self.current_version() == version:
                    raise
                # Switched (and the old version pruned) while we read it: read the new one.
        raise ArtifactError(f"{self.current_link} kept changing during {LOAD_ATTEMPTS} reads")

    def load_current_or_none(self) -> ArtifactSet | None:
        return self.load_current() if self.current_version() is not None else None

    def list_versions(self) -> list[VersionInfo]:
        """Published versions, oldest first (by manifest creation time). Manifests only, no hashing.
        A ``current`` link to garbage marks none current (and is logged): the list is what to roll back to."""
        current = self._current_or_none()
        out: list[VersionInfo] = []
        if not self.versions_dir.is_dir():
            return out
        for directory in self.versions_dir.iterdir():
            if not directory.is_dir() or not VERSION_NAME.match(directory.name):
                continue  # .trash-* and .incoming-* are not versions
            try:
                m = Manifest.from_json((directory / MANIFEST_FILE).read_bytes())
                out.append(VersionInfo(directory.name, m.created, m.code_version, m.data_window, m.notes,
                                       directory.name == current, None, m.checkpoints))
            except (OSError, ArtifactError) as exc:
                out.append(VersionInfo(directory.name, None, None, None, {}, directory.name == current, str(exc)))
        return sorted(out, key=lambda v: (v.created or "", v.version))

    # --- staging ---------------------------------------------------------------------------------------
    def stage(self, files: Mapping[str, bytes], data_window: DataWindow | None = None,
              notes: Mapping[str, str] | None = None, inherit: bool = False, version: str | None = None,
              expect_current: str | None = _ANY) -> Path:
        """Write ``staging/<version>/`` with its manifest. ``inherit`` copies the current version's
        other files (hash-checked), e.g. the models when only the calibration changes, and notes that
        version under ``BUILT_ON_NOTE`` ("" when none was current). ``expect_current`` (with ``inherit``):
        refuse unless the current version is still this one (None: none), the set ``files`` were computed
        from; otherwise the note would vouch for a set they never saw. A write that
        fails (disk full, read-only) removes the half-written folder and raises ArtifactError."""
        version = version or new_version()
        if not VERSION_NAME.match(version):
            raise ArtifactError(f"invalid version name {version!r}")
        for name in files:
            if not FILE_NAME.match(name) or name == MANIFEST_FILE:
                raise ArtifactError(f"invalid artifact file name {name!r}")
        directory = self.staging_dir / version
        try:
            mkdir_shared(self.staging_dir)
            directory.mkdir(exist_ok=False)
        except FileExistsError:
            raise ArtifactError(f"{directory} already exists: stage under another version name") from None
        except OSError as exc:
            raise os_failure(f"stage {version} in {self.staging_dir}", exc) from None
        notes = dict(notes or {})
        try:
            current = self.load_current_or_none() if inherit else None
            if inherit:  # what it was built on: only over that version may it be published (challenge())
                notes[BUILT_ON_NOTE] = current.version if current is not None else ""
                if expect_current is not _ANY and (current.version if current else None) != expect_current:
                    raise ArtifactError(f"current is {notes[BUILT_ON_NOTE] or None!r}, not {expect_current!r} that the "
                                        f"new files were computed from (published meanwhile): {version} not staged")
            if current is not None:
                for name, entry in current.manifest.files.items():
                    if name not in files:
                        try:
                            data = (current.path / name).read_bytes()
                        except OSError as exc:  # pruned under us: the caller stages again
                            raise ArtifactError(f"{current.path / name}: unreadable while copying ({exc})") from None
                        if hashlib.sha256(data).hexdigest() != entry.sha256:
                            raise ArtifactError(f"{current.path / name} changed while being copied")
                        write_durably(directory / name, data)
            for name, data in files.items():
                write_durably(directory / name, data)
            write_manifest(directory, version, data_window, notes)
        except BaseException as exc:
            shutil.rmtree(directory, ignore_errors=True)  # no half-written staging folder left behind
            if isinstance(exc, OSError):
                raise os_failure(f"stage {version} in {directory}", exc) from None
            raise
        prune_staging(self.staging_dir)
        return directory

    def validate(self, directory: Path, expected_version: str | None = None) -> ArtifactSet:
        """Everything a publish requires: hashes, every file loads, the sample forecast, extra checks."""
        artifact = read_set(Path(directory), self.loaders, expected_version)
        sample_forecast_check(artifact)
        model_checkpoint_check(artifact)
        for check in self.checks:
            try:
                check(artifact)
            except ArtifactError:
                raise
            except Exception as exc:  # noqa: BLE001 - a check may raise anything
                raise ArtifactError(f"{directory}: check {getattr(check, '__name__', check)} failed: {exc}") from None
        return artifact

    # --- writing (under the lock) -------------------------------------------------------------------
    def _locked(self) -> AbstractContextManager[None]:
        return publish_lock(self.root, self.lock_timeout_s)

    def _current_or_none(self) -> str | None:
        """The current version, or None when ``current`` is missing or unusable (a publish repairs it)."""
        try:
            return self.current_version()
        except ArtifactError as exc:
            log.warning("%s", exc)
            return None

    def publish(self, staging_dir: Path, expect_current: str | None = _ANY) -> str:
        """Validate ``staging_dir``, move it to ``versions/``, switch ``current`` to it, prune.

        ``expect_current``: refuse if the current version is no longer this one (a champion/challenger
        decision taken against an older champion). A refused artifact leaves ``current`` untouched and
        the staging folder where it was (so a publish that failed on a full disk can be retried).
        """
        staging_dir = Path(staging_dir)
        if staging_dir.is_symlink():  # move the set, not a link to it (a linked version would stay editable)
            staging_dir = staging_dir.resolve()
        with self._locked():
            if expect_current is not _ANY and self.current_version() != expect_current:
                raise ArtifactError(f"current is {self.current_version()!r}, not {expect_current!r}: "
                                    "re-run the comparison")
            previous = self._current_or_none()
            artifact = self.validate(staging_dir)
            version = artifact.version
            target = self.versions_dir / version
            if target.exists():
                raise ArtifactError(f"version {version} is already published")
            try:
                mkdir_shared(self.versions_dir)
                share_readable(staging_dir)
            except OSError as exc:
                raise os_failure(f"publish {version}", exc) from None
            copied = move_in(staging_dir, target)
            try:
                self.load(version)  # the moved copy is what `current` will serve
                switch_current(self.root, version)
            except BaseException as exc:
                move_back(target, staging_dir, copied, self._current_or_none())
                if isinstance(exc, OSError):
                    raise os_failure(f"switch {self.current_link} to {version}", exc) from None
                raise
            if copied:
                shutil.rmtree(staging_dir, ignore_errors=True)
            try:
                self._prune_locked(also_keep=previous)
            except (OSError, ArtifactError) as exc:  # the publish itself is done: readers see the new version
                log.warning("published %s, but pruning old versions failed (retried on the next publish): %s",
                            version, exc)
        log.info("published artifact %s", version)
        return version

    def rollback(self, to: str | None = None, models: bool = False) -> str:
        """Make ``to`` current again. Default: the version the current one was built on (its
        ``BUILT_ON_NOTE``: what was current when the calibration or the retrain staged it), else the newest
        valid version created before the current one. Creation times alone would bring back a version a
        rollback moved away from (v3 rolled back to v2, v4 published over v2: "before v4" is v3), and
        depend on the clock of the host that staged each set. ``models``: the newest version serving other
        checkpoints than the current one (``previous_models``, kept through pruning for this)."""
        if models and to is not None:
            raise ArtifactError("roll back either to a version or to the previous models, not both")
        if not self.root.is_dir():  # a mistyped --dir: the lock would create it, and report "nothing is current"
            raise ArtifactError(f"no artifact store at {self.root}")
        with self._locked():
            try:
                current, unusable = self.current_version(), False
            except ArtifactError:  # a link to garbage (list_versions logs it): a rollback is how it gets repaired
                current, unusable = None, True
            kept = self.list_versions()
            names = [v.version for v in kept]
            if models:
                to = previous_models(kept, current)
                if to is None:
                    raise ArtifactError(f"no kept version serves other models than {current or 'the current link'}")
                self.validate(self.versions_dir / to, expected_version=to)
            elif to is not None:
                if to not in names:
                    raise ArtifactError(f"unknown version {to!r}; kept: {', '.join(names) or 'none'}")
                # The directory name is what `current` will name: its manifest must agree (as load() checks).
                self.validate(self.versions_dir / to, expected_version=to)
            else:
                if current is None and not unusable:
                    raise ArtifactError("nothing is current, so there is nothing to roll back from")
                # A current version whose manifest broke (the usual reason to roll back), or a link to garbage
                # or to a version no longer there, has no date: any readable one is older.
                now = kept[names.index(current)] if current in names else None
                created = None if now is None else now.created
                older = [v.version for v in kept if v.problem is None and v.version != current
                         and (created is None or (v.created or "") < created)]
                candidates = older[::-1]  # newest first
                base = None if now is None else now.notes.get(BUILT_ON_NOTE)
                if base and base in names and base != current:
                    candidates = [base, *(name for name in candidates if name != base)]
                problems = []
                for candidate in candidates:  # a corrupt one is skipped, not fatal
                    try:
                        self.validate(self.versions_dir / candidate, expected_version=candidate)
                    except ArtifactError as exc:
                        problems.append(str(exc))
                        continue
                    to = candidate
                    break
                if to is None:
                    raise ArtifactError(f"no readable version older than {current or 'the current link'} is kept: "
                                        "nothing to roll back to" + (f" ({'; '.join(problems)})" if problems else ""))
            try:
                switch_current(self.root, to)
            except OSError as exc:
                raise os_failure(f"roll back {self.current_link} to {to}", exc) from None
        log.warning("rolled back artifacts %s -> %s", current, to)
        return to

    def prune(self) -> list[str]:
        with self._locked():
            return self._prune_locked()

    def _prune_locked(self, also_keep: str | None = None) -> list[str]:
        """Remove all but the newest ``keep`` versions and those ``versions_to_keep`` keeps besides."""
        current = self.current_version()
        infos = self.list_versions()
        return prune_versions(self.root, [v.version for v in infos],
                              versions_to_keep(infos, current, self.keep, also_keep))


# ---------------------------------------------------------------- module-level helpers (workers, CLI)


def current_version(artifacts_dir: Path) -> str | None:
    return ArtifactStore(artifacts_dir).current_version()


def load_current(artifacts_dir: Path) -> ArtifactSet:
    return ArtifactStore(artifacts_dir).load_current()


def list_versions(artifacts_dir: Path) -> list[VersionInfo]:
    return ArtifactStore(artifacts_dir).list_versions()


def publish(staging_dir: Path, artifacts_dir: Path | None = None) -> str:
    """Publish ``<root>/staging/<version>`` (root inferred) or any directory into ``artifacts_dir``."""
    staging_dir = Path(staging_dir)
    if artifacts_dir is None:
        if staging_dir.parent.name != STAGING:
            raise ArtifactError(f"{staging_dir} is not under <artifacts>/{STAGING}/: pass artifacts_dir")
        artifacts_dir = staging_dir.parent.parent
    return ArtifactStore(artifacts_dir).publish(staging_dir)


def rollback(artifacts_dir: Path, to: str | None = None) -> str:
    return ArtifactStore(artifacts_dir).rollback(to)


def new_staging_dir(artifacts_dir: Path, version: str | None = None) -> Path:
    """An empty ``staging/<version>/`` for a trainer to fill before calling ``write_manifest`` on it."""
    version = version or new_version()
    if not VERSION_NAME.match(version):
        raise ArtifactError(f"invalid version name {version!r}")
    directory = Path(artifacts_dir) / STAGING / version
    directory.mkdir(parents=True, exist_ok=False)
    return directory

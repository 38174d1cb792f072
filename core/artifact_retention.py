"""What a store keeps: the retention rules for published versions and staged sets, and the pruning that
applies them. Versions are pruned under the publish lock (``ArtifactStore``); staging is pruned best effort."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.artifact_files import BUILT_ON_NOTE, VERSIONS, DataWindow, os_failure
from core.constants import STAGING_KEEP_NEWEST, STAGING_KEEP_S

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    version: str
    created: str | None
    code_version: str | None
    data_window: DataWindow | None
    notes: Mapping[str, str]
    current: bool
    problem: str | None  # why the manifest could not be read (hashes are not checked here)
    models: Mapping[str, str] = field(default_factory=dict)  # checkpoint file -> sha256 (none: the committed)


def previous_models(versions: Sequence[VersionInfo], current: str | None) -> str | None:
    """The newest readable version (``versions`` oldest first) serving other checkpoints than ``current``:
    the way back from a retrained model. Every hourly calibration copies the current models forward, so
    the version ``current`` was built on serves them too; a few hours after a retrain, only this one
    still served the models before it."""
    now = next((v for v in versions if v.version == current), None)
    if now is None or now.problem is not None:
        return None
    return next((v.version for v in reversed(versions)
                 if v.problem is None and v.version != current and v.models != now.models), None)


def versions_to_keep(versions: Sequence[VersionInfo], current: str | None, keep: int,
                     also_keep: str | None = None) -> set[str]:
    """The newest ``keep`` of ``versions`` (oldest first), the current one and ``also_keep`` (the
    version that was current until this publish: workers may still be loading it, and it is the
    known-good way back when the newest ones are versions a rollback moved away from), the
    ``keep - 1`` sets the current one was built on in turn (where repeated rollbacks go), and the
    newest one serving other models (``rollback(models=True)``: hourly calibrations would otherwise
    prune the last set serving the models before a retrain within a few hours)."""
    names = [v.version for v in versions]
    kept = set(names[-keep:]) | {v for v in (current, also_keep, previous_models(versions, current)) if v}
    built_on = {v.version: v.notes.get(BUILT_ON_NOTE) for v in versions}
    step = current
    for _ in range(keep - 1):
        step = built_on.get(step) if step else None
        if not step:
            break
        kept.add(step)
    return kept


def prune_versions(root: Path, names: Sequence[str], keep: set[str]) -> list[str]:
    """Remove the versions ``names`` under ``root`` that are not in ``keep`` (each renamed away first, so
    it goes all or nothing), then what an interrupted prune, copy or switch left. Under the publish lock."""
    versions_dir = root / VERSIONS
    removed: list[str] = []
    for name in names:
        if name in keep:
            continue
        trash = versions_dir / f".trash-{name}-{secrets.token_hex(4)}"
        try:
            os.rename(versions_dir / name, trash)
        except FileNotFoundError:
            continue
        except OSError as exc:
            if removed:
                log.info("pruned artifact versions %s", removed)
            raise os_failure(f"prune version {name}", exc) from None
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(name)
    # Left by an interrupted prune, copy or switch (each made only under this lock: none is live).
    for leftover in [*versions_dir.glob(".trash-*"), *versions_dir.glob(".incoming-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    for stale in root.glob(".current-*"):
        if stale.is_symlink():
            stale.unlink(missing_ok=True)
    if removed:
        log.info("pruned artifact versions %s", removed)
    return removed


def prune_staging(staging_dir: Path, keep_s: float = STAGING_KEEP_S, keep_newest: int = STAGING_KEEP_NEWEST,
                  now: float | None = None) -> list[str]:
    """Remove staged sets (and the retrain's ``models-<stamp>`` checkpoints) older than ``keep_s``, except
    the newest ``keep_newest``. Every hourly calibration the gate refuses leaves a whole set here (about
    1 MB once models are published): without this, about 9 GB a year. Best effort: never fails a stage."""
    now = time.time() if now is None else now
    try:
        entries = sorted((p.stat().st_mtime, p) for p in staging_dir.iterdir() if p.is_dir())
    except OSError:
        return []
    removed = []
    for mtime, path in entries[:max(0, len(entries) - keep_newest)]:
        if now - mtime > keep_s:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        log.info("staging: removed %d set(s) older than %.0f days: %s", len(removed), keep_s / 86_400,
                 ", ".join(removed))
    return removed

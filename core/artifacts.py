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
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

import core
from core.assets import spec_for_any
from core.calibration import CALIBRATION_FILE, CalibrationError, CalibrationState
from core.constants import STAGING_KEEP_NEWEST, STAGING_KEEP_S
from core.engines.ewma import EwmaTEngine
from core.evaluation import GRIDS
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest
from core.response import ResponseError, build_response
from core.settings import Settings

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
BUILT_ON_NOTE = "built_on"  # manifest note of an inherited set: the version whose other files it copied
NORM_STATS_FILE = "norm_stats.json"
MANIFEST_FORMAT = 1
CURRENT, VERSIONS, STAGING, LOCK_FILE = "current", "versions", "staging", ".publish.lock"
VERSION_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
FILE_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")
LOAD_ATTEMPTS = 3  # a reader racing a prune re-resolves `current` this many times
SAMPLE_PATHS = 64  # paths in the publish-time sample forecast
SAMPLE_START = 1_767_225_600  # 2026-01-01T00:00Z: any whole minute works for the sample request
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact set that is missing, corrupt, partial or cannot be published / rolled back."""


Loader = Callable[[bytes, str], object]  # (verified file bytes, file name) -> loaded object; raises if bad
Check = Callable[["ArtifactSet"], None]  # extra publish-time validation (e.g. a model forward pass)


def _load_json(data: bytes, name: str) -> object:
    return json.loads(data)


def _load_torch(data: bytes, name: str) -> object:
    import torch  # only when a checkpoint is present: torch takes seconds to import

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _load_npz(data: bytes, name: str) -> object:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


DEFAULT_LOADERS: dict[str, Loader] = {".json": _load_json, ".pt": _load_torch, ".npz": _load_npz}


def kept_as_bytes(data: bytes, name: str) -> object:
    """A loader for files a reader never uses (the miner's EWMA-t fallback and checkpoints): still
    hash-checked, not parsed. torch.load of every checkpoint cost the first fallback after a publish 2.5 s."""
    return data


# --------------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class DataWindow:
    start: int  # unix seconds: the first bar the artifact was fitted on
    end: int  # exclusive


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    version: str
    created: str  # ISO-8601 UTC
    code_version: str  # core.__version__
    git_sha: str | None
    data_window: DataWindow | None
    files: Mapping[str, FileEntry]
    notes: Mapping[str, str] = field(default_factory=dict)

    @property
    def checkpoints(self) -> dict[str, str]:
        """The model checkpoint files it lists, with their sha256 (none: the committed models serve)."""
        return {name: entry.sha256 for name, entry in self.files.items() if name.endswith(".pt")}

    def to_json(self) -> bytes:
        doc = {"format": MANIFEST_FORMAT, "version": self.version, "created": self.created,
               "code_version": self.code_version, "git_sha": self.git_sha,
               "data_window": None if self.data_window is None else
               {"start": self.data_window.start, "end": self.data_window.end},
               "files": {n: {"sha256": e.sha256, "size": e.size} for n, e in sorted(self.files.items())},
               "notes": dict(self.notes)}
        return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        # Not only JSONDecodeError: deep nesting raises RecursionError, an integer of over 4300 digits a
        # plain ValueError, and either escaped every ArtifactError handler (rollback included).
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ArtifactError(f"manifest is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
        if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
            raise ArtifactError(f"manifest must be an object with \"format\": {MANIFEST_FORMAT}")
        version, files, window = doc.get("version"), doc.get("files"), doc.get("data_window")
        if not isinstance(version, str) or not VERSION_NAME.match(version):
            raise ArtifactError(f"manifest version {version!r} is not a valid version name")
        if not isinstance(files, dict):
            raise ArtifactError("manifest 'files' must be an object")
        entries: dict[str, FileEntry] = {}
        for name, raw in files.items():
            if (not FILE_NAME.match(name) or name == MANIFEST_FILE or not isinstance(raw, dict)
                    or not isinstance(raw.get("sha256"), str) or type(raw.get("size")) is not int):
                raise ArtifactError(f"manifest entry {name!r} must be {{\"sha256\": str, \"size\": int}}")
            entries[name] = FileEntry(raw["sha256"], raw["size"])
        data_window = None
        if window is not None:
            if not (isinstance(window, dict) and type(window.get("start")) is int and type(window.get("end")) is int):
                raise ArtifactError("manifest 'data_window' must be null or {\"start\": int, \"end\": int}")
            data_window = DataWindow(window["start"], window["end"])
        notes = doc.get("notes") or {}
        return cls(version, str(doc.get("created", "")), str(doc.get("code_version", "")),
                   doc.get("git_sha") if isinstance(doc.get("git_sha"), str) else None, data_window, entries,
                   {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {})


@lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The checkout's commit, when the code runs from a git checkout with one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(core.__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", sha) else None


def new_version(now: datetime | None = None) -> str:
    """Sortable by creation time, unique across hosts: 20260526T130501Z-1a2b3c."""
    return f"{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


_OS_HINTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted"}


def _os_failure(action: str, exc: OSError) -> ArtifactError:
    """An ArtifactError saying what could not be done and why, in words (disk full, read-only...)."""
    hint = _OS_HINTS.get(exc.errno or 0)
    where = f" ({exc.filename})" if exc.filename else ""
    return ArtifactError(f"cannot {action}: {hint or exc.strerror or exc}{where}"
                         + (f" [{exc.strerror}]" if hint and exc.strerror else ""))


def _share_readable(directory: Path) -> None:
    """Workers may run as another user: a published version must be readable (and its folder
    searchable) by everyone, whatever the publisher's umask. Never narrows a mode."""
    for path in [directory, *directory.iterdir()]:
        mode = path.lstat().st_mode
        wanted = mode | (0o555 if path.is_dir() else 0o444)
        if path.is_symlink() or wanted == mode:
            continue
        try:
            os.chmod(path, wanted & 0o7777)
        except PermissionError as exc:  # someone else's file: it was readable enough for us to validate
            log.warning("cannot make %s readable by other users: %s", path, exc)


def _mkdir_shared(path: Path) -> None:
    """mkdir -p, with the folders it creates searchable by every user (the workers' too)."""
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        try:
            os.chmod(created, (created.stat().st_mode | 0o555) & 0o7777)
        except OSError as exc:
            log.warning("cannot make %s searchable by other users: %s", created, exc)


def _payload_names(directory: Path) -> list[str]:
    """Every file of a version directory except the manifest; anything else there is an error."""
    names = []
    for entry in sorted(directory.iterdir()):
        if entry.name == MANIFEST_FILE:
            continue
        if not entry.is_file() or entry.is_symlink() or not FILE_NAME.match(entry.name):
            raise ArtifactError(f"{entry}: only plain files with simple names belong in an artifact")
        names.append(entry.name)
    return names


def write_manifest(directory: Path, version: str | None = None, data_window: DataWindow | None = None,
                   notes: Mapping[str, str] | None = None) -> Manifest:
    """Hash every file in ``directory`` and write its manifest.json (the last file a stager writes)."""
    version = version or directory.name
    if not VERSION_NAME.match(version):
        raise ArtifactError(f"invalid version name {version!r} (letters, digits, '.', '_', '-')")
    files = {name: FileEntry(sha256_file(directory / name), (directory / name).stat().st_size)
             for name in _payload_names(directory)}
    manifest = Manifest(version, datetime.now(UTC).isoformat(timespec="microseconds"), core.__version__, git_sha(),
                        data_window, files, dict(notes or {}))
    _write_durably(directory / MANIFEST_FILE, manifest.to_json())
    _fsync_dir(directory)
    return manifest


# --------------------------------------------------------------------------------------- loaded sets


@dataclass(frozen=True)
class ArtifactSet:
    """One version, every file hash-verified and loaded."""

    version: str
    path: Path
    manifest: Manifest
    calibration: CalibrationState
    files: Mapping[str, object]  # file name -> loaded object (JSON parsed, checkpoints loaded)

    def scale(self, engine: str, asset: str, time_increment: int) -> float:
        """The calibrated sigma_scale: a core.forecast.ScaleLookup."""
        return self.calibration.scale(engine, asset, time_increment)


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


def read_set(directory: Path, loaders: Mapping[str, Loader], expected_version: str | None = None) -> ArtifactSet:
    """Read a version directory, verifying the manifest's hashes on the very bytes that get loaded."""
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    try:
        manifest = Manifest.from_json((directory / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: missing {MANIFEST_FILE} (partial artifact)") from None
    except OSError as exc:  # unreadable (permissions), a directory, an I/O error
        raise ArtifactError(f"{directory / MANIFEST_FILE}: unreadable ({exc})") from None
    except ArtifactError as exc:
        raise ArtifactError(f"{directory / MANIFEST_FILE}: {exc}") from None
    if expected_version is not None and manifest.version != expected_version:
        raise ArtifactError(f"{directory}: manifest says version {manifest.version!r}, expected {expected_version!r}")
    try:
        on_disk = set(_payload_names(directory))
    except FileNotFoundError:
        raise ArtifactError(f"{directory}: disappeared while being read") from None
    except OSError as exc:
        raise ArtifactError(f"{directory}: unreadable ({exc})") from None
    missing, extra = sorted(set(manifest.files) - on_disk), sorted(on_disk - set(manifest.files))
    if missing or extra:
        raise ArtifactError(f"{directory}: missing file(s) {missing}, unlisted file(s) {extra}")
    if CALIBRATION_FILE not in manifest.files:
        raise ArtifactError(f"{directory}: every artifact needs {CALIBRATION_FILE}")
    loaded: dict[str, object] = {}
    calibration = CalibrationState()
    for name, entry in sorted(manifest.files.items()):
        try:
            data = (directory / name).read_bytes()
        except OSError as exc:
            raise ArtifactError(f"{directory / name}: unreadable ({exc})") from None
        if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ArtifactError(f"{directory / name}: content does not match the manifest hash "
                                f"({len(data)} bytes, manifest says {entry.size})")
        loader = loaders.get(Path(name).suffix)
        if loader is None:
            raise ArtifactError(f"{directory / name}: no loader for {Path(name).suffix or 'files without suffix'}")
        try:
            loaded[name] = loader(data, name)
            if name == CALIBRATION_FILE:
                calibration = CalibrationState.from_json(data)
        except CalibrationError as exc:
            raise ArtifactError(f"{directory / name}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a loader may raise anything on a bad file
            raise ArtifactError(f"{directory / name}: does not load ({type(exc).__name__}: {exc})") from None
    return ArtifactSet(manifest.version, directory, manifest, calibration, loaded)


# ---------------------------------------------------------------------------------- sample forecast


@lru_cache(maxsize=32)
def _sample_snapshot(asset: str) -> MarketSnapshot:
    """A day of seeded 1-minute GBM bars at the asset's table volatility: enough for EWMA."""
    n = 1440
    rng = np.random.default_rng(0)
    step_sigma = spec_for_any(asset).hourly_sigma / np.sqrt(60.0)
    close = 1000.0 * np.exp(np.cumsum(rng.normal(0.0, step_sigma, n)))
    ts = SAMPLE_START - 60 * n + 60 * np.arange(n, dtype=np.int64)
    m1 = PriceHistory(60, ts, close)
    return MarketSnapshot(asset, m1, m1.resample(300), float(close[-1]), SAMPLE_START)


def sample_forecast_check(artifact: ArtifactSet) -> None:
    """The EWMA engine at every calibrated scale must yield a response the validators accept."""
    engine = EwmaTEngine()
    keys = {(e.asset, e.time_increment, e.scale) for e in artifact.calibration.entries.values()
            if e.time_increment in GRIDS}
    keys |= {("BTC", inc, artifact.scale(engine.name, "BTC", inc)) for inc in GRIDS}
    for asset, inc, scale in sorted(keys):
        request = ForecastRequest(asset, SAMPLE_START, inc, GRIDS[inc], SAMPLE_PATHS)
        try:
            paths = engine.forecast(request, _sample_snapshot(asset), np.random.default_rng(0), scale)
            build_response(request, paths)
        except (ResponseError, ValueError) as exc:
            raise ArtifactError(f"sample forecast {asset} {inc}s at scale {scale:g} fails: {exc}") from None


def model_checkpoint_check(artifact: ArtifactSet) -> None:
    """A ``<kind>.pt`` is what the PatchTST engine will serve: it must be a checkpoint of that kind
    this code builds (same checks as ``core.checkpoint.load``), or the set is refused before publish."""
    names = sorted(n for n in artifact.files if n.endswith(".pt"))
    if not names:
        return
    from core.checkpoint import KINDS, CheckpointError, build_model, from_payload  # torch: only with checkpoints

    for name in names:
        kind = name.removesuffix(".pt")
        if kind not in KINDS:
            continue  # another torch file (e.g. a state dict): loading it was the check
        payload = artifact.files[name]
        try:
            if not isinstance(payload, dict):
                raise CheckpointError("not a checkpoint dictionary")
            build_model(from_payload(payload, expected_kind=kind))
        except CheckpointError as exc:
            raise ArtifactError(f"{artifact.path / name}: not a servable {kind} model ({exc})") from None


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
            _mkdir_shared(self.staging_dir)
            directory.mkdir(exist_ok=False)
        except FileExistsError:
            raise ArtifactError(f"{directory} already exists: stage under another version name") from None
        except OSError as exc:
            raise _os_failure(f"stage {version} in {self.staging_dir}", exc) from None
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
                        _write_durably(directory / name, data)
            for name, data in files.items():
                _write_durably(directory / name, data)
            write_manifest(directory, version, data_window, notes)
        except BaseException as exc:
            shutil.rmtree(directory, ignore_errors=True)  # no half-written staging folder left behind
            if isinstance(exc, OSError):
                raise _os_failure(f"stage {version} in {directory}", exc) from None
            raise
        self.prune_staging()
        return directory

    def prune_staging(self, keep_s: float = STAGING_KEEP_S, keep_newest: int = STAGING_KEEP_NEWEST,
                      now: float | None = None) -> list[str]:
        """Remove staged sets (and the retrain's ``models-<stamp>`` checkpoints) older than ``keep_s``, except
        the newest ``keep_newest``. Every hourly calibration the gate refuses leaves a whole set here (about
        1 MB once models are published): without this, about 9 GB a year. Best effort: never fails a stage."""
        now = time.time() if now is None else now
        try:
            entries = sorted((p.stat().st_mtime, p) for p in self.staging_dir.iterdir() if p.is_dir())
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
    @contextmanager
    def _locked(self) -> Iterator[None]:
        path = self.root / LOCK_FILE
        try:
            _mkdir_shared(self.root)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except PermissionError:  # another user's lock file: flock needs only a readable descriptor
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _os_failure(f"open the publish lock {path}", exc) from None
        try:
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and st.st_mode & 0o044 != 0o044:
                os.fchmod(fd, (st.st_mode | 0o444) & 0o7777)  # other users' publishers must be able to open it
            deadline = time.monotonic() + self.lock_timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ArtifactError(f"another publisher has held {path} "
                                            f"for {self.lock_timeout_s:g} s") from None
                    time.sleep(0.02)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

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
                _mkdir_shared(self.versions_dir)
                _share_readable(staging_dir)
            except OSError as exc:
                raise _os_failure(f"publish {version}", exc) from None
            copied = self._move_in(staging_dir, target)
            try:
                self.load(version)  # the moved copy is what `current` will serve
                self._switch(version)
            except BaseException as exc:
                self._move_back(target, staging_dir, copied)
                if isinstance(exc, OSError):
                    raise _os_failure(f"switch {self.current_link} to {version}", exc) from None
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
                self._switch(to)
            except OSError as exc:
                raise _os_failure(f"roll back {self.current_link} to {to}", exc) from None
        log.warning("rolled back artifacts %s -> %s", current, to)
        return to

    def prune(self) -> list[str]:
        with self._locked():
            return self._prune_locked()

    def _move_in(self, source: Path, target: Path) -> bool:
        """Move a validated staging folder to ``versions/``; True when it had to be copied (another file
        system), in which case the source is left for the caller to remove once the publish is done."""
        try:
            os.rename(source, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise _os_failure(f"move {source} to {target}", exc) from None
            incoming = self.versions_dir / f".incoming-{target.name}-{secrets.token_hex(4)}"
            try:
                # File by file, not copytree: a validated set holds plain files only, and copytree would
                # collect a full disk's errors into one list instead of stopping with the first errno.
                incoming.mkdir()
                for path in source.iterdir():
                    copied_file = Path(shutil.copy2(path, incoming / path.name))
                    with copied_file.open("rb") as fh:
                        os.fsync(fh.fileno())
                shutil.copystat(source, incoming)  # the folder's mode too: searchable by the workers' user
                _fsync_dir(incoming)
                os.rename(incoming, target)
            except OSError as copy_exc:
                shutil.rmtree(incoming, ignore_errors=True)
                raise _os_failure(f"copy {source} to {target}", copy_exc) from None
            copied = True
        else:
            copied = False
        try:
            _fsync_dir(self.versions_dir)
        except OSError as exc:
            log.warning("%s: fsync failed (%s)", self.versions_dir, exc)
        return copied

    def _move_back(self, target: Path, source: Path, copied: bool) -> None:
        """Undo ``_move_in`` after a failed switch, so the staging folder can be published again."""
        if self._current_or_none() == target.name:
            return  # the switch did happen: the version is published and stays
        if copied:
            shutil.rmtree(target, ignore_errors=True)  # the staging original is still in place
            return
        try:
            os.rename(target, source)
        except OSError as exc:
            log.error("could not move %s back to %s (%s): it stays there, unpublished", target, source, exc)

    def _switch(self, version: str) -> None:
        """Point ``current`` at ``version`` in one rename; readers see the old target or the new one."""
        link = self.current_link
        tmp = self.root / f".current-{os.getpid()}-{secrets.token_hex(4)}"
        os.symlink(f"{VERSIONS}/{version}", tmp)
        try:
            if link.is_dir() and not link.is_symlink():
                self._retire_plain_current(link)
            os.replace(tmp, link)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:
            _fsync_dir(self.root)
        except OSError as exc:  # every reader already sees the new target; only durability is in doubt
            log.warning("%s -> %s switched, but fsync of %s failed: %s", link, version, self.root, exc)

    @staticmethod
    def _retire_plain_current(link: Path) -> None:
        leftovers = [p.name for p in link.iterdir() if not p.name.startswith(".")]
        if leftovers:
            raise ArtifactError(f"{link} is a plain directory holding {leftovers}: move them into a staged "
                                "version and publish it; nothing is deleted")
        shutil.rmtree(link)

    def _prune_locked(self, also_keep: str | None = None) -> list[str]:
        """Remove all but the newest ``keep`` versions, never the current one nor ``also_keep`` (the
        version that was current until this publish: workers may still be loading it, and it is the
        known-good way back when the newest ones are versions a rollback moved away from), nor the
        ``keep - 1`` sets the current one was built on in turn (where repeated rollbacks go), nor the
        newest one serving other models (``rollback(models=True)``: hourly calibrations would otherwise
        prune the last set serving the models before a retrain within a few hours)."""
        current = self.current_version()
        infos = self.list_versions()
        names = [v.version for v in infos]
        keep = set(names[-self.keep:]) | {v for v in (current, also_keep, previous_models(infos, current)) if v}
        built_on = {v.version: v.notes.get(BUILT_ON_NOTE) for v in infos}
        step = current
        for _ in range(self.keep - 1):
            step = built_on.get(step) if step else None
            if not step:
                break
            keep.add(step)
        removed: list[str] = []
        for name in names:
            if name in keep:
                continue
            trash = self.versions_dir / f".trash-{name}-{secrets.token_hex(4)}"
            try:
                os.rename(self.versions_dir / name, trash)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if removed:
                    log.info("pruned artifact versions %s", removed)
                raise _os_failure(f"prune version {name}", exc) from None
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(name)
        # Left by an interrupted prune, copy or switch (each made only under this lock: none is live).
        for leftover in [*self.versions_dir.glob(".trash-*"), *self.versions_dir.glob(".incoming-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        for stale in self.root.glob(".current-*"):
            if stale.is_symlink():
                stale.unlink(missing_ok=True)
        if removed:
            log.info("pruned artifact versions %s", removed)
        return removed


# ----------------------------------------------------------------------------------------- watchers


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

"""The files of an artifact set on disk: their names, the manifest that lists them with their hashes, and
the durable, shared-readable way they are written (fsync, permissions for the workers' user, OS errors in words).

``core.artifacts`` describes the store's layout; this module knows nothing of loading or publishing.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import core

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
BUILT_ON_NOTE = "built_on"  # manifest note of an inherited set: the version whose other files it copied
NORM_STATS_FILE = "norm_stats.json"
MANIFEST_FORMAT = 1
CURRENT, VERSIONS, STAGING, LOCK_FILE = "current", "versions", "staging", ".publish.lock"
VERSION_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
FILE_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")
_CHUNK = 1 << 20


class ArtifactError(RuntimeError):
    """An artifact set that is missing, corrupt, partial or cannot be published / rolled back."""


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


def payload_names(directory: Path) -> list[str]:
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
             for name in payload_names(directory)}
    manifest = Manifest(version, datetime.now(UTC).isoformat(timespec="microseconds"), core.__version__, git_sha(),
                        data_window, files, dict(notes or {}))
    write_durably(directory / MANIFEST_FILE, manifest.to_json())
    fsync_dir(directory)
    return manifest


# ------------------------------------------------------------------------------------- durable writes


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


_OS_HINTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
             errno.EPERM: "operation not permitted"}


def os_failure(action: str, exc: OSError) -> ArtifactError:
    """An ArtifactError saying what could not be done and why, in words (disk full, read-only...)."""
    hint = _OS_HINTS.get(exc.errno or 0)
    where = f" ({exc.filename})" if exc.filename else ""
    return ArtifactError(f"cannot {action}: {hint or exc.strerror or exc}{where}"
                         + (f" [{exc.strerror}]" if hint and exc.strerror else ""))


def share_readable(directory: Path) -> None:
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


def mkdir_shared(path: Path) -> None:
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

"""Reading one version directory: its files hash-checked against the manifest on the very bytes that get
loaded, each loaded by its suffix's loader, into an ``ArtifactSet``."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.artifact_files import MANIFEST_FILE, ArtifactError, Manifest, payload_names
from core.calibration import CALIBRATION_FILE, CalibrationError, CalibrationState

Loader = Callable[[bytes, str], object]  # (verified file bytes, file name) -> loaded object; raises if bad


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
        on_disk = set(payload_names(directory))
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

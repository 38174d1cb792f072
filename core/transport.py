"""Compact binary results between a worker and the miner: float32 paths and the engine that made them,
or an error message.

A JSON list of 289k floats costs ~300 ms to encode and decode; raw float32 bytes pushed onto a
Redis list and awaited with BLPOP cost ~16 ms (../shared/docs/platform-notes.md §4).

Layout: ``P2`` + int32 [n_paths, n_points, tag_bytes] + tag (UTF-8: engine, NUL, the engine's own
fallback reason) + float32 paths. ``P1`` (no tag) is still read, so a miner can be upgraded before or
after its workers.
"""

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.constants import RESULT_DTYPE, RESULT_HEADER_DTYPE

PATHS_MAGIC = b"P2"
UNTAGGED_PATHS_MAGIC = b"P1"  # an earlier worker's blob: paths only
ERROR_MAGIC = b"E1"
_INT = np.dtype(RESULT_HEADER_DTYPE).itemsize
TEXT_MAX_BYTES = 2000  # an error message, or an engine and its reason


class TransportError(ValueError):
    """A result blob that is truncated, of the wrong shape, or an error reported by the worker."""


@dataclass(frozen=True)
class ComputedPaths:
    """What a forecast produced: the paths and which engine made them (a worker's own EWMA-t stand-in
    shows here, not as the model)."""

    paths: npt.NDArray[np.float32]
    engine: str  # "" when the producer did not say (a P1 worker)
    fallback_reason: str | None = None  # why the engine asked for was not the one that answered
    resent_after: str | None = None  # set by the miner's pool: why it sent the request again (its worker stopped)


def encode_paths(paths: npt.NDArray[np.floating], engine: str = "", fallback_reason: str | None = None) -> bytes:
    if paths.ndim != 2:
        raise TransportError(f"paths must be 2-D, got shape {paths.shape}")
    if "\0" in engine:
        raise TransportError("engine name holds a NUL byte")
    tag = (engine + ("" if fallback_reason is None else "\0" + fallback_reason)).encode("utf-8", "replace")
    tag = tag[:TEXT_MAX_BYTES].decode("utf-8", "ignore").encode("utf-8")  # cut on a character boundary
    header = np.asarray([*paths.shape, len(tag)], dtype=RESULT_HEADER_DTYPE).tobytes()
    return PATHS_MAGIC + header + tag + np.ascontiguousarray(paths, dtype=RESULT_DTYPE).tobytes()


def encode_error(message: str) -> bytes:
    return ERROR_MAGIC + message.encode("utf-8", "replace")[:TEXT_MAX_BYTES]


def decode_result(blob: bytes) -> ComputedPaths:
    """float32[n, m] paths and their engine; raises TransportError for an error blob or a malformed one."""
    magic = blob[:2]
    if magic == ERROR_MAGIC:
        raise TransportError("worker error: " + blob[2:].decode("utf-8", "replace"))
    fields = 3 if magic == PATHS_MAGIC else 2 if magic == UNTAGGED_PATHS_MAGIC else 0
    if not fields:
        raise TransportError("not a paths blob")
    start = 2 + fields * _INT
    if len(blob) < start:
        raise TransportError("paths blob shorter than its header")
    n, m, *rest = (int(v) for v in np.frombuffer(blob, dtype=RESULT_HEADER_DTYPE, count=fields, offset=2))
    tag_len = rest[0] if rest else 0
    if not 0 <= tag_len <= min(TEXT_MAX_BYTES, len(blob) - start):
        raise TransportError(f"paths blob names a tag of {tag_len} bytes")
    body = len(blob) - start - tag_len
    if n <= 0 or m <= 0 or body != n * m * np.dtype(RESULT_DTYPE).itemsize:
        raise TransportError(f"paths blob of {body} bytes does not hold {n}x{m} float32")
    engine, sep, reason = blob[start:start + tag_len].decode("utf-8", "replace").partition("\0")
    paths = np.frombuffer(blob, dtype=RESULT_DTYPE, offset=start + tag_len).reshape(n, m).astype(np.float32)
    return ComputedPaths(paths, engine, reason if sep else None)


def decode_paths(blob: bytes) -> npt.NDArray[np.float32]:
    """The paths alone (see decode_result)."""
    return decode_result(blob).paths

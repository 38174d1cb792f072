"""Worker heartbeats as read back from Redis: which processes are alive and which queues they read.

Workers write one JSON document per process under ``WORKER_HEARTBEAT_KEY`` (see workers/metrics.py);
`synth-miner status` lists them and the miner skips the pool for a queue no live process reads.
"""

import json
import math
from collections.abc import Iterable
from typing import Any

from core.constants import HEARTBEAT_STALE_AFTER_S, WORKER_HEARTBEAT_KEY

HEARTBEAT_PATTERN = WORKER_HEARTBEAT_KEY.format(name="*")


def parse_heartbeat(raw: bytes | str | None) -> dict[str, Any] | None:
    """One heartbeat document, or None for a key gone between SCAN and GET or holding something else."""
    if not raw:
        return None
    try:
        beat = json.loads(raw)
        at = float(beat["at"])
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    # A NaN or infinite time read as never stale (alive for as long as the key lasted) or as NaN seconds silent.
    if not isinstance(beat, dict) or not math.isfinite(at):
        return None
    beat["at"] = at
    return beat


def silent_for(beat: dict[str, Any], now: float) -> float:
    return now - float(beat["at"])


def is_alive(beat: dict[str, Any], now: float) -> bool:
    return silent_for(beat, now) < HEARTBEAT_STALE_AFTER_S


def queues_of(beat: dict[str, Any]) -> set[str]:
    queues = beat.get("queues")  # comma-separated; anything else announces none
    return {q for q in queues.split(",") if q} if isinstance(queues, str) else set()


def live_queues(beats: Iterable[dict[str, Any]], now: float) -> set[str]:
    """The queues at least one live process reads."""
    return {q for beat in beats if is_alive(beat, now) for q in queues_of(beat)}

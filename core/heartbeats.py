"""Worker heartbeats as read back from Redis: which processes are alive and which queues they read.

Workers write one JSON document per process under ``WORKER_HEARTBEAT_KEY`` with a TTL of HEARTBEAT_TTL_S (see
workers/metrics.py); `synth-miner status` lists them and the miner skips the pool for a queue no live process reads.
A beat's "at" is the worker's own clock: how long ago it was written is read from the key's TTL left instead
(Redis's measure, which no skewed host clock affects), and the difference between the two is the worker's clock skew.
"""

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from core.constants import HEARTBEAT_STALE_AFTER_S, HEARTBEAT_TTL_S, WORKER_HEARTBEAT_KEY

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


def key_age(pttl: Any) -> float | None:
    """Seconds since the heartbeat key was written, from its TTL left (PTTL, milliseconds), or None where that
    cannot tell: no TTL (-1), a key gone (-2), a TTL longer than the workers write, or a failed read."""
    if not isinstance(pttl, int) or isinstance(pttl, bool) or not 0 < pttl <= HEARTBEAT_TTL_S * 1000:
        return None
    return HEARTBEAT_TTL_S - pttl / 1000


@dataclass(frozen=True)
class Reading:
    """One process's heartbeat as a reader sees it at ``now`` (its own clock), with the key's age in Redis."""

    beat: dict[str, Any]
    age_s: float | None  # None: judged by the clocks alone, as before ages were read (see key_age)
    now: float

    @property
    def silent_s(self) -> float:
        """Seconds since the worker last announced itself: Redis's measure where known, else the clocks'."""
        return self.age_s if self.age_s is not None else self.now - float(self.beat["at"])

    @property
    def alive(self) -> bool:
        return self.silent_s < HEARTBEAT_STALE_AFTER_S

    @property
    def skew_s(self) -> float | None:
        """How far the worker's clock is ahead of the reader's (negative: behind): the time it wrote in the beat
        against the reader's clock when Redis wrote the key. None where the key's age is unknown."""
        return None if self.age_s is None else float(self.beat["at"]) - (self.now - self.age_s)

    @property
    def ahead_s(self) -> float:
        """How far its clock runs ahead of the reader's (0 where on time, behind or unknown)."""
        return max(0.0, self.skew_s or 0.0)


def queues_of(beat: dict[str, Any]) -> set[str]:
    queues = beat.get("queues")  # comma-separated; anything else announces none
    return {q for q in queues.split(",") if q} if isinstance(queues, str) else set()


def live_readers(readings: Iterable[Reading], lost: Mapping[str, float] | None = None) -> dict[str, float]:
    """Each queue at least one live process reads, with how far ahead of the reader's clock the least-ahead of
    them runs: a task's ``expires`` is judged by the worker's clock, so this is how much sooner it expires there.

    ``lost``: worker name -> when (the reader's clock) it was seen to stop mid-task (its forecast's lease lapsed).
    Its heartbeat looks alive for up to HEARTBEAT_STALE_AFTER_S more, but it reads nothing until it beats again
    (a frozen process that resumes); a killed one never does."""
    readers: dict[str, float] = {}
    lost = lost or {}
    for reading in readings:
        stopped_at = lost.get(str(reading.beat.get("name")))
        if stopped_at is not None and reading.now - reading.silent_s <= stopped_at:
            continue
        if reading.alive:
            for queue in queues_of(reading.beat):
                readers[queue] = min(readers.get(queue, math.inf), reading.ahead_s)
    return readers

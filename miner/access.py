"""Who may ask: signed requests only, from allowed or registered, staked validators, at a sane rate."""

import json
import logging
import math
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Neuron:
    hotkey: str
    stake: float
    validator_permit: bool


class MetagraphView:
    """The registered hotkeys with stake and permit; replaced wholesale on each refresh (no partial reads)."""

    def __init__(self, neurons: dict[str, Neuron] | None = None, loaded: bool = False) -> None:
        self._neurons = neurons or {}
        self.loaded = loaded
        self.updated_at = time.time() if loaded else 0.0
        self._lock = threading.Lock()

    def replace(self, neurons: dict[str, Neuron]) -> None:
        with self._lock:
            self._neurons = neurons
            self.loaded = True
            self.updated_at = time.time()

    def get(self, hotkey: str) -> Neuron | None:
        with self._lock:
            return self._neurons.get(hotkey)

    def __len__(self) -> int:
        return len(self._neurons)

    @classmethod
    def from_file(cls, path: Path) -> "MetagraphView":
        """Static metagraph for --local mode: a JSON list of {hotkey, stake, validator_permit}."""
        try:
            rows = json.loads(path.read_text())
            if not isinstance(rows, list):
                raise TypeError(f"the file holds a JSON {type(rows).__name__}, not a list")
            neurons = {n.hotkey: n for n in map(_neuron_row, rows)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, (KeyError, AttributeError)) else str(exc)
            raise ValueError(f"metagraph file {path} is not a JSON list of {{hotkey, stake, validator_permit}} "
                             f"({' '.join(detail.split())[:200]})") from None
        return cls(neurons, loaded=True)


def _neuron_row(row: object) -> Neuron:
    """One row of a metagraph file, read strictly: ``bool("false")`` is True and NaN passes every
    comparison, so a loose read would serve a caller the file says has no permit or no stake."""
    if not isinstance(row, dict):
        raise TypeError(f"a row is a JSON {type(row).__name__}, not an object")
    hotkey, stake, permit = row["hotkey"], row.get("stake", 0.0), row.get("validator_permit", False)
    if not isinstance(hotkey, str) or not hotkey:
        raise TypeError(f"hotkey {hotkey!r} is not an address")
    if isinstance(stake, bool) or not isinstance(stake, (int, float)) or not math.isfinite(stake):
        raise TypeError(f"{hotkey}: stake {stake!r} is not a number")
    if not isinstance(permit, bool):
        raise TypeError(f"{hotkey}: validator_permit {permit!r} is not true or false")
    return Neuron(hotkey, float(stake), permit)


class RateLimiter:
    """At most ``per_minute`` requests per hotkey in any sliding 60-second window."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._hits: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._sweep_at = 1024  # map size that triggers dropping idle hotkeys

    def allow(self, hotkey: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._hits) >= self._sweep_at:
                # Every signed hotkey that got this far kept its entry for good (all of them where
                # --local serves any signer): drop those idle for a window. Amortised: the next sweep
                # waits until the map has doubled from what is left.
                for idle in [k for k, h in self._hits.items() if not h or h[-1] <= now - 60.0]:
                    del self._hits[idle]
                self._sweep_at = max(1024, 2 * len(self._hits))
            hits = self._hits[hotkey]
            while hits and hits[0] <= now - 60.0:
                hits.popleft()
            if len(hits) >= self.per_minute:
                return False
            hits.append(now)
            return True


class AccessPolicy:
    def __init__(self, settings: Settings, metagraph: MetagraphView) -> None:
        self.settings = settings
        self.metagraph = metagraph
        self.allowed = frozenset(settings.allowed_hotkeys)
        self.rate = RateLimiter(settings.rate_limit_per_minute)

    def refuse(self, hotkey: str | None, signed: bool) -> str | None:
        """The reason to refuse this caller, or None to serve it."""
        if not hotkey or not signed:
            return "unsigned request"
        if self.allowed and hotkey not in self.allowed:
            return "hotkey not in the allow-list"
        if not self.metagraph.loaded:
            # --local without a metagraph file: the allow-list alone decides. In production nobody is
            # served before the first metagraph read, which miner/chain.py retries within seconds.
            return None if self.settings.local else "metagraph not read yet: try again shortly"
        neuron = self.metagraph.get(hotkey)
        if neuron is None:
            return "hotkey not registered on the subnet"
        if not neuron.stake >= self.settings.min_validator_stake:  # NaN (no number) never passes
            return f"stake {neuron.stake:.0f} below the minimum {self.settings.min_validator_stake:.0f}"
        if self.settings.force_validator_permit and not neuron.validator_permit:
            return "no validator permit"
        return None

    def over_rate(self, hotkey: str) -> str | None:
        """Spend one request of the hotkey's budget; the reason to refuse once it is spent.

        Called only after the signature is verified: charged before, a forged request carrying a
        validator's (public) hotkey would use up that validator's budget and lock it out.
        """
        if not self.rate.allow(hotkey):
            return f"rate limit exceeded: at most {self.rate.per_minute} requests per minute per hotkey"
        return None

    def priority(self, hotkey: str | None) -> float:
        neuron = self.metagraph.get(hotkey) if hotkey else None
        return float(neuron.stake) if neuron else 0.0

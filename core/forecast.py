"""The forecast service: pick the engine, seed the RNG, apply calibration, fall back when it fails."""

import logging
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from core.engines.base import Engine, Float32Array
from core.engines.ewma import EwmaTEngine
from core.engines.gbm import GbmEngine
from core.prices import MarketSnapshot
from core.prompts import ForecastRequest
from core.response import WIRE_MAX, WIRE_MIN

log = logging.getLogger(__name__)

FALLBACK_ENGINE = "ewma_t"


def rng_for(request: ForecastRequest, seed: int | None) -> np.random.Generator:
    """Seeded: depends only on the seed and the request (not on other requests). Unseeded: fresh entropy."""
    if seed is None:
        return np.random.default_rng()
    return np.random.default_rng([seed, zlib.crc32(request.key().encode())])


def paths_usable(paths: Float32Array, request: ForecastRequest) -> str | None:
    """Why these paths cannot be sent, or None when they can."""
    if paths.shape != (request.num_simulations, request.n_points):
        return f"shape {paths.shape} != {(request.num_simulations, request.n_points)}"
    if not np.all(np.isfinite(paths)) or not np.all(paths > 0):
        return "non-finite or non-positive prices"
    if paths.min() <= WIRE_MIN or paths.max() >= WIRE_MAX:  # finite, but no reply could carry them
        return f"prices outside the sendable range ({WIRE_MIN:g}, {WIRE_MAX:g})"
    return None


@dataclass(frozen=True)
class ForecastResult:
    paths: Float32Array
    engine: str
    fallback_reason: str | None
    seconds: float


# A function giving the calibrated sigma multiplier for (engine, asset, time_increment).
ScaleLookup = Callable[[str, str, int], float]


def no_calibration(engine: str, asset: str, time_increment: int) -> float:
    return 1.0


def default_engines() -> dict[str, Engine]:
    return {"gbm": GbmEngine(), "ewma_t": EwmaTEngine()}


class ForecasterSource(Protocol):
    def current(self) -> "Forecaster":
        ...


class Forecaster:
    def __init__(self, engines: Mapping[str, Engine] | None = None, default: str = FALLBACK_ENGINE,
                 seed: int | None = None, scale: ScaleLookup = no_calibration) -> None:
        self.engines = dict(engines or default_engines())
        if default not in self.engines:
            raise KeyError(f"unknown engine {default!r}; known: {sorted(self.engines)}")
        self.default = default
        self.seed = seed
        self.scale = scale
        self.fallback = self.engines.get(FALLBACK_ENGINE) or EwmaTEngine()

    @property
    def device(self) -> str:
        """Where the default engine computes: a PatchTST engine's torch device, ``cpu`` for the others."""
        return str(getattr(self.engines[self.default], "device", "cpu"))

    @property
    def models(self) -> dict[str, str]:
        """The checkpoint file serving each model kind (a published artifact's or a committed one);
        empty when the default engine is a statistical one."""
        return {kind: str(path) for kind, path in sorted(getattr(self.engines[self.default], "sources", {}).items())}

    def current(self) -> "Forecaster":
        """A fixed forecaster is its own current version (LiveForecaster reloads on publication)."""
        return self

    def run(self, request: ForecastRequest, snapshot: MarketSnapshot, engine: str | None = None) -> ForecastResult:
        """Paths from the chosen engine, or from the EWMA-t fallback if it fails or emits garbage."""
        name = engine or self.default
        began = time.perf_counter()
        reason: str | None = None
        try:
            primary = self.engines[name]
            paths = primary.forecast(request, snapshot, rng_for(request, self.seed),
                                     self.scale(name, request.asset, request.time_increment))
            reason = paths_usable(paths, request)
            if reason is None:
                return ForecastResult(paths, name, None, time.perf_counter() - began)
        except Exception as exc:  # any engine failure must still produce an answer
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("engine %s failed for %s (%s); using %s", name, request.key(), reason, FALLBACK_ENGINE)
        paths = self.fallback.forecast(request, snapshot, rng_for(request, self.seed),
                                       self.scale(FALLBACK_ENGINE, request.asset, request.time_increment))
        return ForecastResult(paths, FALLBACK_ENGINE, reason, time.perf_counter() - began)

"""The engine interface. Most engines emit per-step Student-t parameters and share the path sampler."""

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from core.path_sampling import LatentVol, sample_paths
from core.prices import MarketSnapshot
from core.prompts import ForecastRequest

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]


class EngineError(RuntimeError):
    """The engine cannot forecast this request (missing model, unusable history...)."""


@dataclass(frozen=True)
class StepParams:
    """Per-step law of the log return: location, standard deviation and tail index."""

    mu: FloatArray  # [n_steps]
    sigma: FloatArray  # [n_steps], std of the one-step log return
    nu: FloatArray | float
    latent: LatentVol = field(default_factory=LatentVol)


class Engine(Protocol):
    name: str

    def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, rng: np.random.Generator,
                 sigma_scale: float = 1.0) -> Float32Array:
        """Prices float32[num_simulations, n_steps + 1] starting at the snapshot's anchor."""
        ...


class ParametricEngine:
    """Base for engines that produce StepParams; subclasses implement ``params``."""

    name = "parametric"

    def params(self, request: ForecastRequest, snapshot: MarketSnapshot) -> StepParams:
        raise NotImplementedError

    def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, rng: np.random.Generator,
                 sigma_scale: float = 1.0) -> Float32Array:
        p = self.params(request, snapshot)
        return sample_paths(snapshot.anchor, p.mu, p.sigma, p.nu, request.num_simulations, rng,
                            p.latent, sigma_scale)

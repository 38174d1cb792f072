"""The reference miner's generator: zero-drift GBM with a fixed hourly sigma per asset, cumprod(1 + r)."""

import numpy as np

from core.assets import spec_for_any
from core.engines.base import Float32Array
from core.prices import MarketSnapshot
from core.prompts import ForecastRequest


class GbmEngine:
    name = "gbm"

    def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, rng: np.random.Generator,
                 sigma_scale: float = 1.0) -> Float32Array:
        sigma = spec_for_any(request.asset).hourly_sigma * np.sqrt(request.time_increment / 3600) * sigma_scale
        returns = rng.normal(0.0, sigma, size=(request.num_simulations, request.n_steps))
        prices = np.empty((request.num_simulations, request.n_points), dtype=np.float32)
        prices[:, 0] = snapshot.anchor
        # 1 + r stays > 0: sigma per step is far below 1, and clip guards the 30-sigma tail anyway.
        prices[:, 1:] = snapshot.anchor * np.cumprod(np.clip(1.0 + returns, 1e-3, None), axis=1)
        return prices

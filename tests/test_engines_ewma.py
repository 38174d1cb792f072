import numpy as np
import pytest

from core.engines.ewma import EwmaTEngine, ewma_variance
from core.engines.gbm import GbmEngine
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest


def gbm_history(step: int, n: int, sigma: float, seed: int = 0) -> PriceHistory:
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0, sigma, n)))
    return PriceHistory.from_arrays(step, np.arange(n) * step, close)


def test_ewma_variance_recovers_constant_vol() -> None:
    returns = np.random.default_rng(0).normal(0, 0.002, 50_000)
    assert abs(np.sqrt(ewma_variance(returns, 2_000)) / 0.002 - 1) < 0.05


def test_ewma_variance_weights_the_newest_returns_most() -> None:
    """A shock's weight halves every half-life back: reversed weights (the oldest return counting most)
    still recover a constant volatility, but lag every regime change by the whole window."""
    half_life = 10.0

    def with_shock(age: int) -> float:
        returns = np.zeros(500)
        returns[-1 - age] = 1.0
        return ewma_variance(returns, half_life)

    assert with_shock(10) / with_shock(0) == pytest.approx(0.5)
    assert with_shock(20) / with_shock(0) == pytest.approx(0.25)


def test_sigma_follows_history_at_the_prompt_step() -> None:
    m1 = gbm_history(60, 20_000, 0.001)
    snap = MarketSnapshot("BTC", m1, None, float(m1.close[-1]), int(m1.ts[-1]) + 60)
    engine = EwmaTEngine()
    hf = engine.params(ForecastRequest("BTC", 0, 60, 3_600, 100), snap)
    lf = engine.params(ForecastRequest("BTC", 0, 300, 86_400, 100), snap)  # from 1m resampled to 5m
    assert abs(hf.sigma.mean() / 0.001 - 1) < 0.25
    assert abs(lf.sigma.mean() / (0.001 * np.sqrt(5)) - 1) < 0.25


def test_only_5m_history_still_serves_1m_prompts() -> None:
    m5 = gbm_history(300, 5_000, 0.003)
    snap = MarketSnapshot("NEWCOIN", None, m5, float(m5.close[-1]), int(m5.ts[-1]) + 300)
    params = EwmaTEngine().params(ForecastRequest("NEWCOIN", 0, 60, 3_600, 100), snap)
    assert abs(params.sigma.mean() / (0.003 / np.sqrt(5)) - 1) < 0.3


def test_no_history_uses_the_asset_table() -> None:
    snap = MarketSnapshot("BTC", None, None, 50_000.0, 0)
    params = EwmaTEngine().params(ForecastRequest("BTC", 0, 60, 3_600, 10), snap)
    assert np.allclose(params.sigma, 0.00541 * np.sqrt(60 / 3600))


def test_engines_emit_positive_paths_from_the_anchor() -> None:
    m1 = gbm_history(60, 5_000, 0.001)
    snap = MarketSnapshot("BTC", m1, None, 123.45, 0)
    request = ForecastRequest("BTC", 0, 300, 86_400, 500)
    for engine in (EwmaTEngine(), GbmEngine()):
        paths = engine.forecast(request, snap, np.random.default_rng(0))
        assert paths.shape == (500, 289) and paths.dtype == np.float32
        assert np.all(paths[:, 0] == np.float32(123.45)) and np.all(paths > 0) and np.all(np.isfinite(paths))

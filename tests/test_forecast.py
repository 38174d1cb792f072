import numpy as np

from core.engines.base import EngineError
from core.forecast import Forecaster, default_engines
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest

SNAP = MarketSnapshot("BTC", PriceHistory.from_arrays(60, np.arange(2000) * 60,
                                                      100 * np.exp(np.cumsum(np.full(2000, 1e-4)))), None, 100.0, 0)
REQ = ForecastRequest("BTC", 1_000_000, 60, 3_600, 200)


class Broken:
    name = "broken"

    def forecast(self, request, snapshot, rng, sigma_scale=1.0):  # type: ignore[no-untyped-def]
        raise EngineError("model file missing")


class Garbage:
    name = "garbage"

    def forecast(self, request, snapshot, rng, sigma_scale=1.0):  # type: ignore[no-untyped-def]
        return np.full((request.num_simulations, request.n_points), np.nan, np.float32)


class Unsendable:
    """Finite, positive paths no reply can carry: HEAD refuses every float from 1e7 up (9 characters)."""
    name = "unsendable"

    def forecast(self, request, snapshot, rng, sigma_scale=1.0):  # type: ignore[no-untyped-def]
        return np.full((request.num_simulations, request.n_points), 2e7, np.float32)


def test_seeded_runs_depend_only_on_seed_and_request() -> None:
    a = Forecaster(seed=7).run(REQ, SNAP).paths
    b = Forecaster(seed=7).run(REQ, SNAP).paths
    c = Forecaster(seed=8).run(REQ, SNAP).paths
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_seeded_runs_of_different_requests_draw_different_numbers() -> None:
    """Seeded backtests score many prompts: with one stream for every request, each prompt's (and each
    asset's) paths would share their innovations and the prompts' errors would be perfectly correlated."""
    later = ForecastRequest("BTC", REQ.start_ts + 60, 60, 3_600, 200)  # same snapshot, so the same laws
    a = Forecaster(seed=7).run(REQ, SNAP).paths
    b = Forecaster(seed=7).run(later, SNAP).paths
    assert not np.array_equal(a, b)


def test_failing_or_garbage_engine_falls_back_to_ewma() -> None:
    for bad in (Broken(), Garbage(), Unsendable()):
        engines = {**default_engines(), bad.name: bad}
        result = Forecaster(engines, default=bad.name, seed=1).run(REQ, SNAP)
        assert result.engine == "ewma_t" and result.fallback_reason
        assert np.all(np.isfinite(result.paths))


def test_calibration_scale_reaches_the_engine() -> None:
    wide = Forecaster(seed=3, scale=lambda e, a, i: 2.0).run(REQ, SNAP).paths
    base = Forecaster(seed=3).run(REQ, SNAP).paths
    ratio = np.log(wide[:, -1] / 100).std() / np.log(base[:, -1] / 100).std()
    assert 1.8 < ratio < 2.2

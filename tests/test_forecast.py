from pathlib import Path

import numpy as np
import pytest

from core.engines.base import Engine, EngineError
from core.engines.ewma import EwmaTEngine
from core.engines.patchtst import PatchTSTEngine
from core.forecast import Forecaster, default_engines
from core.path_sampling import MAX_LOG_MOVE
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest
from core.response import build_response
from core.response_checks import validate_response_head, validate_response_upstream

ROOT = Path(__file__).resolve().parents[1]

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


# ------------------------------------------------------------------ extreme market histories, real models

END = 1_771_000_200  # newest close (a Friday, 16:30 UTC); prompts start a minute later
DAYS = 14
SHAPES = ("frozen 2 days", "frozen 2 days, then +5%", "-60% last bar", "alternating +-10%", "rises from 1e-300",
          "meme coin at 1e-4", "at 9.995e6", "only 5-minute bars", "only 1-minute bars")


def extreme_snapshot(shape: str) -> MarketSnapshot:
    """14 days of 1-minute bars (5-minute bars cut from the same prices) bent into ``shape``."""
    n = DAYS * 1440
    ts = END - 60 * np.arange(n, 0, -1, dtype=np.int64)
    level = {"meme coin at 1e-4": 1e-4, "at 9.995e6": 9.995e6}.get(shape, 3e4)
    r = np.random.default_rng(0).normal(0.0, 8e-4, n)
    close = level * np.exp(np.cumsum(r) - r.sum())
    if shape.startswith("frozen"):
        close[-2880:] = close[-2880]
    factor = {"frozen 2 days, then +5%": 1.05, "-60% last bar": 0.4}.get(shape)
    if factor:
        close[-1] *= factor
    if shape == "alternating +-10%":
        close = level * np.where(np.arange(n) % 2, 1.1, 1.0)
    if shape == "rises from 1e-300":
        close[: n // 2] = 1e-300
    m1 = PriceHistory.from_arrays(60, ts, close)
    five = (ts + 60) % 300 == 0  # the 1-minute bar closing on a 5-minute mark closes that 5-minute bar
    m5 = PriceHistory.from_arrays(300, ts[five] - 240, close[five])
    return MarketSnapshot("PEPE" if shape == "only 1-minute bars" else "BTC",
                          None if shape == "only 5-minute bars" else m1,
                          None if shape == "only 1-minute bars" else m5, float(close[-1]), int(ts[-1]) + 60)


@pytest.fixture(scope="module")
def serving() -> Forecaster:
    """The serving pair: PatchTST with the committed checkpoints, EWMA-t behind it."""
    engines: dict[str, Engine] = {"patchtst": PatchTSTEngine(ROOT / "models"), "ewma_t": EwmaTEngine()}
    return Forecaster(engines, default="patchtst", seed=5)


@pytest.mark.parametrize("increment", [60, 300])
@pytest.mark.parametrize("shape", SHAPES)
def test_extreme_histories_get_valid_bounded_paths(serving: Forecaster, shape: str, increment: int) -> None:
    """Whatever history comes in, the reply holds finite, positive paths within e^3 of the anchor that pass
    both validators' rule sets; no exception escapes."""
    snap = extreme_snapshot(shape)
    request = ForecastRequest(snap.asset, END + 60, increment, 3600 if increment == 60 else 86_400, 1000)
    paths = serving.run(request, snap).paths
    assert paths.shape == (1000, request.n_points) and np.all(paths[:, 0] == np.float32(snap.anchor))
    assert np.all(np.isfinite(paths)) and np.all(paths > 0)
    assert np.all(np.abs(np.log(paths.astype(np.float64) / snap.anchor)) <= MAX_LOG_MOVE + 1e-5)
    response = build_response(request, paths)
    shape_args = (request.start_ts, request.time_increment, request.time_length, request.num_simulations)
    assert validate_response_head(response, *shape_args) == "CORRECT"
    assert validate_response_upstream(response, *shape_args) == "CORRECT"

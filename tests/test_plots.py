"""Backtest figures (core.plots): files are real PNGs of the expected layout; coverage is exact."""

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from core.plots import FAN_LEVELS, coverage, fan_chart, interval_chart, pit_chart


def png_shape(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return tuple(imread(path).shape)


def test_fan_chart_has_a_panel_per_engine(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    times = 1_700_000_040 + 300 * np.arange(289, dtype=np.int64)
    paths = 100 * np.exp(np.cumsum(rng.normal(0, 1e-3, (200, 289)), axis=1))
    bands = {e: np.quantile(paths * f, FAN_LEVELS, axis=0) for e, f in (("gbm", 1.0), ("ewma_t", 1.01))}
    one = png_shape(fan_chart(tmp_path / "one.png", times, paths[0], {"gbm": bands["gbm"]}, "BTC 24h"))
    two = png_shape(fan_chart(tmp_path / "two.png", times, paths[0], bands, "BTC 24h"))
    assert two[1] > 1.8 * one[1] and two[0] == one[0]  # twice as wide, same height
    with pytest.raises(ValueError):
        fan_chart(tmp_path / "none.png", times, paths[0], {}, "empty")


def test_interval_chart_and_pit_chart_grow_with_their_inputs(tmp_path: Path) -> None:
    means = {"BTC": {"gbm": {"5min": 10.0, "30min": 5.0}, "ewma_t": {"5min": 9.0, "30min": 5.5}},
             "ETH": {"gbm": {"5min": 12.0, "30min": 6.0}, "ewma_t": {"5min": 11.0, "30min": 6.5}}}
    tall = png_shape(interval_chart(tmp_path / "iv.png", means, "24h"))
    short = png_shape(interval_chart(tmp_path / "iv1.png", {"BTC": means["BTC"]}, "24h"))
    assert tall[0] > 1.8 * short[0]
    rng = np.random.default_rng(1)
    pits = {"gbm": {"5min": rng.random(500), "1h": rng.random(50)}, "ewma_t": {"5min": rng.random(500)}}
    grid = png_shape(pit_chart(tmp_path / "pit.png", pits, "PIT"))
    single = png_shape(pit_chart(tmp_path / "pit1.png", {"gbm": {"5min": pits["gbm"]["5min"]}}, "PIT"))
    assert grid[0] > 1.8 * single[0] and grid[1] > 1.8 * single[1]  # rows = horizons, columns = engines
    with pytest.raises(ValueError):
        pit_chart(tmp_path / "none.png", {}, "empty")


def test_coverage_counts_central_intervals() -> None:
    pit = np.array([0.5, 0.3, 0.7, 0.04, 0.96, 0.01, 0.99, 0.2])
    cov = coverage(pit, levels=(0.5, 0.9))
    assert cov == {"50%": 3 / 8, "90%": 4 / 8}
    assert np.isnan(coverage(np.empty(0))["50%"])
    uniform = coverage(np.linspace(0, 1, 100_001))
    for level, share in zip((0.5, 0.8, 0.9, 0.95), uniform.values()):
        assert share == pytest.approx(level, abs=1e-4)

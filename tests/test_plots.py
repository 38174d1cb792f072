"""Backtest figures (core.plots): files are real PNGs of the expected layout and content; coverage is exact."""

import re
from pathlib import Path

import matplotlib
import numpy as np
import numpy.typing as npt
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


def figure_texts(path: Path) -> list[str]:
    """The text of a figure saved as SVG with its text kept as text (the format follows the suffix)."""
    return re.findall(r"<text[^>]*>([^<]*)</text>", path.read_text(encoding="utf-8"))


def steady_day() -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], dict[str, npt.NDArray[np.float64]]]:
    """24 h of 5-minute points from 2023-11-14 22:14 UTC, flat at 100 inside flat quantiles 90/95/100/105/110."""
    times = 1_700_000_040 + 300 * np.arange(289, dtype=np.int64)
    bands = np.array([90.0, 95.0, 100.0, 105.0, 110.0])[:, None] * np.ones(289)
    return times, np.full(289, 100.0), {"gbm": bands}


def test_fan_chart_draws_the_outer_band_on_both_sides_of_the_inner_one(tmp_path: Path) -> None:
    """5-95 % from the 5 % to the 95 % quantile, 25-75 % inside it: with evenly spaced quantiles a column
    of the panel reads light, dark (twice as tall), light, top to bottom."""
    image = imread(fan_chart(tmp_path / "fan.png", *steady_day(), "BTC 24h"))[..., :3]
    blue = np.array([31, 119, 180]) / 255  # tab:blue, at the alphas fan_chart draws the bands with
    outer = 1 - 0.18 * (1 - blue)
    inner = 0.65 * outer + 0.35 * blue
    column = image[:, int(0.8 * image.shape[1])]  # right of the legend
    light = np.flatnonzero(np.abs(column - outer).max(axis=-1) < 0.03)
    dark = np.flatnonzero(np.abs(column - inner).max(axis=-1) < 0.03)
    above, below = int((light < dark.min()).sum()), int((light > dark.max()).sum())
    assert dark.size > 50 and above + below == light.size, (above, below, dark.size)
    assert above == pytest.approx(dark.size / 2, abs=4) and below == pytest.approx(dark.size / 2, abs=4)


def test_fan_chart_counts_hours_from_the_start_given_in_utc(tmp_path: Path) -> None:
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        texts = figure_texts(fan_chart(tmp_path / "fan.svg", *steady_day(), "BTC 24h"))
    x_ticks = [float(t) for t in texts[:texts.index("hours after start")]]
    assert min(x_ticks) == 0 and 24 <= max(x_ticks) <= 30, texts
    assert "BTC 24h — start 2023-11-14 22:14 UTC" in texts


def test_pit_chart_titles_each_panel_with_its_own_count_and_coverage(tmp_path: Path) -> None:
    pits = {"gbm": {"5min": np.full(400, 0.5), "1h": np.full(10, 0.99)}, "ewma_t": {"5min": np.full(300, 0.01)}}
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        texts = figure_texts(pit_chart(tmp_path / "pit.svg", pits, "PIT"))
    assert {"gbm 5min (n=400)", "gbm 1h (n=10)", "ewma_t 5min (n=300)", "ewma_t 1h (n=0)"} <= set(texts), texts
    at = texts.index("gbm 5min (n=400)")
    assert texts[at + 1] == "coverage 50%:1.00 80%:1.00 90%:1.00 95%:1.00", texts
    at = texts.index("ewma_t 5min (n=300)")
    assert texts[at + 1] == "coverage 50%:0.00 80%:0.00 90%:0.00 95%:0.00", texts
    at = texts.index("ewma_t 1h (n=0)")
    assert texts[at + 1] == "coverage 50%:nan 80%:nan 90%:nan 95%:nan", texts


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

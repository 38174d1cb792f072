"""Backtest figures as PNG files: fan chart, CRPS per interval, PIT histograms with coverage.

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas, never through pyplot, so no
global backend or GUI state is touched and plotting is safe in workers and tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FAN_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)  # the quantiles a fan chart draws (outer band, inner band, median)
COVERAGE_LEVELS = (0.5, 0.8, 0.9, 0.95)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def fan_chart(path: Path, times: IntArray, realised: FloatArray, bands: Mapping[str, FloatArray],
              title: str) -> Path:
    """One panel per engine: 5-95 % and 25-75 % bands and the median of the paths, and the realised path.

    ``bands[engine]`` has shape [len(FAN_LEVELS), n_points].
    """
    if not bands:
        raise ValueError("fan_chart needs at least one engine's quantiles")
    hours = (np.asarray(times, dtype=np.float64) - float(times[0])) / 3600.0
    fig = Figure(figsize=(5.0 * len(bands), 4.0))
    axes = fig.subplots(1, len(bands), sharey=True, squeeze=False)[0]
    for ax, (engine, q) in zip(axes, bands.items()):
        ax.fill_between(hours, q[0], q[4], color="tab:blue", alpha=0.18, label="5-95 %")
        ax.fill_between(hours, q[1], q[3], color="tab:blue", alpha=0.35, label="25-75 %")
        ax.plot(hours, q[2], color="tab:blue", lw=1.0, label="median")
        ax.plot(hours, realised, color="black", lw=1.2, marker=".", ms=2, label="realised")
        ax.set_title(engine)
        ax.set_xlabel("hours after start")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("price")
    axes[0].legend(loc="best", fontsize=8)
    start = datetime.fromtimestamp(int(times[0]), UTC).strftime("%Y-%m-%d %H:%M UTC")
    fig.suptitle(f"{title} — start {start}")
    fig.tight_layout()
    return _save(fig, path)


def interval_chart(path: Path, means: Mapping[str, Mapping[str, Mapping[str, float]]], title: str) -> Path:
    """Mean CRPS per scoring interval: one panel per asset, one bar per engine and interval.

    ``means[asset][engine][interval]``.
    """
    if not means:
        raise ValueError("interval_chart needs at least one asset")
    assets = list(means)
    fig = Figure(figsize=(11.0, 3.2 * len(assets)))
    axes = fig.subplots(len(assets), 1, squeeze=False)[:, 0]
    for ax, asset in zip(axes, assets):
        engines = list(means[asset])
        intervals: list[str] = []
        for engine in engines:
            intervals += [k for k in means[asset][engine] if k not in intervals]
        x = np.arange(len(intervals), dtype=np.float64)
        width = 0.8 / max(len(engines), 1)
        for i, engine in enumerate(engines):
            values = [means[asset][engine].get(k, np.nan) for k in intervals]
            ax.bar(x + (i - (len(engines) - 1) / 2) * width, values, width, label=engine)
        ax.set_xticks(x, intervals, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("mean CRPS")
        ax.set_title(asset, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def coverage(pit: FloatArray, levels: Sequence[float] = COVERAGE_LEVELS) -> dict[str, float]:
    """Share of realised values inside each central interval of the forecast (ideal: the level itself)."""
    pit = np.asarray(pit, dtype=np.float64)
    if not pit.size:
        return {f"{lv:.0%}": float("nan") for lv in levels}
    return {f"{lv:.0%}": float(np.mean(np.abs(pit - 0.5) <= lv / 2)) for lv in levels}


def pit_chart(path: Path, pits: Mapping[str, Mapping[str, FloatArray]], title: str, bins: int = 20) -> Path:
    """PIT histograms (flat = calibrated; U = too narrow; hump = too wide), a row per horizon and a
    column per engine, each titled with its central-interval coverage. ``pits[engine][horizon]``."""
    engines = list(pits)
    horizons: list[str] = []
    for engine in engines:
        horizons += [h for h in pits[engine] if h not in horizons]
    if not engines or not horizons:
        raise ValueError("pit_chart needs PIT values for at least one engine and horizon")
    fig = Figure(figsize=(4.0 * len(engines), 3.0 * len(horizons)))
    axes = fig.subplots(len(horizons), len(engines), squeeze=False)
    edges = np.linspace(0.0, 1.0, bins + 1)
    for r, horizon in enumerate(horizons):
        for c, engine in enumerate(engines):
            ax = axes[r, c]
            values = np.asarray(pits[engine].get(horizon, np.empty(0)), dtype=np.float64)
            if values.size:
                ax.hist(values, bins=edges, density=True, color="tab:green", alpha=0.7)
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
            cov = coverage(values)
            text = " ".join(f"{k}:{v:.2f}" for k, v in cov.items())
            ax.set_title(f"{engine} {horizon} (n={values.size})\ncoverage {text}", fontsize=8)
            ax.set_xlim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)

"""Our re-implementation of the Synth validator's per-prompt CRPS score.

Two rule sets:

* ``"head"``: mode-network/synth-subnet ``crps_calculation.calculate_crps_for_miner``
  and ``reward.py`` (a NaN total is a miss).
* ``"upstream"``: synthdataco/synth-subnet after PR #323: the same price CRPS, plus
  for 1h prompts the volatility-CRPS term (``calculate_total_score_for_miner``),
  and any non-finite total is a miss.

Scores are in basis points, lower is better; ``-1.0`` marks an invalid response.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
Rules = Literal["head", "upstream"]

BPS = 10_000.0
INVALID = -1.0

LF_TIME_LENGTH = 86_400
HF_TIME_LENGTH = 3_600

LF_INTERVALS: Mapping[str, int] = MappingProxyType(
    {"5min": 300, "30min": 1800, "3hour": 10800, "24hour_abs": 86400}
)
HF_INTERVALS: Mapping[str, int] = MappingProxyType(
    {
        "1min": 60,
        "2min": 120,
        "5min": 300,
        "15min": 900,
        "30min": 1800,
        "60min_abs": 3600,
        **{f"0_{m}min_gaps": m * 60 for m in range(5, 65, 5)},
    }
)

VOL_CRPS_LAMBDA = 5.25
# name -> (block seconds, weight); weight = lambda / (3 sizes x blocks of that size)
VOL_BLOCKS: Mapping[str, tuple[int, float]] = MappingProxyType(
    {
        "vol_60min": (3600, VOL_CRPS_LAMBDA / 3),
        "vol_15min": (900, VOL_CRPS_LAMBDA / 12),
        "vol_5min": (300, VOL_CRPS_LAMBDA / 36),
    }
)
VOL_KEY = "vol_crps"


@dataclass(frozen=True)
class PromptScore:
    total: float  # -1.0 when invalid
    valid: bool
    # Sum per scored interval (+ VOL_KEY, weighted); kept on a non-finite miss for diagnosis,
    # empty on a zero price.
    per_interval: dict[str, float] = field(default_factory=dict)


def scoring_intervals(time_length: int) -> Mapping[str, int]:
    """The validator picks the 1h set by time_length alone, everything else is scored as 24h."""
    return HF_INTERVALS if time_length == HF_TIME_LENGTH else LF_INTERVALS


def _steps(seconds: int, time_increment: int) -> int:
    steps = int(seconds / time_increment)
    if steps < 1:
        raise ValueError(f"interval {seconds}s is shorter than time_increment {time_increment}s")
    return steps


# ---------------------------------------------------------------- CRPS


def _crps_rows(obs: FloatArray, ens: FloatArray, *, owned: bool = False) -> FloatArray:
    """CRPS of row k of ``ens`` ([K, N]) against ``obs[k]``; NaN members ignored.

    Uses CRPS = mean|x - y| - (1/n^2) * sum_i (2i - n + 1) x_(i) on the sorted members,
    the same value as properscoring's plain (non-fair) ensemble CRPS. ``owned`` lets the
    caller hand over a C-contiguous float64 buffer to sort in place.
    """
    if owned and ens.dtype == np.float64 and ens.flags.c_contiguous:
        x = ens
    else:
        x = np.array(ens, dtype=np.float64, order="C", copy=True)
    if x.ndim != 2 or obs.shape != (x.shape[0],):
        raise ValueError(f"shape mismatch: obs {obs.shape}, members {x.shape}")
    k_obs, n_max = x.shape
    if k_obs == 0:
        return np.empty(0, dtype=np.float64)
    if n_max == 0:
        return np.full(k_obs, np.nan)
    x.sort(axis=1)  # NaN sorts last
    rows = np.arange(k_obs)
    ranks = np.arange(n_max, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        if not np.isnan(x[:, -1]).any():
            # Common case, no NaN member: one weight vector for every row.
            centre = x[:, (n_max - 1) // 2].copy()
            # Both terms are shift-invariant; centring avoids cancellation on price levels.
            x -= centre[:, None]
            y = obs - centre
            spread = (x @ (2.0 * ranks - (n_max - 1.0))) / float(n_max) ** 2
            np.subtract(x, y[:, None], out=x)
            np.abs(x, out=x)
            out: FloatArray = x.sum(axis=1) / n_max - spread
            return out
        valid = ~np.isnan(x)
        n = valid.sum(axis=1)
        centre = np.where(n > 0, x[rows, np.maximum(n - 1, 0) // 2], 0.0)
        xc = np.where(valid, x - centre[:, None], 0.0)
        y = obs - centre
        nf = n.astype(np.float64)
        # sum_i (2i - n + 1) x_i over the valid (leading) members.
        spread = (2.0 * (xc @ ranks) - (nf - 1.0) * xc.sum(axis=1)) / nf**2
        abs_dev = np.where(valid, np.abs(xc - y[:, None]), 0.0).sum(axis=1) / nf
        out = abs_dev - spread
    out[n == 0] = np.nan
    return out


def crps_ensemble(obs: FloatArray, members: FloatArray) -> FloatArray:
    """Plain ensemble CRPS for K observations at once.

    ``obs``: shape [K] (a scalar is treated as K=1); ``members``: shape [N, K] (a 1-D
    array is one ensemble of N members). NaN members are ignored; a NaN observation or
    an all-NaN ensemble gives NaN. Returns shape [K].
    """
    y = np.atleast_1d(np.asarray(obs, dtype=np.float64))
    m = np.asarray(members, dtype=np.float64)
    if m.ndim == 1:
        m = m[:, None]
    return _crps_rows(y, m.T)


# ---------------------------------------------------------------- price CRPS


def interval_changes(prices: FloatArray, steps: int, absolute: bool, gap: bool) -> FloatArray:
    """[M, P] prices -> [M, C] values scored for one interval.

    Simple returns in bp between every ``steps``-th point; ``gap`` keeps only the first
    one; ``absolute`` keeps the raw prices after the first sampled point instead.
    """
    pts = prices[:, ::steps]
    if gap:
        pts = pts[:, :2]
    if absolute:
        return pts[:, 1:]
    # Same operation order as the validator: (diff / previous) * 1e4.
    changes: FloatArray = (np.diff(pts, axis=1) / pts[:, :-1]) * BPS
    return changes


def observed_runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """[start, end) of each run of True: the validator's label_observed_blocks, minus -1."""
    padded = np.concatenate(([False], mask, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]


@dataclass(frozen=True)
class _Interval:
    name: str
    absolute: bool
    columns: slice  # into the stacked change matrix


def _price_crps(
    paths: FloatArray, real: FloatArray, time_increment: int, intervals: Mapping[str, int]
) -> tuple[float, dict[str, float]]:
    n_points = real.shape[0]
    sim_parts: list[FloatArray] = []
    real_parts: list[FloatArray] = []
    specs: list[_Interval] = []
    col = 0
    for name, seconds in intervals.items():
        steps = _steps(seconds, time_increment)
        absolute = name.endswith("_abs")
        gap = name.endswith("_gaps")
        if absolute and n_points >= 1 and steps >= n_points:
            # The validator shrinks the step until the real path yields a second point.
            steps = max(n_points - 1, 1)
        sim = interval_changes(paths, steps, absolute, gap)
        obs = interval_changes(real[None, :], steps, absolute, gap)[0]
        sim_parts.append(sim)
        real_parts.append(obs)
        specs.append(_Interval(name, absolute, slice(col, col + obs.shape[0])))
        col += obs.shape[0]

    all_real = np.concatenate(real_parts) if real_parts else np.empty(0)
    observed = ~np.isnan(all_real)
    # One sort for every observed column of every interval, rows = columns.
    crps = np.full(all_real.shape[0], np.nan)
    if observed.any():
        stacked = np.concatenate([part.T for part in sim_parts], axis=0)
        if not observed.all():
            stacked = stacked[observed]
        crps[observed] = _crps_rows(all_real[observed], stacked, owned=True)

    total = 0.0
    per_interval: dict[str, float] = {}
    last_price = real[-1] if n_points else np.nan
    for spec in specs:
        values = crps[spec.columns]
        mask = observed[spec.columns]
        if values.shape[0] == 0:
            continue  # no change at all: the validator writes no row either
        if spec.absolute:
            values = values / last_price * BPS
        # Same summation order as the validator: numpy sum per observed block, then
        # block sums added in order.
        acc = 0.0
        for start, end in observed_runs(mask):
            acc += float(values[start:end].sum())
        per_interval[spec.name] = acc
        total += acc
    return total, per_interval


# ---------------------------------------------------------------- volatility CRPS (upstream)


def block_volatilities(prices: FloatArray, block_steps: int) -> FloatArray:
    """[M, P] prices -> [M, B] std (ddof=1, NaN ignored) of the 1-step bp returns per block.

    Blocks are consecutive and whole (trailing steps dropped); a block with fewer than
    two observed returns is NaN.
    """
    returns = (np.diff(prices, axis=1) / prices[:, :-1]) * BPS
    n_blocks = returns.shape[1] // block_steps
    blocks = returns[:, : n_blocks * block_steps].reshape(returns.shape[0], n_blocks, block_steps)
    seen = ~np.isnan(blocks)
    count = seen.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(seen, blocks, 0.0).sum(axis=2) / count
        dev = np.where(seen, blocks - mean[..., None], 0.0)
        vol: FloatArray = np.sqrt((dev * dev).sum(axis=2) / (count - 1))
    vol[count < 2] = np.nan
    return vol


def _vol_crps(paths: FloatArray, real: FloatArray, time_increment: int) -> float:
    score = 0.0
    for seconds, weight in VOL_BLOCKS.values():
        steps = _steps(seconds, time_increment)
        sim_vol = block_volatilities(paths, steps)
        real_vol = block_volatilities(real[None, :], steps)[0]
        seen = ~np.isnan(real_vol)
        if not seen.any():
            continue
        values = _crps_rows(real_vol[seen], sim_vol[:, seen].T)
        acc = 0.0
        for v in values.tolist():  # sequential, as the validator's sum() over np.float64
            acc += v
        score += weight * acc
    return score


# ---------------------------------------------------------------- prompt score


def score_prompt(
    paths: FloatArray,
    real_prices: FloatArray,
    time_increment: int,
    time_length: int,
    rules: Rules = "upstream",
) -> PromptScore:
    """Score one miner's paths [n_paths, n_points] against the realised prices [n_points].

    NaN realised prices drop the changes they touch; any zero in ``paths`` is invalid.
    """
    if rules not in ("head", "upstream"):
        raise ValueError(f"unknown rules {rules!r}")
    sims = np.asarray(paths, dtype=np.float64)
    real = np.asarray(real_prices, dtype=np.float64)
    if sims.ndim != 2 or real.ndim != 1 or sims.shape[1] != real.shape[0]:
        raise ValueError(f"paths {sims.shape} and real_prices {real.shape} do not match")

    if np.any(sims == 0):
        return PromptScore(INVALID, False, {})

    # Non-finite values are part of the rules (a miss), not a numerical accident.
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        total, per_interval = _price_crps(sims, real, time_increment, scoring_intervals(time_length))
        if rules == "upstream" and time_length == HF_TIME_LENGTH:
            vol = _vol_crps(sims, real, time_increment)
            per_interval[VOL_KEY] = vol
            total += vol

    valid = bool(np.isfinite(total)) if rules == "upstream" else not bool(np.isnan(total))
    return PromptScore(total if valid else INVALID, valid, per_interval)

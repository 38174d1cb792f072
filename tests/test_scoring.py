"""core.scoring against the validator's published numbers, hand-worked cases and an
independent, slow restatement of the validator's rules built on properscoring."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pytest

from core.scoring import (
    HF_INTERVALS,
    LF_INTERVALS,
    VOL_CRPS_LAMBDA,
    VOL_KEY,
    Rules,
    block_volatilities,
    crps_ensemble,
    interval_changes,
    observed_runs,
    score_prompt,
)

ps = pytest.importorskip("properscoring")

NAN = np.nan
LF = (300, 86_400)
HF = (60, 3_600)


def lf(paths: list[list[float]], real: list[float], rules: Rules = "head") -> float:
    return score_prompt(np.array(paths, dtype=float), np.array(real, dtype=float), *LF, rules=rules).total


def gbm(rng: np.random.Generator, n: int, points: int, s0: float = 100_000.0, sigma: float = 1e-3) -> np.ndarray:
    steps = 1.0 + rng.normal(0.0, sigma, size=(n, points - 1))
    return s0 * np.hstack([np.ones((n, 1)), np.cumprod(steps, axis=1)])


# ---------------------------------------------------------------- golden values of the real
# tests/test_calculate_crps.py (mode-network and synthdataco), 24h intervals, 5-min grid


@pytest.mark.parametrize("rules", ["head", "upstream"])
@pytest.mark.parametrize(
    ("paths", "real", "expected"),
    [
        ([[90000, 91000, 92000], [90000, 91000, 92000]], [92600, 92500, 93500], 284.1200564488584),
        ([[900, 910, 920], [900, 910, 920]], [926, 925, 935], 284.1200564488584),
        ([[50, 60, 70]], [50, 60, 70], 0.0),
        ([[90000, 91000, 92000, 92500, 92600]], [92600, 92500, 92600, 92500, 93500], 479.6904902048716),
        ([[50000, 51000, 52000]], [92600, 92500, 93500], 4737.272133130346),
        ([[55, 64, 70, 82.5, 89.2, 100, 110, 123, 131]], [50, 60, NAN, 80, 90, NAN, NAN, 120, 130], 1061.3650577065207),
        (
            [[1303196869523179600000000000000000000000000000000000000000000000000000000000000000000000000,
              0.00011997788254371478, 70, 82.5, 89.2, 100, 110, 123, 131]],
            [50, 60, NAN, 80, 90, NAN, NAN, 120, 130],
            12697.728694070156,
        ),
    ],
)
def test_published_totals_exactly(paths: list[list[float]], real: list[float], expected: float, rules: Rules) -> None:
    assert lf(paths, real, rules) == expected


def test_published_total_three_member_case() -> None:
    # HEAD's test publishes 13413.59914105867, synthdataco's 13413.599141058676 (one ulp apart:
    # properscoring with or without numba). We land on HEAD's bits; either is acceptable.
    paths = [[50000, 51000, 52000], [10000, 70000, 50000], [90000, 70000, 50000]]
    real = [105165.69445825, 105016.21888945, 105066.94377502]
    assert lf(paths, real) == pytest.approx(13413.599141058676, rel=1e-15)


@pytest.mark.parametrize(
    "real",
    [
        [50, 60, NAN, 80, 90, NAN, NAN, 120, 130],
        [NAN, 60, 70, NAN, 90, 100, 110, 120, NAN],
        [NAN] * 9,
    ],
)
def test_published_gappy_real_prices_score_zero_for_a_perfect_path(real: list[float]) -> None:
    assert lf([[50, 60, 70, 80, 90, 100, 110, 120, 130]], real) == 0.0


def test_published_gaps_lower_the_score() -> None:
    path = [[55, 64, 70, 82.5, 89.2, 100, 110, 123.5, 131.2]]
    gappy = lf(path, [50, 60, NAN, 80, 90, NAN, NAN, 120, 130])
    full = lf(path, [50, 60, 70, 80, 90, 100, 110, 120, 130])
    assert gappy == 1103.6743957796587
    assert gappy < full


@pytest.mark.parametrize("rules", ["head", "upstream"])
def test_published_nan_in_single_member_is_a_miss(rules: Rules) -> None:
    # The validator's CRPS is NaN here; reward.py turns it into -1.
    s = score_prompt(
        np.array([[50, 60, NAN, 80, 90, 92, 98, 120, 130]]),
        np.array([55, 64, 70, 82.5, 89.2, 100, 110, 123.5, 131.2]),
        *LF,
        rules=rules,
    )
    assert (s.total, s.valid) == (-1.0, False)


@pytest.mark.parametrize("rules", ["head", "upstream"])
@pytest.mark.parametrize(("grid", "real"), [(LF, [50, 60, NAN, 80, 90, NAN, NAN, 120, 130]),
                                           (HF, [50, 60, 65, 80, 90, 94, 101, 120, 130])])
def test_published_zero_price_is_invalid(grid: tuple[int, int], real: list[float], rules: Rules) -> None:
    paths = np.array([[0.00011997788254371478, 0, 70, 82.5, 89.2, 100, 110, 123, 131]])
    s = score_prompt(paths, np.array(real, dtype=float), *grid, rules=rules)
    assert s == type(s)(-1.0, False, {})


def test_published_block_volatility_value() -> None:
    # Returns in bp are [100, 99.00990099]; one 2-step block.
    vol = block_volatilities(np.array([[100.0, 101.0, 102.0]]), 2)
    assert vol.shape == (1, 1)
    assert vol[0, 0] == pytest.approx(0.7001057239470748, rel=1e-14)


def test_observed_runs_match_label_observed_blocks() -> None:
    assert observed_runs(~np.isnan([1.0, 2.0, NAN, 4.0, NAN, NAN, 7.0, 8.0])) == [(0, 2), (3, 4), (6, 8)]
    assert observed_runs(~np.isnan([NAN, 1.0, 2.0, NAN, 3.0])) == [(1, 3), (4, 5)]
    assert observed_runs(~np.isnan([NAN, NAN, NAN])) == []
    assert observed_runs(np.zeros(0, dtype=bool)) == []


# ---------------------------------------------------------------- CRPS itself


def test_one_member_crps_is_absolute_error() -> None:
    members = np.array([[3.0, -1.0, 10.0]])
    obs = np.array([1.0, 2.0, 10.0])
    np.testing.assert_allclose(crps_ensemble(obs, members), [2.0, 3.0, 0.0], atol=1e-15)


def test_two_member_crps_by_hand() -> None:
    # (|a-y| + |b-y|)/2 - |a-b|/4
    a, b, y = 1.0, 5.0, 2.0
    expected = (abs(a - y) + abs(b - y)) / 2 - abs(a - b) / 4
    assert crps_ensemble(np.array([y]), np.array([[b], [a]]))[0] == pytest.approx(expected, abs=1e-15)
    assert crps_ensemble(np.array([y]), np.array([[b], [a]]))[0] == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
@pytest.mark.parametrize("level", [0.0, 1e5])
def test_crps_matches_properscoring_with_nan_members(level: float) -> None:
    rng = np.random.default_rng(7)
    members = level + rng.standard_t(4, size=(200, 40)) * 30
    members[rng.random(members.shape) < 0.15] = NAN
    members[:, 3] = NAN  # an all-NaN ensemble
    members[:-1, 4] = NAN  # a single surviving member
    obs = level + rng.normal(0, 40, size=40)
    obs[5] = NAN
    ours = crps_ensemble(obs, members)
    theirs = ps.crps_ensemble(obs, members.T)
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9 * max(level, 1.0), equal_nan=True)
    assert np.isnan(ours[3]) and np.isnan(ours[5])


def test_crps_without_nan_matches_properscoring_large_ensemble() -> None:
    rng = np.random.default_rng(8)
    members = rng.normal(0, 20, size=(1000, 12))
    obs = rng.normal(0, 25, size=12)
    np.testing.assert_allclose(crps_ensemble(obs, members), ps.crps_ensemble(obs, members.T), rtol=1e-11)


def test_crps_accepts_scalar_and_one_dimensional_input() -> None:
    assert crps_ensemble(np.float64(2.0), np.array([1.0, 5.0]))[0] == pytest.approx(1.0)


# ---------------------------------------------------------------- intervals


def test_interval_term_counts_of_full_prompts() -> None:
    def terms(intervals: Mapping[str, int], ti: int, points: int) -> int:
        prices = np.ones((1, points))
        total = 0
        for name, seconds in intervals.items():
            total += interval_changes(prices, seconds // ti, name.endswith("_abs"), name.endswith("_gaps")).shape[1]
        return total

    assert list(LF_INTERVALS) == ["5min", "30min", "3hour", "24hour_abs"]
    assert [n for n in HF_INTERVALS if n.endswith("_gaps")] == [f"0_{m}min_gaps" for m in range(5, 65, 5)]
    assert terms(LF_INTERVALS, 300, 289) == 288 + 48 + 8 + 1
    assert terms(HF_INTERVALS, 60, 61) == 60 + 30 + 12 + 4 + 2 + 1 + 12


def test_changes_are_simple_returns_in_bp_and_gaps_keep_the_first() -> None:
    prices = np.array([[100.0, 102, 105, 103, 108, 107, 112]])
    np.testing.assert_allclose(interval_changes(prices, 2, False, False), [[500.0, 285.714285714, 370.37037037]], rtol=1e-9)
    np.testing.assert_allclose(interval_changes(prices, 2, False, True), [[500.0]])
    np.testing.assert_allclose(interval_changes(prices, 6, True, False), [[112.0]])


def test_hand_computed_single_path_prompt() -> None:
    sim, real = [100.0, 101.0, 102.0], [100.0, 102.0, 101.0]
    five_min = abs(100.0 - 200.0) + abs((102 - 101) / 101 * 1e4 - (101 - 102) / 102 * 1e4)
    # 24hour_abs shrinks its step to the last point: |102 - 101| in bp of the real close
    absolute = abs(102.0 - 101.0) / 101.0 * 1e4
    s = score_prompt(np.array([sim]), np.array(real), *LF, rules="head")
    assert s.per_interval == pytest.approx({"5min": five_min, "24hour_abs": absolute}, rel=1e-12)
    assert s.total == pytest.approx(five_min + absolute, rel=1e-12)


def test_nan_at_t0_removes_every_gap_term_and_first_changes() -> None:
    rng = np.random.default_rng(3)
    paths, real = gbm(rng, 50, 61), gbm(rng, 1, 61)[0]
    real[0] = NAN
    s = score_prompt(paths, real, *HF, rules="head")
    assert s.valid
    for name in HF_INTERVALS:
        if name.endswith("_gaps"):
            assert s.per_interval[name] == 0.0  # scored row, no observed change
    assert s.per_interval["1min"] > 0


# ---------------------------------------------------------------- against a slow restatement


def oracle_price(paths: np.ndarray, real: np.ndarray, ti: int, intervals: Mapping[str, int]) -> float:
    """The validator's price CRPS, one properscoring call per observed change."""
    if np.any(paths == 0):
        return -1.0
    total = 0.0
    for name, seconds in intervals.items():
        k = int(seconds / ti)
        absolute, gap = name.endswith("_abs"), name.endswith("_gaps")
        while absolute and len(real[::k]) == 1 and k > 1:
            k -= 1
        for src in (paths, real[None, :]):
            pts = src[:, ::k][:, :2] if gap else src[:, ::k]
            vals = pts[:, 1:] if absolute else np.diff(pts, axis=1) / pts[:, :-1] * 1e4
            if src is paths:
                sim = vals
            else:
                obs = vals[0]
        for t in range(obs.size):
            if not np.isnan(obs[t]):
                c = float(ps.crps_ensemble(obs[t], sim[:, t]))
                total += c / real[-1] * 1e4 if absolute else c
    return total


def oracle_vol(paths: np.ndarray, real: np.ndarray, ti: int) -> float:
    total = 0.0
    for seconds, blocks_per_hour in ((3600, 1), (900, 4), (300, 12)):
        b = seconds // ti

        def vols(a: np.ndarray) -> np.ndarray:
            r = np.diff(a, axis=1) / a[:, :-1] * 1e4
            out = np.full((a.shape[0], r.shape[1] // b), NAN)
            for i in range(a.shape[0]):
                for j in range(out.shape[1]):
                    blk = r[i, j * b:(j + 1) * b]
                    blk = blk[~np.isnan(blk)]
                    if blk.size >= 2:
                        out[i, j] = np.std(blk, ddof=1)
            return out

        sim, obs = vols(paths), vols(real[None, :])[0]
        s = sum(float(ps.crps_ensemble(obs[j], sim[:, j])) for j in range(obs.size) if not np.isnan(obs[j]))
        total += VOL_CRPS_LAMBDA / (3 * blocks_per_hour) * s
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grid", [LF, HF])
def test_matches_restated_validator_on_gappy_prompts(grid: tuple[int, int], seed: int) -> None:
    ti, tl = grid
    rng = np.random.default_rng(seed)
    points = tl // ti + 1
    paths, real = gbm(rng, 40, points), gbm(rng, 1, points)[0]
    real[rng.random(points) < 0.1] = NAN
    real[-1] = 101_000.0  # the validator never scores a prompt without its last price
    paths[3, 7] = NAN  # a NaN member is ignored, not fatal
    head = score_prompt(paths, real, ti, tl, rules="head")
    assert head.valid
    assert head.total == pytest.approx(oracle_price(paths, real, ti, LF_INTERVALS if tl == 86_400 else HF_INTERVALS), rel=1e-10)
    assert sum(head.per_interval.values()) == pytest.approx(head.total, rel=1e-12)

    upstream = score_prompt(paths, real, ti, tl, rules="upstream")
    if tl == 86_400:
        assert upstream == head
    else:
        assert upstream.per_interval[VOL_KEY] == pytest.approx(oracle_vol(paths, real, ti), rel=1e-10)
        assert upstream.total == pytest.approx(head.total + upstream.per_interval[VOL_KEY], rel=1e-12)


# ---------------------------------------------------------------- upstream volatility term


def alternating_path(a_bp: float, points: int = 61, s0: float = 100.0) -> np.ndarray:
    prices = [s0]
    for i in range(points - 1):
        prices.append(prices[-1] * (1 + (a_bp if i % 2 == 0 else -a_bp) / 1e4))
    return np.array(prices)


def test_vol_term_by_hand() -> None:
    # One-member ensemble, flat real path: every realised block vol is 0, so each block's
    # CRPS is the simulated vol. Returns +a, -a, ...: a*sqrt(60/59) over the hour,
    # 4a/sqrt(15) per 15-min block, a*sqrt(6/5) per 5-min block.
    a = 10.0
    paths = alternating_path(a)[None, :]
    real = np.full(61, 100.0)
    s = score_prompt(paths, real, *HF, rules="upstream")
    s60, s15, s5 = a * math.sqrt(60 / 59), 4 * (4 * a / math.sqrt(15)), 12 * a * math.sqrt(6 / 5)
    expected = VOL_CRPS_LAMBDA * (s60 / 1 + s15 / 4 + s5 / 12) / 3
    assert s.per_interval[VOL_KEY] == pytest.approx(expected, rel=1e-9)
    head = score_prompt(paths, real, *HF, rules="head")
    assert VOL_KEY not in head.per_interval
    assert s.total == pytest.approx(head.total + expected, rel=1e-12)


def test_vol_blocks_with_fewer_than_two_returns_are_skipped() -> None:
    a = 10.0
    paths = alternating_path(a)[None, :]
    real = np.full(61, 100.0)
    real[6:10] = NAN  # no observed return left in the second 5-min block
    real[16:] = NAN  # nothing observed after minute 15
    vol = block_volatilities(real[None, :], 5)[0]
    assert not np.isnan(vol[0]) and np.isnan(vol[1]) and np.isnan(vol[3])
    s = score_prompt(paths, real, *HF, rules="upstream")
    # Scored: the 60-min block and 15-min block 0 (10 returns each), 5-min blocks 0 and 2.
    b15 = block_volatilities(paths, 15)[0, 0]
    b5 = block_volatilities(paths, 5)[0]
    r60 = block_volatilities(real[None, :], 60)[0, 0]
    r15 = block_volatilities(real[None, :], 15)[0, 0]
    expected = (
        VOL_CRPS_LAMBDA / 3 * abs(a * math.sqrt(60 / 59) - r60)
        + VOL_CRPS_LAMBDA / 12 * abs(b15 - r15)
        + VOL_CRPS_LAMBDA / 36 * (abs(b5[0] - vol[0]) + abs(b5[2] - vol[2]))
    )
    assert s.per_interval[VOL_KEY] == pytest.approx(expected, rel=1e-9)


def test_vol_term_only_for_one_hour_prompts() -> None:
    rng = np.random.default_rng(5)
    paths, real = gbm(rng, 20, 289), gbm(rng, 1, 289)[0]
    assert VOL_KEY not in score_prompt(paths, real, *LF, rules="upstream").per_interval


# ---------------------------------------------------------------- invalid rules


def test_non_finite_total_head_keeps_inf_upstream_rejects_it() -> None:
    # A zero realised close makes the _abs term inf: HEAD's reward only catches NaN.
    rng = np.random.default_rng(6)
    paths, real = gbm(rng, 10, 289), gbm(rng, 1, 289)[0]
    real[-1] = 0.0
    head = score_prompt(paths, real, *LF, rules="head")
    upstream = score_prompt(paths, real, *LF, rules="upstream")
    assert head.valid and math.isinf(head.total)
    assert (upstream.valid, upstream.total) == (False, -1.0)


def test_zero_anywhere_in_paths_is_invalid_even_where_unscored() -> None:
    rng = np.random.default_rng(9)
    paths, real = gbm(rng, 10, 61), gbm(rng, 1, 61)[0]
    paths[4, 59] = 0.0
    for rules in ("head", "upstream"):
        s = score_prompt(paths, real, *HF, rules=rules)
        assert (s.total, s.valid, s.per_interval) == (-1.0, False, {})


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        score_prompt(np.ones((3, 10)), np.ones(11), *LF)

"""Statistical tests of the path sampler against moments derived in closed form.

Every tolerance is a multiple of a standard error estimated from the sample itself (independent
paths give independent replicates), with fixed seeds so the tests are deterministic.
"""

import json

import numpy as np
import numpy.typing as npt
import pytest
from scipy import stats

from core.path_sampling import (
    LOG_VOL_MAX,
    MAX_LOG_MOVE,
    NU_MIN,
    LatentVol,
    SamplingError,
    latent_log_vol,
    latent_multiplier,
    log_move_bounds,
    sample_paths,
    stratified_normal,
    unit_t,
)
from core.prompts import ForecastRequest
from core.response import render_json, round_for_wire
from core.response_checks import validate_response_head, validate_response_upstream
from core.scoring import crps_ensemble

FloatArray = npt.NDArray[np.float64]
Z_TOL = 5.0  # standard errors; a false alarm at 5 SE is a 1-in-1.7-million event per check


def log_returns(paths: npt.NDArray[np.float32]) -> FloatArray:
    return np.diff(np.log(paths.astype(np.float64)), axis=1)


def excess_kurtosis(x: FloatArray, axis: int = 0) -> FloatArray:
    centred = x - x.mean(axis=axis, keepdims=True)
    m2 = (centred**2).mean(axis=axis)
    out: FloatArray = (centred**4).mean(axis=axis) / m2**2 - 3.0
    return out


def batch_estimate(values: FloatArray, n_batches: int, statistic: "np.ufunc | object") -> tuple[float, float]:
    """Statistic over the whole sample and its standard error from independent batches of paths."""
    batches = np.array_split(values, n_batches)
    per_batch = np.array([statistic(b) for b in batches])  # type: ignore[operator]
    return float(statistic(values)), float(per_batch.std(ddof=1) / np.sqrt(n_batches))  # type: ignore[operator]


def t_fourth_moment(nu: float) -> float:
    """E[eps^4] of a unit-variance Student-t."""
    return 3.0 * (nu - 2.0) / (nu - 4.0)


def sum_excess_kurtosis(latent: LatentVol, nu: float, n_steps: int) -> float:
    """Excess kurtosis of the sum of n_steps returns r_t = m_t eps_t, m_t = exp(z_t - Var z).

    E[m_t^2 m_u^2] = exp(4 v rho^|t-u|) with v = Var z; the innovations are independent of z.
    """
    v = latent.stationary_var
    lags = np.abs(np.subtract.outer(np.arange(n_steps), np.arange(n_steps)))
    cross = np.exp(4.0 * v * latent.rho**lags)
    fourth = np.trace(cross) * t_fourth_moment(nu) + 3.0 * (cross.sum() - np.trace(cross))
    return float(fourth / n_steps**2 - 3.0)


def squared_return_acf(latent: LatentVol, nu: float, lag: int) -> float:
    """Corr(r_t^2, r_{t+lag}^2) for the stationary latent model."""
    v = latent.stationary_var
    cov = np.exp(4.0 * v * latent.rho**lag) - 1.0
    var = np.exp(4.0 * v) * t_fourth_moment(nu) - 1.0
    return float(cov / var)


# --------------------------------------------------------------------------- shape and invariants


def test_shape_dtype_anchor_and_seeding() -> None:
    mu, sigma = np.zeros(12), np.full(12, 0.01)
    a = sample_paths(250.5, mu, sigma, 5.0, 64, np.random.default_rng(7), LatentVol(0.9, 0.2))
    b = sample_paths(250.5, mu, sigma, 5.0, 64, np.random.default_rng(7), LatentVol(0.9, 0.2))
    c = sample_paths(250.5, mu, sigma, 5.0, 64, np.random.default_rng(8), LatentVol(0.9, 0.2))
    assert a.shape == (64, 13) and a.dtype == np.float32
    assert np.all(a[:, 0] == np.float32(250.5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("sigma", [1e-9, 0.05, 10.0, 1e6])
def test_prices_positive_and_finite_for_any_sigma(sigma: float) -> None:
    paths = sample_paths(3.0e4, np.zeros(288), np.full(288, sigma), 2.1, 500, np.random.default_rng(1),
                         LatentVol(0.99, 0.5), sigma_scale=2.0)
    assert np.all(np.isfinite(paths)) and np.all(paths > 0)
    ratio = paths.astype(np.float64) / 3.0e4
    assert np.all(np.abs(np.log(ratio)) <= MAX_LOG_MOVE + 1e-5)


@pytest.mark.parametrize("sigma, scale, mu, latent", [
    (1e39, 1.0, 0.0, LatentVol()),  # finite in float64, inf once cast to float32: inf - inf in the cumsum
    (1e300, 1.0, 0.0, LatentVol(0.99, 0.03)),
    (1e30, 1e300, 0.0, LatentVol()),  # sigma * sigma_scale overflows float64
    (1e34, 1.0, 0.0, LatentVol()),  # heavy-tailed draws (nu = 2.05) times sigma overflow float32
    (0.01, 1.0, 0.0, LatentVol(0.5, 30.0)),  # exp(latent log-vol) overflows: 0 * inf on the zero stratum
    (1e39, 1.0, -1e39, LatentVol()),  # +-inf steps and a -inf drift
    (1e300, 1e10, 0.0, LatentVol(0.9999, 1.0)),  # inf std times exp(-Var z) = 0: NaN std
    (0.01, 1.0, 0.0, LatentVol(0.5, LOG_VOL_MAX)),  # the largest latent std accepted
    (1e300, 1e10, 0.0, LatentVol(float(np.nextafter(1.0, 0.0)), LOG_VOL_MAX)),  # and its largest variance
])
def test_huge_but_finite_parameters_never_give_nan_prices(sigma: float, scale: float, mu: float,
                                                           latent: LatentVol) -> None:
    n = 288
    paths = sample_paths(100.0, np.full(n, mu), np.full(n, sigma), 2.05, 1001, np.random.default_rng(2),
                         latent, sigma_scale=scale)
    assert np.all(np.isfinite(paths)) and np.all(paths > 0) and np.all(paths[:, 0] == np.float32(100.0))
    assert np.all(np.abs(np.log(paths.astype(np.float64) / 100.0)) <= MAX_LOG_MOVE + 1e-5)


@pytest.mark.parametrize("anchor", [2.0e6, 9.0e6, 3.0e-18])
def test_paths_of_an_anchor_near_the_wire_limits_stay_sendable(anchor: float) -> None:
    """HEAD refuses every float from 1e7 up ("12345678.0" has 9 characters): an asset at 2e6 whose paths were
    allowed e^3 above it got no reply at all. Its paths are held inside what a reply can carry instead."""
    request = ForecastRequest("BTC", 1_800_000_000, 300, 86_400, 1000)
    paths = sample_paths(anchor, np.zeros(288), np.full(288, 0.2), 2.5, 1000, np.random.default_rng(3))
    assert paths.max() < 1e7 and paths.min() > 1e-18
    rendered = json.loads(render_json(request, round_for_wire(paths)))
    shape = (request.start_ts, request.time_increment, request.time_length, request.num_simulations)
    assert validate_response_head(rendered, *shape) == validate_response_upstream(rendered, *shape) == "CORRECT"


@pytest.mark.parametrize("anchor", [9.995e6, 9_999_999.0, 1.005e-18])
def test_a_sendable_anchor_between_the_margin_and_the_wire_limit_keeps_its_paths_sendable(anchor: float) -> None:
    """An anchor the wire carries but closer to its limit than the rounding margin (9.99e6 to 1e7, 1e-18 to
    1.01e-18) kept the plain +-e^3 bounds: about half of its paths crossed the limit, EWMA-t's as much as the
    model's, and no reply was sent. They stop at the anchor on that side instead."""
    request = ForecastRequest("BTC", 1_800_000_000, 60, 3600, 1000)
    paths = sample_paths(anchor, np.zeros(60), np.full(60, 0.001), 5.0, 1000, np.random.default_rng(3))
    if anchor > 1.0:
        assert paths.max() == np.float32(anchor) and paths.min() < np.float32(anchor)
    else:
        assert paths.min() == np.float32(anchor) and paths.max() > np.float32(anchor)
    rendered = json.loads(render_json(request, round_for_wire(paths)))
    shape = (request.start_ts, request.time_increment, request.time_length, request.num_simulations)
    assert validate_response_head(rendered, *shape) == validate_response_upstream(rendered, *shape) == "CORRECT"


def test_the_usual_anchors_keep_the_plain_bounds() -> None:
    """The narrowing binds only within e^3 of the wire limits: every asset served today keeps +-MAX_LOG_MOVE
    (and so its paths, bit for bit)."""
    for anchor in (1e-16, 1e-4, 1.0, 3.0e4, 4.9e5):
        assert log_move_bounds(anchor) == (-MAX_LOG_MOVE, MAX_LOG_MOVE)


def test_extreme_anchors_stay_finite_in_float32() -> None:
    for anchor in (1e-30, 1e30):
        paths = sample_paths(anchor, np.zeros(5), np.full(5, 10.0), 3.0, 100, np.random.default_rng(0))
        assert np.all(np.isfinite(paths)) and np.all(paths > 0)


def test_zero_sigma_gives_flat_paths_with_drift() -> None:
    mu = np.full(4, 0.01)
    paths = sample_paths(100.0, mu, np.zeros(4), 5.0, 3, np.random.default_rng(0))
    expected = 100.0 * np.exp(np.cumsum(mu))
    np.testing.assert_allclose(paths[:, 1:], np.broadcast_to(expected, (3, 4)), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    ({"mu": np.zeros(3)}, "1-D of one length"),
    ({"sigma": np.array([0.1, -0.1, 0.1, 0.1])}, "sigma finite and >= 0"),
    ({"sigma": np.array([0.1, np.nan, 0.1, 0.1])}, "sigma finite and >= 0"),
    ({"mu": np.array([0.0, np.inf, 0.0, 0.0])}, "mu must be finite"),
    ({"anchor": 0.0}, "anchor price"),
    ({"anchor": float("nan")}, "anchor price"),
    ({"anchor": 1e40}, "anchor price"),
    ({"n_paths": 0}, "n_paths"),
    ({"n_paths": 2.5}, "n_paths"),
    ({"nu": np.array([5.0, 5.0])}, "one value per step"),
    ({"nu": float("nan")}, "nu must be > 0"),
    ({"sigma_scale": -1.0}, "sigma_scale"),
    ({"sigma_scale": float("inf")}, "sigma_scale"),
])
def test_bad_parameters_raise_typed_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"anchor": 100.0, "mu": np.zeros(4), "sigma": np.full(4, 0.01), "nu": 5.0,
                               "n_paths": 10, "rng": np.random.default_rng(0)}
    args.update(kwargs)
    with pytest.raises(SamplingError, match=message):
        sample_paths(**args)  # type: ignore[arg-type]


def test_latent_vol_rejects_bad_parameters() -> None:
    # s beyond LOG_VOL_MAX overflowed: s**2 raised OverflowError, a float32 s of inf made NaN prices
    for rho, s in ((1.0, 0.1), (-0.1, 0.1), (0.5, -0.1), (0.5, float("inf")), (0.5, float("nan")), (0.5, 1e39),
                   (0.0, 1e200)):
        with pytest.raises(SamplingError):
            LatentVol(rho, s)
    assert issubclass(SamplingError, ValueError)


# --------------------------------------------------------------------------- innovations


@pytest.mark.parametrize("nu", [2.5, 4.0, 7.0, 30.0])
def test_unit_t_follows_the_rescaled_student_t_law(nu: float) -> None:
    draws = unit_t(np.random.default_rng(11), nu, (200_000, 1))[:, 0]
    # Kolmogorov-Smirnov against t(nu) scaled to unit variance.
    result = stats.kstest(draws / np.sqrt((nu - 2.0) / nu), stats.t(nu).cdf)
    assert result.pvalue > 1e-3


def test_unit_t_has_unit_variance() -> None:
    nu = 10.0  # finite 8th moment: the variance of the sample variance exists
    draws = unit_t(np.random.default_rng(3), nu, (400_000, 1))[:, 0]
    se = np.sqrt(np.var(draws**2) / draws.size)
    assert abs(np.mean(draws**2) - 1.0) < Z_TOL * se


def test_per_step_nu_gives_per_step_tails() -> None:
    nu = np.array([4.5, 60.0])
    draws = unit_t(np.random.default_rng(5), nu, (300_000, 2))
    for k in range(2):
        assert stats.kstest(draws[:, k] / np.sqrt((nu[k] - 2.0) / nu[k]), stats.t(nu[k]).cdf).pvalue > 1e-3


@pytest.mark.parametrize("nu", [0.5, 2.0])
def test_nu_at_or_below_two_is_sampled_at_the_floor(nu: float) -> None:
    """At nu = 2 the unit-variance rescale sqrt((nu - 2) / nu) is 0: a floor at 2 instead of NU_MIN would
    silently turn every innovation into 0 (flat paths, the worst CRPS), not raise."""
    draws = unit_t(np.random.default_rng(9), nu, (2_000, 3))
    assert np.array_equal(draws, unit_t(np.random.default_rng(9), NU_MIN, (2_000, 3)))
    assert np.all(draws != 0.0)


def test_infinite_nu_is_gaussian() -> None:
    draws = unit_t(np.random.default_rng(5), float("inf"), (200_000, 1))[:, 0]
    assert stats.kstest(draws, stats.norm.cdf).pvalue > 1e-3


# --------------------------------------------------------------------------- stratified normals


def test_every_step_holds_each_normal_midpoint_quantile_once() -> None:
    n = 1000
    z = stratified_normal(np.random.default_rng(4), (n, 300))
    midpoints = stats.norm.ppf((np.arange(n) + 0.5) / n)
    columns = np.sort(z, axis=0)
    assert np.all(columns == columns[:, :1])  # the same set at every step
    np.testing.assert_allclose(columns[:, 0], midpoints / np.sqrt(np.mean(midpoints**2)), rtol=1e-6)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose((z.astype(np.float64) ** 2).mean(axis=0), 1.0, rtol=1e-6)
    # so each step's empirical CDF is within 1/n of the normal CDF everywhere
    assert stats.kstest(z[:, 0], stats.norm.cdf).statistic <= 1.0 / n


def test_a_path_meets_the_strata_in_independent_random_orders() -> None:
    z = stratified_normal(np.random.default_rng(8), (20, 50_000))
    for path in (0, 7, 19):  # one path's draws over many steps: uniform over the 20 strata
        counts = np.unique(z[path], return_counts=True)[1]
        assert counts.size == 20 and stats.chisquare(counts).pvalue > 1e-3
    # a path's stratum at one step says nothing about its stratum at the next
    rank_corr = stats.spearmanr(z[:, :-1].ravel(), z[:, 1:].ravel()).statistic
    assert abs(rank_corr) < Z_TOL / np.sqrt(z[:, 1:].size)
    assert np.array_equal(z, stratified_normal(np.random.default_rng(8), (20, 50_000)))  # seeded
    assert not np.array_equal(z, stratified_normal(np.random.default_rng(9), (20, 50_000)))


def test_a_single_path_gets_plain_normal_draws() -> None:
    z = stratified_normal(np.random.default_rng(2), (1, 100_000))
    assert stats.kstest(z[0], stats.norm.cdf).pvalue > 1e-3
    two = stratified_normal(np.random.default_rng(2), (2, 50))
    assert np.allclose(np.sort(two, axis=0), [[-1.0], [1.0]])  # midpoints +-0.674, scaled to variance 1
    paths = sample_paths(100.0, np.zeros(60), np.full(60, 0.001), 5.0, 1, np.random.default_rng(2),
                         LatentVol(0.9, 0.1))
    assert paths.shape == (1, 61) and np.all(np.isfinite(paths)) and np.unique(paths).size > 50


def test_a_stratified_ensemble_scores_like_the_law_itself() -> None:
    # The validator's ensemble CRPS of n iid draws exceeds the law's own CRPS by E|X - X'| / 2n on
    # average; the midpoint ensemble should remove nearly all of it.
    n, m = 1000, 4000
    rng = np.random.default_rng(3)
    y = rng.standard_normal(m)
    exact = y * (2 * stats.norm.cdf(y) - 1) + 2 * stats.norm.pdf(y) - 1 / np.sqrt(np.pi)
    iid_excess = 1 / (np.sqrt(np.pi) * n)  # E|X - X'| / 2n for N(0, 1)
    excess = crps_ensemble(y, stratified_normal(rng, (n, m)).astype(np.float64)) - exact
    se = excess.std(ddof=1) / np.sqrt(m)
    assert se < 0.01 * iid_excess
    assert abs(excess.mean()) < 0.05 * iid_excess


def test_sample_paths_stratify_the_innovations() -> None:
    n, sigma = 500, 0.01
    paths = sample_paths(100.0, np.zeros(40), np.full(40, sigma), float("inf"), n, np.random.default_rng(6))
    z = log_returns(paths) / sigma  # Gaussian innovations, no latent vol: the stratified normals
    strata = np.floor(stats.norm.cdf(z) * n).astype(int)  # midpoints sit mid-stratum: no edge effects
    assert np.all(np.sort(strata, axis=0) == np.arange(n)[:, None])
    iid = sample_paths(100.0, np.zeros(40), np.full(40, sigma), float("inf"), n, np.random.default_rng(6),
                       stratified=False)
    iid_strata = np.floor(stats.norm.cdf(log_returns(iid) / sigma) * n).astype(int)
    held = np.array([np.bincount(iid_strata[:, k], minlength=n) for k in range(40)])
    assert 0.3 < np.mean(held == 1) < 0.45  # iid: a stratum holds exactly one draw with probability ~1/e


# --------------------------------------------------------------------------- latent volatility


def test_latent_start_is_stationary() -> None:
    latent = LatentVol(rho=0.98, s=0.15)
    z = latent_log_vol(np.random.default_rng(21), latent, (200_000, 50))
    target = latent.stationary_var  # s^2 / (1 - rho^2)
    for column in (0, 1, 25, 49):
        sample_var = z[:, column].var()
        se = target * np.sqrt(2.0 / (z.shape[0] - 1))  # Gaussian: Var(s^2) = 2 sigma^4 / (n - 1)
        assert abs(sample_var - target) < Z_TOL * se, column
    # Lag-one autocorrelation is rho from the first step on.
    corr = np.corrcoef(z[:, 0], z[:, 1])[0, 1]
    assert abs(corr - latent.rho) < Z_TOL * (1 - latent.rho**2) / np.sqrt(z.shape[0])


def test_latent_multiplier_preserves_mean_square() -> None:
    latent = LatentVol(rho=0.95, s=0.1)
    m = latent_multiplier(np.random.default_rng(4), latent, (400_000, 3))
    for column in range(3):
        sq = m[:, column] ** 2
        assert abs(sq.mean() - 1.0) < Z_TOL * sq.std() / np.sqrt(sq.size)
    # Without the exp(-Var z) correction the mean square would be exp(2 Var z): far outside the band.
    assert np.exp(2 * latent.stationary_var) - 1.0 > 20 * (m[:, 0] ** 2).std() / np.sqrt(m.shape[0])


@pytest.mark.parametrize("latent", [LatentVol(), LatentVol(0.95, 0.1)])
@pytest.mark.parametrize("scale", [1.0, 1.7])
def test_log_return_variance_is_sigma_squared_times_scale_squared(latent: LatentVol, scale: float) -> None:
    sigma = np.array([0.002, 0.001, 0.004])
    paths = sample_paths(100.0, np.zeros(3), sigma, 8.0, 300_000, np.random.default_rng(9), latent, scale)
    r = log_returns(paths)
    for k in range(3):
        sq = r[:, k] ** 2
        target = (sigma[k] * scale) ** 2
        # float32 prices add rounding noise of ~1e-7 relative: negligible next to these returns.
        assert abs(sq.mean() - target) < Z_TOL * sq.std() / np.sqrt(sq.size), k
        assert abs(r[:, k].mean()) < Z_TOL * r[:, k].std() / np.sqrt(sq.size)


def test_drift_is_the_mean_log_return() -> None:
    mu = np.array([0.001, -0.002])
    sigma = np.array([0.01, 0.01])
    paths = sample_paths(50.0, mu, sigma, 6.0, 300_000, np.random.default_rng(2), LatentVol(0.9, 0.1))
    r = log_returns(paths)
    for k in range(2):
        assert abs(r[:, k].mean() - mu[k]) < Z_TOL * r[:, k].std() / np.sqrt(r.shape[0])


def test_aggregated_returns_keep_fat_tails_only_with_latent_vol() -> None:
    n_paths, n_steps, nu = 100_000, 60, 10.0
    sigma = np.full(n_steps, 0.001)
    latent = LatentVol(0.95, 0.1)
    with_latent = log_returns(sample_paths(100.0, np.zeros(n_steps), sigma, nu, n_paths,
                                           np.random.default_rng(31), latent)).sum(axis=1)
    iid = log_returns(sample_paths(100.0, np.zeros(n_steps), sigma, nu, n_paths,
                                   np.random.default_rng(32))).sum(axis=1)
    k_latent, se_latent = batch_estimate(with_latent, 20, excess_kurtosis)
    k_iid, se_iid = batch_estimate(iid, 20, excess_kurtosis)
    # Closed forms: iid sums lose their tails by the CLT (kurtosis / 60); latent vol keeps them.
    expected_latent = sum_excess_kurtosis(latent, nu, n_steps)
    expected_iid = sum_excess_kurtosis(LatentVol(), nu, n_steps)
    assert abs(k_latent - expected_latent) < Z_TOL * se_latent
    assert abs(k_iid - expected_iid) < Z_TOL * se_iid
    assert k_latent - k_iid > Z_TOL * np.hypot(se_latent, se_iid)


def test_squared_returns_cluster_only_with_latent_vol() -> None:
    n_paths, n_steps, nu = 50_000, 40, 10.0
    sigma = np.full(n_steps, 0.001)
    latent = LatentVol(0.95, 0.1)

    def lag_one_acf(r: FloatArray) -> float:
        sq = r**2
        a, b = sq[:, :-1].ravel(), sq[:, 1:].ravel()
        return float(np.corrcoef(a, b)[0, 1])

    clustered = log_returns(sample_paths(100.0, np.zeros(n_steps), sigma, nu, n_paths,
                                         np.random.default_rng(41), latent))
    iid = log_returns(sample_paths(100.0, np.zeros(n_steps), sigma, nu, n_paths, np.random.default_rng(42)))
    acf_latent, se_latent = batch_estimate(clustered, 20, lag_one_acf)
    acf_iid, se_iid = batch_estimate(iid, 20, lag_one_acf)
    assert acf_latent > Z_TOL * se_latent
    assert abs(acf_latent - squared_return_acf(latent, nu, 1)) < Z_TOL * se_latent
    assert abs(acf_iid) < Z_TOL * se_iid

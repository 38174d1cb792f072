"""Calibration: update rules, prompt building without look-ahead, the JSON state, and convergence."""

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from core.artifacts import ArtifactStore
from core.calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    CalibrationState,
    Case,
    CasePlan,
    Entry,
    UpdateRules,
    calibrate_key,
    load_scale_lookup,
    next_scale,
    recent_cases,
    run_calibration,
    run_calibration_job,
    scale_key,
    search_scale,
    store_histories,
)
from core.engines.base import EngineError, ParametricEngine, StepParams
from core.evaluation import AssetHistory
from core.forecast import Forecaster
from core.history_store import HistoryStore
from core.path_sampling import unit_t
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest
from core.settings import Settings

DAY = 86_400
T0 = 1_760_000_000 // DAY * DAY  # a UTC midnight in 2025
MINUTE_SIGMA = 0.0008


class FixedSigmaEngine(ParametricEngine):
    """Constant one-step std (per minute, scaled by sqrt(step)) and fixed tails: a known-wrong model."""

    name = "fixed"

    def __init__(self, minute_sigma: float, nu: float) -> None:
        self.minute_sigma = minute_sigma
        self.nu = nu

    def params(self, request: ForecastRequest, snapshot: MarketSnapshot) -> StepParams:
        n = request.n_steps
        sigma = self.minute_sigma * math.sqrt(request.time_increment / 60)
        return StepParams(np.zeros(n), np.full(n, sigma), self.nu)


def t_history(minutes: int, sigma: float, nu: float, seed: int, start: int = T0) -> PriceHistory:
    """1-minute closes from unit-variance Student-t log returns with per-minute std ``sigma``."""
    returns = sigma * unit_t(np.random.default_rng(seed), nu, (minutes, 1))[:, 0]
    return PriceHistory.from_arrays(60, start + 60 * np.arange(minutes), 2500.0 * np.exp(np.cumsum(returns)))


# --------------------------------------------------------------------------------------- update rule


def test_defaults_match_the_calibration_constants() -> None:
    settings = Settings()
    hf, lf = UpdateRules.for_prompt(settings, 60), UpdateRules.for_prompt(settings, 300)
    assert (hf.alpha, hf.max_move, hf.min_samples) == (0.4, 0.10, 150)
    assert (lf.alpha, lf.max_move, lf.min_samples) == (0.2, 0.07, 120)
    assert (hf.scale_min, hf.scale_max) == (0.5, 2.0) == (lf.scale_min, lf.scale_max)


def test_next_scale_is_a_log_space_ema_within_move_and_clamp() -> None:
    rules = UpdateRules(alpha=0.4, scale_min=0.5, scale_max=2.0, max_move=0.10, min_samples=1)
    # Inside the move limit: the geometric EMA exactly.
    assert next_scale(1.0, 1.2, rules) == pytest.approx(1.2**0.4)
    assert next_scale(1.0, 1.0 / 1.2, rules) == pytest.approx(1.2**-0.4)
    # Far targets: capped at +-10 % of the current scale.
    assert next_scale(1.0, 5.0, rules) == pytest.approx(1.1)
    assert next_scale(1.0, 0.1, rules) == pytest.approx(0.9)
    # The clamp wins over the EMA.
    assert next_scale(1.95, 2.5, rules) == pytest.approx(2.0)
    assert next_scale(0.52, 0.3, rules) == pytest.approx(0.5)
    with pytest.raises(CalibrationError):
        next_scale(1.0, float("nan"), rules)
    with pytest.raises(CalibrationError):
        UpdateRules(alpha=0.0, scale_min=0.5, scale_max=2.0, max_move=0.1, min_samples=1)
    with pytest.raises(CalibrationError):
        UpdateRules(alpha=0.4, scale_min=1.5, scale_max=2.0, max_move=0.1, min_samples=1)


# -------------------------------------------------------------------------------------------- prompts


def test_recent_cases_see_no_future_and_use_the_validator_price_convention() -> None:
    m1 = t_history(3 * DAY // 60, MINUTE_SIGMA, 5.0, seed=1)
    gap = (m1.ts >= T0 + 2 * DAY + 14_400) & (m1.ts < T0 + 2 * DAY + 14_700)  # 5 missing minutes
    m1 = PriceHistory(60, m1.ts[~gap], m1.close[~gap])
    history = AssetHistory(m1, m1.resample(300))
    end = T0 + 2 * DAY + 6 * 3600
    plan = CasePlan(count=8, spacing_s=900, lookback_s=DAY, n_paths=50, seed=3)
    cases = recent_cases("ETH", history, 60, end, plan)
    assert 0 < len(cases) <= 8
    closes = dict(zip(m1.ts.tolist(), m1.close.tolist()))
    for case in cases:
        start = case.request.start_ts
        assert start % 60 == 0 and start + 3600 + 60 <= end
        assert case.request.num_simulations == 50 and case.request.time_length == 3600
        # No look-ahead: the engine sees only bars closed a minute before the start.
        assert case.snapshot.m1 is not None
        assert int(case.snapshot.m1.ts[-1]) + 60 <= start - 60
        assert case.snapshot.anchor == closes[int(case.snapshot.m1.ts[-1])]
        assert int(case.snapshot.m1.ts[0]) >= start - 60 - DAY
        # Realised price at grid time t = close of the 1-minute bar opening at t; missing -> NaN.
        grid = start + 60 * np.arange(61)
        expected = np.array([closes.get(int(t), np.nan) for t in grid])
        np.testing.assert_array_equal(case.realised, expected)
    assert any(np.isnan(c.realised).any() for c in cases), "the gap should fall inside some prompt"


def test_recent_cases_for_24h_prompts_and_bad_grid() -> None:
    m1 = t_history(5 * DAY // 60, MINUTE_SIGMA, 5.0, seed=2)
    history = AssetHistory(m1, m1.resample(300))
    end = int(m1.ts[-1]) + 60
    cases = recent_cases("BTC", history, 300, end, CasePlan(4, 3600, 2 * DAY, 20, 0))
    assert len(cases) == 4
    for case in cases:
        assert case.realised.shape == (289,) and np.isfinite(case.realised).all()
        assert case.snapshot.m5 is not None and int(case.snapshot.m5.ts[-1]) + 300 <= case.request.start_ts - 60
    with pytest.raises(CalibrationError, match="no prompt grid"):
        recent_cases("BTC", history, 120, end, CasePlan(4, 3600, DAY, 20, 0))


# ---------------------------------------------------------------------------------------------- state


def test_state_is_a_scale_lookup_with_default_one_and_drives_the_forecaster() -> None:
    state = CalibrationState()
    assert state.scale("ewma_t", "BTC", 60) == 1.0
    state.put(Entry("ewma_t", "BTC", 60, scale=2.0))
    assert state.scale("ewma_t", "BTC", 60) == 2.0
    assert state.scale("ewma_t", "BTC", 300) == 1.0 and state.scale("gbm", "BTC", 60) == 1.0

    m1 = t_history(DAY // 60, MINUTE_SIGMA, 5.0, seed=4)
    snapshot = MarketSnapshot("BTC", m1, m1.resample(300), float(m1.close[-1]), int(m1.ts[-1]) + 60)
    request = ForecastRequest("BTC", int(m1.ts[-1]) + 120, 60, 3600, 100)
    plain = Forecaster(seed=5).run(request, snapshot)
    scaled = Forecaster(seed=5, scale=state.lookup).run(request, snapshot)
    # Same random numbers, twice the std: every log move doubles.
    np.testing.assert_allclose(np.log(scaled.paths[:, 1:] / scaled.paths[:, :1]),
                               2.0 * np.log(plain.paths[:, 1:] / plain.paths[:, :1]), rtol=2e-3, atol=2e-6)


def test_state_json_round_trip_and_atomic_save(tmp_path: Path) -> None:
    state = CalibrationState(meta={"run": "abc"})
    m1 = t_history(2 * DAY // 60, MINUTE_SIGMA, 5.0, seed=6)
    cases = recent_cases("SOL", AssetHistory(m1, None), 60, int(m1.ts[-1]) + 60, CasePlan(3, 900, DAY, 20, 0))
    rules = UpdateRules(alpha=0.4, scale_min=0.5, scale_max=2.0, max_move=0.1, min_samples=2)
    calibrate_key(state, "fixed", FixedSigmaEngine(MINUTE_SIGMA, 5.0), "SOL", 60, cases, rules, now=1234, seed=0)
    path = tmp_path / CALIBRATION_FILE
    state.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [CALIBRATION_FILE]  # no temp file left behind
    loaded = CalibrationState.load(path)
    assert loaded.entries == state.entries and loaded.meta == {"run": "abc"}
    assert loaded.to_json() == state.to_json()
    entry = loaded.entries[scale_key("fixed", "SOL", 60)]
    assert entry.last_update == 1234 and len(entry.history) == 1 and entry.history[0].applied


@pytest.mark.parametrize("document, message", [
    (b"{not json", "not valid JSON"),
    (b'{"format": 2, "entries": {}}', "format"),
    (b'{"format": 1, "entries": []}', "must be objects"),
    ((b'{"format": 1, "entries": {"a:B:60": {"engine": "a", "asset": "B", "time_increment": 60, '
      b'"scale": -1, "samples": 0}}}'), "outside the sane range"),
    ((b'{"format": 1, "entries": {"a:B:60": {"engine": "a", "asset": "B", "time_increment": 60, '
      b'"scale": 1e-300, "samples": 0}}}'), "outside the sane range"),  # was served: flat paths
    ((b'{"format": 1, "entries": {"a:B:0": {"engine": "a", "asset": "B", "time_increment": 0, '
      b'"scale": 1, "samples": 0}}}'), "must be > 0"),
    ((b'{"format": 1, "entries": {"a:B:60": {"engine": "a", "asset": "C", "time_increment": 60, '
      b'"scale": 1, "samples": 0}}}'), "different key"),
    ((b'{"format": 1, "entries": {"a:B:60": {"engine": "a", "asset": "B", "time_increment": 60, '
      b'"scale": "big", "samples": 0}}}'), "finite number"),
    ((b'{"format": 1, "entries": {"a:B:60": {"engine": "a", "asset": "B", "time_increment": 60, '
      b'"scale": 1, "samples": 0, "history": {}}}}'), "must be a list"),
    # A corrupt file must fail as CalibrationError, not as whatever the JSON or float machinery raises.
    ((b'{"format": 1, "entries": {"a:B:60": {"engine": "a", "asset": "B", "time_increment": 60, '
      b'"scale": 1' + b"0" * 400 + b', "samples": 0}}}'), "finite number"),  # was OverflowError
    ((b'{"format": 1, "entries": {"a:B:60": {"engine": "a", "asset": "B", "time_increment": 60, '
      b'"scale": 1, "samples": 0, "history": [{"applied": true, "at": 1, "old": 1, "new": 1, '
      b'"samples": 1, "target": 1' + b"0" * 400 + b'}]}}}'), "finite number"),  # was OverflowError
    (b"[" * 100_000, "not valid JSON"),  # was RecursionError
    (b'{"format": true, "entries": {}}', "format"),  # was accepted: True == 1
])
def test_malformed_state_is_refused_with_a_clear_error(document: bytes, message: str) -> None:
    with pytest.raises(CalibrationError, match=message):
        CalibrationState.from_json(document)


# --------------------------------------------------------------------------------------------- runs


def test_too_few_prompts_leave_the_scale_alone() -> None:
    m1 = t_history(2 * DAY // 60, MINUTE_SIGMA, 5.0, seed=7)
    cases = recent_cases("BTC", AssetHistory(m1, None), 60, int(m1.ts[-1]) + 60, CasePlan(5, 900, DAY, 20, 0))
    state = CalibrationState({scale_key("fixed", "BTC", 60): Entry("fixed", "BTC", 60, scale=1.3)})
    outcome = calibrate_key(state, "fixed", FixedSigmaEngine(MINUTE_SIGMA, 5.0), "BTC", 60, cases,
                            UpdateRules.for_prompt(Settings(), 60), now=99, seed=0)
    assert not outcome.moved and outcome.new == outcome.old == 1.3
    assert "150 needed" in outcome.reason
    entry = state.entries[scale_key("fixed", "BTC", 60)]
    assert entry.scale == 1.3 and entry.history[-1].applied is False and entry.last_update is None


class ZeroPathsEngine(FixedSigmaEngine):
    """Answers with zero prices: every prompt is invalid, so every candidate scale has mean CRPS inf."""

    name = "zeros"

    def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, rng: np.random.Generator,
                 sigma_scale: float = 1.0) -> npt.NDArray[np.float32]:
        return np.zeros((request.num_simulations, request.n_points), np.float32)


def test_a_key_that_scores_no_prompt_still_saves(tmp_path: Path) -> None:
    m1 = t_history(2 * DAY // 60, MINUTE_SIGMA, 5.0, seed=6)
    cases = recent_cases("SOL", AssetHistory(m1, None), 60, int(m1.ts[-1]) + 60, CasePlan(3, 900, DAY, 20, 0))
    rules = UpdateRules(alpha=0.4, scale_min=0.5, scale_max=2.0, max_move=0.1, min_samples=2)
    state = CalibrationState()
    outcome = calibrate_key(state, "zeros", ZeroPathsEngine(MINUTE_SIGMA, 5.0), "SOL", 60, cases, rules,
                            now=7, seed=0)
    assert not outcome.moved and outcome.samples == 0 and outcome.new == outcome.old == 1.0
    assert outcome.mean_crps_target is None and outcome.mean_crps_old is None
    state.save(tmp_path / CALIBRATION_FILE)  # raised "Out of range float values are not JSON compliant"
    assert CalibrationState.load(tmp_path / CALIBRATION_FILE).entries == state.entries


class PickyEngine(FixedSigmaEngine):
    """Refuses some prompts as PatchTST does one whose history is too short for its context."""

    name = "picky"

    def params(self, request: ForecastRequest, snapshot: MarketSnapshot) -> StepParams:
        if request.start_ts // 60 % 2:  # about half the prompts
            raise EngineError("need 480 returns at 60s, history has 12")
        return super().params(request, snapshot)


class PickyForecastEngine(PickyEngine):
    """The same, through an engine of its own forecast (scored lazily, not through params)."""

    def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, rng: np.random.Generator,
                 sigma_scale: float = 1.0) -> npt.NDArray[np.float32]:
        return ParametricEngine.forecast(self, request, snapshot, rng, sigma_scale)


@pytest.mark.parametrize("engine", [PickyEngine(MINUTE_SIGMA, 5.0), PickyForecastEngine(MINUTE_SIGMA, 5.0)])
def test_prompts_an_engine_cannot_forecast_are_left_unscored(engine: FixedSigmaEngine) -> None:
    # One such prompt raised out of calibrate_key, and so out of the whole run (every asset and grid).
    m1 = t_history(2 * DAY // 60, MINUTE_SIGMA, 5.0, seed=6)
    cases = recent_cases("SOL", AssetHistory(m1, None), 60, int(m1.ts[-1]) + 60, CasePlan(12, 600, DAY, 20, 0))
    refused = sum(c.request.start_ts // 60 % 2 for c in cases)
    assert 0 < refused < len(cases)
    rules = UpdateRules(alpha=0.4, scale_min=0.5, scale_max=2.0, max_move=0.1, min_samples=2)
    outcome = calibrate_key(CalibrationState(), "picky", engine, "SOL", 60, cases, rules, now=7, seed=0)
    assert outcome.moved and outcome.samples == len(cases) - refused


def test_search_finds_a_smaller_scale_for_an_overdispersed_engine() -> None:
    m1 = t_history(6 * DAY // 60, MINUTE_SIGMA, 30.0, seed=8)
    cases = recent_cases("BTC", AssetHistory(m1, None), 60, int(m1.ts[-1]) + 60, CasePlan(100, 3600, DAY, 100, 0))
    found = search_scale(FixedSigmaEngine(MINUTE_SIGMA / 0.7, 30.0), cases, 1.0, 0.5, 2.0, 0.01, 0, "upstream")
    assert found.samples == len(cases) == 100
    assert found.mean_crps <= found.mean_crps_current
    assert found.target == pytest.approx(0.7, rel=0.08)  # 100 independent hours: a few % of noise


def test_calibration_converges_to_the_true_scale_within_move_limits() -> None:
    """Truth is 1.5x the engine's sigma; each run sees fresh, later data like the hourly job.

    Default update rules (alpha 0.4, +-10 %, 150 prompts). One target from 155 independent hours
    has a noise of about 3 %; after two capped runs the log-EMA closes the remaining gap by 0.6 per
    run, so eight runs leave ~1 % of gap and the EMA averages the noise down to ~1.7 %.
    """
    settings = Settings(calibration_windows_hf=155, calibration_spacing_hf_s=3600, calibration_paths=100,
                        cache_days_hf=1.0, calibration_rules="head", calibration_search_tol=0.02)
    engine = FixedSigmaEngine(MINUTE_SIGMA / 1.5, 5.0)
    runs = 8
    block = 155 * 60 + 3 * 60  # minutes of fresh prompts per run
    m1 = t_history(DAY // 60 + 60 + runs * block, MINUTE_SIGMA, 5.0, seed=11)
    history = AssetHistory(m1, None)
    state = CalibrationState()
    hf_limit = settings.calibration_max_move_hf
    scales, targets = [1.0], []
    for run in range(runs):
        end = T0 + 60 * (DAY // 60 + 60 + (run + 1) * block)
        result = run_calibration(state, {"fixed": engine}, "fixed", {"BTC": history}, [60], end, settings,
                                 now=end)
        (outcome,) = result.outcomes
        assert outcome.moved and outcome.samples >= settings.calibration_min_samples_hf
        assert outcome.target is not None
        targets.append(outcome.target)
        assert abs(outcome.new / outcome.old - 1.0) <= hf_limit + 1e-12  # the per-run move limit
        scales.append(state.scale("fixed", "BTC", 60))
    assert scales[1] == pytest.approx(1.1) and scales[2] == pytest.approx(1.21)  # capped while far away
    assert all(b > a for a, b in itertools.pairwise(scales[:5]))
    assert float(np.mean(targets)) == pytest.approx(1.5, rel=0.03)  # 8 targets: ~1.2 % noise
    assert scales[-1] == pytest.approx(1.5, rel=0.04)
    entry = state.entries[scale_key("fixed", "BTC", 60)]
    assert [m.new for m in entry.history] == pytest.approx(scales[1:])


def test_job_calibrates_from_the_history_store_and_publishes_through_the_gate(tmp_path: Path) -> None:
    # The served engine stays the default (patchtst): the job calibrates SYNTH_CALIBRATION_ENGINE, EWMA-t.
    settings = Settings(artifacts_dir=tmp_path / "artifacts", data_dir=tmp_path / "data",
                        calibration_windows_hf=12, calibration_min_samples_hf=10, calibration_windows_lf=4,
                        calibration_min_samples_lf=3, calibration_paths=40, cache_days_hf=0.5, cache_days_lf=1.0,
                        champion_tolerance=0.01)
    m1 = t_history(4 * DAY // 60, MINUTE_SIGMA, 5.0, seed=12)
    store = HistoryStore(settings.data_dir / "history", durable=False)
    store.append("BTC", m1)
    store.append("BTC", m1.resample(300))
    now = int(m1.ts[-1]) + 60
    first = run_calibration_job(settings, now=now)
    keys = {o["key"] for o in first["outcomes"]}
    assert keys == {"ewma_t:BTC:60", "ewma_t:BTC:300"}
    assert first["published"] is not None and first["decision"]["promote"]
    artifacts = ArtifactStore(settings.artifacts_dir)
    assert artifacts.current_version() == first["published"]
    current = artifacts.load_current()
    for outcome in first["outcomes"]:
        engine, asset, increment = outcome["key"].split(":")
        assert current.calibration.scale(engine, asset, int(increment)) == pytest.approx(outcome["new"])
    assert json.loads((settings.artifacts_dir / "current" / CALIBRATION_FILE).read_text())["meta"]["end"] == now
    # A second run has a champion to beat: both scores are reported.
    # A second run keeps moving toward the same targets and has a champion to beat: both scores reported.
    second = run_calibration_job(settings, now=now)
    assert any(o["moved"] and o["new"] != o["old"] for o in second["outcomes"])
    decision = second["decision"]
    assert decision["champion"] == first["published"] and decision["challenger"] != first["published"]
    assert decision["champion_crps"] is not None and decision["challenger_crps"] is not None
    assert (second["published"] is not None) == decision["promote"]
    assert artifacts.current_version() == (second["published"] or first["published"])


def test_job_does_not_publish_over_a_set_published_while_it_calibrated(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The hour's search runs on the set current when it started; a retrain published meanwhile must not get
    these scales (computed on the models it replaced) staged as if they were computed on it."""
    from core import calibration

    settings = Settings(artifacts_dir=tmp_path / "artifacts", data_dir=tmp_path / "data",
                        calibration_windows_hf=12, calibration_min_samples_hf=10, calibration_windows_lf=4,
                        calibration_min_samples_lf=3, calibration_paths=40, cache_days_hf=0.5, cache_days_lf=1.0,
                        champion_tolerance=0.01)
    m1 = t_history(4 * DAY // 60, MINUTE_SIGMA, 5.0, seed=12)
    HistoryStore(settings.data_dir / "history", durable=False).append("BTC", m1)
    artifacts = ArtifactStore(settings.artifacts_dir)
    searched = calibration.run_calibration
    meanwhile: list[str] = []

    def search_while_a_retrain_publishes(*args: Any, **kwargs: Any) -> Any:
        run = searched(*args, **kwargs)
        retrained = {CALIBRATION_FILE: CalibrationState().to_json()}  # its own (empty) scales
        meanwhile.append(artifacts.publish(artifacts.stage(retrained, notes={"kind": "retrain"})))
        return run

    monkeypatch.setattr(calibration, "run_calibration", search_while_a_retrain_publishes)
    summary = run_calibration_job(settings, now=int(m1.ts[-1]) + 60)
    assert summary["published"] is None and "published meanwhile" in summary["reason"], summary
    assert artifacts.current_version() == meanwhile[0]  # the retrain's set stays, with no scales it never saw


def test_only_the_calibration_engines_scales_are_applied(tmp_path: Path) -> None:
    """Scales another engine left in the artifact (an earlier SYNTH_CALIBRATION_ENGINE) are ignored."""
    state = CalibrationState({e.key: e for e in (Entry("ewma_t", "BTC", 60, scale=1.2),
                                                 Entry("patchtst", "BTC", 60, scale=0.8))})
    store = ArtifactStore(tmp_path / "artifacts")
    store.publish(store.stage({CALIBRATION_FILE: state.to_json()}))
    default = load_scale_lookup(Settings(artifacts_dir=tmp_path / "artifacts"))
    assert default("ewma_t", "BTC", 60) == 1.2 and default("patchtst", "BTC", 60) == 1.0
    assert default("ewma_t", "ETH", 60) == 1.0  # no entry: unscaled
    model = load_scale_lookup(Settings(artifacts_dir=tmp_path / "artifacts", calibration_engine="patchtst"))
    assert model("patchtst", "BTC", 60) == 0.8 and model("ewma_t", "BTC", 60) == 1.0


def test_job_gate_scores_with_the_configured_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SYNTH_CALIBRATION_RULES drives the search and the gate alike (the gate used to score upstream always)."""
    import core.champion

    settings = Settings(artifacts_dir=tmp_path / "artifacts", data_dir=tmp_path / "data",
                        calibration_windows_hf=12, calibration_min_samples_hf=10, calibration_windows_lf=4,
                        calibration_min_samples_lf=3, calibration_paths=40, cache_days_hf=0.5, cache_days_lf=1.0,
                        calibration_rules="head")
    m1 = t_history(4 * DAY // 60, MINUTE_SIGMA, 5.0, seed=12)
    store = HistoryStore(settings.data_dir / "history", durable=False)
    store.append("BTC", m1)
    store.append("BTC", m1.resample(300))
    seen: list[str] = []
    real_compare = core.champion.compare

    def spy(*args: object, **kwargs: object) -> core.champion.ChampionDecision:
        seen.append(str(args[5] if len(args) > 5 else kwargs.get("rules", "upstream")))
        return real_compare(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(core.champion, "compare", spy)
    summary = run_calibration_job(settings, now=int(m1.ts[-1]) + 60)
    assert summary["decision"] is not None and seen == ["head"]


def test_a_job_with_nothing_to_calibrate_on_says_why(tmp_path: Path) -> None:
    """The hourly job on an empty store reported ``ok`` / ``nothing published`` with no outcome and no
    reason, while ``synth-miner calibrate`` on the same store refused clearly: the summary now says why."""
    settings = Settings(artifacts_dir=tmp_path / "artifacts", data_dir=tmp_path / "data")
    now = T0 + 40 * DAY
    empty = run_calibration_job(settings, now=now)
    assert empty["outcomes"] == [] and empty["published"] is None
    assert empty["reason"].startswith("no prompts: the history store holds no prices in the 21 days before "
                                      "2025-"), empty["reason"]
    assert str(tmp_path / "data") in empty["reason"]
    # Replayed prices never reach the store (core.refresh.durable_store): that is the reason to lead with.
    replayed = run_calibration_job(settings.model_copy(update={"price_provider": "replay"}), now=now)
    assert replayed["reason"].startswith("prices are replayed: the history store is not filled, nothing to "
                                         "calibrate on"), replayed["reason"]
    # A store with too little history: each key's own reason, not a bare "nothing published".
    store = HistoryStore(settings.data_dir / "history", durable=False)
    store.append("BTC", t_history(DAY // 60, MINUTE_SIGMA, 5.0, seed=13, start=now - DAY))
    short = run_calibration_job(settings, now=now)
    assert short["published"] is None and short["outcomes"]
    assert short["reason"].startswith("no scale moved: ewma_t:BTC:60: "), short["reason"]
    assert "prompts <" in short["reason"]


def test_a_market_that_closes_reaches_back_for_the_session_prompts_its_window_lacks(tmp_path: Path,
                                                                                    shared_data: Path) -> None:
    """SPY's regular-hours bars (as `data import` stores them) fill ~1 in 6.5 of the hourly slots: an equity key
    scored 29 prompts of the 140 its window holds, under the 120 needed, at every run: never calibrated. Its
    prompts now reach back (CasePlan.session_reach) for the older session prompts; a crypto key's do not."""
    from core.csv_history import read_csv

    now = 1_770_411_600  # Friday 2026-02-06 21:00Z, after the close; before the files' held-out split
    settings = Settings(artifacts_dir=tmp_path / "artifacts", data_dir=tmp_path / "data", calibration_windows_lf=14,
                        calibration_windows_hf=12,
                        calibration_min_samples_lf=12, calibration_paths=40, cache_days_lf=2.0)
    store = HistoryStore(settings.data_dir / "history", durable=False)
    for step, res in ((60, "1m"), (300, "5m")):
        store.append("SPYX", read_csv(shared_data / f"spy_{res}.csv.gz", step).between(now - 30 * DAY, now))
    history = AssetHistory(store.read("SPYX", 60, now - 30 * DAY, now), store.read("SPYX", 300, now - 30 * DAY, now))
    plan = CasePlan.for_prompt(settings, 300)
    latest_slots = recent_cases("SPYX", history, 300, now, CasePlan(**{**plan.__dict__, "session_reach": 1}))
    reached = recent_cases("SPYX", history, 300, now, plan)
    assert len(latest_slots) < 12 <= len(reached) == 14, (len(latest_slots), len(reached))
    assert [c.prompt.start_ts for c in reached[-len(latest_slots):]] == [c.prompt.start_ts for c in latest_slots]
    # Gold closes at weekends: it reaches back too (its 24 h key fills ~5 in 7 of the slots, under the floor).
    assert plan.reach("SPYX") == plan.reach("XAU") == 7 and plan.reach("BTC") == 1
    # What the job reads from the store reaches back as far: the reached prompts see the whole lookback the live
    # cache gave them, not one cut at the crypto span.
    read = store_histories(settings, now, ["SPYX"])["SPYX"]

    def seen(cases: list[Case]) -> list[tuple[int, int, int]]:
        return [(c.prompt.start_ts, len(c.snapshot.m1 or ()), len(c.snapshot.m5 or ())) for c in cases]

    assert seen(recent_cases("SPYX", read, 300, now, plan)) == seen(reached)
    summary = run_calibration_job(settings, now=now)
    lf = next(o for o in summary["outcomes"] if o["key"] == "ewma_t:SPYX:300")
    assert lf["moved"] and lf["samples"] == 14 and lf["reason"] == "ok", lf
    # The 1 h key asks 12 prompts here, short of the default 150 needed:
    # which the summary names although the other key moved and the set was published.
    assert summary["published"] and summary["not_calibrated"] == {"ewma_t:SPYX:60": "12 prompts < 150 needed"}, \
        summary

"""Champion/challenger: the promotion rule, and the gate in front of a real artifact store."""

import logging
from pathlib import Path

import numpy as np
import pytest

from core.artifact_files import ArtifactError
from core.artifact_sets import ArtifactSet
from core.artifacts import ArtifactStore
from core.calibration import CALIBRATION_FILE, CalibrationState, Case, CasePlan, Entry, recent_cases
from core.champion import (
    COMMITTED_MODELS,
    ChampionDecision,
    ForecasterFactory,
    artifact_forecaster,
    backtest_scores,
    challenge,
    challenge_models,
    challenge_set,
    decide,
    model_forecaster,
)
from core.engines.base import EngineError
from core.engines.ewma import EwmaTEngine
from core.engines.gbm import GbmEngine
from core.engines.patchtst import PatchTSTEngine
from core.engines_registry import build_engines
from core.evaluation import AssetHistory
from core.forecast import Forecaster
from core.path_sampling import unit_t
from core.prices import PriceHistory
from core.settings import Settings
from tests.model_fixtures import write_checkpoints

DAY = 86_400
T0 = 1_760_000_000 // DAY * DAY


# ------------------------------------------------------------------------------------------- the rule


def test_no_champion_means_promotion() -> None:
    d = decide("new", None, np.array([10.0, 12.0, np.nan]), None, 0.01)
    assert d.promote and d.champion is None and d.challenger_crps == 11.0 and d.challenger_invalid == 1


@pytest.mark.parametrize("challenger, champion, tolerance, promote", [
    ([9.0, 11.0], [10.0, 12.0], 0.0, True),  # better
    ([10.0, 12.0], [10.0, 12.0], 0.0, True),  # a tie does not lose
    ([10.2, 12.0], [10.0, 12.0], 0.01, True),  # 0.9 % worse, inside a 1 % tolerance
    ([10.5, 12.0], [10.0, 12.0], 0.01, False),  # 2.3 % worse
])
def test_mean_crps_with_tolerance(challenger: list[float], champion: list[float], tolerance: float,
                                  promote: bool) -> None:
    d = decide("new", "old", np.array(challenger), np.array(champion), tolerance)
    assert d.promote is promote
    assert d.challenger_crps == pytest.approx(np.mean(challenger))
    assert d.champion_crps == pytest.approx(np.mean(champion))
    assert d.cases == 2 and d.tolerance == tolerance


def test_failing_a_prompt_the_champion_answers_is_never_promoted() -> None:
    d = decide("new", "old", np.array([1.0, np.nan, 1.0]), np.array([5.0, 5.0, 5.0]), 0.5)
    assert not d.promote and "invalid on 1 prompt" in d.reason
    assert d.cases == 2 and d.challenger_invalid == 1 and d.champion_invalid == 0


def test_the_means_are_over_the_prompts_both_answered() -> None:
    """A prompt the champion failed must not count in the challenger's mean: a hard prompt only the
    challenger answered would make it look worse (and an easy one better) than it is, paired."""
    d = decide("new", "old", np.array([10.0, 10.0, 100.0]), np.array([11.0, 11.0, np.nan]), 0.0)
    assert d.promote and d.cases == 2 and d.champion_invalid == 1
    assert d.challenger_crps == pytest.approx(10.0) and d.champion_crps == pytest.approx(11.0)


def test_nothing_to_compare_on_keeps_the_champion() -> None:
    d = decide("new", "old", np.array([np.nan]), np.array([np.nan]), 0.0)
    assert not d.promote and d.cases == 0
    with pytest.raises(ValueError, match="same prompts"):
        decide("new", "old", np.array([1.0]), np.array([1.0, 2.0]), 0.0)
    with pytest.raises(ValueError, match="tolerance"):
        decide("new", "old", np.array([1.0]), np.array([1.0]), -0.1)


# ---------------------------------------------------------------------------------------- the gate


def student_t_cases(count: int, lookback_s: int) -> list[Case]:
    """Recent 1 h prompts on Student-t data, where the uncalibrated EWMA engine is about right."""
    rng = np.random.default_rng(21)
    minutes = 3 * DAY // 60
    close = 1800.0 * np.exp(np.cumsum(0.0009 * unit_t(rng, 5.0, (minutes, 1))[:, 0]))
    m1 = PriceHistory.from_arrays(60, T0 + 60 * np.arange(minutes), close)
    found = recent_cases("ETH", AssetHistory(m1, None), 60, int(m1.ts[-1]) + 60,
                         CasePlan(count=count, spacing_s=3600, lookback_s=lookback_s, n_paths=100, seed=2))
    assert len(found) == count
    return found


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    return student_t_cases(24, DAY)


@pytest.fixture(scope="module")
def model_cases() -> list[Case]:
    """The 1 h model needs a day of 5-minute returns before each prompt."""
    return student_t_cases(16, 3 * DAY // 2)


def stage_scale(store: ArtifactStore, version: str, scale: float) -> Path:
    state = CalibrationState({"ewma_t:ETH:60": Entry("ewma_t", "ETH", 60, scale=scale)})
    return store.stage({CALIBRATION_FILE: state.to_json()}, version=version)


def factory() -> ForecasterFactory:
    return artifact_forecaster({"ewma_t": EwmaTEngine()}, Settings(engine="ewma_t", calibration_seed=3))


def test_scores_follow_the_artifact_calibration(tmp_path: Path, cases: list[Case]) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    good = store.validate(stage_scale(store, "good", 1.0))
    wide = store.validate(stage_scale(store, "wide", 3.0))
    make = factory()
    good_scores = backtest_scores(make(good), cases, "upstream")
    wide_scores = backtest_scores(make(wide), cases, "upstream")
    assert np.isfinite(good_scores).all() and np.isfinite(wide_scores).all()
    assert wide_scores.mean() > 1.1 * good_scores.mean()  # three times the std is clearly worse


def test_the_default_engine_is_the_one_the_scales_apply_to(tmp_path: Path, cases: list[Case]) -> None:
    """Served on PatchTST (or any other engine), calibrated on EWMA-t: scoring the served engine would
    apply scale 1.0 to both sides, and any calibration would tie with the champion (and be published)."""
    store = ArtifactStore(tmp_path / "artifacts")
    good = store.validate(stage_scale(store, "good", 1.0))
    wide = store.validate(stage_scale(store, "wide", 3.0))
    settings = Settings(engine="gbm", calibration_engine="ewma_t", calibration_seed=3)
    make = artifact_forecaster({"gbm": GbmEngine(), "ewma_t": EwmaTEngine()}, settings)
    assert backtest_scores(make(wide), cases, "upstream").mean() > 1.1 * backtest_scores(make(good), cases,
                                                                                         "upstream").mean()


def test_a_worse_challenger_is_rejected_and_the_champion_keeps_serving(
        tmp_path: Path, cases: list[Case], caplog: pytest.LogCaptureFixture) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    first = challenge(store, stage_scale(store, "champ", 1.0), cases, factory(), 0.005)
    assert first.promote and first.champion is None and store.current_version() == "champ"
    worse = stage_scale(store, "wide", 2.0)
    with caplog.at_level(logging.INFO, logger="core.champion"):
        decision = challenge(store, worse, cases, factory(), 0.005)
    assert isinstance(decision, ChampionDecision)
    assert not decision.promote and decision.champion == "champ" and decision.challenger == "wide"
    assert decision.challenger_crps is not None and decision.champion_crps is not None
    assert decision.challenger_crps > decision.champion_crps * 1.005
    assert store.current_version() == "champ" and worse.exists()
    assert any("rejected" in r.getMessage() and "wide" in r.getMessage() for r in caplog.records)


def test_a_better_challenger_is_promoted(tmp_path: Path, cases: list[Case]) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    challenge(store, stage_scale(store, "wide", 2.0), cases, factory(), 0.0)
    decision = challenge(store, stage_scale(store, "good", 1.0), cases, factory(), 0.0)
    assert decision.promote and decision.champion == "wide"
    assert decision.challenger_crps is not None and decision.champion_crps is not None
    assert decision.challenger_crps < decision.champion_crps
    assert store.current_version() == "good"
    assert store.load_current().scale("ewma_t", "ETH", 60) == 1.0


def test_promotion_is_refused_if_the_champion_changed_during_the_comparison(
        tmp_path: Path, cases: list[Case]) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    challenge(store, stage_scale(store, "champ", 2.0), cases, factory(), 0.0)
    sneaky = stage_scale(store, "sneaky", 1.9)
    base = factory()

    def racing_factory(artifact: ArtifactSet | None) -> Forecaster:
        if artifact is not None and artifact.version == "champ" and store.current_version() == "champ":
            store.publish(sneaky)  # another publisher wins the race mid-comparison
        return base(artifact)

    with pytest.raises(ArtifactError, match="re-run the comparison"):
        challenge(store, stage_scale(store, "good", 1.0), cases, racing_factory, 0.0)
    assert store.current_version() == "sneaky"


def test_a_set_built_on_a_version_no_longer_current_is_not_compared_or_published(
        tmp_path: Path, cases: list[Case]) -> None:
    """The hourly calibration copies the current models into its staged set; a retrained model published
    meanwhile would be reverted by publishing it (and the retrain gate the same the other way)."""
    store = ArtifactStore(tmp_path / "artifacts")
    challenge(store, stage_scale(store, "champ", 2.0), cases, factory(), 0.0)
    state = CalibrationState({"ewma_t:ETH:60": Entry("ewma_t", "ETH", 60, scale=1.0)})
    calibrated = store.stage({CALIBRATION_FILE: state.to_json()}, version="calibrated", inherit=True)
    assert store.validate(calibrated).manifest.notes["built_on"] == "champ"
    store.publish(stage_scale(store, "retrained", 2.0))  # another job publishes before the gate runs

    def never(artifact: ArtifactSet | None) -> Forecaster:
        raise AssertionError("a stale set is not compared")

    decision = challenge(store, calibrated, cases, never, 0.0)
    assert not decision.promote and decision.champion == "retrained" and decision.cases == 0
    assert "built on champ" in decision.reason and "retrained is current" in decision.reason
    assert store.current_version() == "retrained" and calibrated.exists()
    # Staged over the current one, the same calibration is compared and, better, published.
    again = store.stage({CALIBRATION_FILE: state.to_json()}, version="calibrated-2", inherit=True)
    assert challenge(store, again, cases, factory(), 0.0).promote and store.current_version() == "calibrated-2"
    first = ArtifactStore(tmp_path / "fresh")
    assert first.validate(first.stage({CALIBRATION_FILE: state.to_json()}, inherit=True)).manifest.notes["built_on"] == ""


# ------------------------------------------------------------------------------------ model sets


def stage_model(store: ArtifactStore, version: str, checkpoint: Path) -> Path:
    files = {"hf.pt": checkpoint.read_bytes()}
    if store.current_version() is None:
        files[CALIBRATION_FILE] = CalibrationState().to_json()
    return store.stage(files, version=version, inherit=True)


def test_a_retrained_model_is_published_only_if_it_does_not_lose_to_the_served_one(
        tmp_path: Path, model_cases: list[Case]) -> None:
    settings = Settings(artifacts_dir=tmp_path / "artifacts", calibration_seed=3)  # committed models/
    store = ArtifactStore.from_settings(settings)
    random_head = write_checkpoints(tmp_path / "random", ("hf",), perturb=0.3) / "hf.pt"
    assert {model_forecaster(settings, None).run(c.request, c.snapshot).engine for c in model_cases} == {"patchtst"}
    # Before any publication the committed model defends: a random head does not win by default.
    worse = stage_model(store, "random-head", random_head)
    lost = challenge_models(store, worse, model_cases, settings, 0.0)
    assert not lost.promote and lost.champion == COMMITTED_MODELS and lost.cases == len(model_cases)
    assert lost.challenger_crps is not None and lost.champion_crps is not None
    assert lost.challenger_crps > lost.champion_crps
    assert store.current_version() is None and worse.exists()
    # The committed model itself, re-staged, ties and is published; the engine then serves it from there.
    same = challenge_models(store, stage_model(store, "same", settings.models_dir / "hf.pt"), model_cases, settings, 0.0)
    assert same.promote and same.challenger_crps == same.champion_crps and store.current_version() == "same"
    engine = build_engines(settings)["patchtst"]
    assert isinstance(engine, PatchTSTEngine)
    assert engine.sources["hf"] == store.versions_dir / "same" / "hf.pt"
    assert engine.sources["lf_crypto"] == settings.models_dir / "lf_crypto.pt"  # not in the set: committed
    # Later challengers face the published set.
    again = challenge_models(store, stage_model(store, "random-head-2", random_head), model_cases, settings, 0.0)
    assert not again.promote and again.champion == "same" and store.current_version() == "same"


def test_a_model_gate_that_cannot_run_the_models_refuses_instead_of_comparing_the_fallbacks(
        tmp_path: Path, model_cases: list[Case], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where PatchTST does not load for the gate (``SYNTH_DEVICE=cuda`` from a shared .env on the cpu worker),
    both sides would be the EWMA-t fallback: a tie, and any retrained model, a random one included, published."""
    def no_cuda(*_: object, **__: object) -> PatchTSTEngine:
        raise EngineError("device cuda asked for, but torch sees no CUDA device")  # as on a cpu-only host

    monkeypatch.setattr(PatchTSTEngine, "from_settings", no_cuda)
    settings = Settings(artifacts_dir=tmp_path / "artifacts", calibration_seed=3, device="cuda")
    store = ArtifactStore.from_settings(settings)
    random_head = write_checkpoints(tmp_path / "random", ("hf",), perturb=0.3) / "hf.pt"
    staged = stage_model(store, "random-head", random_head)
    with pytest.raises(ArtifactError, match="PatchTST"):
        challenge_models(store, staged, model_cases, settings, 0.0)
    assert store.current_version() is None and staged.exists()


def test_a_set_whose_models_pass_but_whose_calibration_loses_is_not_published(
        tmp_path: Path, model_cases: list[Case]) -> None:
    """``artifacts publish --gate`` of a set carrying a checkpoint and a calibration gets two verdicts: it is
    published only if it loses neither, so models that pass must not carry a worse calibration through."""
    settings = Settings(artifacts_dir=tmp_path / "artifacts", calibration_seed=3)  # PatchTST served, EWMA-t scaled
    store = ArtifactStore.from_settings(settings)
    store.publish(stage_scale(store, "served", 1.0))  # the committed models, unscaled
    wide = CalibrationState({"ewma_t:ETH:60": Entry("ewma_t", "ETH", 60, scale=3.0)})
    staged = store.stage({"hf.pt": (settings.models_dir / "hf.pt").read_bytes(), CALIBRATION_FILE: wide.to_json()},
                         version="same-model-wide-scales")
    decision = challenge_set(store, staged, model_cases, settings, 0.0)
    assert not decision.promote, decision
    assert decision.reason.startswith("models: challenger") and "; calibration: challenger" in decision.reason
    assert decision.challenger_crps is not None and decision.champion_crps is not None
    assert decision.challenger_crps > decision.champion_crps  # the calibration's scores
    assert store.current_version() == "served" and staged.exists()

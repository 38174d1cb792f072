"""Champion/challenger: a new artifact becomes current only if it does not lose the recent backtest.

Both sets forecast the same recent prompts (``core.calibration.recent_cases``, the prompt builder
calibration uses) with the same seed, so per-prompt scores are paired; each is scored like a
validator would (wire-rounded paths, ``core.scoring.score_prompt``). The challenger is promoted when

    mean CRPS(challenger) <= mean CRPS(champion) * (1 + tolerance)

over the prompts both answered, and it is never promoted if it fails a prompt the champion answers.
The decision and both scores are logged and returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from core.artifact_files import BUILT_ON_NOTE, ArtifactError
from core.artifact_sets import ArtifactSet
from core.artifacts import ArtifactStore
from core.calibration import Case, score_cases
from core.engines.base import Engine
from core.evaluation import FloatArray
from core.forecast import Forecaster, no_calibration
from core.response import round_for_wire
from core.scoring import Rules
from core.settings import Settings

log = logging.getLogger(__name__)

ForecasterFactory = Callable[[ArtifactSet | None], Forecaster]  # None: what serves with no artifact current


def artifact_forecaster(engines: Mapping[str, Engine], settings: Settings,
                        engine: str | None = None) -> ForecasterFactory:
    """Forecasters over shared engines that differ only by the artifact's calibration, run on ``engine``
    (default ``settings.calibration_engine``: on any other engine the scales are 1.0, so every set ties).

    Artifacts carrying models need a factory that builds their engines from the set's files
    (``model_forecaster``; ``challenge_set`` picks the right one).
    """
    name = engine or settings.calibration_engine
    return lambda artifact: Forecaster(engines, default=name, seed=settings.calibration_seed,
                                       scale=no_calibration if artifact is None else
                                       artifact.calibration.lookup_for(settings.calibration_engine))


def backtest_scores(forecaster: Forecaster, cases: Sequence[Case], rules: Rules) -> FloatArray:
    """Per-case validator CRPS of what the forecaster would send (NaN where invalid)."""
    return score_cases(cases, lambda _, c: round_for_wire(forecaster.run(c.request, c.snapshot).paths), rules)


@dataclass(frozen=True)
class ChampionDecision:
    promote: bool
    challenger: str
    champion: str | None
    challenger_crps: float | None  # mean over the prompts both answered
    champion_crps: float | None
    tolerance: float
    cases: int  # prompts both answered
    challenger_invalid: int
    champion_invalid: int
    reason: str


def decide(challenger: str, champion: str | None, challenger_scores: FloatArray,
           champion_scores: FloatArray | None, tolerance: float) -> ChampionDecision:
    """The promotion rule on paired per-prompt scores (NaN = invalid response)."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    ch_ok = np.isfinite(challenger_scores)
    if champion is None or champion_scores is None:
        mean = float(challenger_scores[ch_ok].mean()) if ch_ok.any() else None
        return ChampionDecision(True, challenger, None, mean, None, tolerance, int(ch_ok.sum()),
                                int((~ch_ok).sum()), 0, "no current artifact to defend")
    if champion_scores.shape != challenger_scores.shape:
        raise ValueError("champion and challenger must be scored on the same prompts")
    cp_ok = np.isfinite(champion_scores)
    both = ch_ok & cp_ok
    ch_bad, cp_bad = int((~ch_ok).sum()), int((~cp_ok).sum())
    if not both.any():
        return ChampionDecision(False, challenger, champion, None, None, tolerance, 0, ch_bad, cp_bad,
                                "no recent prompt both answered: nothing to compare on")
    ch_mean, cp_mean = float(challenger_scores[both].mean()), float(champion_scores[both].mean())
    lost = int((cp_ok & ~ch_ok).sum())
    if lost:
        promote, reason = False, f"challenger invalid on {lost} prompt(s) the champion answers"
    elif ch_mean <= cp_mean * (1.0 + tolerance):
        promote, reason = True, f"challenger {ch_mean:.2f} <= champion {cp_mean:.2f} x (1 + {tolerance:g})"
    else:
        promote, reason = False, f"challenger {ch_mean:.2f} > champion {cp_mean:.2f} x (1 + {tolerance:g})"
    return ChampionDecision(promote, challenger, champion, ch_mean, cp_mean, tolerance, int(both.sum()),
                            ch_bad, cp_bad, reason)


def compare(challenger: ArtifactSet, champion: ArtifactSet | None, cases: Sequence[Case],
            factory: ForecasterFactory, tolerance: float, rules: Rules = "upstream",
            baseline: str | None = None) -> ChampionDecision:
    """``baseline``: the name of what serves when no artifact is current (``factory(None)``), which then
    defends; without one, a first artifact wins by default."""
    ch_scores = backtest_scores(factory(challenger), cases, rules)
    name = baseline if champion is None else champion.version
    cp_scores = None if name is None else backtest_scores(factory(champion), cases, rules)
    decision = decide(challenger.version, name, ch_scores, cp_scores, tolerance)
    log.info("champion/challenger: %s %s (challenger mean CRPS %s, champion %s mean CRPS %s, %d prompts): %s",
             decision.challenger, "PROMOTED" if decision.promote else "rejected", decision.challenger_crps,
             decision.champion, decision.champion_crps, decision.cases, decision.reason)
    return decision


def challenge(store: ArtifactStore, staging_dir: Path, cases: Sequence[Case], factory: ForecasterFactory,
              tolerance: float, rules: Rules = "upstream", publish: bool = True,
              baseline: str | None = None) -> ChampionDecision:
    """Validate the staged set, compare it with the current one, publish it if it does not lose.

    The publish is conditional on the champion still being current, so a comparison can never
    promote a challenger over a version it was not compared with; a set that inherited the files of
    another version than the current one is not compared at all. A rejected set stays in staging.
    """
    challenger = store.validate(staging_dir)
    champion = store.load_current_or_none()
    built_on = challenger.manifest.notes.get(BUILT_ON_NOTE)
    current = champion.version if champion is not None else ""
    if built_on is not None and built_on != current:
        # Another job published while this set was staged: publishing it would bring back the files it
        # copied from the older set (the hourly calibration against a retrained model, or back).
        return ChampionDecision(False, challenger.version, current or None, None, None, tolerance, 0, 0, 0,
                                f"{challenger.version} was built on {built_on or 'no set'}, but {current or 'none'} "
                                "is current now: the next run stages over it")
    decision = compare(challenger, champion, cases, factory, tolerance, rules, baseline)
    if decision.promote and publish:
        store.publish(staging_dir, expect_current=None if champion is None else champion.version)
    return decision


# ------------------------------------------------------------------------------------ model sets

COMMITTED_MODELS = "committed-models"  # the champion's name when no artifact carries models yet


def model_forecaster(settings: Settings, artifact: ArtifactSet | None) -> Forecaster:
    """What a worker serves with ``artifact`` current: its checkpoints, the committed models for the
    kinds it lacks, its calibration (None: the committed models, uncalibrated). Raises ArtifactError
    where PatchTST does not load at all (no checkpoint, no such device)."""
    from core.engines_registry import engines_over, forecaster_over

    engines = engines_over(settings, None if artifact is None else artifact.path)
    if "patchtst" not in engines:  # both sides would be the EWMA-t fallback: a tie, any model published
        raise ArtifactError("PatchTST does not load here (see the warning above): models cannot be gated")
    scale = no_calibration if artifact is None else artifact.calibration.lookup_for(settings.calibration_engine)
    return forecaster_over(engines, "patchtst", settings.calibration_seed, scale)


def challenge_models(store: ArtifactStore, staging_dir: Path, cases: Sequence[Case], settings: Settings,
                     tolerance: float, rules: Rules = "upstream", publish: bool = True) -> ChampionDecision:
    """``challenge`` for a staged set that carries model checkpoints.

    The champion is what serves now (the current set's models over the committed ones, or the
    committed ones alone before any publication), so a first retrained model must beat the committed
    model rather than win by default. The cases must lie after the challenger's training data.
    """
    return challenge(store, staging_dir, cases, partial(model_forecaster, settings), tolerance, rules, publish,
                     baseline=COMMITTED_MODELS)


# ------------------------------------------------------------------------------------- any staged set


def model_files(artifact: ArtifactSet | None) -> dict[str, str]:
    """The set's checkpoints (name -> sha256): what a worker serving it loads over the committed models."""
    if artifact is None:
        return {}
    return {name: entry.sha256 for name, entry in artifact.manifest.files.items() if name.endswith(".pt")}


def challenge_set(store: ArtifactStore, staging_dir: Path, cases: Sequence[Case], settings: Settings,
                  tolerance: float, rules: Rules = "upstream", publish: bool = True) -> ChampionDecision:
    """The gate for any staged set (``artifacts publish --gate``): each side scored as it would serve.

    Its calibration is scored like the calibrate gate does (its scales on ``settings.calibration_engine``,
    the only engine they change, over the models the set serves); when its checkpoints differ from the
    champion's, its models are also scored like the retrain gate does (``challenge_models``: PatchTST
    from each side's own files, the committed models defending before any). It is promoted only if it
    loses neither, and published only over the version it was compared with.
    """
    from core.engines_registry import engines_over, models_in

    challenger = store.validate(staging_dir)
    champion = store.load_current_or_none()
    expected = None if champion is None else champion.version
    verdicts: list[ChampionDecision] = []
    if model_files(challenger) != model_files(champion):
        verdicts.append(challenge_models(store, staging_dir, cases, settings, tolerance, rules, publish=False))
    # model_forecaster already applied the scales when PatchTST is the calibrated engine.
    if not verdicts or (verdicts[0].promote and settings.calibration_engine != "patchtst"):
        # Same checkpoints on both sides (or irrelevant to the calibrated engine): one shared engine set.
        engines = engines_over(settings, models_in(challenger.path))
        if settings.calibration_engine not in engines:  # PatchTST that does not load: no engine to score on
            raise ArtifactError(f"the calibrated engine {settings.calibration_engine} does not load here (see the "
                                "warning above): its scales cannot be gated")
        verdicts.append(challenge(store, staging_dir, cases, artifact_forecaster(engines, settings), tolerance,
                                  rules, publish=False))
    decision = verdicts[-1]
    if len(verdicts) == 2:  # say both verdicts: the printed scores are the calibration's
        decision = replace(decision, reason=f"models: {verdicts[0].reason}; calibration: {decision.reason}")
    if decision.promote and publish:
        store.publish(staging_dir, expect_current=expected)
    return decision

"""sigma_scale per (engine, asset, prompt type), chosen by the validator's own CRPS on recent windows.

One run, per key:

1. Recent validator-style prompts are built from history with ``core.evaluation`` (the same prompts,
   realised prices and no-look-ahead snapshots as the backtest): one prompt per spacing slot, the
   latest ones whose realised prices are already known at ``end``. A market that closes (equities, gold's
   files) reaches further back for the prompts its latest slots lack (``CasePlan.session_reach``).
2. A bounded Brent search (golden-section with parabolic steps) over log(sigma_scale) in
   [scale_min, scale_max] minimises the mean ``core.scoring.score_prompt`` total. Every candidate
   scale reuses the same random numbers per prompt (``core.forecast.rng_for``), so the objective is
   smooth in the scale and the search is exact for the sample; 200 paths per prompt keep a run
   cheap (Settings.calibration_paths).
3. The stored scale moves toward the minimiser by a log-space EMA (alpha 0.4 for 1 h, 0.2 for 24 h),
   by at most +-10 % (1 h) / +-7 % (24 h) per run, clamped to [0.5, 2.0], and only when at least
   150 (1 h) / 120 (24 h) prompts were scored.

The state is one JSON document, ``calibration.json`` (shipped inside every artifact version)::

    {"format": 1, "meta": {...},
     "entries": {"ewma_t:BTC:60": {"engine": "ewma_t", "asset": "BTC", "time_increment": 60,
                                   "scale": 1.1, "samples": 180, "last_update": 1779667200,
                                   "history": [{"at": ..., "old": 1.0, "new": 1.1, "target": 1.42, ...}]}}}

``CalibrationState.scale`` is a ``core.forecast.ScaleLookup``: 1.0 for any key it does not hold.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize_scalar

from core.assets import ASSETS
from core.atomic_files import atomic_write
from core.constants import CALIBRATION_SESSION_REACH, LF_INCREMENT
from core.engines.base import Engine, EngineError, Float32Array, ParametricEngine
from core.evaluation import (
    GRIDS,
    AssetHistory,
    EvalPrompt,
    EvaluationError,
    FloatArray,
    Window,
    iso,
    pick_prompts,
    realised_prices,
    snapshot_at,
)
from core.forecast import ScaleLookup, rng_for
from core.path_sampling import sample_paths
from core.prices import MarketSnapshot
from core.prompts import ForecastRequest
from core.scoring import Rules, score_prompt
from core.settings import Settings

log = logging.getLogger(__name__)

STATE_FORMAT = 1
CALIBRATION_FILE = "calibration.json"
MAX_JSON_INT = 2**1023  # larger integers overflow float(): refused as numbers
SCALE_SANE = (0.01, 100.0)  # a loaded scale outside this is a corrupt file, whatever the search bounds
HISTORY_KEPT = 100  # runs remembered per key: four days of hourly runs
LIVE_PATHS = 1000  # paths the validators ask for; the search uses fewer (see ensemble_optimum)


class CalibrationError(ValueError):
    """A calibration document or parameter that cannot be used (message names the field)."""


def scale_key(engine: str, asset: str, time_increment: int) -> str:
    return f"{engine}:{asset}:{time_increment}"


# ----------------------------------------------------------------------------------------- update rule


@dataclass(frozen=True)
class UpdateRules:
    alpha: float  # weight of the new target in the log-space EMA
    scale_min: float
    scale_max: float
    max_move: float  # relative: new / old stays in [1 - max_move, 1 + max_move]
    min_samples: int  # scored prompts needed before the scale may move

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise CalibrationError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0 < self.scale_min <= 1 <= self.scale_max:
            raise CalibrationError(f"need 0 < scale_min <= 1 <= scale_max, got [{self.scale_min}, {self.scale_max}]")
        if not 0 < self.max_move < 1:
            raise CalibrationError(f"max_move must be in (0, 1), got {self.max_move}")
        if self.min_samples < 1:
            raise CalibrationError(f"min_samples must be >= 1, got {self.min_samples}")

    @classmethod
    def for_prompt(cls, settings: Settings, time_increment: int) -> UpdateRules:
        hf = time_increment < LF_INCREMENT
        return cls(alpha=settings.calibration_alpha_hf if hf else settings.calibration_alpha_lf,
                   scale_min=settings.calibration_scale_min, scale_max=settings.calibration_scale_max,
                   max_move=settings.calibration_max_move_hf if hf else settings.calibration_max_move_lf,
                   min_samples=settings.calibration_min_samples_hf if hf else settings.calibration_min_samples_lf)


def next_scale(current: float, target: float, rules: UpdateRules) -> float:
    """Log-space EMA toward ``target``, then the per-run move limit, then the clamp."""
    if not (math.isfinite(current) and current > 0 and math.isfinite(target) and target > 0):
        raise CalibrationError(f"scales must be finite and > 0, got current={current}, target={target}")
    ema = math.exp((1.0 - rules.alpha) * math.log(current) + rules.alpha * math.log(target))
    limited = min(max(ema, current * (1.0 - rules.max_move)), current * (1.0 + rules.max_move))
    return min(max(limited, rules.scale_min), rules.scale_max)


# ----------------------------------------------------------------------------- prompts from history


@dataclass(frozen=True)
class Case:
    """One scored prompt: what the engine may see, and what the validator will compare against."""

    prompt: EvalPrompt
    request: ForecastRequest
    snapshot: MarketSnapshot
    realised: FloatArray  # [n_points], NaN where no 1-minute close exists


@dataclass(frozen=True)
class CasePlan:
    count: int  # prompts wanted (one per spacing slot, the latest ones)
    spacing_s: int
    lookback_s: int  # history an engine sees before each prompt (the live cache window)
    n_paths: int
    seed: int  # picks the start inside each slot
    # How many times the window a market that closes may reach back for the prompts its latest slots lack
    # (CALIBRATION_SESSION_REACH); 1: never (the retrain gate, which must stay after the training data).
    session_reach: int = CALIBRATION_SESSION_REACH

    @classmethod
    def for_prompt(cls, settings: Settings, time_increment: int) -> CasePlan:
        hf = time_increment < LF_INCREMENT
        return cls(count=settings.calibration_windows_hf if hf else settings.calibration_windows_lf,
                   spacing_s=settings.calibration_spacing_hf_s if hf else settings.calibration_spacing_lf_s,
                   lookback_s=settings.cache_window_s(time_increment), n_paths=settings.calibration_paths,
                   seed=settings.calibration_seed)

    def reach(self, asset: str | None) -> int:
        """Windows the asset's prompts may span: ``session_reach`` for a market that closes, else 1."""
        spec = ASSETS.get(asset or "")
        return self.session_reach if spec is not None and (spec.us_session or spec.weekend_closed) else 1

    def span_s(self, time_increment: int, asset: str | None = None) -> int:
        """History needed before ``end``: the prompts, their horizon and the lookback of the oldest."""
        return self.count * self.spacing_s * self.reach(asset) + GRIDS[time_increment] + self.lookback_s


def known_before(history: AssetHistory, end: int) -> AssetHistory:
    """Only bars closed by ``end`` (ts + step <= end): what a run at ``end`` can know."""
    return history.cut({60: end - 60 + 1, 300: end - 300 + 1})


def recent_cases(asset: str, history: AssetHistory, time_increment: int, end: int, plan: CasePlan) -> list[Case]:
    """The latest ``plan.count`` scorable prompts whose realised prices are all known at ``end``."""
    if time_increment not in GRIDS:
        raise CalibrationError(f"no prompt grid for time_increment {time_increment}; known: {sorted(GRIDS)}")
    time_length = GRIDS[time_increment]
    known = known_before(history, end)
    last_start = end - time_length - 60  # the last grid bar opens at start + length and must have closed
    window = Window(asset, time_increment, last_start - plan.count * plan.spacing_s, last_start)
    prompts = pick_prompts(known, window, plan.spacing_s, plan.seed, plan.count)
    reach = plan.reach(asset)
    if len(prompts) < plan.count and reach > 1:
        # Equities' 140 daily slots hold ~29 session prompts: the older ones they lack, from further back (the
        # latest slots' picks stay as they were).
        older = Window(asset, time_increment, window.start - (reach - 1) * plan.count * plan.spacing_s, window.start)
        prompts = pick_prompts(known, older, plan.spacing_s, plan.seed)[len(prompts) - plan.count:] + prompts
    cases = []
    for prompt in prompts:
        realised, source = realised_prices(known, prompt.start_ts, time_increment, time_length)
        if source is None or not np.isfinite(realised[-1]):
            continue  # the validator does not score a prompt without its last price
        try:
            snapshot = snapshot_at(asset, known, prompt.start_ts, plan.lookback_s)
        except EvaluationError:
            continue
        cases.append(Case(prompt, prompt.request(plan.n_paths), snapshot, realised))
    return cases


PathsFor = Callable[[int, Case], npt.NDArray[np.floating[Any]]]  # (index in the sequence, case) -> paths


def score_cases(cases: Sequence[Case], paths_for: PathsFor, rules: Rules) -> FloatArray:
    """Validator CRPS total per case; NaN where the response would be invalid or the engine cannot forecast."""
    out = np.full(len(cases), np.nan)
    for i, case in enumerate(cases):
        req = case.request
        try:
            paths = np.asarray(paths_for(i, case), dtype=np.float64)  # the one float64 copy the scorer needs
        except EngineError:
            # E.g. PatchTST on a prompt whose history is too short for its context: live, the forecaster
            # answers with EWMA-t; here the case is left unscored. It raised out of the whole run before,
            # so one such prompt of one asset stopped every key's calibration.
            continue
        score = score_prompt(paths, case.realised, req.time_increment, req.time_length, rules)
        if score.valid:
            out[i] = score.total
    return out


# ------------------------------------------------------------------------------------------- search


def scaled_paths(engine: Engine, case: Case, seed: int) -> Callable[[float], Float32Array]:
    """Paths for one case as a function of sigma_scale, the same random numbers for every scale."""
    if isinstance(engine, ParametricEngine) and type(engine).forecast is ParametricEngine.forecast:
        # Same result as engine.forecast, without recomputing the parameters for every candidate.
        try:
            p = engine.params(case.request, case.snapshot)
        except EngineError as exc:
            error = exc  # raised when scored (score_cases leaves the case unscored), not while listing cases

            def fail(s: float) -> Float32Array:
                raise error

            return fail
        return lambda s: sample_paths(case.snapshot.anchor, p.mu, p.sigma, p.nu, case.request.num_simulations,
                                      rng_for(case.request, seed), p.latent, s)
    return lambda s: engine.forecast(case.request, case.snapshot, rng_for(case.request, seed), s)


@dataclass(frozen=True)
class ScaleSearch:
    target: float  # the minimiser, carried over to LIVE_PATHS members (ensemble_optimum)
    mean_crps: float  # at target
    mean_crps_current: float  # at the scale in force, for the log
    samples: int  # cases scored (valid) at target
    evaluations: int


def ensemble_optimum(n_members: int) -> float:
    """Where the plain ensemble CRPS of n Gaussian members puts its optimal std, relative to the truth.

    Its spread term is biased by c = (n - 1) / n, which moves the minimiser of
    sqrt(1 + s^2) - c s / sqrt(2) (the expected score, in units of the true std) to c / sqrt(2 - c^2):
    0.980 for 100 members, 0.990 for 200, 0.998 for the 1000 the validators ask for.
    """
    c = (n_members - 1) / n_members
    return c / math.sqrt(2.0 - c * c)


def _mean(values: FloatArray) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.inf


def search_scale(engine: Engine, cases: Sequence[Case], current: float, lo: float, hi: float, tol: float,
                 seed: int, rules: Rules) -> ScaleSearch:
    """The scale in [lo, hi] minimising the mean CRPS over ``cases`` (to ``tol`` in log scale)."""
    makers = [scaled_paths(engine, case, seed) for case in cases]
    seen: dict[float, FloatArray] = {}

    def scores_at(log_scale: float) -> FloatArray:
        if log_scale not in seen:
            scale = math.exp(log_scale)
            seen[log_scale] = score_cases(cases, lambda i, _: makers[i](scale), rules)
        return seen[log_scale]

    # Brent's bounded method: golden-section steps plus parabolic ones where the objective is smooth
    # (common random numbers make it so): ~8 evaluations instead of golden-section's 14 at tol 0.01.
    found = minimize_scalar(lambda x: _mean(scores_at(float(x))), bounds=(math.log(lo), math.log(hi)),
                            method="bounded", options={"xatol": tol})
    log_target = float(found.x)
    at_target = scores_at(log_target)
    # The minimiser found with n members, carried over to the 1000 members a live reply carries.
    n_search = cases[0].request.num_simulations if cases else LIVE_PATHS
    carry = ensemble_optimum(LIVE_PATHS) / ensemble_optimum(n_search)
    return ScaleSearch(math.exp(log_target) * carry, _mean(at_target), _mean(scores_at(math.log(current))),
                       int(np.isfinite(at_target).sum()), len(seen))


# ------------------------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Move:
    at: int  # unix seconds of the run
    old: float
    new: float
    target: float | None  # None when the run did not search (too few prompts)
    samples: int
    mean_crps_target: float | None
    mean_crps_old: float | None
    applied: bool
    reason: str


@dataclass(frozen=True)
class Entry:
    engine: str
    asset: str
    time_increment: int
    scale: float = 1.0
    samples: int = 0  # prompts scored in the last run that moved the scale
    last_update: int | None = None  # unix seconds of that run
    history: tuple[Move, ...] = ()

    @property
    def key(self) -> str:
        return scale_key(self.engine, self.asset, self.time_increment)


def _number(raw: Mapping[str, Any], name: str, where: str, optional: bool = False) -> float | None:
    value = raw.get(name)
    if value is None and optional:
        return None
    # An integer past float range (JSON allows 1e400 written out in digits) is not finite either.
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, int) and abs(value) > MAX_JSON_INT) or not math.isfinite(value)):
        raise CalibrationError(f"{where}: {name!r} must be a finite number, got {str(value)[:40]}")
    return float(value)


def _integer(raw: Mapping[str, Any], name: str, where: str, optional: bool = False) -> int | None:
    value = raw.get(name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CalibrationError(f"{where}: {name!r} must be an integer, got {value!r}")
    return value


def _text(raw: Mapping[str, Any], name: str, where: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise CalibrationError(f"{where}: {name!r} must be a non-empty string, got {value!r}")
    return value


def _move(raw: object, where: str) -> Move:
    if not isinstance(raw, dict):
        raise CalibrationError(f"{where}: a history item must be an object")
    applied = raw.get("applied")
    if not isinstance(applied, bool):
        raise CalibrationError(f"{where}: 'applied' must be true or false")
    return Move(at=_integer(raw, "at", where) or 0, old=_number(raw, "old", where) or 0.0,
                new=_number(raw, "new", where) or 0.0, target=_number(raw, "target", where, optional=True),
                samples=_integer(raw, "samples", where) or 0,
                mean_crps_target=_number(raw, "mean_crps_target", where, optional=True),
                mean_crps_old=_number(raw, "mean_crps_old", where, optional=True),
                applied=applied, reason=str(raw.get("reason", "")))


def _entry(key: str, raw: object) -> Entry:
    where = f"calibration entry {key!r}"
    if not isinstance(raw, dict):
        raise CalibrationError(f"{where}: must be an object")
    history = raw.get("history", [])
    if not isinstance(history, list):
        raise CalibrationError(f"{where}: 'history' must be a list")
    entry = Entry(engine=_text(raw, "engine", where), asset=_text(raw, "asset", where),
                  time_increment=_integer(raw, "time_increment", where) or 0,
                  scale=_number(raw, "scale", where) or 0.0, samples=_integer(raw, "samples", where) or 0,
                  last_update=_integer(raw, "last_update", where, optional=True),
                  history=tuple(_move(m, where) for m in history))
    if entry.key != key:
        raise CalibrationError(f"{where}: fields name a different key {entry.key!r}")
    if entry.time_increment <= 0 or entry.samples < 0:
        raise CalibrationError(f"{where}: time_increment must be > 0 and samples >= 0")
    if not SCALE_SANE[0] <= entry.scale <= SCALE_SANE[1]:  # e.g. 1e-300 would serve flat paths
        raise CalibrationError(f"{where}: scale {entry.scale} is outside the sane range {list(SCALE_SANE)}")
    return entry


class CalibrationState:
    """All calibrated scales; ``scale`` is the ScaleLookup the Forecaster takes."""

    def __init__(self, entries: Mapping[str, Entry] | None = None, meta: Mapping[str, Any] | None = None) -> None:
        self.entries: dict[str, Entry] = dict(entries or {})
        self.meta: dict[str, Any] = dict(meta or {})  # free-form provenance (data window, run id...)

    def scale(self, engine: str, asset: str, time_increment: int) -> float:
        entry = self.entries.get(scale_key(engine, asset, time_increment))
        return entry.scale if entry is not None else 1.0

    @property
    def lookup(self) -> ScaleLookup:
        return self.scale

    def lookup_for(self, calibrated: str) -> ScaleLookup:
        """What a forecaster applies: this engine's scales, 1.0 for every other engine (so scales an
        earlier choice of calibration engine left behind are never served)."""
        def scale(engine: str, asset: str, time_increment: int) -> float:
            return self.scale(engine, asset, time_increment) if engine == calibrated else 1.0

        return scale

    def entry(self, engine: str, asset: str, time_increment: int) -> Entry:
        return self.entries.get(scale_key(engine, asset, time_increment)) or Entry(engine, asset, time_increment)

    def put(self, entry: Entry) -> None:
        self.entries[entry.key] = entry

    def copy(self) -> CalibrationState:
        return CalibrationState(self.entries, self.meta)

    # --- JSON ---------------------------------------------------------------------------------------
    def to_json(self) -> bytes:
        doc = {"format": STATE_FORMAT, "meta": self.meta,
               "entries": {k: asdict(e) for k, e in sorted(self.entries.items())}}
        return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> CalibrationState:
        try:
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: [[[[...
            raise CalibrationError(f"calibration document is not valid JSON ({exc})") from None
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if isinstance(fmt, bool) or fmt != STATE_FORMAT:  # true == 1 in Python
            raise CalibrationError(f"calibration document must be an object with \"format\": {STATE_FORMAT}")
        entries, meta = doc.get("entries", {}), doc.get("meta", {})
        if not isinstance(entries, dict) or not isinstance(meta, dict):
            raise CalibrationError("calibration 'entries' and 'meta' must be objects")
        return cls({key: _entry(key, raw) for key, raw in entries.items()}, meta)

    @classmethod
    def load(cls, path: Path) -> CalibrationState:
        try:
            return cls.from_json(path.read_bytes())
        except OSError as exc:
            raise CalibrationError(f"{path}: unreadable ({exc})") from None
        except CalibrationError as exc:
            raise CalibrationError(f"{path}: {exc}") from None

    def save(self, path: Path) -> None:
        """Atomic: a reader sees the old document or the new one, never half of one."""
        with atomic_write(path) as fh:
            fh.write(self.to_json())


# -------------------------------------------------------------------------------------------- a run


@dataclass(frozen=True)
class CalibrationOutcome:
    key: str
    old: float
    new: float
    target: float | None
    samples: int
    moved: bool
    reason: str
    mean_crps_target: float | None = None
    mean_crps_old: float | None = None
    seconds: float = 0.0


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def calibrate_key(state: CalibrationState, engine_name: str, engine: Engine, asset: str, time_increment: int,
                  cases: Sequence[Case], rules: UpdateRules, now: int, seed: int, tol: float = 0.01,
                  scoring: Rules = "upstream") -> CalibrationOutcome:
    """One run for one key: search, then move the stored scale under the update rules (in ``state``)."""
    began = time.perf_counter()
    entry = state.entry(engine_name, asset, time_increment)
    old = entry.scale
    if len(cases) < rules.min_samples:
        move = Move(now, old, old, None, len(cases), None, None, False,
                    f"{len(cases)} prompts < {rules.min_samples} needed")
    else:
        found = search_scale(engine, cases, old, rules.scale_min, rules.scale_max, tol, seed, scoring)
        # A scale at which no prompt scored has mean CRPS inf: stored as null, since the JSON state
        # refuses non-finite numbers (one such key would otherwise make every save raise).
        crps_target, crps_old = _finite_or_none(found.mean_crps), _finite_or_none(found.mean_crps_current)
        if found.samples < rules.min_samples:
            move = Move(now, old, old, found.target, found.samples, crps_target, crps_old,
                        False, f"{found.samples} scored prompts < {rules.min_samples} needed")
        else:
            new = next_scale(old, found.target, rules)
            move = Move(now, old, new, found.target, found.samples, crps_target, crps_old, True, "ok")
    history = (*entry.history, move)[-HISTORY_KEPT:]
    if move.applied:
        entry = replace(entry, scale=move.new, samples=move.samples, last_update=now, history=history)
    else:
        entry = replace(entry, history=history)
    state.put(entry)
    outcome = CalibrationOutcome(entry.key, move.old, move.new, move.target, move.samples, move.applied,
                                 move.reason, move.mean_crps_target, move.mean_crps_old,
                                 time.perf_counter() - began)
    log.info("calibration %s: %.4f -> %.4f (target %s, %d prompts, %s)", outcome.key, outcome.old, outcome.new,
             "none" if outcome.target is None else f"{outcome.target:.4f}", outcome.samples, outcome.reason)
    return outcome


@dataclass
class CalibrationRun:
    outcomes: list[CalibrationOutcome] = field(default_factory=list)
    cases: dict[tuple[str, int], list[Case]] = field(default_factory=dict)  # (asset, time_increment)

    @property
    def moved(self) -> bool:
        return any(o.moved and o.new != o.old for o in self.outcomes)

    def all_cases(self) -> list[Case]:
        return [c for cases in self.cases.values() for c in cases]


def run_calibration(state: CalibrationState, engines: Mapping[str, Engine], engine_name: str,
                    histories: Mapping[str, AssetHistory], increments: Sequence[int], end: int,
                    settings: Settings, now: int | None = None) -> CalibrationRun:
    """Calibrate ``engine_name`` for every asset and prompt type with usable history; updates ``state``."""
    if engine_name not in engines:
        raise CalibrationError(f"unknown engine {engine_name!r}; available: {sorted(engines)}")
    run = CalibrationRun()
    for asset, history in sorted(histories.items()):
        for inc in increments:
            cases = recent_cases(asset, history, inc, end, CasePlan.for_prompt(settings, inc))
            run.cases[(asset, inc)] = cases
            run.outcomes.append(calibrate_key(
                state, engine_name, engines[engine_name], asset, inc, cases, UpdateRules.for_prompt(settings, inc),
                int(time.time()) if now is None else now, settings.calibration_seed,
                settings.calibration_search_tol, settings.calibration_rules))
    return run


# ------------------------------------------------------------------------------ production entry points


def load_scale_lookup(settings: Settings) -> ScaleLookup:
    """The current artifact's scales (hash-verified) for ``settings.calibration_engine``; raises
    ArtifactError when there is no current artifact."""
    from core.artifacts import ArtifactStore  # imported here: core.artifacts imports this module

    return ArtifactStore.from_settings(settings).load_current().calibration.lookup_for(settings.calibration_engine)


def history_span_s(settings: Settings, asset: str | None = None) -> int:
    """Seconds of history before ``end`` that calibration's prompts (and their lookbacks) read for ``asset``
    (None: one whose market never closes)."""
    return max(CasePlan.for_prompt(settings, inc).span_s(inc, asset) for inc in sorted(GRIDS))


def store_histories(settings: Settings, end: int, assets: Sequence[str] | None = None) -> dict[str, AssetHistory]:
    """What calibration reads in production: the durable history store, as far back as its prompts need."""
    from core.history_store import HistoryStore

    history_store = HistoryStore.from_settings(settings)
    spans = {asset: history_span_s(settings, asset) for asset in (assets or history_store.assets())}
    histories = {asset: AssetHistory(history_store.read(asset, 60, end - span, end) or None,
                                     history_store.read(asset, 300, end - span, end) or None)
                 for asset, span in spans.items()}
    return {a: h for a, h in histories.items() if h.m1 is not None or h.m5 is not None}


def run_calibration_job(settings: Settings, now: int | None = None) -> dict[str, Any]:
    """The hourly job: calibrate on the durable history store, stage, gate, publish. Returns a summary."""
    from core.artifact_files import ArtifactError, DataWindow
    from core.artifacts import ArtifactStore
    from core.champion import artifact_forecaster, challenge
    from core.engines_registry import engines_over, models_in

    now = int(time.time()) if now is None else now
    end = now - now % 60
    store = ArtifactStore.from_settings(settings)
    current = store.load_current_or_none()
    state = current.calibration.copy() if current is not None else CalibrationState()
    increments = sorted(GRIDS)
    histories = store_histories(settings, end)
    # That set's models, not whatever is current by the time they load: the scales belong to this set.
    engines = engines_over(settings, None if current is None else models_in(current.path))
    run = run_calibration(state, engines, settings.calibration_engine, histories, increments, end, settings, now)
    summary: dict[str, Any] = {"end": end, "outcomes": [asdict(o) for o in run.outcomes], "published": None}
    if not run.moved:
        # Said in the summary: `synth-miner status` shows it as the job's outcome (it read "nothing published").
        summary["reason"] = (no_history_reason(settings, end) if not histories
                             else unmoved_reason(run.outcomes))
        log.warning("calibration: nothing published: %s", summary["reason"])
        return summary
    kept = {o.key: o.reason for o in run.outcomes if not o.moved}
    if kept:  # the keys that moved say nothing of those that did not (an equity short of session prompts)
        summary["not_calibrated"] = kept
        log.warning("calibration: %d key(s) not moved: %s", len(kept), "; ".join(f"{k}: {r}" for k, r in kept.items()))
    starts = [c.prompt.start_ts for c in run.all_cases()]
    state.meta = {"calibrated_at": now, "end": end, "engine": settings.calibration_engine}
    try:
        # Over the set the scales were computed from, or not at all: a retrain published meanwhile would
        # otherwise get these scales (computed on the models it replaced) vouched for as its own.
        staging = store.stage({CALIBRATION_FILE: state.to_json()}, data_window=DataWindow(min(starts), end),
                              notes={"kind": "calibration"}, inherit=True,
                              expect_current=None if current is None else current.version)
    except ArtifactError as exc:
        summary["reason"] = f"not published: {exc}"
        log.warning("calibration: %s", summary["reason"])
        return summary
    forecaster = artifact_forecaster(engines, settings, settings.calibration_engine)
    # The gate scores by the same rules as the search (it scored upstream whatever the setting).
    decision = challenge(store, staging, run.all_cases(), forecaster, settings.champion_tolerance,
                         settings.calibration_rules)
    summary["published"] = decision.challenger if decision.promote else None
    summary["decision"] = asdict(decision)
    summary["reason"] = decision.reason if decision.promote else f"not published: {decision.reason}"
    return summary


def no_history_reason(settings: Settings, end: int) -> str:
    """Why the job found no prompts at all. The gist comes first: status cuts the line at 100 characters."""
    from core.refresh import replays_prices  # imported here, as the other core imports of this section

    days = history_span_s(settings) / 86_400
    empty = f"the history store holds no prices in the {days:.0f} days before {iso(end)} ({settings.data_dir})"
    if replays_prices(settings):
        # By design (core.refresh.durable_store): replayed rows are old prices dated now, kept out of the store.
        return f"prices are replayed: the history store is not filled, nothing to calibrate on; {empty}"
    return f"no prompts: {empty}; `synth-miner data import` or `data sync` fills it"


def unmoved_reason(outcomes: Sequence[CalibrationOutcome]) -> str:
    """Each key's own reason (too few prompts, most often) when no scale moved."""
    return "no scale moved: " + "; ".join(
        f"{o.key}: {o.reason if not o.moved else f'kept at {o.new:.4f}'}" for o in outcomes)

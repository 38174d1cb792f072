"""Model inputs computed from price history alone, identically in training and in serving.

Two kinds, both defined once here so training and the engine can never disagree:

* **context** (what the history says at the forecast origin): the last ``context_len`` one-step
  log returns for the patch encoder, standardised by the EWMA-t engine's fast volatility, and
  scalar summaries: realised volatility, returns and close ranges over several windows (1-minute
  and 5-minute bars for the HF model, 5-minute bars for the LF models), the fast/slow EWMA ratio
  and the age of the newest close.
* **step** (known in advance for every horizon step): time of day (UTC and New York), day of week,
  minute-of-hour marks and the US equity session (open/closed, minutes since the open and to the
  close, trading day, half day). This is how intraday seasonality and session changes reach the
  per-step head.

Only closes exist in ../shared/data and in the price providers' histories we cache, so true
high-low ranges cannot be computed: the ``range_*`` features are the range of the closes in a window.

Returns are always between adjacent bars (``diff(ts) == step``); a return across a gap is dropped,
exactly as ``PriceHistory.log_returns`` and the EWMA-t engine do.
"""

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from core.assets import ASSETS
from core.engines.ewma import DEFAULT_CONFIGS, EwmaConfig, ewma_variance
from core.market_calendar import bars_in_hours, ny_local_seconds, us_session
from core.prices import PriceHistory

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

FEATURE_VERSION = 2  # bump whenever a feature's meaning changes: old checkpoints then refuse to load
VAR_FLOOR = 1e-14  # same floor as the EWMA-t engine's variance


class FeatureError(ValueError):
    """History too short or unusable to compute a model's inputs."""


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that fixes one model's inputs."""

    step: int  # seconds per bar and per forecast step
    horizon: int  # forecast steps
    context_len: int  # returns fed to the patch encoder
    windows: tuple[int, ...]  # bar counts of the realised-vol / return / range features
    coarse_windows: tuple[int, ...] = ()  # 5-minute-bar windows computed from resampled 1-minute bars
    # History a training window may see: the batch interface's and the LF cache's 14 days, so the
    # EWMA base and the features are computed from what backtests and production give an engine.
    lookback_s: int = 14 * 86_400
    ewma: EwmaConfig = field(default_factory=EwmaConfig)  # the base the head corrects (pinned per checkpoint)
    # Staleness below this does not count (pinned per checkpoint; 0 in those that predate it). Training
    # sees bars up to the guard before the origin, but a live request comes ~120 s before its start and
    # the newest cached bar may be a minute older than that: an unseen feature value there moved sigma
    # by 6-14 % at 1-minute steps. Closures and outages (hours) still register.
    stale_slack_s: int = 0
    # Inputs are regular-session bars only (core.market_calendar). The equity files hold regular
    # hours only, while live tokenised equities and perps trade around the clock: their night and
    # weekend bars, which no training window ever held, are dropped in serving as in training.
    session_only: bool = False
    # Assets whose files close for the weekend and a daily break (gold: Friday 16:50 to Sunday 18:05 and
    # 16:50 to 18:05 daily, New York) while the live token trades through them: those bars are dropped
    # the same way.
    weekend_closed: tuple[str, ...] = ()

    @property
    def min_returns(self) -> int:
        return max(self.context_len, max(self.windows))


GOLD_WEEKEND = tuple(a.name for a in ASSETS.values() if a.weekend_closed)
STALE_SLACK_S = 180  # the live request lead (~120 s) and one bar's age: the normal serving delay

FEATURE_SPECS: dict[str, FeatureSpec] = {
    "hf": FeatureSpec(step=60, horizon=60, context_len=480, windows=(15, 60, 240),
                      coarse_windows=(48, 288), ewma=DEFAULT_CONFIGS[60], stale_slack_s=STALE_SLACK_S,
                      weekend_closed=GOLD_WEEKEND),
    "lf_crypto": FeatureSpec(step=300, horizon=288, context_len=576, windows=(12, 48, 288, 576),
                             ewma=DEFAULT_CONFIGS[300], stale_slack_s=STALE_SLACK_S, weekend_closed=GOLD_WEEKEND),
    "lf_equity": FeatureSpec(step=300, horizon=288, context_len=384, windows=(12, 78, 390),
                             ewma=DEFAULT_CONFIGS[300], stale_slack_s=STALE_SLACK_S, session_only=True),
}

SERIES_NAMES = ("ret", "abs_ret")  # channels of the encoder input


def context_feature_names(spec: FeatureSpec) -> list[str]:
    names = ["log_fast_slow", "log_stale"]
    for w in spec.windows:
        names += [f"rv_{w}", f"ret_{w}", f"range_{w}"]
    names += [f"rv5m_{w}" for w in spec.coarse_windows]
    return names


STEP_FEATURE_NAMES: tuple[str, ...] = (
    "tod_sin1", "tod_cos1", "tod_sin2", "tod_cos2", "tod_sin3", "tod_cos3",
    "ny_tod_sin", "ny_tod_cos", "dow_sin", "dow_cos", "weekend",
    "on_hour", "on_half_hour",
    "us_open", "us_since_open", "us_to_close", "us_trading_day", "us_half_day",
    "horizon_frac",
)

def step_starts(origins: npt.ArrayLike, step: int, horizon: int) -> IntArray:
    """int64[len(origins), horizon]: when each horizon step begins."""
    o = np.atleast_1d(np.asarray(origins, dtype=np.int64))
    out: IntArray = o[:, None] + step * np.arange(horizon, dtype=np.int64)[None, :]
    return out


def hour_mark(starts: IntArray, step: int, period: int) -> FloatArray:
    """1.0 where a 1-minute step starts on a multiple of ``period`` seconds; 0 at coarser steps."""
    marks: FloatArray = ((starts % period == 0) & (step == 60)).astype(np.float64)
    return marks


def step_features(origins: npt.ArrayLike, step: int, horizon: int) -> FloatArray:
    """Calendar of each horizon step: float64[len(origins), horizon, len(STEP_FEATURE_NAMES)].

    Step h covers [origin + h*step, origin + (h+1)*step); its features describe the step's middle,
    except the hour marks, which flag 1-minute steps that start on a whole or half hour. At 5-minute
    steps they stay 0: the LF models train on 5-minute bars whose origins sit at 240 s (mod 300), where
    no step starts on the hour, so a live origin on a 5-minute mark would feed them untrained weights.
    """
    starts = step_starts(origins, step, horizon)  # (B, H)
    mid = starts + step // 2
    tod = 2 * np.pi * (mid % 86_400) / 86_400
    ny_tod = 2 * np.pi * (ny_local_seconds(mid) % 86_400) / 86_400
    day = mid // 86_400
    weekday = (day + 3) % 7
    dow = 2 * np.pi * weekday / 7
    session = us_session(mid)
    frac = np.broadcast_to((np.arange(horizon) + 0.5) / horizon, starts.shape)
    cols = [np.sin(tod), np.cos(tod), np.sin(2 * tod), np.cos(2 * tod), np.sin(3 * tod), np.cos(3 * tod),
            np.sin(ny_tod), np.cos(ny_tod), np.sin(dow), np.cos(dow), (weekday >= 5).astype(np.float64),
            hour_mark(starts, step, 3600), hour_mark(starts, step, 1800),
            session.open, session.since_open, session.to_close, session.trading_day, session.half_day, frac]
    return np.stack(cols, axis=-1)


def session_bars(spec: FeatureSpec, asset: str, history: PriceHistory) -> PriceHistory:
    """The bars a model's inputs may use, as its training files held them (the hours its checkpoint pins):
    a 24/7 feed's night or weekend bars are dropped."""
    return bars_in_hours(history, session_only=spec.session_only, weekend_closed=asset in spec.weekend_closed)


def us_closed_steps(origins: npt.ArrayLike, step: int, horizon: int) -> npt.NDArray[np.bool_]:
    """bool[len(origins), horizon]: the step's middle falls outside the NYSE regular session.

    Equity data holds regular hours only, so the variance of all closed steps together is the
    overnight (or weekend) move; live tokenised equities trade through it at a lower pace.
    """
    closed: npt.NDArray[np.bool_] = us_session(step_starts(origins, step, horizon) + step // 2).open == 0
    return closed


# --- history -> returns -> context ------------------------------------------------------------------


@dataclass(frozen=True)
class Returns:
    """One-step log returns between adjacent bars and the time each became known (its close time)."""

    step: int
    r: FloatArray
    known_ts: IntArray

    def __len__(self) -> int:
        return int(self.r.size)

    def known_by(self, origin: int, lookback_s: int) -> "Returns":
        """Returns known at ``origin`` and at most ``lookback_s`` old (the serving cache's window)."""
        lo, hi = np.searchsorted(self.known_ts, [origin - lookback_s, origin], side="right")
        return Returns(self.step, self.r[lo:hi], self.known_ts[lo:hi])

    def from_bars_since(self, start: int) -> "Returns":
        """Returns whose two bars both open at or after ``start``: those a history cut there still holds
        (``evaluation.snapshot_at`` and the live cache keep bars opening at most the lookback before the cut)."""
        lo = int(np.searchsorted(self.known_ts, start + 2 * self.step, side="left"))
        return Returns(self.step, self.r[lo:], self.known_ts[lo:])


def returns_of(history: PriceHistory) -> Returns:
    if len(history) < 2:
        return Returns(history.step, np.empty(0), np.empty(0, np.int64))
    adjacent = np.diff(history.ts) == history.step
    r = np.diff(np.log(history.close))[adjacent]
    return Returns(history.step, r, (history.ts[1:] + history.step)[adjacent])


def base_variances(returns: FloatArray, cfg: EwmaConfig) -> tuple[float, float]:
    """The EWMA-t engine's fast and slow one-step variances (same function, same inputs)."""
    return ewma_variance(returns, cfg.half_life_bars), ewma_variance(returns, cfg.long_half_life_bars)


def base_sigma(fast: float, slow: float, cfg: EwmaConfig, horizon: int) -> FloatArray:
    """The EWMA-t engine's per-step std before its ``var_mult``: fast reverting to slow over the horizon.

    ``var_mult`` (tuned on the validator's CRPS, < 1) is left out on purpose: the likelihood is fitted
    against the raw realised-volatility estimate, and the shrink is applied when sampling
    (``sample_scale``), so the untrained model still reproduces the EWMA-t engine exactly.
    """
    decay = 0.5 ** (np.arange(horizon, dtype=np.float64) / cfg.reversion_bars)
    variance = slow + (fast - slow) * decay
    out: FloatArray = np.sqrt(np.maximum(variance, VAR_FLOOR))
    return out


def sample_scale(cfg: EwmaConfig) -> float:
    """Std multiplier between the raw base and the EWMA-t engine's sampled std."""
    return float(np.sqrt(cfg.var_mult))


@dataclass(frozen=True)
class ContextInputs:
    series: FloatArray  # [context_len] returns / fast EWMA std, oldest first
    scalars: FloatArray  # [len(context_feature_names(spec))], raw (normalised by the model's stats)
    base: FloatArray  # [horizon] EWMA-t per-step std of the one-step log return, before var_mult
    fast: float
    slow: float


def context_inputs(spec: FeatureSpec, native: Returns, origin: int,
                   coarse: Returns | None = None) -> ContextInputs:
    """Context of one forecast from returns known at ``origin`` (already cut to the lookback)."""
    if len(native) < spec.min_returns:
        raise FeatureError(f"need {spec.min_returns} returns at {spec.step}s, history has {len(native)}")
    fast, slow = base_variances(native.r, spec.ewma)
    fast, slow = max(fast, VAR_FLOOR), max(slow, VAR_FLOOR)
    sd = np.sqrt(fast)
    r = native.r
    # Staleness beyond one step and the slack (closures, outages); 0 for the normal serving delay.
    stale = max(origin - int(native.known_ts[-1]) - spec.step - spec.stale_slack_s, 0) / spec.step
    values = [0.5 * np.log(fast / slow), np.log1p(stale)]
    for w in spec.windows:
        tail = r[-w:]
        path = np.concatenate(([0.0], np.cumsum(tail)))
        values += [0.5 * np.log(max(float(np.mean(tail**2)), VAR_FLOOR) / fast),
                   float(path[-1]) / (sd * np.sqrt(w)),
                   float(path.max() - path.min()) / (sd * np.sqrt(w))]
    for w in spec.coarse_windows:
        if coarse is None or len(coarse) < w:
            raise FeatureError(f"need {w} resampled 5-minute returns, history has {0 if coarse is None else len(coarse)}")
        rv = max(float(np.mean(coarse.r[-w:] ** 2)), VAR_FLOOR)
        values.append(0.5 * np.log(rv / (fast * coarse.step / spec.step)))
    scalars = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(scalars)):
        raise FeatureError("non-finite context feature")
    return ContextInputs(series=r[-spec.context_len:] / sd, scalars=scalars,
                         base=base_sigma(fast, slow, spec.ewma, spec.horizon), fast=fast, slow=slow)


def history_context(spec: FeatureSpec, history: PriceHistory, origin: int) -> ContextInputs:
    """Serving path: a snapshot's history at the model's step -> context inputs."""
    if history.step != spec.step:
        raise FeatureError(f"history step {history.step}s, model needs {spec.step}s")
    known = history.known_at(origin)
    # Bar-exact lookback, as training windows cut it: a live cache starts its window at "now", a little
    # before the origin, and held a return more at the old edge (it moved the slow EWMA of gold and equities).
    since = origin - spec.lookback_s
    native = returns_of(known).known_by(origin, spec.lookback_s).from_bars_since(since)
    coarse = (returns_of(known.resample(300)).known_by(origin, spec.lookback_s).from_bars_since(since)
              if spec.coarse_windows else None)
    return context_inputs(spec, native, origin, coarse)


@dataclass(frozen=True)
class NormStats:
    """Mean and std of each context feature over the training windows only."""

    mean: FloatArray
    std: FloatArray

    @classmethod
    def fit(cls, scalars: FloatArray) -> "NormStats":
        if scalars.ndim != 2 or scalars.shape[0] < 2:
            raise FeatureError("need at least two training windows to fit normalisation statistics")
        std = scalars.std(axis=0)
        # A feature constant in training (e.g. staleness for 24/7 crypto) is only centred, never
        # blown up by a tiny std when serving meets a value training never had.
        return cls(scalars.mean(axis=0), np.where(std < 1e-3, 1.0, std))

    def apply(self, scalars: FloatArray) -> FloatArray:
        if scalars.shape[-1] != self.mean.size:
            raise FeatureError(f"{scalars.shape[-1]} features, statistics for {self.mean.size}")
        out: FloatArray = np.clip((scalars - self.mean) / self.std, -8.0, 8.0)
        return out

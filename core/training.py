"""Train one model: NLL on standardised returns, early stopping on the validator's CRPS.

* Loss: Student-t negative log-likelihood of every observed increment of the realised log price on
  the horizon grid, in units of the EWMA-t std at the origin. Adjacent observed points give
  one-step returns; across a market closure the increment's variance is the sum of the step
  variances it spans (so closed-hour steps learn the overnight move). Unit-variance t: the head's
  sigma is the std, scale = sigma * sqrt((nu - 2) / nu).
* Selection: after every epoch, paths are sampled with ``core.path_sampling.sample_paths`` for a
  fixed set of validation prompts and scored with ``core.scoring.score_prompt``; the best epoch by
  mean CRPS is kept. Epoch 0 is the untrained model, which equals the EWMA-t engine, so a model
  that never beats EWMA-t on validation is saved as EWMA-t (zero correction), never worse.
* Ensembles: ``members`` networks from seeds seed, seed + 1, ... on the same windows and
  normalisation; their laws are averaged and the average is kept when it beats EWMA-t on
  validation. After training, on the same prompts: the sampler's latent volatility and, for
  equities, the std multiplier of the hours outside the US session (the checkpoint's fields).
* Refit (``refit``, the 24 h models by default): once validation has chosen everything, the same
  recipe (per member: its NLL and CRPS epochs, on the same schedules) is replayed on every window,
  validation included, so the served model has seen the latest regime and data sources too.
* Seeded (torch, numpy, batch order, sampler) and CPU by default.
"""

import copy
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from core import devices
from core.checkpoint import SESSION_KINDS, Checkpoint
from core.datasets import MODEL_ASSETS, FileSlice, WindowSet, build_windows, split_train_val
from core.engines.ewma import DEFAULT_CONFIGS, EwmaConfig
from core.features import (
    FEATURE_SPECS,
    STEP_FEATURE_NAMES,
    FeatureSpec,
    NormStats,
    context_feature_names,
    sample_scale,
    step_features,
    us_closed_steps,
)
from core.model import (
    LawModel,
    PatchTST,
    PatchTSTConfig,
    PatchTSTEnsemble,
    StudentTParams,
    series_channels,
    unit_t_log_prob,
)
from core.path_sampling import LatentVol, sample_paths
from core.scoring import score_prompt

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# hf: 29 minutes, so origins cycle through every minute of the hour as live prompts do. On :00/:30 only,
# the hour marks sat on fixed steps and that model scored 0.9915x EWMA-t on validation origins at other
# minutes against 0.9862x on :00/:30. 5-minute origins are pinned to 240 s (mod 300) by the bars.
DEFAULT_STRIDE_S = {"hf": 1740, "lf_crypto": 3600, "lf_equity": 1800}
# Sample-CRPS fine-tune epochs after the NLL phase: hf kept improving past 6 (validation 0.9852 at
# 6 epochs, 0.9839 at 10); the 24 h models level off by 6.
DEFAULT_CRPS_EPOCHS = {"hf": 10, "lf_crypto": 6, "lf_equity": 6}
# Refit on every window (validation included) after selection, per model. Walk-forward check on the
# pre-held-out data (select on the middle 16 %, score on the last 20 %, single member): the refit
# 24 h crypto model scored 0.9947x the unrefitted one [0.9915, 0.9972] (every asset better); the 1 h
# model 1.0000x [0.9980, 1.0019], so it keeps its selected weights.
REFIT_DEFAULT = {"hf": False, "lf_crypto": True, "lf_equity": True}
# Half-life (days) of the refit's recency weighting, per model; None = every window alike.
# Walk-forward (a selected member's recipe replayed on each file's first 80 %, scored on the last
# 20 %, paired, ratio to the same replay drawing every window alike): lf_crypto 180 d 0.9974
# [0.9955, 0.9992] and 0.9990 [0.9972, 1.0006] on two seeds (90 d 0.9976 and 0.9991; 365 d 0.9987
# on the first); lf_equity 90 d 0.9986 [0.9976, 0.9996] on two seeds pooled (180 d 0.9993);
# hf 180 d 1.0005 [0.9979, 1.0025] on 2400 prompts, so it stays unweighted.
REFIT_HALF_LIFE_DAYS: dict[str, float | None] = {"hf": None, "lf_crypto": 180.0, "lf_equity": 90.0}
# Std multipliers for steps outside the US session (SESSION_KINDS), tried on validation after training.
CLOSED_SCALE_CANDIDATES = (0.5, 0.6, 0.7, 0.85, 1.0)
# Per-path volatility candidates for the sampler (rho, s), tried on validation after training.
LATENT_CANDIDATES = (LatentVol(), LatentVol(0.98, 0.03), LatentVol(0.99, 0.03), LatentVol(0.98, 0.06),
                     LatentVol(0.99, 0.06))
ARCH: dict[str, dict[str, Any]] = {  # per-model architecture on top of PatchTSTConfig's defaults
    "hf": {"patch_len": 16, "stride": 16},  # the 1-minute drift pays on validation (0.985 vs 0.988 without)
    # No drift head at 24 h: a learned drift compounds over 288 steps into a biased 24 h level. On
    # validation it cost equities 1.0 % CRPS and bought crypto nothing (0.9786 with, 0.9789 without).
    "lf_crypto": {"patch_len": 24, "stride": 24, "max_mu": 0.0},
    "lf_equity": {"patch_len": 24, "stride": 24, "max_mu": 0.0},
}


CrpsWeight = Literal["std", "price"]


class TrainingError(RuntimeError):
    """Training cannot run as asked (no device, no windows...)."""


@dataclass
class TrainOptions:
    epochs: int = 12
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    stride_s: int | None = None  # between training origins; None = DEFAULT_STRIDE_S
    val_frac: float = 0.2
    val_prompts: int = 160  # validation prompts scored with the validator's CRPS per epoch
    n_paths: int = 1000
    patience: int = 3  # epochs without a better validation CRPS before stopping
    asset_dropout: float = 0.1  # share of windows shown as the unknown asset (trains its embedding)
    batches_per_epoch: int | None = 120  # an epoch is this many random batches (None = one pass)
    max_train_windows: int | None = None  # subsample (smoke tests)
    arch: dict[str, Any] = field(default_factory=dict)  # PatchTSTConfig overrides
    latent: LatentVol | None = None  # sampler latent vol; None = the EWMA-t engine's
    latent_grid: tuple[LatentVol, ...] | None = None  # candidates picked on validation CRPS after training
    closed_grid: tuple[float, ...] | None = None  # closed-session std multipliers (SESSION_KINDS only)
    members: int = 1  # ensemble size: members trained from seeds seed, seed + 1, ... on the same windows
    crps_epochs: int = 0  # sample-CRPS fine-tune epochs after the NLL phase
    crps_lr_factor: float = 0.2
    crps_members: int = 16  # sampled paths per window in the CRPS loss
    crps_weight: CrpsWeight = "std"  # "std": windows weigh alike; "price": by their base std, as the validator's bps do
    # Refit only: draw windows with a weight halving every this many days before the asset's newest
    # window, so the served model leans on the latest regime; None = every window alike (each epoch
    # without repeats); "auto" = REFIT_HALF_LIFE_DAYS of the model. Selection always draws alike.
    refit_half_life_days: float | Literal["auto"] | None = "auto"
    ewma: EwmaConfig | None = None  # the base to correct; None = the EWMA-t engine's current default


def model_config(kind: str, overrides: Mapping[str, Any] | None = None,
                 spec: FeatureSpec | None = None) -> PatchTSTConfig:
    spec = spec or FEATURE_SPECS[kind]
    cfg = PatchTSTConfig(context_len=spec.context_len, horizon=spec.horizon,
                         n_context=len(context_feature_names(spec)), n_step=len(STEP_FEATURE_NAMES),
                         n_assets=len(MODEL_ASSETS[kind]), base_nu=spec.ewma.nu, **ARCH[kind])
    cfg = replace(cfg, **dict(overrides or {}))
    cfg.check()
    return cfg


@dataclass
class Batch:
    series: torch.Tensor  # (B, C, L)
    context: torch.Tensor  # (B, F)
    steps: torch.Tensor  # (B, H, S)
    asset: torch.Tensor  # (B,)
    log_path: torch.Tensor  # (B, H+1) in units of the base std at the origin, NaN where unobserved
    base_rel: torch.Tensor  # (B, H) base std / base std at step 0
    base0: torch.Tensor  # (B,) base std at step 0 (log-return units): turns the std units back into price


def make_batch(w: WindowSet, rows: IntArray, norm: NormStats, cfg: PatchTSTConfig, device: str,
               rng: np.random.Generator | None = None, asset_dropout: float = 0.0) -> Batch:
    spec = FEATURE_SPECS[w.kind]
    idx = w.ctx_end[rows, None] - cfg.context_len + np.arange(cfg.context_len)  # (B, L)
    series = w.returns[idx] / w.scale[rows, None]
    asset = w.asset[rows].copy()
    if rng is not None and asset_dropout > 0:
        asset[rng.random(asset.size) < asset_dropout] = cfg.n_assets
    b0 = w.base[rows, :1]

    def t(a: npt.NDArray[Any]) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32, device=device)

    return Batch(series=series_channels(t(series)), context=t(norm.apply(w.scalars[rows])),
                 steps=t(step_features(w.origin[rows], spec.step, spec.horizon)),
                 asset=torch.as_tensor(asset, device=device), log_path=t(w.log_path[rows] / b0),
                 base_rel=t(w.base[rows] / b0), base0=t(b0[:, 0]))


def increment_nll(p: StudentTParams, base_rel: torch.Tensor, log_path: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each observed increment of the log path (see the module docstring)."""
    b, n = log_path.shape  # n = H + 1
    var = (base_rel * torch.exp(p.log_sigma)) ** 2  # (B, H) variance of each step
    zero = var.new_zeros(b, 1)
    cum_var = torch.cat([zero, var.cumsum(1)], dim=1)  # (B, H+1)
    cum_mu = torch.cat([zero, (base_rel * p.mu).cumsum(1)], dim=1)
    seen = ~torch.isnan(log_path)
    pos = torch.arange(n, device=log_path.device).expand(b, n)
    last_seen = torch.where(seen, pos, torch.full_like(pos, -1)).cummax(dim=1).values  # (B, H+1)
    prev = torch.cat([torch.full_like(pos[:, :1], -1), last_seen[:, :-1]], dim=1)  # previous observed point
    valid = seen & (prev >= 0)
    prev_c = prev.clamp(min=0)
    y = torch.nan_to_num(log_path)
    inc = y - y.gather(1, prev_c)
    inc_var = (cum_var - cum_var.gather(1, prev_c)).clamp(min=1e-12)
    inc_mu = cum_mu - cum_mu.gather(1, prev_c)
    nu = torch.cat([p.nu[:, :1], p.nu], dim=1)  # tail of the increment ending at k: step k-1's
    z = (inc - inc_mu) / torch.sqrt(inc_var)
    nll = -(unit_t_log_prob(z, nu) - 0.5 * torch.log(inc_var))
    return nll[valid].mean()


@dataclass(frozen=True)
class StepLaws:
    mu: FloatArray  # (B, H) in log-return units
    sigma: FloatArray  # (B, H) std of the one-step log return
    nu: FloatArray  # (B, H)


def predict(model: LawModel | None, w: WindowSet, rows: IntArray, norm: NormStats, cfg: PatchTSTConfig,
            device: str, scale: float, batch_size: int = 512, closed_scale: float = 1.0) -> StepLaws:
    """Per-step laws as sampled (``scale`` = sqrt(var_mult)); ``model=None`` gives the EWMA-t engine's.

    ``closed_scale`` multiplies the std of steps outside the US session (the checkpoint's field).
    """
    base = w.base[rows] * scale
    if model is None:
        return StepLaws(np.zeros_like(base), base.copy(), np.full_like(base, cfg.base_nu))
    if closed_scale != 1.0:
        spec = FEATURE_SPECS[w.kind]
        base = np.where(us_closed_steps(w.origin[rows], spec.step, spec.horizon), base * closed_scale, base)
    model.eval()
    out: list[StudentTParams] = []
    with torch.no_grad():
        for lo in range(0, rows.size, batch_size):
            bt = make_batch(w, rows[lo:lo + batch_size], norm, cfg, device)
            out.append(model(bt.series, bt.context, bt.steps, bt.asset))
    def cat(i: int) -> FloatArray:
        joined: FloatArray = torch.cat([o[i] for o in out]).double().cpu().numpy()
        return joined

    return StepLaws(base * cat(0), base * np.exp(cat(1)), cat(2))


def prompt_scores(laws: StepLaws, w: WindowSet, rows: IntArray, latent: LatentVol, n_paths: int,
                  seed: int) -> FloatArray:
    """Validator CRPS per prompt; the same random streams for every model (paired comparison)."""
    spec = FEATURE_SPECS[w.kind]
    scores = np.empty(rows.size)
    for i, row in enumerate(rows.tolist()):
        paths = sample_paths(float(w.anchor[row]), laws.mu[i], laws.sigma[i], laws.nu[i], n_paths,
                             np.random.default_rng([seed, row]), latent)
        real = w.anchor[row] * np.exp(w.log_path[row])
        scores[i] = score_prompt(np.asarray(paths, np.float64), real, spec.step, spec.step * spec.horizon).total
    return scores


def spaced_rows(n: int, k: int) -> IntArray:
    return np.unique(np.linspace(0, n - 1, max(min(k, n), 0)).round().astype(np.int64))


@dataclass
class TrainResult:
    checkpoint: Checkpoint
    history: list[dict[str, float]]
    seconds: float


def _data_window(files: Mapping[str, FileSlice], windows: WindowSet, train: WindowSet, val: WindowSet) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, asset in enumerate(MODEL_ASSETS[windows.kind]):
        if asset not in files:
            continue
        tr, va = train.origin[train.asset == i], val.origin[val.asset == i]
        out[asset] = {"file": files[asset].stem, "eval_start_ts": files[asset].eval_start_ts,
                      "train_origins": [int(tr.min()), int(tr.max())] if tr.size else None,
                      "val_origins": [int(va.min()), int(va.max())] if va.size else None,
                      "train_windows": int(tr.size), "val_windows": int(va.size)}
    return out


def resolve_device(device: str) -> str:
    try:
        return devices.resolve_device(device)
    except devices.DeviceError as exc:
        raise TrainingError(str(exc)) from exc


LossFn = Callable[[StudentTParams, Batch], torch.Tensor]


def nll_loss(p: StudentTParams, b: Batch) -> torch.Tensor:
    return increment_nll(p, b.base_rel, b.log_path)


@dataclass(frozen=True)
class Intervals:
    """The validator's scoring intervals in steps: changes between consecutive points ``k`` apart,
    changes from the start to a point (its ``_gaps`` terms), and the price at a point itself (its
    ``_abs`` terms: the paths' level from the anchor against the realised level, not a change from the
    realised start, which differs from the anchor by the move between the two)."""

    consecutive: tuple[int, ...]
    from_start: tuple[int, ...]
    absolute: tuple[int, ...] = ()


VALIDATOR_INTERVALS = {  # core.scoring's HF_INTERVALS / LF_INTERVALS, in steps of the prompt
    60: Intervals(consecutive=(1, 2, 5, 15, 30), from_start=tuple(range(5, 65, 5)), absolute=(60,)),
    300: Intervals(consecutive=(1, 6, 36), from_start=(), absolute=(288,)),
}


def _fair_crps(sim: torch.Tensor, real: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Fair ensemble CRPS per column: sim (M, B, C) against real (B, C); NaN columns score 0."""
    m = sim.shape[0]
    spread = (torch.sort(sim, dim=0).values * ranks[:, None, None]).sum(0) / (m * (m - 1))
    crps = (sim - torch.nan_to_num(real)).abs().mean(0) - spread
    return crps * ~torch.isnan(real)


def sample_crps_loss(p: StudentTParams, b: Batch, intervals: Intervals, members: int = 16,
                     scale: float = 1.0, weight: CrpsWeight = "std") -> torch.Tensor:
    """Fair ensemble CRPS of the realised log-price changes on the validator's intervals.

    Reparameterised Student-t draws (``rsample``) make the sampled paths differentiable; per window
    the CRPS is summed over every interval's changes, as the validator sums them, in units of the
    base std. ``weight="price"`` then weighs each window by its base std (over the batch mean), so
    wild windows count as much as they do in the validator's basis points. ``scale`` is the
    sampler's std multiplier on the base (sqrt(var_mult)), so this scores what is sent.
    """
    t_scale = torch.sqrt((p.nu - 2) / p.nu)  # std -> Student-t scale
    eps = torch.distributions.StudentT(p.nu).rsample((members,)) * t_scale  # (M, B, H) unit variance
    steps = scale * b.base_rel * (p.mu + torch.exp(p.log_sigma) * eps)  # (M, B, H)
    paths = torch.cat([steps.new_zeros(*steps.shape[:2], 1), steps.cumsum(-1)], dim=-1)  # (M, B, H+1)
    ranks = 2 * torch.arange(1, members + 1, device=paths.device, dtype=paths.dtype) - members - 1
    per_window = paths.new_zeros(paths.shape[1])  # (B,)
    for k in intervals.consecutive:
        per_window = per_window + _fair_crps(paths[..., ::k].diff(dim=-1), b.log_path[:, ::k].diff(dim=-1),
                                             ranks).sum(-1)
    ends = [k for k in intervals.from_start if k < paths.shape[-1]]
    if ends:
        real = b.log_path[:, ends] - b.log_path[:, :1]  # (B, E)
        per_window = per_window + _fair_crps(paths[..., ends], real, ranks).sum(-1)
    levels = [k for k in intervals.absolute if k < paths.shape[-1]]
    if levels:  # log price from the anchor, where every path starts (log_path is relative to it too)
        per_window = per_window + _fair_crps(paths[..., levels], b.log_path[:, levels], ranks).sum(-1)
    if weight == "price":
        return (per_window * b.base0 / b.base0.mean()).mean()
    return per_window.mean()


def recency_weights(w: WindowSet, half_life_days: float | None) -> FloatArray | None:
    """Draw probabilities halving every ``half_life_days`` before each asset's newest window."""
    if half_life_days is None:
        return None
    if not half_life_days > 0 or not np.isfinite(half_life_days):
        raise TrainingError(f"recency half-life must be a positive number of days, got {half_life_days}")
    newest = np.full(int(w.asset.max()) + 1, np.iinfo(np.int64).min)
    np.maximum.at(newest, w.asset, w.origin)
    age_days = (newest[w.asset] - w.origin) / 86_400.0
    weights = 0.5 ** (age_days / half_life_days)
    p: FloatArray = weights / weights.sum()
    return p


class _EpochRunner:
    """Epochs of one loss over random batches of the training windows (shared by train and refit)."""

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))

    def __init__(self, train_w: WindowSet, norm: NormStats, cfg: PatchTSTConfig, device: str,
                 rng: np.random.Generator, opts: TrainOptions, console: Console,
                 half_life_days: float | None = None) -> None:
        self.train_w, self.norm, self.cfg, self.device, self.rng = train_w, norm, cfg, device, rng
        self.opts, self.console = opts, console
        self.n_batches = max(len(train_w) // opts.batch_size, 1)  # an epoch: one pass, or batches_per_epoch
        if opts.batches_per_epoch is not None:
            self.n_batches = min(self.n_batches, opts.batches_per_epoch)
        self.draw_p = recency_weights(train_w, half_life_days)

    def epoch_rows(self) -> IntArray:
        """[n_batches, batch_size] window rows of one epoch."""
        size = self.n_batches * self.opts.batch_size
        if self.draw_p is None:
            rows: IntArray = self.rng.permutation(len(self.train_w))[:size]
        else:
            rows = self.rng.choice(len(self.train_w), size=size, replace=True, p=self.draw_p)
        return rows.reshape(self.n_batches, -1)

    def run(self, model: PatchTST, name: str, loss_fn: LossFn, scheduled: int, lr: float,
            after_epoch: Callable[[float], bool]) -> None:
        """Up to ``scheduled`` epochs on one OneCycle schedule; stops when ``after_epoch(mean loss)`` is False."""
        if scheduled < 1:
            return
        opts, n = self.opts, self.n_batches
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=opts.weight_decay)
        # At least 20 scheduled steps: OneCycleLR's warm-up cannot be shorter than one step.
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(scheduled * n, 20),
                                                    pct_start=0.1)
        with Progress(*self.columns, console=self.console, transient=True) as progress:
            for index in range(scheduled):
                model.train()
                order = self.epoch_rows()
                task = progress.add_task(f"{name} epoch {index + 1}", total=n, info="")
                losses = []
                for rows in order:
                    b = make_batch(self.train_w, np.sort(rows), self.norm, self.cfg, self.device, self.rng,
                                   opts.asset_dropout)
                    loss = loss_fn(model(b.series, b.context, b.steps, b.asset), b)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    sched.step()
                    losses.append(float(loss.detach()))
                    progress.update(task, advance=1, info=f"{np.mean(losses[-50:]):.4f}")
                progress.remove_task(task)
                if not after_epoch(float(np.mean(losses))):
                    break


def _phase_losses(spec: FeatureSpec, opts: TrainOptions, shrink: float) -> tuple[LossFn, LossFn]:
    """The NLL phase's loss and the CRPS fine-tune's."""
    intervals = VALIDATOR_INTERVALS[spec.step]

    def crps(p: StudentTParams, b: Batch) -> torch.Tensor:
        return sample_crps_loss(p, b, intervals, opts.crps_members, shrink, opts.crps_weight)

    return nll_loss, crps


def train(kind: str, files: Mapping[str, FileSlice], opts: TrainOptions, console: Console | None = None,
          on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Build windows, train, select on validation CRPS; returns the best checkpoint (not saved)."""
    if kind not in FEATURE_SPECS:
        raise TrainingError(f"unknown model {kind!r}; known: {sorted(FEATURE_SPECS)}")
    began = time.perf_counter()
    console = console or Console(quiet=True)
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    spec = replace(FEATURE_SPECS[kind], ewma=opts.ewma or DEFAULT_CONFIGS[FEATURE_SPECS[kind].step])

    windows = build_windows(kind, files, opts.stride_s or DEFAULT_STRIDE_S[kind], opts.val_frac, spec)
    train_w, val_w = split_train_val(windows)
    if opts.max_train_windows is not None and len(train_w) > opts.max_train_windows:
        train_w = train_w.subset(np.sort(rng.choice(len(train_w), opts.max_train_windows, replace=False)))
    if len(train_w) < 2 or len(val_w) < 1:
        raise TrainingError(f"{kind}: {len(train_w)} training and {len(val_w)} validation windows; need more data")
    console.print(f"[bold]{kind}[/]: {len(train_w)} training / {len(val_w)} validation windows")

    norm = NormStats.fit(train_w.scalars)
    cfg = model_config(kind, opts.arch, spec)
    latent = opts.latent if opts.latent is not None else spec.ewma.latent
    scorable = np.flatnonzero(val_w.scorable)  # like backtest prompts: first and last price observed
    val_rows = scorable[spaced_rows(scorable.size, opts.val_prompts)]
    if val_rows.size < 1:  # nothing to select on: every CRPS would be NaN and every comparison False
        raise TrainingError(f"{kind}: no validation prompt to select on ({scorable.size} of {len(val_w)} validation "
                            f"windows have their first and last realised price, val_prompts={opts.val_prompts}); "
                            "need more data")
    all_val = np.arange(len(val_w))

    shrink = sample_scale(spec.ewma)

    def val_crps(m: LawModel | None, lat: LatentVol, closed: float = 1.0) -> float:
        laws = predict(m, val_w, val_rows, norm, cfg, device, shrink, closed_scale=closed)
        return float(np.mean(prompt_scores(laws, val_w, val_rows, lat, opts.n_paths, opts.seed)))

    def val_nll(m: LawModel) -> float:
        m.eval()
        with torch.no_grad():
            return float(np.mean([nll_loss(m(b.series, b.context, b.steps, b.asset), b).item()
                                  for lo in range(0, all_val.size, 1024)
                                  for b in [make_batch(val_w, all_val[lo:lo + 1024], norm, cfg, device)]]))

    ewma_crps = val_crps(None, latent)
    history: list[dict[str, float]] = []
    runner = _EpochRunner(train_w, norm, cfg, device, rng, opts, console)
    loss_fns = _phase_losses(spec, opts, shrink)

    def fit_member(index: int) -> tuple[PatchTST, int, float, tuple[int, int]]:
        """One member from seed ``opts.seed + index``: NLL, then the CRPS fine-tune; best epoch kept."""
        torch.manual_seed(opts.seed + index)
        model = PatchTST(cfg).to(device)
        name = kind if opts.members == 1 else f"{kind} member {index + 1}/{opts.members}"
        best = {"crps": val_crps(model, latent), "epoch": 0}
        best_state = copy.deepcopy(model.state_dict())
        first = {"member": float(index), "epoch": 0.0, "train_loss": float("nan"), "val_nll": val_nll(model),
                 "val_crps": best["crps"], "ratio_vs_ewma": best["crps"] / ewma_crps}
        history.append(first)
        console.print(f"{name} epoch 0 (= EWMA-t): val CRPS {best['crps']:.2f} (EWMA-t {ewma_crps:.2f}), "
                      f"val NLL {first['val_nll']:.4f}")
        epoch = 0
        kept: list[int] = []  # per phase: the epochs of that phase in the kept state (what refit replays)

        def phase(phase_name: str, loss_fn: LossFn, scheduled: int, lr: float) -> None:
            """Epochs of one loss; after each, keep the model if its validation CRPS is the best so far."""
            nonlocal best_state, epoch
            start, bad = epoch, 0

            def after(mean_loss: float) -> bool:
                nonlocal best_state, epoch, bad
                epoch += 1
                crps = val_crps(model, latent)
                row = {"member": float(index), "epoch": float(epoch), "train_loss": mean_loss,
                       "val_nll": val_nll(model), "val_crps": crps, "ratio_vs_ewma": crps / ewma_crps}
                history.append(row)
                if on_epoch:
                    on_epoch(row)
                better = crps < best["crps"]
                console.print(f"{name} epoch {epoch} ({phase_name}): train {row['train_loss']:.4f}, "
                              f"val NLL {row['val_nll']:.4f}, val CRPS {crps:.2f} "
                              f"({row['ratio_vs_ewma']:.4f}x EWMA-t){' *' if better else ''}")
                if better:
                    best.update(crps=crps, epoch=epoch)
                    best_state, bad = copy.deepcopy(model.state_dict()), 0
                    return True
                bad += 1
                if bad >= opts.patience:
                    console.print(f"no better validation CRPS for {bad} epochs: {phase_name} phase stops")
                    return False
                return True

            runner.run(model, f"{name} {phase_name}", loss_fn, scheduled, lr, after)
            model.load_state_dict(best_state)
            kept.append(max(int(best["epoch"]) - start, 0))

        phase("nll", loss_fns[0], opts.epochs, opts.lr)
        phase("crps", loss_fns[1], opts.crps_epochs, opts.lr * opts.crps_lr_factor)
        return model.eval(), int(best["epoch"]), float(best["crps"]), (kept[0], kept[1])

    fitted = [fit_member(i) for i in range(opts.members)]
    members = [m for m, _, _, _ in fitted]
    kept_members = list(range(len(fitted)))
    best_crps = fitted[0][2]
    final: LawModel = members[0]
    if len(members) > 1:
        ensemble = PatchTSTEnsemble(members)
        ensemble_crps = val_crps(ensemble, latent)
        console.print(f"ensemble of {len(members)}: val CRPS {ensemble_crps:.2f} "
                      f"({ensemble_crps / ewma_crps:.4f}x EWMA-t)")
        # Not "the better of the average and the best member": each member's epoch was picked on
        # these same prompts, so the best member's score is biased low and would beat the average by
        # luck. The average must beat EWMA-t; if it does not, the best member (which did) is kept.
        if ensemble_crps <= ewma_crps:
            final, best_crps = ensemble, ensemble_crps
        else:
            single = min(range(len(fitted)), key=lambda i: fitted[i][2])
            members, best_crps, kept_members = [members[single]], fitted[single][2], [single]
            final = members[0]

    # The sampler's per-path volatility, picked on the same validation prompts (reference notes 1.6.3).
    latent_scores = {f"{c.rho},{c.s}": val_crps(final, c) for c in (opts.latent_grid or ())}
    if latent_scores:
        key = min(latent_scores, key=latent_scores.__getitem__)
        if latent_scores[key] < best_crps:
            rho, s = (float(v) for v in key.split(","))
            latent, best_crps = LatentVol(rho, s), latent_scores[key]
        console.print(f"latent volatility: {latent} (validation CRPS {best_crps:.2f})")

    # How much variance the closed hours carry: the NLL learns it from a few overnight increments
    # among thousands of 5-minute ones, so the validator's CRPS picks it (the 24 h level term).
    closed_scale = 1.0
    closed_scores: dict[str, float] = {}
    if kind in SESSION_KINDS:
        closed_scores = {f"{c:g}": val_crps(final, latent, c) for c in (opts.closed_grid or ())}
        if closed_scores:
            key = min(closed_scores, key=closed_scores.__getitem__)
            if closed_scores[key] < best_crps:
                closed_scale, best_crps = float(key), closed_scores[key]
            console.print(f"closed-session std x{closed_scale:g} (validation CRPS {best_crps:.2f})")

    seconds = time.perf_counter() - began
    metrics = {"best_epochs": [e for _, e, _, _ in fitted],
               # (NLL, CRPS) epochs of each kept member, with its seed offset: what ``refit`` replays
               "phase_epochs": [[i, *fitted[i][3]] for i in kept_members],
               "member_val_crps": [c for _, _, c, _ in fitted], "members": len(members),
               "val_crps": best_crps, "val_crps_ewma": ewma_crps,
               "val_ratio_vs_ewma": best_crps / ewma_crps, "val_prompts": int(val_rows.size),
               "train_windows": len(train_w), "val_windows": len(val_w), "train_seconds": seconds,
               "seed": opts.seed, "epochs_run": sum(1 for h in history if h["epoch"] > 0), "history": history,
               "latent_search": latent_scores, "closed_scale_search": closed_scores,
               "nll_epochs": opts.epochs, "crps_epochs": opts.crps_epochs, "crps_lr_factor": opts.crps_lr_factor,
               "crps_members": opts.crps_members, "crps_weight": opts.crps_weight, "num_params": final.get_num_params(),
               "head_params": final.head_params(),
               "stride_s": opts.stride_s or DEFAULT_STRIDE_S[kind], "lr": opts.lr, "batch_size": opts.batch_size,
               "batches_per_epoch": opts.batches_per_epoch, "weight_decay": opts.weight_decay,
               "asset_dropout": opts.asset_dropout}
    states = [{k: v.cpu() for k, v in m.state_dict().items()} for m in members]
    checkpoint = Checkpoint(kind=kind, config=cfg, state_dict=states[0], members=states[1:],
                            norm=norm, ewma=spec.ewma, latent=latent, closed_scale=closed_scale,
                            stale_slack_s=spec.stale_slack_s, data_window=_data_window(files, windows, train_w, val_w), metrics=metrics)
    return TrainResult(checkpoint, history, seconds)


# The recipe a refit replays from the selected checkpoint's metrics (older checkpoints lack some).
REPLAYED = ("seed", "nll_epochs", "crps_epochs", "lr", "batch_size", "batches_per_epoch", "stride_s",
            "weight_decay", "asset_dropout", "crps_lr_factor", "crps_members", "crps_weight")


def refit(kind: str, files: Mapping[str, FileSlice], selected: Checkpoint, opts: TrainOptions,
          console: Console | None = None) -> TrainResult:
    """Retrain ``selected``'s members on every window, validation included, for the epochs it kept.

    Everything was chosen on validation (epochs per phase and member, ensemble, latent volatility,
    closed-session std); this replays that recipe on all the history before the held-out cut, so the
    served model has also seen the most recent regime and data sources. Nothing is scored or picked
    here. The schedule (epochs, learning rate, batches...) comes from ``selected``'s metrics, so the
    replayed epochs see the same learning rates as the selected ones did.
    """
    began = time.perf_counter()
    console = console or Console(quiet=True)
    if selected.kind != kind:
        raise TrainingError(f"refit of a {selected.kind} checkpoint asked for model {kind}")
    m = selected.metrics
    missing = [k for k in ("phase_epochs", *REPLAYED) if k not in m]
    if missing:
        raise TrainingError(f"the {kind} checkpoint lacks {missing}: retrain it with this version before a refit")
    weight = m["crps_weight"]
    if weight not in get_args(CrpsWeight):
        raise TrainingError(f"the {kind} checkpoint's crps_weight {weight!r} is not one of {get_args(CrpsWeight)}")
    opts = replace(opts, seed=int(m["seed"]), epochs=int(m["nll_epochs"]), crps_epochs=int(m["crps_epochs"]), lr=float(m["lr"]),
                   batch_size=int(m["batch_size"]), stride_s=int(m["stride_s"]),
                   batches_per_epoch=None if m["batches_per_epoch"] is None else int(m["batches_per_epoch"]),
                   weight_decay=float(m["weight_decay"]), asset_dropout=float(m["asset_dropout"]),
                   crps_lr_factor=float(m["crps_lr_factor"]), crps_members=int(m["crps_members"]),
                   crps_weight=weight)
    device = resolve_device(opts.device)
    rng = np.random.default_rng(opts.seed)
    spec = selected.spec
    windows = build_windows(kind, files, int(opts.stride_s or DEFAULT_STRIDE_S[kind]), opts.val_frac, spec)
    if opts.max_train_windows is not None and len(windows) > opts.max_train_windows:
        windows = windows.subset(np.sort(rng.choice(len(windows), opts.max_train_windows, replace=False)))
    if len(windows) < 2:
        raise TrainingError(f"{kind}: {len(windows)} windows; need more data")
    console.print(f"[bold]{kind}[/] refit: {len(windows)} windows (training and validation)")
    norm = NormStats.fit(windows.scalars)
    cfg = selected.config
    half_life = REFIT_HALF_LIFE_DAYS[kind] if opts.refit_half_life_days == "auto" else opts.refit_half_life_days
    if half_life is not None:
        console.print(f"windows drawn with a {half_life:g}-day recency half-life")
    runner = _EpochRunner(windows, norm, cfg, device, rng, opts, console, half_life)
    nll, crps = _phase_losses(spec, opts, sample_scale(spec.ewma))

    def replay(model: PatchTST, name: str, loss_fn: LossFn, scheduled: int, lr: float, stop: int) -> None:
        done = 0

        def after(mean_loss: float) -> bool:
            nonlocal done
            done += 1
            console.print(f"{name} epoch {done}/{stop}: train {mean_loss:.4f}")
            return done < stop

        if stop > 0:
            runner.run(model, name, loss_fn, scheduled, lr, after)

    members: list[PatchTST] = []
    for seed_offset, n_nll, n_crps in m["phase_epochs"]:
        torch.manual_seed(opts.seed + int(seed_offset))
        model = PatchTST(cfg).to(device)
        replay(model, f"{kind} member {seed_offset} nll", nll, opts.epochs, opts.lr, int(n_nll))
        replay(model, f"{kind} member {seed_offset} crps", crps, opts.crps_epochs, opts.lr * opts.crps_lr_factor,
               int(n_crps))
        members.append(model.eval())

    seconds = time.perf_counter() - began
    final: LawModel = PatchTSTEnsemble(members) if len(members) > 1 else members[0]
    metrics = {**{k: v for k, v in m.items() if k != "history"}, "refit": True, "train_windows": len(windows),
               "refit_half_life_days": half_life,
               "train_seconds": seconds, "selection_train_seconds": m.get("train_seconds"),
               "num_params": final.get_num_params(), "head_params": final.head_params()}
    states = [{k: v.cpu() for k, v in mm.state_dict().items()} for mm in members]
    data_window: dict[str, Any] = {}
    for i, asset in enumerate(MODEL_ASSETS[kind]):
        origins = windows.origin[windows.asset == i]
        if asset in files and origins.size:
            data_window[asset] = {"file": files[asset].stem, "eval_start_ts": files[asset].eval_start_ts,
                                  "train_origins": [int(origins.min()), int(origins.max())],
                                  "train_windows": int(origins.size), "selected_on": selected_on(selected, asset)}
    checkpoint = Checkpoint(kind=kind, config=cfg, state_dict=states[0], members=states[1:], norm=norm,
                            ewma=selected.ewma, latent=selected.latent, closed_scale=selected.closed_scale,
                            stale_slack_s=selected.stale_slack_s, data_window=data_window, metrics=metrics)
    return TrainResult(checkpoint, [], seconds)


def selected_on(selected: Checkpoint, asset: str) -> Any:
    """The windows the recipe was chosen on: a refit of a refit points at the original selection."""
    entry = selected.data_window.get(asset)
    if selected.metrics.get("refit") and isinstance(entry, dict):
        return entry.get("selected_on")
    return entry


def fit(kind: str, files: Mapping[str, FileSlice], opts: TrainOptions, refit_after: bool | None = None,
        console: Console | None = None) -> Checkpoint:
    """What ``synth-miner train`` and the retraining job ship: selection, then (``REFIT_DEFAULT``
    unless ``refit_after`` says otherwise) the refit on every window."""
    selected = train(kind, files, opts, console).checkpoint
    if REFIT_DEFAULT[kind] if refit_after is None else refit_after:
        return refit(kind, files, selected, opts, console).checkpoint
    return selected

"""The weekly retraining job: every model retrained on the durable history store, gated, published.

The store accumulates what the providers no longer keep (Hyperliquid holds ~3.5 days), so it is
the training source in production. Each model is trained exactly as `synth-miner train` does
(validation split in time, early stopping on the validator's CRPS, epoch 0 = the EWMA-t base as a
candidate; the 24 h models then replay the chosen recipe on every window, validation included).

The gate: training stops ``retrain_gate_days`` before now, and the newest prompts of that held-back
tail (the model's assets and grid, realised prices known) are scored for the retrained model and for
the model that serves now (the current artifact's, else the committed one), same prompts and seeds,
as the validator scores them. A retrained model that does not lose (``retrain_tolerance``) is staged
as an artifact (the current calibration and other models inherited) and published; workers load it
between tasks. A losing one stays in ``artifacts/staging/`` with the verdict in the report, and the
plain checkpoints of every run are kept in ``artifacts/staging/models-<stamp>-<random>/`` for inspection (a week:
``core.artifact_retention.prune_staging``).
"""

import logging
import math
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.artifact_files import ArtifactError, DataWindow, new_version
from core.artifacts import ArtifactStore
from core.calibration import CALIBRATION_FILE, CalibrationState, Case, CasePlan, recent_cases
from core.champion import challenge_models
from core.checkpoint import Checkpoint, save
from core.constants import GATE_FEED_STOPPED_S
from core.datasets import MODEL_ASSETS, DatasetError, histories_from_cache
from core.evaluation import GRIDS, AssetHistory, iso
from core.features import FEATURE_SPECS
from core.history_store import HistoryStore, HistoryStoreError
from core.prices import PriceHistory
from core.settings import Settings
from core.store_sources import changes, owners
from core.training import (
    CLOSED_SCALE_CANDIDATES,
    DEFAULT_CRPS_EPOCHS,
    LATENT_CANDIDATES,
    TrainingError,
    TrainOptions,
    fit,
)

log = logging.getLogger(__name__)


class ResampledStore:
    """The store read at any step: 1-minute bars resampled as an exchange would, and native bars where they
    are stored (they win on equal times). Both, not either: after `data import` of 5-minute files the live
    refresh keeps adding 1-minute bars only, and reading the native ones alone left the 24 h models training
    on the imported past without the live weeks after it (and gated on lookbacks that stopped there)."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store

    def read(self, asset: str, step: int, start: int, end: int) -> PriceHistory:
        return self._merged(asset, step, start, end)[0]

    def read_sourced(self, asset: str, step: int, start: int, end: int) -> tuple[PriceHistory, tuple[int, ...]]:
        """``read``, and the bar times in it where the source changes: each bar is owned by the stretch that
        wrote it, a resampled bar by that of its window's last minute (its close). So a native import's own
        gap, filled by 1-minute bars of another feed, is two joins, and a fill from the same feed is none."""
        if step == 60:
            return self.store.read_sourced(asset, 60, start, end)
        merged, native, minute = self._merged(asset, step, start, end)
        owner = np.full(len(merged), "", dtype=object)
        resampled = np.setdiff1d(merged.ts, native.ts, assume_unique=True)  # native bars win on equal times
        closes = minute.ts[np.searchsorted(minute.ts, resampled + step, side="left") - 1]
        owner[np.searchsorted(merged.ts, resampled)] = owners(self.store.stretches(asset, 60), closes)
        owner[np.searchsorted(merged.ts, native.ts)] = owners(self.store.stretches(asset, step), native.ts)
        return merged, changes(merged.ts, owner)

    def _merged(self, asset: str, step: int, start: int, end: int) -> tuple[PriceHistory, PriceHistory, PriceHistory]:
        """What ``read`` returns, with the native bars and the 1-minute bars it was made of."""
        native = self.store.read(asset, step, start, end)
        if step == 60:
            return native, native, native
        minute = self.store.read(asset, 60, start, end)
        resampled = minute.resample(step, complete=False)
        return (resampled.merge(native) if len(native) else resampled), native, minute


def gate_s(settings: Settings) -> int:
    """The held-back tail: training ends this long before now, and the gate's prompts start after it."""
    return int(settings.retrain_gate_days * 86_400)


def gate_plan(settings: Settings, time_increment: int) -> CasePlan:
    """The newest prompts of the held-back tail: each starts after the training data ends."""
    base = CasePlan.for_prompt(settings, time_increment)
    room = gate_s(settings) - GRIDS[time_increment] - 60
    return CasePlan(count=room // base.spacing_s, spacing_s=base.spacing_s, lookback_s=base.lookback_s,
                    n_paths=settings.retrain_gate_paths, seed=base.seed, session_reach=1)


def gate_cases(settings: Settings, store: HistoryStore, kind: str, now: int) -> list[Case]:
    """Every asset of ``kind`` with history: its gate prompts, as the live cache would have shown them."""
    step = FEATURE_SPECS[kind].step
    plan = gate_plan(settings, step)
    begin = now - gate_s(settings) - plan.lookback_s
    cases: list[Case] = []
    for asset in MODEL_ASSETS[kind]:
        history = AssetHistory(store.read(asset, 60, begin, now) or None, store.read(asset, 300, begin, now) or None)
        if history.m1 is not None or history.m5 is not None:
            cases += recent_cases(asset, history, step, now, plan)
    return cases


def newest_close(store: HistoryStore, asset: str, now: int) -> int | None:
    """When the asset's newest stored bar closed by ``now`` closed (None: it has none): its feed's last word."""
    newest: int | None = None
    for step in (60, 300):
        for day in reversed([d for d in store.days(asset, step) if d * 86_400 < now]):
            bars = store.read_day(asset, step, day).between(day * 86_400, now - step + 1)
            if bars.last_ts is not None:
                newest = max(newest or 0, int(bars.last_ts) + step)
                break
    return newest


@dataclass(frozen=True)
class GateCoverage:
    """How well the gate's prompts cover the model's assets."""

    prompts: dict[str, int]  # per asset of the model
    need: int  # prompts each asset needs (Settings.retrain_gate_min_prompts)
    stopped: dict[str, int | None]  # short assets whose feed stopped -> when their newest bar closed
    short: tuple[str, ...]  # short assets whose feed runs: they block the model

    def not_gated(self) -> dict[str, str]:
        return {asset: "feed stopped: no bar in the store" if at is None else
                f"feed stopped since {iso(at)}, {self.prompts[asset]} gate prompts" for asset, at in self.stopped.items()}


def gate_coverage(settings: Settings, store: HistoryStore, kind: str, cases: list[Case], now: int) -> GateCoverage:
    """Which of the model's assets have the prompts a verdict needs. A short one whose feed stopped is left
    out (the others decide): it has no fresh price to serve either, and refusing every model until its feed
    comes back would stop the retraining of all the others. A short one whose feed runs blocks the model."""
    counts = Counter(c.prompt.asset for c in cases)
    need = settings.retrain_gate_min_prompts
    prompts = {asset: counts[asset] for asset in MODEL_ASSETS[kind]}
    stopped: dict[str, int | None] = {}
    short: list[str] = []
    for asset, n in prompts.items():
        if n >= need:
            continue
        newest = newest_close(store, asset, now)
        if newest is None or newest <= now - GATE_FEED_STOPPED_S:
            stopped[asset] = newest
        else:
            short.append(asset)
    return GateCoverage(prompts, need, stopped, tuple(short))


def short_reason(settings: Settings, kind: str, coverage: GateCoverage) -> str:
    """Why too few prompts decide nothing, and what gives more: a longer gate, or a feed without gaps."""
    step = FEATURE_SPECS[kind].step
    plan = gate_plan(settings, step)
    counts = ", ".join(f"{a} {coverage.prompts[a]}" for a in coverage.short)
    said = (f"not gated: too few gate prompts ({counts}; {coverage.need} needed per asset, "
            "SYNTH_RETRAIN_GATE_MIN_PROMPTS)")
    if plan.count < coverage.need:
        days = (GRIDS[step] + 60 + coverage.need * plan.spacing_s) / 86_400
        return (f"{said}: a {settings.retrain_gate_days:g}-day gate holds at most {plan.count} per asset for "
                f"{kind}; SYNTH_RETRAIN_GATE_DAYS >= {math.ceil(days * 100) / 100:g} gives {coverage.need}")
    return f"{said}: gaps or market closures in the held-back tail; the served model stays"


def run_gate(settings: Settings, artifacts: ArtifactStore, history: HistoryStore, kind: str, checkpoint_file: Path,
             trained: DataWindow, now: int) -> dict[str, Any]:
    """Stage ``kind``'s retrained checkpoint over the current set, score it against the served model."""
    try:
        cases = gate_cases(settings, history, kind, now)
        coverage = gate_coverage(settings, history, kind, cases, now)
    except HistoryStoreError as exc:  # a corrupt partition: no verdict, nothing published, the job goes on
        log.error("retrained %s not gated: %s", kind, exc)
        return {"cases": 0, "published": None, "reason": f"gate failed: history store unreadable: {exc}"}
    not_gated = coverage.not_gated()
    cases = [c for c in cases if c.prompt.asset not in coverage.stopped]
    said = {"prompts": coverage.prompts, "not_gated": not_gated}
    if coverage.short:
        return {"cases": len(cases), **said, "published": None, "reason": short_reason(settings, kind, coverage)}
    if not cases:
        return {"cases": 0, **said, "published": None, "reason": "no scorable prompt in the held-back tail"}
    if not_gated:
        log.warning("retrained %s: %s", kind, "; ".join(f"{a} not gated: {why}" for a, why in not_gated.items()))
    files = {checkpoint_file.name: checkpoint_file.read_bytes()}
    staging: Path | None = None
    try:
        # The set the staged one is built on (it inherits its other files): only over it may it be published.
        parent = artifacts.current_version()
        if parent is None:
            files[CALIBRATION_FILE] = CalibrationState().to_json()  # every artifact needs one
        staging = artifacts.stage(files, data_window=trained, inherit=True, version=f"{new_version()}-{kind}",
                                  notes={"kind": "models", "models": kind, "gate_cases": str(len(cases))})
        decision = challenge_models(artifacts, staging, cases, settings, settings.retrain_tolerance,
                                    settings.calibration_rules, publish=False)
    except ArtifactError as exc:  # an unservable checkpoint or an unreadable current set: say so, serve on
        log.error("retrained %s not gated: %s", kind, exc)
        return {"cases": len(cases), "staged": None if staging is None else str(staging), "published": None,
                "reason": f"gate failed: {exc}"}
    verdict = {**asdict(decision), **said, "staged": str(staging), "published": None}
    if not_gated:  # said in the reason too: status shows a verdict's reason, not its fields
        verdict["reason"] = f"{decision.reason}; not gated: " + ", ".join(
            f"{a} ({why})" for a, why in not_gated.items())
    if not decision.promote:
        return verdict
    if not settings.retrain_publish:
        return {**verdict, "reason": f"{verdict['reason']}; not published (SYNTH_RETRAIN_PUBLISH=false)"}
    try:
        # Not the champion's version: one published between staging and the comparison (the hourly
        # calibration) is a set this one was not built on, and publishing over it would revert it.
        return {**verdict, "staged": None, "published": artifacts.publish(staging, expect_current=parent)}
    except ArtifactError as exc:  # e.g. calibration published meanwhile: next week's run decides again
        log.warning("retrained %s passed the gate but was not published: %s", kind, exc)
        return {**verdict, "reason": f"passed the gate, not published: {exc}"}


def untrained_assets(kind: str, checkpoint: Checkpoint) -> list[str]:
    """The model's own assets that no training window showed it (``Checkpoint.data_window`` per asset)."""
    return [asset for asset in MODEL_ASSETS[kind]
            if not (checkpoint.data_window.get(asset) or {}).get("train_windows")]


def run_retrain_job(settings: Settings, now: int | None = None, options: TrainOptions | None = None) -> dict[str, Any]:
    now = int(time.time()) if now is None else now
    now -= now % 60
    cut = now - gate_s(settings)  # the gate's tail: never trained on
    start = cut - int(settings.retrain_days * 86_400)
    history = HistoryStore.from_settings(settings)
    reader = ResampledStore(history)
    artifacts = ArtifactStore.from_settings(settings)
    # A random tail: `synth-miner retrain` and the beat's run in the same minute must not save over each other.
    stamp = f"{time.strftime('%Y%m%dT%H%M', time.gmtime(now))}-{secrets.token_hex(3)}"
    out_dir: Path = artifacts.staging_dir / f"models-{stamp}"
    report: dict[str, Any] = {"staged": str(out_dir), "trained_to": cut, "models": {}}
    for kind, spec in FEATURE_SPECS.items():
        try:
            files = histories_from_cache(reader, MODEL_ASSETS[kind], spec.step, start, cut)
        except HistoryStoreError as exc:  # one corrupt partition must not stop the other models
            log.error("%s not retrained: %s", kind, exc)
            report["models"][kind] = f"skipped: history store unreadable: {exc}"
            continue
        if not files:
            # Not "no history in the store": a young store's whole history may lie in the held-back tail, and
            # a store of imported 5-minute files holds none the 1 h model can use.
            bars = "1-minute bars" if spec.step == 60 else "bars"
            report["models"][kind] = (f"skipped: no {bars} in the store before {iso(cut)}, "
                                      f"{settings.retrain_gate_days:g} days before now (the gate's held-back tail)")
            continue
        try:
            crps_epochs = settings.retrain_crps_epochs
            opts = options or TrainOptions(
                seed=now // 86_400, crps_epochs=DEFAULT_CRPS_EPOCHS[kind] if crps_epochs is None else crps_epochs,
                members=settings.retrain_members, latent_grid=LATENT_CANDIDATES, closed_grid=CLOSED_SCALE_CANDIDATES)
            checkpoint = fit(kind, files, opts)
        except (TrainingError, DatasetError) as exc:  # too little or unusable history: say so, go on
            report["models"][kind] = f"skipped: {exc}"
            continue
        try:
            save(checkpoint, out_dir / f"{kind}.pt")
        except OSError as exc:  # a full disk: this model's hours are lost, but say which and try the next one
            log.error("retrained %s not saved: %s", kind, exc)
            report["models"][kind] = f"skipped: checkpoint not saved in {out_dir}: {exc}"
            continue
        m = checkpoint.metrics
        best = {"val_crps": m["val_crps"], "val_ratio_vs_ewma": m["val_ratio_vs_ewma"], "members": m["members"],
                "refit": bool(m.get("refit", False)), "refit_half_life_days": m.get("refit_half_life_days")}
        seconds = float(m["train_seconds"]) + float(m.get("selection_train_seconds") or 0.0)
        unseen = untrained_assets(kind, checkpoint)
        if unseen:
            # The gate scores only the assets the store holds, but the model serves all of its own: one
            # trained on BTC alone replaced the committed model for ETH, SOL and XAU too (their embedding
            # rows never trained, never scored).
            gate: dict[str, Any] = {
                "cases": 0, "published": None,
                "reason": f"not gated: no training window of {', '.join(unseen)} before the gate, which it would "
                          "serve untrained; the served model stays (`synth-miner data import` or `data sync`)"}
        else:
            gate = run_gate(settings, artifacts, history, kind, out_dir / f"{kind}.pt", DataWindow(start, cut), now)
        report["models"][kind] = {"seconds": round(seconds, 1), "best": best, "gate": gate}
        log.info("retrained %s in %.0f s: %s; gate: %s", kind, seconds, best,
                 f"published {gate['published']}" if gate["published"] else gate["reason"])
    return report

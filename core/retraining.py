"""The weekly retraining job: every model retrained on the durable history store, staged for review.

The store accumulates what the providers no longer keep (Hyperliquid holds ~3.5 days), so it is
the training source in production. Each model is trained exactly as `synth-miner train` does
(validation split in time, early stopping on the validator's CRPS, epoch 0 = the EWMA-t base as a
candidate, so a checkpoint is never worse than EWMA-t on its own validation prompts; the 24 h models
then replay the chosen recipe on every window, validation included) and saved to
``artifacts/staging/models-<stamp>/``. Serving them is an operator's decision: point
``SYNTH_MODELS_DIR`` at that folder (workers reload on the next artifact publication or restart).
"""

import logging
import time
from pathlib import Path
from typing import Any

from core.checkpoint import save
from core.datasets import MODEL_ASSETS, DatasetError, histories_from_cache
from core.features import FEATURE_SPECS
from core.history_store import HistoryStore
from core.prices import PriceHistory
from core.settings import Settings
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
    """The store read at any step: native bars when stored, else complete windows of 1-minute bars."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store

    def read(self, asset: str, step: int, start: int, end: int) -> PriceHistory:
        native = self.store.read(asset, step, start, end)
        if len(native) or step == 60:
            return native
        return self.store.read(asset, 60, start, end).resample(step)


def run_retrain_job(settings: Settings, now: int | None = None, options: TrainOptions | None = None) -> dict[str, Any]:
    now = int(time.time()) if now is None else now
    start = now - int(settings.retrain_days * 86_400)
    reader = ResampledStore(HistoryStore.from_settings(settings))
    out_dir: Path = settings.artifacts_dir / "staging" / f"models-{time.strftime('%Y%m%dT%H%M', time.gmtime(now))}"
    report: dict[str, Any] = {"staged": str(out_dir), "models": {}}
    for kind, spec in FEATURE_SPECS.items():
        files = histories_from_cache(reader, MODEL_ASSETS[kind], spec.step, start, now)
        if not files:
            report["models"][kind] = "skipped: no history in the store"
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
        save(checkpoint, out_dir / f"{kind}.pt")
        m = checkpoint.metrics
        best = {"val_crps": m["val_crps"], "val_ratio_vs_ewma": m["val_ratio_vs_ewma"], "members": m["members"],
                "refit": bool(m.get("refit", False)), "refit_half_life_days": m.get("refit_half_life_days")}
        seconds = float(m["train_seconds"]) + float(m.get("selection_train_seconds") or 0.0)
        report["models"][kind] = {"seconds": round(seconds, 1), "best": best}
        log.info("retrained %s in %.0f s: %s", kind, seconds, best)
    return report

"""The weekly retraining job trains from the durable history store and stages loadable checkpoints."""

import json
from pathlib import Path

from core.checkpoint import load
from core.csv_history import read_csv
from core.history_store import HistoryStore
from core.retraining import ResampledStore, run_retrain_job
from core.settings import Settings
from core.training import REFIT_DEFAULT, REFIT_HALF_LIFE_DAYS, TrainOptions

TINY = {"d_model": 16, "n_heads": 2, "n_layers": 1, "d_ff": 32, "head_hidden": 16}


def test_retrain_from_store_stages_checkpoints(tmp_path: Path, shared_data: Path) -> None:
    manifest = json.loads((shared_data / "manifest.json").read_text())
    store = HistoryStore(tmp_path / "data" / "history")
    cut = manifest["btc_1m"]["eval_start_ts"]  # gap-free Binance spot before it
    # Only pre-held-out rows enter the store, 1-minute bars only (as live providers deliver).
    store.append("BTC", read_csv(shared_data / "btc_1m.csv.gz", 60).between(cut - 12 * 86_400, cut))
    assert len(ResampledStore(store).read("BTC", 300, cut - 86_400, cut)) == 288  # 5-minute bars from 1-minute
    settings = Settings(data_dir=tmp_path / "data", artifacts_dir=tmp_path / "artifacts", retrain_days=12)
    options = TrainOptions(epochs=1, batch_size=32, batches_per_epoch=4, val_prompts=4, n_paths=100,
                           stride_s=3600, arch=dict(TINY), val_frac=0.3)
    report = run_retrain_job(settings, now=cut, options=options)
    staged = Path(report["staged"])
    assert report["models"]["lf_equity"].startswith("skipped")  # no equity history in this store
    for kind in ("hf", "lf_crypto"):
        assert isinstance(report["models"][kind], dict), report["models"][kind]
        checkpoint, _ = load(staged / f"{kind}.pt", expected_kind=kind)
        # The 24 h model replays its recipe on every window after selection; the 1 h model does not.
        assert report["models"][kind]["best"]["refit"] == REFIT_DEFAULT[kind] == bool(checkpoint.metrics.get("refit"))
        if REFIT_DEFAULT[kind]:  # and leans on recent windows as the model's default says
            half_life = REFIT_HALF_LIFE_DAYS[kind]
            assert report["models"][kind]["best"]["refit_half_life_days"] == half_life == checkpoint.metrics[
                "refit_half_life_days"]

"""``synth-miner train``: fit one PatchTST model and write its checkpoint; ``synth-miner retrain``: the
weekly retraining job (history store, gate, publish) run now.

Mount with ``cli_model.register(app)``; ``train`` and ``retrain`` are also plain functions.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from core.features import FEATURE_SPECS
from synth_miner.cli_checks import non_negative, positive, writable_folder

console = Console()
DEFAULT_DATA = Path("../shared/data")


def _parse_day(text: str, option: str = "--cut") -> int:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"not an ISO date or time: {text!r}", param_hint=option) from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def history_root(path: Path) -> Path:
    """The history store root for ``--store``: the data dir (store at DATA_DIR/history, as every other
    command and SYNTH_DATA_DIR take it) or, when nothing else could be meant, the history root itself."""
    from core.assets import ASSETS

    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist", param_hint="--store")
    if not path.is_dir():
        raise typer.BadParameter(f"{path} is not a folder", param_hint="--store")
    nested = path / "history"
    asset_dirs = sorted(a for a in ASSETS if (path / a).is_dir())
    if nested.is_dir() and asset_dirs:
        raise typer.BadParameter(f"{path} holds both a history/ folder and asset folders ({', '.join(asset_dirs)}): "
                                 f"pass the data dir or the history root alone", param_hint="--store")
    if nested.is_dir():
        return nested
    if asset_dirs:
        return path
    raise typer.BadParameter(f"no history store at {path}: expected the data dir (with history/ inside, as "
                             "SYNTH_DATA_DIR) or the history root (asset folders such as BTC/)", param_hint="--store")


def train(
    model: Annotated[str, typer.Option("--model", help="hf | lf_crypto | lf_equity")],
    data_dir: Annotated[Path, typer.Option("--data-dir", help="CSV folder with manifest.json (held-out cut)",
                                           file_okay=False)] = DEFAULT_DATA,
    store: Annotated[Path | None, typer.Option("--store", help="train from the history store of this data dir "
                                                                "(DATA_DIR/history; the history root itself works "
                                                                "too) instead of --data-dir (needs --cut)")] = None,
    cut: Annotated[str | None, typer.Option("--cut", help="with --store: nothing at or after this UTC time "
                                                           "is used")] = None,
    days: Annotated[float, typer.Option("--days", help="with --store: days of history before --cut",
                                        callback=positive)] = 180.0,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="NLL epochs (at most; early stopping)")] = 6,
    crps_epochs: Annotated[int | None, typer.Option("--crps-epochs", min=0,
                                                    help="sample-CRPS fine-tune epochs after the NLL phase "
                                                         "(default: 10 for hf, 6 for the 24 h models)")] = None,
    latent_search: Annotated[bool, typer.Option("--latent-search/--no-latent-search",
                                                help="pick the sampler's per-path volatility on validation")]
    = True,
    closed_search: Annotated[bool, typer.Option("--closed-search/--no-closed-search",
                                                help="lf_equity: pick the closed-session std multiplier on "
                                                     "validation")] = True,
    members: Annotated[int, typer.Option("--members", min=1, help="ensemble size: members from seeds seed, "
                                                                   "seed+1, ... whose laws are averaged")] = 3,
    refit_after: Annotated[bool | None, typer.Option(
        "--refit/--no-refit", help="after selection, retrain the chosen recipe on every window, validation "
                                   "included (default: on for the 24 h models)")] = None,
    refit_from: Annotated[Path | None, typer.Option(
        "--refit-from", help="skip selection: replay this checkpoint's recipe (epochs, learning rates, batches, seeds) on every "
                         "window; the other training options are ignored", dir_okay=False)]
    = None,
    refit_half_life: Annotated[float | None, typer.Option(
        "--refit-half-life", callback=non_negative,
        help="days: the refit draws windows with weights halving every this many days before each asset's newest "
             "(default: 180 for lf_crypto, 90 for lf_equity, none for hf; 0 = every window alike)")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    device: Annotated[str, typer.Option(
        "--device", help="cpu (reproduces the committed checkpoints) | cuda | auto")] = "cpu",
    out: Annotated[Path, typer.Option("--out", help="folder for <model>.pt")] = Path("models"),
    force: Annotated[bool, typer.Option(
        "--force", help="replace an existing <model>.pt in --out (models/ holds the committed, served ones)")]
    = False,
    stride_min: Annotated[int | None, typer.Option("--stride-min", min=1, help="minutes between training origins")]
    = None,
    batches_per_epoch: Annotated[int, typer.Option("--batches-per-epoch", min=1)] = 120,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 256,
    lr: Annotated[float, typer.Option("--lr", callback=positive)] = 2e-3,
    val_prompts: Annotated[int, typer.Option("--val-prompts", min=1,
                                             help="validation prompts scored with the validator CRPS per epoch")]
    = 160,
    paths: Annotated[int, typer.Option("--paths", min=2, help="paths per validation prompt")] = 1000,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads (default: torch's)")] = None,
    max_train_windows: Annotated[int | None, typer.Option("--max-train-windows", hidden=True)] = None,
) -> None:
    """Train one model (time-ordered split, early stopping on validation CRPS) and write its checkpoint."""
    import torch

    from core.checkpoint import CheckpointError, checkpoint_path, load, save
    from core.datasets import MODEL_ASSETS, DatasetError, histories_from_cache, load_csv_dir
    from core.features import FeatureError
    from core.history_store import HistoryStore, HistoryStoreError
    from core.training import (
        CLOSED_SCALE_CANDIDATES,
        DEFAULT_CRPS_EPOCHS,
        LATENT_CANDIDATES,
        TrainingError,
        TrainOptions,
        fit,
        refit,
    )

    if model not in FEATURE_SPECS:
        raise typer.BadParameter(f"use one of {', '.join(FEATURE_SPECS)}", param_hint="--model")
    if threads:
        torch.set_num_threads(threads)
    spec = FEATURE_SPECS[model]
    target = checkpoint_path(out, model)
    if target.exists() and not force:  # before any training: the default --out is the served models' folder
        raise typer.BadParameter(f"{target} exists: pass --out DIR for a new checkpoint, or --force to replace it",
                                 param_hint="--out")
    writable_folder(out, "--out")
    try:
        if store is not None:
            from core.retraining import ResampledStore

            if cut is None:
                raise typer.BadParameter("training from the store needs --cut (the held-out start)",
                                         param_hint="--cut")
            limit = _parse_day(cut)
            root = history_root(store)
            # As the retraining job reads it: native bars, else 5-minute bars made from the 1-minute ones.
            files = histories_from_cache(ResampledStore(HistoryStore(root)), MODEL_ASSETS[model], spec.step,
                                         limit - int(days * 86_400), limit)
            if not files:
                raise DatasetError(f"the store at {root} has no {spec.step}s history for "
                                   f"{', '.join(MODEL_ASSETS[model])} in the {days:g} days before {cut}")
        else:
            if not data_dir.is_dir():
                raise typer.BadParameter(f"{data_dir} is not a folder", param_hint="--data-dir")
            files = load_csv_dir(data_dir, model)
        opts = TrainOptions(epochs=epochs, seed=seed, device=device, batch_size=batch_size, lr=lr,
                            stride_s=stride_min * 60 if stride_min else None, val_prompts=val_prompts,
                            n_paths=paths, batches_per_epoch=batches_per_epoch, max_train_windows=max_train_windows,
                            crps_epochs=DEFAULT_CRPS_EPOCHS[model] if crps_epochs is None else crps_epochs,
                            latent_grid=LATENT_CANDIDATES if latent_search else None,
                            closed_grid=CLOSED_SCALE_CANDIDATES if closed_search else None, members=members,
                            refit_half_life_days="auto" if refit_half_life is None else (refit_half_life or None))
        began = time.perf_counter()
        if refit_from is not None:
            selected, _ = load(refit_from, expected_kind=model)
            result_checkpoint = refit(model, files, selected, opts, console).checkpoint
        else:
            result_checkpoint = fit(model, files, opts, refit_after, console)
    except (DatasetError, TrainingError, FeatureError, CheckpointError, HistoryStoreError) as exc:
        console.print(f"[red]training failed:[/] {exc}")
        raise typer.Exit(1) from None
    path = target
    save(result_checkpoint, path)
    m = result_checkpoint.metrics
    table = Table(title=f"{model}: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    for column in ("members", "best epochs", "val CRPS", "EWMA-t", "ratio", "refit windows", "params", "s"):
        table.add_column(column, justify="right")
    table.add_row(str(m["members"]), ",".join(str(e) for e in m["best_epochs"]), f"{m['val_crps']:.1f}",
                  f"{m['val_crps_ewma']:.1f}", f"{m['val_ratio_vs_ewma']:.4f}",
                  str(m["train_windows"]) if m.get("refit") else "-", str(m["num_params"]),
                  f"{time.perf_counter() - began:.0f}")
    console.print(table)


def retrain(
    days: Annotated[float | None, typer.Option("--days", min=1.0, help="days of store history to train on "
                                                                      "(SYNTH_RETRAIN_DAYS, default all of it)")] = None,
    gate_days: Annotated[float | None, typer.Option(
        "--gate-days", help="newest days held back: the retrained model must not lose their prompts to the "
                            "served one (SYNTH_RETRAIN_GATE_DAYS, more than 1.05)")] = None,
    publish: Annotated[bool | None, typer.Option(
        "--publish/--no-publish", help="publish a model that passes the gate (SYNTH_RETRAIN_PUBLISH); "
                                       "--no-publish stages it with the verdict")] = None,
    members: Annotated[int | None, typer.Option("--members", min=1, help="seeds per model")] = None,
    at: Annotated[str | None, typer.Option("--at", help="run as if it were this UTC time (default: now)")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="torch CPU threads (default: torch's)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the job's report as JSON")] = False,
) -> None:
    """Run the weekly retraining job now: train every model on the history store (SYNTH_DATA_DIR), score
    it against the served model on the held-back newest prompts, publish the ones that do not lose."""
    import json

    from core.logs import setup_logging
    from core.retraining import run_retrain_job
    from synth_miner.cli_settings import load_settings

    now = None if at is None else _parse_day(at, "--at")  # a usage error before anything is set up
    overrides: dict[str, Any] = {"retrain_days": days, "retrain_gate_days": gate_days,
                                 "retrain_publish": publish, "retrain_members": members}
    settings = load_settings(**overrides)  # a bad value, SYNTH_* list variables included: one usage line
    setup_logging(settings.log_level, settings.log_json)  # the job reports each model as it finishes
    if threads:
        import torch

        torch.set_num_threads(threads)
    report = run_retrain_job(settings, now=now)
    trained = {k: v for k, v in report["models"].items() if isinstance(v, dict)}
    if as_json:
        console.print_json(json.dumps(report, default=str))
    else:
        table = Table(title=f"retrained on the store before {datetime.fromtimestamp(report['trained_to'], UTC):%Y-%m-%d %H:%M} UTC")
        for column in ("model", "train s", "val ratio", "gate prompts", "retrained CRPS", "served CRPS", "verdict"):
            table.add_column(column, justify="left" if column in ("model", "verdict") else "right")
        for kind, entry in report["models"].items():
            if not isinstance(entry, dict):
                table.add_row(kind, "-", "-", "-", "-", "-", str(entry))
                continue
            gate = entry["gate"]
            staged = f" (staged in {gate['staged']})" if gate.get("staged") else ""
            verdict = (f"[green]published {gate['published']}[/]" if gate.get("published")
                       else f"[yellow]served model kept[/]: {gate['reason']}{staged}")
            crps = [f"{gate[k]:.2f}" if gate.get(k) is not None else "-" for k in ("challenger_crps", "champion_crps")]
            table.add_row(kind, f"{entry['seconds']:.0f}", f"{entry['best']['val_ratio_vs_ewma']:.4f}",
                          str(gate["cases"]), *crps, verdict)
        console.print(table)
    if not trained:
        console.print(f"[red]nothing retrained:[/] the history store under {settings.data_dir} has no usable "
                      "history before the gate (fill it with `synth-miner data sync` or `data import`)")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Mount the model commands on the main ``synth-miner`` app."""
    app.command("train")(train)
    app.command("retrain")(retrain)


app = typer.Typer(help="Train the PatchTST models.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Train the PatchTST models (a group, so ``train`` stays a named subcommand)."""


register(app)

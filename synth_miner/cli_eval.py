"""Evaluation commands: ``forecast-batch`` (the stable batch interface), ``backtest`` and ``tune-ewma``.

Mount with ``cli_eval.register(app)``; each command is also a plain function.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from core.batch import (
    BatchInputError,
    BatchRunner,
    PriceFolder,
    run_file,
    served_engines,
)
from core.constants import HF_INCREMENT, LF_INCREMENT
from core.evaluation import EvaluationError, Mode, iso, parse_day, plan_prompts
from core.forecast import no_calibration
from core.scoring import Rules
from synth_miner.cli_assets import checked_assets
from synth_miner.cli_checks import positive, writable_folder
from synth_miner.cli_settings import load_settings

DEFAULT_DATA = Path("../shared/data")
# The reference design: 24 h prompts on BTC/ETH/XAU/SPYX/NVDAX and 1 h prompts on BTC/ETH/XAU/SOL; with
# one 24 h prompt per day and one 1 h prompt per 16 h of each held-out window that is ~326 prompts.
DEFAULT_LF_ASSETS = "BTC,ETH,XAU,SPYX,NVDAX"
DEFAULT_HF_ASSETS = "BTC,ETH,XAU,SOL"
DEFAULT_LF_SPACING_H = 24.0
DEFAULT_HF_SPACING_H = 16.0

console = Console()


def _assets(text: str) -> list[str]:
    return [a.strip() for a in text.split(",") if a.strip()]


def _validator_assets(text: str, option: str) -> list[str]:
    """A comma list of assets validators ask for; any other name is refused, not scored under a name no
    validator uses (SPY's prices are asked for as SPYX and SP500)."""
    return checked_assets(_assets(text), option)


def _spacing(hours: float, name: str) -> int:
    if not math.isfinite(hours):
        raise typer.BadParameter(f"{hours} is not a number of hours", param_hint=name)
    seconds = round(hours * 3600 / 60) * 60
    if seconds < 60:
        raise typer.BadParameter(f"{name} must be at least one minute")
    return seconds


def forecast_batch(
    requests: Annotated[Path, typer.Option("--requests", help="JSONL file, one request per line",
                                           exists=True, dir_okay=False, readable=True)],
    prices_dir: Annotated[Path, typer.Option("--prices-dir", help="folder of <asset>_1m/_5m.csv.gz files",
                                             exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="JSONL file written: one response or error per request")],
    seed: Annotated[int, typer.Option("--seed", min=0, help="RNG seed: same seed + request + data = same paths")],
    engine: Annotated[str | None, typer.Option("--engine", help="engine name (default: the production engine)")]
    = None,
    calibrated: Annotated[bool, typer.Option("--calibration/--no-calibration",
                                             help="apply the published sigma calibration, as production does")]
    = True,
) -> None:
    """Forecast every request of a JSONL file from a price folder, with no look-ahead, deterministically."""
    settings = load_settings()  # per command, so tests can change the environment
    engines, scale = served_engines(settings, calibrated)  # models and calibration from one version
    name = engine or settings.engine
    if name not in engines:
        raise typer.BadParameter(f"unknown engine {name!r}; available: {', '.join(sorted(engines))}",
                                 param_hint="--engine")
    if not any(p.is_file() for res in ("1m", "5m") for p in prices_dir.glob(f"*_{res}.csv*")):
        # A mistyped folder answered every request with an error line, and the command exited 0.
        raise typer.BadParameter(f"{prices_dir} holds no <asset>_1m.csv(.gz) or <asset>_5m.csv(.gz) price file",
                                 param_hint="--prices-dir")
    if calibrated and scale is no_calibration:  # asked for, but nothing published loads: say so
        console.print(f"[yellow]no published calibration loads from {settings.artifacts_dir}: paths are "
                      "unscaled (as with --no-calibration)[/yellow]")
    runner = BatchRunner(PriceFolder(prices_dir), engines, name, seed, settings.offline_lookback_s(),
                         settings.max_num_simulations, scale)
    try:
        summary = run_file(runner, requests, out)
    except BatchInputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from None
    # Off a terminal (a pipe, a log) rich wraps at 80 columns and split the output path: printed whole.
    (console if console.is_terminal else Console(width=max(console.width, 400))).print(
        f"{summary.lines} requests: {summary.ok} answered, {summary.errors} errors, "
        f"{summary.fallbacks} served by the fallback engine; engine {name}, seed {seed}; "
        f"{summary.seconds:.1f} s -> {out}")


def backtest(
    out: Annotated[Path, typer.Option("--out", help="report folder, e.g. reports/<name>")] = Path("reports/backtest"),
    data_dir: Annotated[Path, typer.Option("--data-dir", help="price folder with manifest.json", exists=True,
                                           file_okay=False)] = DEFAULT_DATA,
    engines_opt: Annotated[str | None, typer.Option("--engines", help="comma list (default: gbm,ewma_t and "
                                                                         "the production engine)")] = None,
    mode: Annotated[str, typer.Option("--mode", help="heldout | walkforward (pre-eval_start only) | range")]
    = "heldout",
    start: Annotated[str | None, typer.Option("--start", help="first prompt start (ISO date), clamps windows")]
    = None,
    end: Annotated[str | None, typer.Option("--end", help="prompts start before this (ISO date)")] = None,
    days: Annotated[float, typer.Option("--days", help="walkforward: days before each file's eval_start_ts",
                                        callback=positive)] = 60.0,
    lf_assets: Annotated[str, typer.Option("--lf-assets", help="24 h prompt assets")] = DEFAULT_LF_ASSETS,
    hf_assets: Annotated[str, typer.Option("--hf-assets", help="1 h prompt assets")] = DEFAULT_HF_ASSETS,
    lf_spacing_h: Annotated[float, typer.Option("--lf-spacing-h", help="one 24 h prompt per this many hours")]
    = DEFAULT_LF_SPACING_H,
    hf_spacing_h: Annotated[float, typer.Option("--hf-spacing-h", help="one 1 h prompt per this many hours")]
    = DEFAULT_HF_SPACING_H,
    max_prompts: Annotated[int | None, typer.Option("--max-prompts", min=1, help="cap per asset × prompt type")]
    = None,
    paths: Annotated[int, typer.Option("--paths", help="paths per forecast (validators ask 1000)")] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="prompt placement and path RNG seed")] = 0,
    rules: Annotated[str, typer.Option("--rules", help="upstream | head scoring rules")] = "upstream",
    calibrated: Annotated[bool, typer.Option("--calibrated/--raw", help="apply the published sigma calibration")]
    = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="write the PNG figures")] = True,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0,
                                                help="bootstrap resamples for the ratio intervals (0: none)")]
    = 2000,
) -> None:
    """Score engines on validator-style prompts (held-out windows by default) and write table, JSON, PNGs."""
    from core.backtest import (
        BASELINES,
        prompts_on_trained_dates,
        prompts_seen_in_training,
        rich_table,
        run_backtest,
        summarise,
        write_report,
    )

    if rules not in ("upstream", "head"):
        raise typer.BadParameter("use upstream or head", param_hint="--rules")
    if mode not in ("heldout", "walkforward", "range"):
        raise typer.BadParameter("use heldout, walkforward or range", param_hint="--mode")
    if paths < 1:
        raise typer.BadParameter("must be >= 1", param_hint="--paths")
    groups = {LF_INCREMENT: _validator_assets(lf_assets, "--lf-assets"),
              HF_INCREMENT: _validator_assets(hf_assets, "--hf-assets")}
    settings = load_settings()  # per command, so tests can change the environment
    # Models and calibration from one load of `current`: resolving it twice (build_engines, then
    # calibration_lookup) pairs one version's models with the next version's scales if a publish lands between.
    available, scale = served_engines(settings, calibrated)
    names = _assets(engines_opt) if engines_opt else list(dict.fromkeys(["gbm", "ewma_t", settings.engine]))
    if not engines_opt:
        names = [n for n in names if n in available]
    missing = [n for n in names if n not in available]
    if missing:
        raise typer.BadParameter(f"unknown engine(s) {missing}; available: {', '.join(sorted(available))}",
                                 param_hint="--engines")
    try:
        plan = plan_prompts(data_dir, groups, mode_of(mode),
                            {LF_INCREMENT: _spacing(lf_spacing_h, "--lf-spacing-h"),
                             HF_INCREMENT: _spacing(hf_spacing_h, "--hf-spacing-h")},
                            seed, parse_day(start) if start else None, parse_day(end) if end else None, days,
                            max_prompts)
    except EvaluationError as exc:
        raise typer.BadParameter(str(exc)) from None
    for note in plan.skipped:
        console.print(f"[yellow]skipped[/] {note}")
    if not plan.prompts:
        console.print("[red]no prompts: nothing to score[/]")
        raise typer.Exit(1)
    # A model fitted past a held-out boundary (trained from a store that imported it, or on a --cut after it)
    # would be scored on its own training data without a word: said before the run and kept in the report.
    seen = prompts_seen_in_training({n: available[n] for n in names}, plan.prompts)
    for note in seen:
        console.print(f"[red]warning:[/] {note}" if mode == "heldout" else f"[dim]note: {note}[/]")
    dated, date_notes = prompts_on_trained_dates({n: available[n] for n in names}, plan.prompts)
    trained_dates = frozenset(dated)
    for note in date_notes:
        console.print(f"[dim]note: {note}; the UNSEEN rows leave them out[/]")
    rules_value: Rules = "upstream" if rules == "upstream" else "head"
    lookback_s = settings.offline_lookback_s()
    writable_folder(out, "--out")
    result = run_backtest(plan.prompts, PriceFolder.from_histories(plan.histories), available, names, seed, paths,
                          lookback_s, rules_value, scale,
                          console=console, max_num_simulations=max(paths, settings.max_num_simulations))
    config = {"mode": mode, "data_dir": str(data_dir), "engines": names, "rules": rules, "paths": paths,
              "seed": seed, "calibrated": calibrated,
              "lookback_days": {"24h": lookback_s[LF_INCREMENT] / 86_400, "1h": lookback_s[HF_INCREMENT] / 86_400},
              "spacing_h": {"24h": lf_spacing_h, "1h": hf_spacing_h}, "max_prompts": max_prompts,
              "seen_in_training": seen, "on_trained_dates": date_notes,
              "windows": [{"asset": w.asset, "prompt": "24h" if w.time_increment == LF_INCREMENT else "1h",
                           "start": iso(w.start), "end": iso(w.end)} for w in plan.windows]}
    baselines = [b for b in BASELINES if b in names]
    written = write_report(result, out, config, plots=plots, baselines=baselines, n_boot=bootstrap,
                           trained_dates=trained_dates)
    # Off a terminal (a log file, CI) rich would wrap the table at 80 columns: print it at full width.
    wide = console if console.is_terminal else Console(width=max(console.width, 160))
    wide.print(rich_table(summarise(result, baselines, bootstrap, seed, trained_dates), baselines,
                          title=f"{len(result.prompts)} prompts, {rules} rules, {paths} paths"))
    # Not "wall time": it is the scoring loop's, a fraction of the command's on small runs (loading, plots).
    console.print(f"scored in {result.wall_s:.1f} s; wrote {len(written)} files to {out}")


def mode_of(text: str) -> Mode:
    if text == "walkforward":
        return "walkforward"
    if text == "range":
        return "range"
    return "heldout"


def tune_ewma(
    out: Annotated[Path, typer.Option("--out", help="folder for tuning.json")] = Path("reports/tuning"),
    data_dir: Annotated[Path, typer.Option("--data-dir", exists=True, file_okay=False)] = DEFAULT_DATA,
    days: Annotated[float, typer.Option("--days", help="days of pre-held-out data per asset",
                                        callback=positive)] = 90.0,
    lf_assets: Annotated[str, typer.Option("--lf-assets")] = "BTC,ETH,SOL,XAU,SPYX,NVDAX",
    hf_assets: Annotated[str, typer.Option("--hf-assets")] = DEFAULT_HF_ASSETS,
    lf_spacing_h: Annotated[float, typer.Option("--lf-spacing-h")] = 24.0,
    hf_spacing_h: Annotated[float, typer.Option("--hf-spacing-h")] = 12.0,
    max_prompts: Annotated[int | None, typer.Option("--max-prompts", min=1, help="cap per asset × prompt type")]
    = None,
    paths: Annotated[int, typer.Option("--paths", min=1, help="paths per forecast while searching")] = 200,
    seed: Annotated[int, typer.Option("--seed", min=0)] = 0,
    rules: Annotated[str, typer.Option("--rules", help="upstream | head")] = "upstream",
    fit_share: Annotated[float, typer.Option("--fit-share", help="earlier share of each asset's prompts to fit")]
    = 0.7,
    params: Annotated[str, typer.Option("--params", help="comma list of globals to tune")] =
    "var_mult,half_life_bars,long_half_life_bars,reversion_bars,nu,latent_s",
    passes: Annotated[int, typer.Option("--passes", min=0, help="coordinate-search passes (coarse, then fine)")] = 2,
    final_paths: Annotated[int, typer.Option("--final-paths", min=0, help="paths for the final var_mult pick and the "
                                                                   "reported comparison (0 = --paths)")] = 1000,
) -> None:
    """Tune the EWMA-t globals per prompt type walk-forward on data before every file's eval_start_ts."""
    from core.engines.ewma import DEFAULT_CONFIGS
    from core.tuning import TuningError, config_literal, run_tuning

    if rules not in ("upstream", "head"):
        raise typer.BadParameter("use upstream or head", param_hint="--rules")
    groups = {LF_INCREMENT: _validator_assets(lf_assets, "--lf-assets"),
              HF_INCREMENT: _validator_assets(hf_assets, "--hf-assets")}
    settings = load_settings()  # per command, so tests can change the environment
    try:
        plan = plan_prompts(data_dir, groups, "walkforward",
                            {LF_INCREMENT: _spacing(lf_spacing_h, "--lf-spacing-h"),
                             HF_INCREMENT: _spacing(hf_spacing_h, "--hf-spacing-h")},
                            seed, days=days, max_per_window=max_prompts)
    except EvaluationError as exc:
        raise typer.BadParameter(str(exc)) from None
    for note in plan.skipped:
        console.print(f"[yellow]skipped[/] {note}")
    windows = [{"asset": w.asset, "time_increment": w.time_increment, "start": iso(w.start), "end": iso(w.end)}
               for w in plan.windows]
    writable_folder(out, "--out")
    began = time.perf_counter()
    rules_value: Rules = "upstream" if rules == "upstream" else "head"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"tuning on {len(plan.prompts)} prompts", total=None)
        try:
            report = run_tuning(plan.histories, plan.prompts, DEFAULT_CONFIGS,
                                settings.offline_lookback_s(), paths, seed, rules_value, fit_share,
                                _assets(params), passes, windows,
                                on_eval=lambda msg: bar.update(task, description=f"tuning: {msg}"),
                                final_paths=final_paths or None)
        except TuningError as exc:
            raise typer.BadParameter(str(exc)) from None
    doc = report.to_json()
    doc["cpu_wall_s"] = round(time.perf_counter() - began, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(doc, indent=2))
    for inc, res in report.results.items():
        fit, check = report.fit[inc], report.check[inc]
        console.print(f"[bold]{inc}s grid[/] ({report.prompts[inc][0]} fit / {report.prompts[inc][1]} check prompts, "
                      f"{res.evaluations} candidates)\n  {inc}: {config_literal(res.best)},")
        if res.note:  # e.g. the start kept: the search found nothing better at the final path count
            console.print(f"  [yellow]{res.note}[/]")
        for label, cmp in (("fit", fit), ("check", check)):
            if cmp is not None:
                console.print(f"  {label}: CRPS × start {cmp.mean_vs_start:.4f} (geo {cmp.geo_vs_start:.4f}), "
                              f"× gbm {cmp.mean_vs_gbm:.4f} (geo {cmp.geo_vs_gbm:.4f}) on {cmp.n} prompts")
    console.print(f"{doc['cpu_wall_s']} s; wrote {out / 'tuning.json'}")


def register(app: typer.Typer) -> None:
    """Mount the evaluation commands on the main ``synth-miner`` app."""
    app.command("forecast-batch")(forecast_batch)
    app.command("backtest")(backtest)
    app.command("tune-ewma")(tune_ewma)


app = typer.Typer(help="Batch forecasts, backtests and EWMA tuning.", no_args_is_help=True)
register(app)

__all__ = ["BatchInputError", "app", "backtest", "forecast_batch", "register", "tune_ewma"]

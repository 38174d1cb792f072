"""``synth-miner artifacts list|publish|rollback`` and ``synth-miner calibrate``.

Mount with ``register(app)`` (adds the ``artifacts`` group and the ``calibrate`` command).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from core.artifact_files import BUILT_ON_NOTE, ArtifactError, DataWindow
from core.artifacts import ArtifactStore
from core.assets import ASSETS
from core.calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    CalibrationOutcome,
    CalibrationState,
    Case,
    CasePlan,
    recent_cases,
    run_calibration,
    store_histories,
)
from core.champion import ChampionDecision, artifact_forecaster, challenge, challenge_set
from core.csv_history import find_file, load_asset
from core.engines_registry import engines_over, models_in
from core.evaluation import (
    GRIDS,
    AssetHistory,
    EvaluationError,
    data_end,
    eval_starts,
    iso,
    load_manifest,
    parse_day,
    training_history,
)
from core.prices import PriceDataError
from core.settings import Settings
from synth_miner.cli_assets import checked_assets
from synth_miner.cli_checks import non_negative, writable_folder
from synth_miner.cli_settings import load_settings

artifacts_app = typer.Typer(help="Versioned artifact sets (models, calibration): list, publish, roll back.",
                            no_args_is_help=True)
console = Console()
errors = Console(stderr=True)

PROMPT_INCREMENTS = {"high": 60, "low": 300}  # the validators' labels for 1 h and 24 h prompts

DirOption = Annotated[Path | None, typer.Option("--dir", help="artifacts root (SYNTH_ARTIFACTS_DIR)")]


def _fail(message: str) -> typer.Exit:
    errors.print(f"[red]error:[/] {message}")
    return typer.Exit(code=1)


class _Unlogged(logging.Filter):
    """Drops the log records this command prints itself (those starting with ``prefix``)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _store(artifacts_dir: Path | None, settings: Settings | None = None) -> ArtifactStore:
    settings = settings or load_settings()
    return ArtifactStore(artifacts_dir or settings.artifacts_dir, keep=settings.artifacts_keep)


# ------------------------------------------------------------------------------------------ history


def histories_for(data_dir: Path | None, assets: list[str] | None, all_rows: bool, settings: Settings,
                  end: int | None) -> dict[str, AssetHistory]:
    """A CSV folder when one is given, else the history store the hourly job calibrates on."""
    if assets:
        assets = checked_assets(assets, "--asset")
    if data_dir is not None:
        return load_histories(data_dir, assets, all_rows)
    now = int(time.time()) if end is None else end
    histories = store_histories(settings, now - now % 60, assets or None)
    if not histories:
        raise typer.BadParameter(f"the history store in {settings.data_dir} holds no prices"
                                 f"{' for ' + ', '.join(assets) if assets else ''} {stale_store_hint(settings, assets, now)}"
                                 "`synth-miner data import` or `data sync` fills it, or pass a CSV folder with --data-dir",
                                 param_hint="SYNTH_DATA_DIR")
    return histories


def stale_store_hint(settings: Settings, assets: list[str] | None, end: int) -> str:
    """Calibration reads only the days before ``end``: a store filled with older history (an import of
    ../shared/data) is not empty, and saying so points at --end instead of at a re-import."""
    from core.history_store import HistoryStore, HistoryStoreError

    days = max(CasePlan.for_prompt(settings, inc).span_s(inc) for inc in sorted(GRIDS)) / 86_400
    store = HistoryStore.from_settings(settings)
    try:
        newest = max((span[1] for a in (assets or store.assets()) for step in (60, 300)
                      if (span := store.span(a, step)) is not None), default=None)
    except (HistoryStoreError, OSError):  # a damaged store: the refusal itself still says what to do
        newest = None
    before = f"in the {days:.0f} days before {iso(end)}"
    if newest is None:
        return before + ": "
    return f"{before} (its newest bar is at {iso(newest)}: --end {iso(newest + 60)[:10]} calibrates on it); "


def load_histories(folder: Path, assets: list[str] | None, all_rows: bool) -> dict[str, AssetHistory]:
    """Histories from a CSV folder, each file cut at its manifest.json held-out boundary."""
    if not folder.is_dir():
        raise typer.BadParameter(f"{folder} is not a directory", param_hint="--data-dir")
    try:
        manifest = load_manifest(folder)
    except EvaluationError as exc:
        raise typer.BadParameter(str(exc), param_hint="--data-dir") from None
    if not manifest and not all_rows:
        raise typer.BadParameter(f"{folder} has no manifest.json, so no held-out split is known; pass --all-rows "
                                 "to use every row (only for data nobody evaluates on)", param_hint="--data-dir")
    names = assets or [a for a in ASSETS if find_file(folder, a, 60) or find_file(folder, a, 300)]
    out: dict[str, AssetHistory] = {}
    for asset in names:
        try:
            m1, m5 = load_asset(folder, asset)
        except PriceDataError as exc:
            raise typer.BadParameter(str(exc), param_hint="--data-dir") from None
        history = AssetHistory(m1, m5)
        if not all_rows:
            history = training_history(history, eval_starts(folder, asset, manifest))
        if history.m1 is None and history.m5 is None:
            errors.print(f"[yellow]{asset}: no usable (pre-held-out) rows in {folder}, skipped[/]")
            continue
        out[asset] = history
    if not out:
        raise typer.BadParameter(f"no price files for {names} in {folder}", param_hint="--data-dir")
    return out


def history_end(history: AssetHistory, until: int | None) -> int:
    ends = [e for e in (data_end(history, 60), data_end(history, 300)) if e is not None]
    end = max(ends)
    return min(end, until) if until is not None else end


def gate_cases(histories: dict[str, AssetHistory], increments: list[int], until: int | None,
               settings: Settings) -> list[Case]:
    cases: list[Case] = []
    for asset, history in histories.items():
        for inc in increments:
            cases += recent_cases(asset, history, inc, history_end(history, until), CasePlan.for_prompt(settings, inc))
    return cases


def _parse_end(end: str | None) -> int | None:
    if end is None:
        return None
    try:
        return parse_day(end)
    except EvaluationError as exc:
        raise typer.BadParameter(str(exc), param_hint="--end") from None


def _increments(prompts: list[str] | None) -> list[int]:
    chosen = prompts or list(PROMPT_INCREMENTS)
    unknown = sorted(set(chosen) - set(PROMPT_INCREMENTS))
    if unknown:
        raise typer.BadParameter(f"unknown prompt type(s) {unknown}; use high (1 h) or low (24 h)",
                                 param_hint="--prompt")
    return sorted({PROMPT_INCREMENTS[p] for p in chosen})


def print_decision(decision: ChampionDecision) -> None:
    def crps(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    verdict = "[green]promoted[/]" if decision.promote else "[red]rejected[/]"
    # The first publish has no champion: "vs champion - -" read as a value lost, not as nothing to defend.
    against = "" if decision.champion is None and decision.champion_crps is None else \
        f" vs champion {decision.champion or '-'} {crps(decision.champion_crps)}"
    console.print(f"challenger {decision.challenger} {verdict}: mean CRPS {crps(decision.challenger_crps)}{against} "
                  f"over {decision.cases} prompts (tolerance {decision.tolerance:g}); {decision.reason}")


# --------------------------------------------------------------------------------------- artifacts


@artifacts_app.command("list")
def list_cmd(artifacts_dir: DirOption = None) -> None:
    """Published versions, oldest first; the current one is starred (and said unusable if it does not load)."""
    store = _store(artifacts_dir)
    versions = store.list_versions()
    problem = store.current_problem()
    if not versions:
        console.print(f"no artifact published under {store.root}")
        if problem:
            console.print(f"[red]current is unusable:[/] {escape(problem)}: no artifact loads from it (the next "
                          "publish points it at a set that loads)")
        return
    table = Table("", Column("version", no_wrap=True), "created", "data window", "code", "notes")
    for v in versions:
        window = "-" if v.data_window is None else f"{iso(v.data_window.start)} .. {iso(v.data_window.end)}"
        notes = v.problem or ", ".join(f"{k}={val}" for k, val in sorted(v.notes.items()) if val)  # built_on=""
        table.add_row("*" if v.current else "", v.version, v.created or "?", window, v.code_version or "?", notes)
    # Off a terminal (a pipe, a log) rich assumes 80 columns and cuts versions and dates: print them whole.
    (console if console.is_terminal else Console(width=max(console.width, 160))).print(table)
    if problem:  # no row is starred: say why, and how to repair it, rather than leave the operator guessing
        console.print(f"[red]current is unusable:[/] {escape(problem)}: no artifact loads from it; `synth-miner "
                      f"artifacts rollback` (the newest readable version) or `--to VERSION` points it at a set that "
                      f"loads")


@artifacts_app.command("publish")
def publish_cmd(
    staging: Annotated[Path, typer.Argument(help="a staged version directory (with manifest.json)")],
    artifacts_dir: DirOption = None,
    gate: Annotated[bool, typer.Option("--gate", help="publish only if it does not lose the recent backtest")] = False,
    data_dir: Annotated[Path | None, typer.Option(help="price CSV folder for --gate (default: the history "
                                                        "store, as the hourly job)")] = None,
    asset: Annotated[list[str] | None, typer.Option(help="asset scored by --gate (repeatable)")] = None,
    end: Annotated[str | None, typer.Option(help="--gate prompts end before this ISO time")] = None,
    tolerance: Annotated[float | None, typer.Option(help="promote if CRPS <= champion x (1 + this)",
                                                    callback=non_negative)] = None,
    all_rows: Annotated[bool, typer.Option("--all-rows", help="ignore manifest.json's held-out split")] = False,
    force: Annotated[bool, typer.Option("--force", help="publish a set staged on another version than the "
                                        "current one (its inherited files replace the current ones)")] = False,
) -> None:
    """Validate a staged artifact and make it current (atomically); the current one stays on failure."""
    settings = load_settings()
    store = _store(artifacts_dir, settings)
    try:
        staged = store.validate(staging)
        built_on, current = staged.manifest.notes.get(BUILT_ON_NOTE), store.current_version() or ""
        if staged.version == current:  # e.g. versions/<current> passed again: not a staged-on mismatch
            console.print(f"{current} is already current: nothing to publish")
            return
        if (store.versions_dir / staged.version).exists():
            raise _fail(f"{staged.version} is already published (not current): `synth-miner artifacts rollback "
                        f"--to {staged.version}` makes it current again")
        if built_on is not None and built_on != current and not force:
            # E.g. `retrain --no-publish`, then an hourly calibration: publishing would bring its older one back.
            raise _fail(f"{staged.version} was staged on {built_on or 'no published set'}, but {current} is current "
                        f"now: publishing it would replace {current}'s other files (its calibration, its models) "
                        f"with those it copied from {built_on or 'nothing'}. Stage it again, or pass --force")
        if not gate:
            if force or built_on is None:
                version = store.publish(staging)
            else:  # only over the version checked above: one published meanwhile (the hourly job) is not reverted
                version = store.publish(staging, expect_current=current or None)
            console.print(f"published {version}")
            return
        histories = histories_for(data_dir, asset, all_rows, settings, _parse_end(end))
        cases = gate_cases(histories, sorted(PROMPT_INCREMENTS.values()), _parse_end(end), settings)
        # Each side as it would serve: its scales on the calibrated engine, its own models if it carries any.
        decision = challenge_set(store, staging, cases, settings,
                                 settings.champion_tolerance if tolerance is None else tolerance,
                                 settings.calibration_rules)
    except ArtifactError as exc:
        raise _fail(str(exc)) from None
    print_decision(decision)
    if not decision.promote:
        raise typer.Exit(code=1)


@artifacts_app.command("rollback")
def rollback_cmd(
    to: Annotated[str | None, typer.Option(help="version to make current (default: the previous one)")] = None,
    models: Annotated[bool, typer.Option("--models", help="back to the newest version serving other models than "
                                         "the current one (undoes a retrain that hourly calibrations built on)")] = False,
    artifacts_dir: DirOption = None,
) -> None:
    """Point current back at an earlier (validated) version."""
    store = _store(artifacts_dir)
    try:
        before = store.current_version()
    except ArtifactError:  # a link to garbage (the store logs it): rolling back is how it gets repaired
        before = "(unusable link)"
    # The store logs the switch as a warning, which logging's last-resort handler (no logging set up
    # here) prints to stderr too: the line below says it once.
    said = _Unlogged("rolled back artifacts ")
    logging.getLogger("core.artifacts").addFilter(said)
    try:
        after = store.rollback(to, models=models)
    except ArtifactError as exc:
        raise _fail(str(exc)) from None
    finally:
        logging.getLogger("core.artifacts").removeFilter(said)
    console.print(f"current: {before} -> {after}")


# --------------------------------------------------------------------------------------- calibrate


def print_outcomes(outcomes: list[CalibrationOutcome]) -> None:
    table = Table(Column("key", no_wrap=True), "old", "new", "target", "prompts", "CRPS target / old", "note")

    def fmt(value: float | None, digits: int = 4) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for o in outcomes:
        table.add_row(o.key, fmt(o.old), fmt(o.new), fmt(o.target), str(o.samples),
                      f"{fmt(o.mean_crps_target, 1)} / {fmt(o.mean_crps_old, 1)}",
                      f"moved ({o.seconds:.1f} s)" if o.moved else "kept")
    console.print(table)
    for o in outcomes:
        if not o.moved:
            console.print(f"{o.key} kept at {o.old:.4f}: {o.reason}", soft_wrap=True)


def calibrate_cmd(
    data_dir: Annotated[Path | None, typer.Option(help="price CSV folder (default: the history store in "
                                                        "SYNTH_DATA_DIR, as the hourly job)")] = None,
    asset: Annotated[list[str] | None, typer.Option(help="asset (repeatable; default: all with files)")] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="high (1 h) and/or low (24 h); default both")] = None,
    engine: Annotated[str | None, typer.Option(help="engine to calibrate (SYNTH_CALIBRATION_ENGINE)")] = None,
    end: Annotated[str | None, typer.Option(help="use prompts realised before this ISO time")] = None,
    runs: Annotated[int, typer.Option(min=1, help="update runs on the same prompts (each within limits)")] = 1,
    windows: Annotated[int | None, typer.Option(min=1, help="prompts per key and run")] = None,
    min_samples: Annotated[int | None, typer.Option(min=1, help="prompts needed to move a scale")] = None,
    paths: Annotated[int | None, typer.Option(min=10, help="paths per prompt in the search")] = None,
    artifacts_dir: DirOption = None,
    output: Annotated[Path | None, typer.Option(help="also write the new calibration.json here")] = None,
    publish: Annotated[bool, typer.Option("--publish/--dry-run",
                                          help="stage a new version and publish it through the gate")] = True,
    all_rows: Annotated[bool, typer.Option("--all-rows", help="ignore manifest.json's held-out split")] = False,
) -> None:
    """Choose sigma_scale per (engine, asset, prompt type) by the validator CRPS on recent prompts."""
    settings = load_settings(
        calibration_engine=engine, calibration_windows_hf=windows, calibration_windows_lf=windows,
        calibration_min_samples_hf=min_samples, calibration_min_samples_lf=min_samples, calibration_paths=paths)
    store = _store(artifacts_dir, settings)
    increments = _increments(prompt)
    if output is not None:
        if output.is_dir():
            raise typer.BadParameter(f"{output} is a folder: give a file name", param_hint="--output")
        writable_folder(output.parent, "--output")
    until = _parse_end(end)
    histories = histories_for(data_dir, asset, all_rows, settings, until)
    try:
        current = store.load_current_or_none()
    except ArtifactError as exc:
        raise _fail(f"the current artifact does not load: {exc}") from None
    state = current.calibration.copy() if current is not None else CalibrationState()
    engines = engines_over(settings, None if current is None else models_in(current.path))  # that set's models
    if settings.calibration_engine not in engines:
        raise typer.BadParameter(f"unknown engine {settings.calibration_engine!r}; available: {sorted(engines)}",
                                 param_hint="--engine")
    outcomes: list[CalibrationOutcome] = []
    cases: list[Case] = []
    now = int(time.time())
    try:
        for asset_name, history in histories.items():
            asset_end = history_end(history, until)
            for run in range(runs):
                result = run_calibration(state, engines, settings.calibration_engine, {asset_name: history}, increments,
                                         asset_end, settings, now)
                outcomes += result.outcomes
                if run == runs - 1:
                    cases += result.all_cases()
    except CalibrationError as exc:
        raise _fail(str(exc)) from None
    print_outcomes(outcomes)
    state.meta = {"calibrated_at": now, "engine": settings.calibration_engine, "runs": runs}
    if output is not None:
        state.save(output)
        console.print(f"wrote {output}")
    moved = any(o.moved and o.new != o.old for o in outcomes)
    if not publish or not moved:
        console.print("nothing published" + ("" if moved else ": no scale moved"))
        return
    starts = [c.prompt.start_ts for c in cases]
    try:
        # Over the set the scales were computed from, or not at all (another job may have published since).
        staging = store.stage({CALIBRATION_FILE: state.to_json()}, inherit=True, notes={"kind": "calibration"},
                              expect_current=None if current is None else current.version,
                              data_window=DataWindow(min(starts), max(history_end(h, until)
                                                                       for h in histories.values())))
        decision = challenge(store, staging, cases, artifact_forecaster(engines, settings, settings.calibration_engine),
                             settings.champion_tolerance, settings.calibration_rules)
    except ArtifactError as exc:
        raise _fail(str(exc)) from None
    print_decision(decision)


def register(app: typer.Typer) -> None:
    """Mount ``artifacts`` (list, publish, rollback) and ``calibrate`` on the main CLI."""
    app.add_typer(artifacts_app, name="artifacts")
    app.command("calibrate")(calibrate_cmd)

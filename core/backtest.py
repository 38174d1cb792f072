"""Backtests: engines run through the batch interface on validator-style prompts, scored, tabulated.

Every engine sees the same prompts, the same data and the same seed (the batch interface keys each
request's RNG on the request), so per-prompt scores are paired and ratios between engines are
estimated with a paired bootstrap that resamples whole UTC days of prompt starts (every asset's prompts
of a day together: neighbouring prompts share most of their realised path). Scores use the wire-rounded
paths, which is what a validator receives.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from core.batch import BatchItem, BatchRunner, PriceFolder
from core.constants import SECONDS_PER_DAY
from core.engines.base import Engine
from core.evaluation import EvalPrompt, FloatArray, Lookback, grid_times, iso, realised_prices
from core.forecast import ScaleLookup, no_calibration
from core.plots import FAN_LEVELS, coverage, fan_chart, interval_chart, pit_chart
from core.prices import IntArray
from core.scoring import Rules, score_prompt

if TYPE_CHECKING:  # torch comes with it: only engines that carry checkpoints load it
    from core.checkpoint import Checkpoint

BASELINES = ("gbm", "ewma_t")
PIT_HORIZONS = {"5min": 300, "1h": 3600}  # returns whose calibration the PIT charts show
ALL = "ALL"
UNSEEN = "UNSEEN"  # pooled over the prompts on dates no serving model trained or selected on, for any asset


@dataclass(frozen=True)
class EngineScore:
    total: float  # validator CRPS; -1.0 when invalid
    valid: bool
    per_interval: dict[str, float]
    engine_used: str | None  # differs from the engine asked for when the forecaster fell back
    fallback_reason: str | None
    error: str | None  # the batch interface's error line, when there was no response at all
    seconds: float


@dataclass(frozen=True)
class PromptResult:
    prompt: EvalPrompt
    source_step: int | None  # file the realised prices came from (60 or 300)
    observed: int  # grid points with a realised price
    scores: dict[str, EngineScore]


@dataclass(frozen=True)
class FanData:
    prompt: EvalPrompt
    times: IntArray
    realised: FloatArray
    bands: dict[str, FloatArray]  # engine -> [len(FAN_LEVELS), n_points]


@dataclass
class BacktestResult:
    engines: list[str]
    rules: str
    seed: int
    num_simulations: int
    prompts: list[PromptResult] = field(default_factory=list)
    pit: dict[tuple[str, str, str], list[FloatArray]] = field(default_factory=dict)  # (prompt, engine, horizon)
    fans: dict[tuple[str, str], FanData] = field(default_factory=dict)  # (asset, prompt label)
    wall_s: float = 0.0

    def pit_values(self, label: str, engine: str, horizon: str) -> FloatArray:
        parts = self.pit.get((label, engine, horizon), [])
        return np.concatenate(parts) if parts else np.empty(0)


def pit_values(paths: FloatArray, realised: FloatArray, steps: int) -> FloatArray:
    """PIT of the realised change over consecutive, non-overlapping ``steps``-step blocks from t0.

    Mid-rank for ties; blocks with an unobserved end are skipped.
    """
    idx = np.arange(0, paths.shape[1], steps)
    if idx.size < 2:
        return np.empty(0)
    sim = np.diff(np.log(paths[:, idx]), axis=1)
    with np.errstate(invalid="ignore"):
        real = np.diff(np.log(realised[idx]))
    ok = np.isfinite(real)
    if not ok.any():
        return np.empty(0)
    sim, real = sim[:, ok], real[ok]
    less = (sim < real).sum(axis=0)
    equal = (sim == real).sum(axis=0)
    return np.asarray((less + 0.5 * equal) / sim.shape[0], dtype=np.float64)


def _fan_picks(prompts: Sequence[EvalPrompt]) -> set[str]:
    """The middle prompt of each (asset, grid): the one drawn as a fan chart."""
    groups: dict[tuple[str, str], list[EvalPrompt]] = defaultdict(list)
    for p in prompts:
        groups[(p.asset, p.label)].append(p)
    return {g[len(g) // 2].id for g in groups.values()}


@runtime_checkable
class TrainedEngine(Protocol):
    """An engine serving trained checkpoints (PatchTST), each saying what data it was fitted on."""

    @property
    def kinds(self) -> list[str]: ...

    def checkpoint(self, kind: str) -> Checkpoint: ...


def _seen_spans(entry: Any) -> list[tuple[int, int]]:
    """The (oldest, newest) forecast origins of each part of one asset's data window: training, validation,
    and the selection run's."""
    if not isinstance(entry, Mapping):
        return []
    spans = [entry.get("train_origins"), entry.get("val_origins")]
    if isinstance(selected := entry.get("selected_on"), Mapping):
        spans += [selected.get("train_origins"), selected.get("val_origins")]
    return [(int(span[0]), int(span[1])) for span in spans if isinstance(span, (list, tuple)) and len(span) == 2]


def _seen_until(entry: Any) -> int | None:
    """The newest forecast origin of one asset's data window."""
    return max((last for _, last in _seen_spans(entry)), default=None)


def _served_checkpoints(engines: Mapping[str, Engine]) -> Iterator[tuple[str, str, Checkpoint]]:
    """(engine name, model kind, checkpoint) for every model a trained engine serves."""
    for name, engine in engines.items():
        if isinstance(engine, TrainedEngine):
            for kind in engine.kinds:
                yield name, kind, engine.checkpoint(kind)


def prompts_seen_in_training(engines: Mapping[str, Engine], prompts: Sequence[EvalPrompt]) -> list[str]:
    """One line per (engine, model, asset) whose checkpoint trained or selected on a horizon reaching into
    these prompts: a held-out table over them flatters the model. The data README's split is per file, so
    only the asset's own rows count (other assets' dates may overlap by design)."""
    notes = []
    for name, kind, checkpoint in _served_checkpoints(engines):
        spec = checkpoint.spec
        for asset, entry in sorted(checkpoint.data_window.items()):
            last = _seen_until(entry)
            if last is None:
                continue
            until = last + spec.horizon * spec.step  # the realised prices of its newest window
            mine = [p for p in prompts if p.asset == asset and p.time_increment == spec.step]
            early = [p for p in mine if p.start_ts < until]
            if early:
                notes.append(f"{name} {kind}: fitted on {asset} up to {iso(until)}; {len(early)} of the "
                             f"{len(mine)} {asset} {early[0].label} prompts start before that")
    return notes


def prompts_on_trained_dates(engines: Mapping[str, Engine], prompts: Sequence[EvalPrompt]) -> tuple[set[str], list[str]]:
    """The prompts whose realised prices fall on dates the model serving them trained or selected on, for
    any of its assets, and a line per (engine, model) that has some.

    The data README splits each file at its own boundary, so one asset's held-out days can lie inside
    another asset's training days: a model fitted on BTC through May has seen the market of ETH's
    February held-out window. Nothing of ETH leaks, but a shared market regime might flatter the ETH
    rows; the prompts outside every such window give a table that cannot be flattered that way."""
    from core.engines.patchtst import route  # only with a trained engine, which has loaded torch already

    dated: set[str] = set()
    notes = []
    for name, kind, checkpoint in _served_checkpoints(engines):
        spec = checkpoint.spec
        reach = spec.horizon * spec.step  # a window's realised prices run that far past its origin
        spans = [(asset, first, last + reach) for asset, entry in checkpoint.data_window.items()
                 for first, last in _seen_spans(entry)]
        mine = [p for p in prompts if route(p.request(1)) == kind]
        hit: dict[str, set[str]] = defaultdict(set)  # prompt id -> the assets whose dates it falls on
        for p in mine:
            for asset, first, end in spans:
                if p.start_ts < end and p.start_ts + p.time_length > first:
                    hit[p.id].add(asset)
        if hit:
            dated |= set(hit)
            on = sorted({a for assets in hit.values() for a in assets})
            which = sorted({p.asset for p in mine if p.id in hit})
            notes.append(f"{name} {kind}: {len(hit)} of its {len(mine)} prompts ({', '.join(which)}) fall on "
                         f"dates it was fitted on for {', '.join(on)}")
    return dated, notes


def run_backtest(prompts: Sequence[EvalPrompt], prices: PriceFolder, engines: Mapping[str, Engine],
                 names: Sequence[str], seed: int, num_simulations: int, lookback_s: Lookback,
                 rules: Rules = "upstream", scale: ScaleLookup = no_calibration, progress: bool = True,
                 console: Console | None = None, max_num_simulations: int = 10_000) -> BacktestResult:
    """Score every engine in ``names`` on every prompt; a bad prompt or engine never stops the run."""
    unknown = [n for n in names if n not in engines]
    if unknown:
        raise KeyError(f"unknown engine(s) {unknown}; available: {sorted(engines)}")
    runners = {n: BatchRunner(prices, engines, n, seed, lookback_s, max_num_simulations, scale) for n in names}
    result = BacktestResult(list(names), rules, seed, num_simulations)
    fan_ids = _fan_picks(prompts)
    began = time.perf_counter()
    bar = Progress(TextColumn("[bold]backtest[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not progress,
                   transient=False)
    with bar:
        task = bar.add_task("", total=len(prompts) * len(names))
        for prompt in prompts:
            realised, source = realised_prices(prices.history(prompt.asset), prompt.start_ts,
                                               prompt.time_increment, prompt.time_length)
            scores: dict[str, EngineScore] = {}
            bands: dict[str, FloatArray] = {}
            for name in names:
                bar.update(task, description=f"{prompt.asset} {prompt.label} {name}")
                item = BatchItem(prompt.id, prompt.request(num_simulations))
                outcome = runners[name].run_item(item)
                if outcome.rounded is None:
                    scores[name] = EngineScore(-1.0, False, {}, None, None, outcome.error, outcome.seconds)
                else:
                    s = score_prompt(outcome.rounded, realised, prompt.time_increment, prompt.time_length, rules)
                    scores[name] = EngineScore(s.total, s.valid, s.per_interval, outcome.engine_used,
                                               outcome.fallback_reason, None, outcome.seconds)
                    for horizon, seconds in PIT_HORIZONS.items():
                        if seconds % prompt.time_increment == 0 and seconds <= prompt.time_length:
                            pit = pit_values(outcome.rounded, realised, seconds // prompt.time_increment)
                            result.pit.setdefault((prompt.label, name, horizon), []).append(pit)
                    if prompt.id in fan_ids:
                        bands[name] = np.quantile(outcome.rounded, FAN_LEVELS, axis=0)
                bar.advance(task)
            if bands:
                result.fans[(prompt.asset, prompt.label)] = FanData(
                    prompt, grid_times(prompt.start_ts, prompt.time_increment, prompt.time_length), realised, bands)
            result.prompts.append(PromptResult(prompt, source, int(np.sum(np.isfinite(realised))), scores))
    result.wall_s = time.perf_counter() - began
    return result


# ------------------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class Ratio:
    value: float  # mean CRPS of the engine / mean CRPS of the baseline, over prompts both answered
    lo: float  # paired bootstrap 95 % interval
    hi: float
    n: int


@dataclass(frozen=True)
class SummaryRow:
    asset: str
    prompt: str
    engine: str
    n: int  # scored (valid) prompts
    invalid: int
    fallbacks: int
    mean: float
    median: float
    ratios: dict[str, Ratio | None]
    intervals: dict[str, float]  # mean CRPS per scoring interval


def paired_ratio(a: FloatArray, b: FloatArray, n_boot: int, rng: np.random.Generator,
                 blocks: IntArray | None = None) -> Ratio | None:
    """mean(a) / mean(b) with a percentile bootstrap over the pairs, resampled together and by whole
    ``blocks`` when given (a label per pair; each block's pairs are drawn as one). Single prompts made the
    interval too narrow: 24 h prompts 4 h apart share 20 h of realised path (on the held-out run, 0.0025
    wide by prompt against 0.0038 by day). With fewer than two blocks the pairs are resampled one by one."""
    if a.size == 0 or a.size != b.size or float(np.mean(b)) <= 0:
        return None
    value = float(np.mean(a) / np.mean(b))
    if a.size == 1 or n_boot <= 0:
        return Ratio(value, value, value, int(a.size))
    labels = np.arange(a.size) if blocks is None or np.unique(blocks).size < 2 else np.asarray(blocks)
    _, block = np.unique(labels, return_inverse=True)
    a_sum, b_sum = np.bincount(block, weights=a), np.bincount(block, weights=b)
    idx = rng.integers(0, a_sum.size, size=(n_boot, a_sum.size))
    boot = a_sum[idx].sum(axis=1) / b_sum[idx].sum(axis=1)  # equal pair counts: the ratio of the means
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Ratio(value, float(lo), float(hi), int(a.size))


def _row(asset: str, label: str, engine: str, results: Sequence[PromptResult], baselines: Sequence[str],
         n_boot: int, seed: int) -> SummaryRow:
    own = [r.scores[engine] for r in results]
    valid = np.array([s.total for s in own if s.valid], dtype=np.float64)
    ratios: dict[str, Ratio | None] = {}
    for base in baselines:
        if base == engine or not all(base in r.scores for r in results):
            ratios[base] = None  # itself, or a baseline that was not run
            continue
        both = [r for r in results if r.scores[engine].valid and r.scores[base].valid]
        arr = np.array([(r.scores[engine].total, r.scores[base].total) for r in both], dtype=np.float64).reshape(-1, 2)
        days = np.array([r.prompt.start_ts // SECONDS_PER_DAY for r in both], dtype=np.int64)
        # Its own stream per row and baseline: the interval does not move with the other engines or assets run.
        rng = np.random.default_rng([seed, zlib.crc32(f"{asset}|{label}|{engine}|{base}".encode())])
        ratios[base] = paired_ratio(arr[:, 0], arr[:, 1], n_boot, rng, days)
    sums: dict[str, list[float]] = defaultdict(list)
    for s in own:
        if s.valid:
            for k, v in s.per_interval.items():
                sums[k].append(v)
    return SummaryRow(asset, label, engine, int(valid.size), sum(not s.valid for s in own),
                      sum(s.fallback_reason is not None for s in own),
                      float(np.mean(valid)) if valid.size else math.nan,
                      float(np.median(valid)) if valid.size else math.nan,
                      ratios, {k: float(np.mean(v)) for k, v in sums.items()})


def summarise(result: BacktestResult, baselines: Sequence[str] = BASELINES, n_boot: int = 2000,
              seed: int = 0, trained_dates: frozenset[str] = frozenset()) -> list[SummaryRow]:
    """A row per asset × prompt × engine, then pooled rows (asset ALL) per prompt and overall; with
    ``trained_dates`` (prompt ids, see ``prompts_on_trained_dates``) also the pooled rows of the other
    prompts (asset UNSEEN), when some prompts are left on both sides."""
    groups: dict[tuple[str, str], list[PromptResult]] = defaultdict(list)
    for r in result.prompts:
        groups[(r.prompt.asset, r.prompt.label)].append(r)
    labels = sorted({label for _, label in groups}, key=lambda s: (len(s), s), reverse=True)
    rows: list[SummaryRow] = []
    for key in sorted(groups, key=lambda k: (labels.index(k[1]), k[0])):
        rows += [_row(key[0], key[1], e, groups[key], baselines, n_boot, seed) for e in result.engines]
    for label in labels:
        pooled = [r for r in result.prompts if r.prompt.label == label]
        rows += [_row(ALL, label, e, pooled, baselines, n_boot, seed) for e in result.engines]
    if len(labels) > 1:
        rows += [_row(ALL, ALL, e, result.prompts, baselines, n_boot, seed) for e in result.engines]
    unseen = [r for r in result.prompts if r.prompt.id not in trained_dates]
    if unseen and len(unseen) < len(result.prompts):
        unseen_labels = [label for label in labels if any(r.prompt.label == label for r in unseen)]
        for label in unseen_labels:
            pooled = [r for r in unseen if r.prompt.label == label]
            rows += [_row(UNSEEN, label, e, pooled, baselines, n_boot, seed) for e in result.engines]
        if len(unseen_labels) > 1:
            rows += [_row(UNSEEN, ALL, e, unseen, baselines, n_boot, seed) for e in result.engines]
    return rows


def _fmt_ratio(r: Ratio | None) -> str:
    if r is None:
        return "—"
    if r.lo == r.hi:  # not bootstrapped (--bootstrap 0, one prompt): "[x, x]" read as a certain ratio
        return f"{r.value:.3f}"
    return f"{r.value:.3f} [{r.lo:.3f}, {r.hi:.3f}]"


def rich_table(rows: Sequence[SummaryRow], baselines: Sequence[str] = BASELINES, title: str = "") -> Table:
    table = Table(title=title or None, show_lines=False)
    for col in ("asset", "prompt", "engine", "n", "invalid", "fallback", "mean CRPS", "median CRPS"):
        table.add_column(col, justify="left" if col in ("asset", "prompt", "engine") else "right")
    for base in baselines:
        table.add_column(f"× {base} [95% CI]", justify="right")
    previous = None
    for row in rows:
        if previous is not None and (row.asset, row.prompt) != previous:
            table.add_section()
        previous = (row.asset, row.prompt)
        table.add_row(row.asset, row.prompt, row.engine, str(row.n), str(row.invalid), str(row.fallbacks),
                      f"{row.mean:.1f}", f"{row.median:.1f}", *[_fmt_ratio(row.ratios.get(b)) for b in baselines])
    return table


def markdown_table(rows: Sequence[SummaryRow], baselines: Sequence[str] = BASELINES) -> str:
    head = ["asset", "prompt", "engine", "n", "invalid", "fallback", "mean CRPS", "median CRPS"]
    head += [f"× {b} [95% CI]" for b in baselines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.asset, row.prompt, row.engine, str(row.n), str(row.invalid), str(row.fallbacks),
                 f"{row.mean:.1f}", f"{row.median:.1f}"] + [_fmt_ratio(row.ratios.get(b)) for b in baselines]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_intervals(rows: Sequence[SummaryRow]) -> str:
    """Mean CRPS per scoring interval, one table per prompt type (interval sets differ)."""
    out: list[str] = []
    for label in dict.fromkeys(r.prompt for r in rows):
        subset = [r for r in rows if r.prompt == label and r.intervals]
        keys: list[str] = []
        for r in subset:
            keys += [k for k in r.intervals if k not in keys]
        if not keys:
            continue
        out.append(f"\n### {label} prompts: mean CRPS per interval\n")
        out.append("| asset | engine | " + " | ".join(keys) + " |")
        out.append("|" + "---|" * (len(keys) + 2))
        for r in subset:
            out.append(f"| {r.asset} | {r.engine} | " + " | ".join(f"{r.intervals.get(k, math.nan):.1f}"
                                                                    for k in keys) + " |")
    return "\n".join(out)


def coverage_table(result: BacktestResult) -> dict[str, dict[str, dict[str, Any]]]:
    """prompt label -> engine -> horizon -> {n, coverage per central level}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (label, engine, horizon) in result.pit:
        values = result.pit_values(label, engine, horizon)
        out.setdefault(label, {}).setdefault(engine, {})[horizon] = {"n": int(values.size), **coverage(values)}
    return out


# ------------------------------------------------------------------------------------------- report


def _clean(value: float) -> float | None:
    return None if not math.isfinite(value) else value


def scores_json(result: BacktestResult, rows: Sequence[SummaryRow], config: Mapping[str, Any],
                trained_dates: frozenset[str] = frozenset()) -> bytes:
    prompts = []
    for r in result.prompts:
        prompts.append({
            "id": r.prompt.id, "asset": r.prompt.asset, "prompt": r.prompt.label,
            "start_ts": r.prompt.start_ts, "start_time": iso(r.prompt.start_ts),
            "time_increment": r.prompt.time_increment, "time_length": r.prompt.time_length,
            "realised_source_step": r.source_step, "observed_points": r.observed,
            "on_trained_dates": r.prompt.id in trained_dates,
            "scores": {name: {"total": _clean(s.total), "valid": s.valid, "engine_used": s.engine_used,
                              "fallback_reason": s.fallback_reason, "error": s.error,
                              "seconds": round(s.seconds, 4),
                              "per_interval": {k: _clean(v) for k, v in s.per_interval.items()}}
                       for name, s in r.scores.items()},
        })
    summary = []
    for row in rows:
        d = asdict(row)
        d["mean"], d["median"] = _clean(row.mean), _clean(row.median)
        summary.append(d)
    doc = {"config": dict(config), "wall_s": round(result.wall_s, 2), "summary": summary,
           "coverage": coverage_table(result), "prompts": prompts}
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)


def write_report(result: BacktestResult, out_dir: Path, config: Mapping[str, Any], plots: bool = True,
                 baselines: Sequence[str] = BASELINES, n_boot: int = 2000,
                 trained_dates: frozenset[str] = frozenset()) -> dict[str, Path]:
    """table.md, scores.json and the PNGs under ``out_dir``; returns what was written, by name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarise(result, baselines, n_boot, result.seed, trained_dates)
    written: dict[str, Path] = {}
    md = [f"# Backtest ({result.rules} rules, {result.num_simulations} paths, seed {result.seed})\n",
          f"{len(result.prompts)} prompts, engines: {', '.join(result.engines)}; scored in {result.wall_s:.1f} s.\n",
          ("Ratios are mean CRPS / the baseline's mean CRPS over the prompts both answered validly, with a "
          "paired bootstrap 95 % interval over whole UTC days of prompt starts. Lower is better.\n")]
    if any(row.asset == UNSEEN for row in rows):
        md.append(f"{UNSEEN} rows pool the prompts whose realised prices fall on no date a served model was fitted "
                  "or selected on, for any of its assets (each file is split at its own boundary, so one "
                  "asset's held-out days can be another's training days).\n")
    md += [markdown_table(rows, baselines), markdown_intervals(rows)]
    written["table"] = out_dir / "table.md"
    written["table"].write_text("\n".join(md) + "\n")
    written["scores"] = out_dir / "scores.json"
    written["scores"].write_bytes(scores_json(result, rows, config, trained_dates))
    if plots and result.prompts:
        for (asset, label), fan in sorted(result.fans.items()):
            written[f"fan_{asset}_{label}"] = fan_chart(out_dir / f"fan_{asset}_{label}.png", fan.times,
                                                        fan.realised, fan.bands, f"{asset} {label} prompt {fan.prompt.id}")
        by_label: dict[str, dict[str, dict[str, dict[str, float]]]] = defaultdict(dict)
        for row in rows:
            if row.asset not in (ALL, UNSEEN) and row.intervals:
                by_label[row.prompt].setdefault(row.asset, {})[row.engine] = row.intervals
        for label, means in by_label.items():
            written[f"crps_intervals_{label}"] = interval_chart(out_dir / f"crps_intervals_{label}.png", means,
                                                                f"{label} prompts: mean CRPS per interval")
        for label in dict.fromkeys(r.prompt.label for r in result.prompts):
            pits = {e: {h: result.pit_values(label, e, h) for h in PIT_HORIZONS if (label, e, h) in result.pit}
                    for e in result.engines}
            pits = {e: v for e, v in pits.items() if v}
            if pits:
                written[f"pit_{label}"] = pit_chart(out_dir / f"pit_{label}.png", pits,
                                                    f"{label} prompts: PIT of realised returns")
    return written

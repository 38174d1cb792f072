"""Validator-style prompts, realised price vectors and no-look-ahead snapshots, built from history.

Shared by the backtest, the EWMA tuning, calibration and training validation, so every one of them
scores the same thing the same way.

Conventions (../shared/docs/synth-protocol.md §3, §4.2):

* Prompts start on whole minutes; the grid is ``start + k * time_increment`` for k = 0..n_steps
  (24 h at 5 minutes = 289 points, 1 h at 1 minute = 61 points).
* The realised price at grid time t is the close of the **1-minute bar opening at t** (the price at
  t + 60 s); a missing bar is NaN and the validator simply drops every change that touches it.
* Without 1-minute data the only exact equivalent is the close of the 5-minute bar opening at
  t - 240 s (it also ends at t + 60 s, so it is the same price). That bar exists only when
  t ≡ 240 (mod 300); every other grid time is left NaN rather than approximated by a nearby close,
  because a price taken at the wrong moment biases the CRPS of the changes it touches. 24 h prompts
  on 5-minute-only data are therefore placed on starts ≡ 240 (mod 300), where the whole grid is
  observable; 1 h prompts need 1-minute data (5-minute bars would leave 4 of 5 points missing).
* One prompt takes all its realised prices from one file (1-minute when that file has any row in
  the prompt's span, else 5-minute), so a source switch between files cannot put a level step
  inside a prompt.
* Like the validator, a prompt whose last grid price is missing is not scored; we also require the
  first one, so every scored prompt has an observed start (the gap terms and the fan chart need it).
* An engine sees only bars whose close was published at least ``LOOKAHEAD_GUARD_S`` before the
  start (``PriceHistory.known_at(start - 60)``), within a lookback window; the anchor is the newest
  such close.
* Held-out rows (``timestamp >= eval_start_ts`` in manifest.json) are never used for tuning: each
  file is cut at its own ``eval_start_ts`` (a file without one is all held out). A held-out prompt
  for an asset starts at or after the latest ``eval_start_ts`` of the files it may read.
"""

from __future__ import annotations

import itertools
import json
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from core.constants import HF_INCREMENT, HF_LENGTH, LF_INCREMENT, LF_LENGTH, LOOKAHEAD_GUARD_S, MINUTE
from core.csv_history import find_file, load_asset
from core.prices import IntArray, MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest

FloatArray = npt.NDArray[np.float64]

FIVE_MIN_LAG = 240  # the 5-minute bar opening at t - 240 s closes at t + 60 s, like the 1-minute bar at t
GRIDS: dict[int, int] = {LF_INCREMENT: LF_LENGTH, HF_INCREMENT: HF_LENGTH}  # time_increment -> time_length
PROMPT_LABELS: dict[int, str] = {LF_INCREMENT: "24h", HF_INCREMENT: "1h"}
Mode = Literal["heldout", "walkforward", "range"]


class EvaluationError(ValueError):
    """Prompts or realised prices cannot be built from the history given (clear message, typed)."""


# ------------------------------------------------------------------------------------------- history


@dataclass(frozen=True)
class AssetHistory:
    """An asset's 1-minute and 5-minute bars (either may be absent)."""

    m1: PriceHistory | None
    m5: PriceHistory | None

    def cut(self, limits: Mapping[int, int | None]) -> AssetHistory:
        """Keep only rows with ts < limit per step (None = drop the file): removes held-out rows."""

        def keep(h: PriceHistory | None) -> PriceHistory | None:
            if h is None or h.step not in limits:
                return h
            limit = limits[h.step]
            kept = h.between(-(2**62), limit) if limit is not None else PriceHistory.empty(h.step)
            return kept if len(kept) else None

        return AssetHistory(keep(self.m1), keep(self.m5))

    def rows_between(self, step: int, start: int, end: int) -> int:
        """How many rows of one file have start <= ts < end."""
        h = self.m1 if step == 60 else self.m5
        if h is None:
            return 0
        lo, hi = np.searchsorted(h.ts, [start, end], side="left")
        return int(hi - lo)


# Seconds of history before a start: one for every grid, or per time_increment (Settings.offline_lookback_s).
Lookback = int | Mapping[int, int]


def lookback_for(lookback: Lookback, time_increment: int) -> int:
    """The history a ``time_increment`` grid gets; a grid the mapping lacks gets its longest."""
    if isinstance(lookback, int):
        return lookback
    return lookback.get(time_increment, max(lookback.values()))


def snapshot_at(asset: str, history: AssetHistory, start_ts: int, lookback_s: int,
                guard_s: int = LOOKAHEAD_GUARD_S) -> MarketSnapshot:
    """What an engine may see for a prompt starting at ``start_ts``: closes known at start - guard."""
    cut = start_ts - guard_s

    def view(h: PriceHistory | None) -> PriceHistory | None:
        if h is None:
            return None
        known = h.known_at(cut)
        known = known.between(cut - lookback_s, cut)
        return known if len(known) else None

    m1, m5 = view(history.m1), view(history.m5)
    # The newest close wins; on a tie the 1-minute bar (same instant, finer source) is used.
    newest = [(h.last_close_time or 0, -h.step, float(h.close[-1])) for h in (m1, m5) if h is not None]
    if not newest:
        raise EvaluationError(f"no {asset} price closed in the {lookback_s / 86_400:g} days before "
                              f"{iso(cut)} (the prompt's start minus {guard_s} s)")
    anchor_time, _, anchor = max(newest)
    return MarketSnapshot(asset, m1, m5, anchor, anchor_time)


# ----------------------------------------------------------------------------------- realised prices


def grid_times(start_ts: int, time_increment: int, time_length: int) -> IntArray:
    if time_increment <= 0 or time_length <= 0 or time_length % time_increment:
        raise EvaluationError(f"bad grid {time_increment}s/{time_length}s")
    return start_ts + np.arange(time_length // time_increment + 1, dtype=np.int64) * time_increment


def realised_from(history: PriceHistory, start_ts: int, time_increment: int, time_length: int) -> FloatArray:
    """Realised prices on the prompt grid from one file; NaN where the exact bar is missing."""
    if start_ts % MINUTE:
        raise EvaluationError(f"prompt start {start_ts} is not a whole minute")
    grid = grid_times(start_ts, time_increment, time_length)
    if history.step == 60:
        keys = grid
    elif history.step == 300:
        keys = grid - FIVE_MIN_LAG
    else:
        raise EvaluationError(f"realised prices need 60 s or 300 s bars, got step {history.step}")
    out = np.full(grid.size, np.nan)
    if not len(history):
        return out
    idx = np.searchsorted(history.ts, keys)
    idx_ok = np.minimum(idx, len(history) - 1)
    found = (idx < len(history)) & (history.ts[idx_ok] == keys)
    out[found] = history.close[idx_ok[found]]
    return out


def realised_source(history: AssetHistory, start_ts: int, time_length: int) -> int | None:
    """Which file gives a prompt's realised prices: 60 when the 1-minute file covers any of it, else 300."""
    if history.rows_between(60, start_ts, start_ts + time_length + 1):
        return 60
    if history.rows_between(300, start_ts - FIVE_MIN_LAG, start_ts + time_length - FIVE_MIN_LAG + 1):
        return 300
    return None


def realised_prices(history: AssetHistory, start_ts: int, time_increment: int,
                    time_length: int) -> tuple[FloatArray, int | None]:
    """Realised grid prices (NaN = unobserved) and the step of the file they came from."""
    source = realised_source(history, start_ts, time_length)
    if source is None:
        return np.full(time_length // time_increment + 1, np.nan), None
    h = history.m1 if source == 60 else history.m5
    assert h is not None
    return realised_from(h, start_ts, time_increment, time_length), source


# -------------------------------------------------------------------------------------------- prompts


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


def parse_day(text: str) -> int:
    """'2026-02-17' or a full ISO time (UTC when naive) -> unix seconds."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise EvaluationError(f"not an ISO date or time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


@dataclass(frozen=True)
class EvalPrompt:
    asset: str
    start_ts: int
    time_increment: int
    time_length: int

    @property
    def label(self) -> str:
        return PROMPT_LABELS.get(self.time_increment, f"{self.time_increment}s")

    @property
    def id(self) -> str:
        return f"{self.asset}-{self.label}-{self.start_ts}"

    def request(self, num_simulations: int) -> ForecastRequest:
        return ForecastRequest(self.asset, self.start_ts, self.time_increment, self.time_length, num_simulations)

    def request_line(self, num_simulations: int) -> dict[str, object]:
        """The prompt as a line of the batch interface's request file."""
        return {"id": self.id, "asset": self.asset, "start_time": iso(self.start_ts),
                "time_increment": self.time_increment, "time_length": self.time_length,
                "num_simulations": num_simulations}


@dataclass(frozen=True)
class Window:
    """Prompts for (asset, grid) start in [start, end); their realised prices must lie in the data."""

    asset: str
    time_increment: int
    start: int
    end: int

    @property
    def time_length(self) -> int:
        return GRIDS[self.time_increment]


def _members(ts: IntArray, values: IntArray) -> npt.NDArray[np.bool_]:
    if not ts.size:
        return np.zeros(values.shape, bool)
    idx = np.minimum(np.searchsorted(ts, values), ts.size - 1)
    return np.asarray(ts[idx] == values)


def scorable_starts(history: AssetHistory, time_increment: int, time_length: int, lo: int, hi: int) -> IntArray:
    """Whole-minute starts in [lo, hi) whose first and last realised prices are observed (sorted)."""
    parts: list[IntArray] = []
    m1, m5 = history.m1, history.m5
    if m1 is not None and len(m1):
        s = m1.between(lo, hi).ts
        parts.append(s[_members(m1.ts, s + time_length)])
    if time_increment >= 300 and m5 is not None and len(m5):
        s = m5.between(lo - FIVE_MIN_LAG, hi - FIVE_MIN_LAG).ts + FIVE_MIN_LAG
        s = s[_members(m5.ts, s + time_length - FIVE_MIN_LAG)]
        if m1 is not None and len(m1) and s.size:
            # Only where the 1-minute file has nothing in the span (else it is the realised source).
            inside = np.searchsorted(m1.ts, s + time_length, side="right") - np.searchsorted(m1.ts, s)
            s = s[inside == 0]
        parts.append(s)
    if not parts:
        return np.empty(0, np.int64)
    return np.unique(np.concatenate(parts))


def pick_prompts(history: AssetHistory, window: Window, spacing_s: int, seed: int,
                 max_prompts: int | None = None) -> list[EvalPrompt]:
    """One prompt per ``spacing_s`` slot of the window, its start drawn uniformly among the slot's
    scorable starts (seeded per asset and grid), like the validators' one-request-per-bucket keepers."""
    if spacing_s < MINUTE or spacing_s % MINUTE:
        raise EvaluationError(f"prompt spacing must be a positive whole number of minutes, got {spacing_s} s")
    starts = scorable_starts(history, window.time_increment, window.time_length, window.start, window.end)
    if not starts.size:
        return []
    rng = np.random.default_rng([seed, zlib.crc32(f"{window.asset}:{window.time_increment}".encode())])
    slot = (starts - window.start) // spacing_s
    edges = np.flatnonzero(np.r_[True, slot[1:] != slot[:-1], True])
    chosen = [int(starts[a + rng.integers(b - a)]) for a, b in itertools.pairwise(edges)]
    if max_prompts is not None and len(chosen) > max_prompts:
        # Spread the kept prompts over the whole window rather than keeping its beginning.
        keep = np.unique(np.linspace(0, len(chosen) - 1, max_prompts).round().astype(int))
        chosen = [chosen[i] for i in keep]
    return [EvalPrompt(window.asset, s, window.time_increment, window.time_length) for s in chosen]


# ----------------------------------------------------------------------------------- held-out split


def load_manifest(folder: Path) -> dict[str, int | None]:
    """File name -> eval_start_ts from the folder's manifest.json ({} when there is none)."""
    path = folder / "manifest.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(raw, dict):
        raise EvaluationError(f"{path}: expected an object keyed by file")
    out: dict[str, int | None] = {}
    for key, entry in raw.items():
        if isinstance(entry, dict):
            value = entry.get("eval_start_ts")
            out[str(entry.get("file", f"{key}.csv.gz"))] = int(value) if isinstance(value, (int, float)) else None
    return out


def eval_starts(folder: Path, asset: str, manifest: Mapping[str, int | None]) -> dict[int, int | None]:
    """step -> eval_start_ts of the asset's files present in the folder (None: all rows held out)."""
    out: dict[int, int | None] = {}
    for step in (60, 300):
        path = find_file(folder, asset, step)
        if path is not None:
            out[step] = manifest_cut(manifest, path.name)
    return out


def manifest_cut(manifest: Mapping[str, int | None], name: str) -> int | None:
    """The eval_start_ts of file ``name``: by its name, else by its stem (``btc_1m``), as ``core.datasets`` reads it.

    By name alone, a gunzipped ``btc_1m.csv`` against the manifest's ``btc_1m.csv.gz`` had no boundary, so the
    heldout mode scored the whole file, training rows included, while training still cut it at eval_start_ts.
    """
    if name in manifest:
        return manifest[name]
    stem = name.split(".")[0]
    return next((cut for key, cut in manifest.items() if key.split(".")[0] == stem), None)


def data_end(history: AssetHistory, step: int) -> int | None:
    h = history.m1 if step == 60 else history.m5
    return None if h is None or not len(h) else int(h.ts[-1]) + h.step


def heldout_window(asset: str, time_increment: int, history: AssetHistory,
                   starts: Mapping[int, int | None]) -> Window | None:
    """From the latest eval_start_ts of the files the prompt may read to the end of the data. A file without
    one is all held out (``training_history`` drops it, the trainer refuses it), so it bounds nothing."""
    steps = (60,) if time_increment < 300 else (60, 300)
    if not any(s in starts for s in steps):
        return None
    marks = [v for s, v in starts.items() if s in steps and v is not None]
    ends = [e for e in (data_end(history, s) for s in steps) if e is not None]
    if not ends:
        return None
    if marks:
        return Window(asset, time_increment, max(marks), max(ends))
    firsts = [h.first_ts for h in ((history.m1, history.m5) if 300 in steps else (history.m1,))
              if h is not None and h.first_ts is not None]
    return Window(asset, time_increment, min(firsts), max(ends))


def training_history(history: AssetHistory, starts: Mapping[int, int | None]) -> AssetHistory:
    """The history with every file cut at its own eval_start_ts (files without one dropped)."""
    limits: dict[int, int | None] = {}
    for step in (60, 300):
        if step in starts:
            limits[step] = starts[step]
    return history.cut(limits)


def training_window(asset: str, time_increment: int, training: AssetHistory, days: float,
                    until: int | None = None) -> Window | None:
    """The last ``days`` of pre-held-out data (rolling origins); ``training`` is already cut."""
    steps = (60,) if time_increment < 300 else (60, 300)
    ends = [e for e in (data_end(training, s) for s in steps) if e is not None]
    if not ends:
        return None
    end = min(max(ends), until) if until is not None else max(ends)
    return Window(asset, time_increment, end - int(days * 86_400), end)


def build_prompts(histories: Mapping[str, AssetHistory], windows: Iterable[Window],
                  spacing_s: Mapping[int, int], seed: int, max_per_window: int | None = None) -> list[EvalPrompt]:
    prompts: list[EvalPrompt] = []
    for w in windows:
        if w.asset in histories and w.end > w.start:
            prompts += pick_prompts(histories[w.asset], w, spacing_s[w.time_increment], seed, max_per_window)
    return prompts


def clamp_windows(windows: Sequence[Window], start: int | None, end: int | None) -> list[Window]:
    out = []
    for w in windows:
        lo = max(w.start, start) if start is not None else w.start
        hi = min(w.end, end) if end is not None else w.end
        if hi > lo:
            out.append(Window(w.asset, w.time_increment, lo, hi))
    return out


# -------------------------------------------------------------------------------------------- plans


def load_histories(folder: Path, assets: Iterable[str]) -> dict[str, AssetHistory]:
    """Both files of every asset that has at least one in ``folder`` (assets without any are left out)."""
    out: dict[str, AssetHistory] = {}
    for asset in dict.fromkeys(assets):
        m1, m5 = load_asset(folder, asset)
        if m1 is not None or m5 is not None:
            out[asset] = AssetHistory(m1, m5)
    return out


@dataclass(frozen=True)
class Plan:
    prompts: list[EvalPrompt]
    windows: list[Window]
    histories: dict[str, AssetHistory]  # what engines may read (cut at eval_start_ts in walk-forward mode)
    skipped: list[str]  # (asset, grid) pairs without data or without a window, with the reason


def plan_prompts(folder: Path, assets: Mapping[int, Sequence[str]], mode: Mode, spacing_s: Mapping[int, int],
                 seed: int, start: int | None = None, end: int | None = None, days: float = 60.0,
                 max_per_window: int | None = None,
                 histories: Mapping[str, AssetHistory] | None = None) -> Plan:
    """Prompts for every (grid, asset) in ``assets`` (time_increment -> asset names).

    heldout: from the files' eval_start_ts to the end of the data; walkforward: the last ``days`` before
    eval_start_ts, with every file cut there; range: [start, end) on all the data. ``start``/``end``
    also clamp the other two modes.
    """
    if mode not in ("heldout", "walkforward", "range"):
        raise EvaluationError(f"unknown mode {mode!r}; use heldout, walkforward or range")
    if mode == "range" and (start is None or end is None):
        raise EvaluationError("range mode needs both a start and an end date")
    unknown = [inc for inc in assets if inc not in GRIDS]
    if unknown:
        raise EvaluationError(f"no prompt grid for time_increment {unknown}; known: {sorted(GRIDS)}")
    names = [a for group in assets.values() for a in group]
    loaded = dict(histories) if histories is not None else load_histories(folder, names)
    manifest = load_manifest(folder)
    if mode != "range" and not manifest:
        raise EvaluationError(f"{folder} has no manifest.json with eval_start_ts: use --mode range")
    usable: dict[str, AssetHistory] = {}
    windows: list[Window] = []
    skipped: list[str] = []
    for inc, group in assets.items():
        for asset in group:
            if asset not in loaded:
                skipped.append(f"{asset} {PROMPT_LABELS[inc]}: no price file")
                continue
            marks = eval_starts(folder, asset, manifest)
            history = training_history(loaded[asset], marks) if mode == "walkforward" else loaded[asset]
            usable[asset] = history
            if mode == "heldout":
                window = heldout_window(asset, inc, history, marks)
            elif mode == "walkforward":
                window = training_window(asset, inc, history, days)
            else:
                assert start is not None and end is not None
                window = Window(asset, inc, start, end)
            clamped = clamp_windows([window], start, end) if window is not None else []
            if not clamped:
                skipped.append(f"{asset} {PROMPT_LABELS[inc]}: no {mode} window")
                continue
            windows += clamped
    prompts = build_prompts(usable, windows, spacing_s, seed, max_per_window)
    return Plan(prompts, windows, usable, skipped)

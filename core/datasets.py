"""Training windows for the three models, from CSV folders like ../shared/data or from the history store.

Order of operations, each a guard against a way of fooling ourselves:

1. **Held-out cut first.** Every file is cut at its manifest ``eval_start_ts`` before anything else
   looks at it; a file without one is refused (never silently trained on to its end).
2. **Pieces.** The remaining rows are split at every source-segment join named in the manifest and
   at every gap longer than the asset's allowance: none for crypto (``diff(ts) == step`` inside a
   piece), a market closure (at most 4 days) for gold and US equities, whose 24 h horizons cannot
   be gap-free (equity files hold regular trading hours only).
3. **Windows.** One forecast origin every ``stride_s`` inside a piece. Inputs use only bars known
   ``LOOKAHEAD_GUARD_S`` before the origin and at most the serving cache's lookback; targets are the
   realised prices on the horizon grid, NaN where a closure left no bar. Nothing crosses a piece.
   Realised prices follow ``core.evaluation``: the price at grid time t is the close of the bar that
   ends at t + 60 s (the 1-minute bar opening at t, the 5-minute bar opening at t - 240 s), so
   5-minute origins sit on t = 240 (mod 300), as the backtest's 5-minute-only prompts do.
4. **Time-ordered split.** Per file, the last ``val_frac`` of the pre-held-out rows are validation;
   training windows end (origin + horizon) before the validation start.
"""

import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from core.assets import spec_for_any
from core.constants import LOOKAHEAD_GUARD_S
from core.csv_history import STEP_SUFFIX, find_file, read_csv
from core.features import (
    FEATURE_SPECS,
    FeatureError,
    FeatureSpec,
    Returns,
    context_feature_names,
    context_inputs,
    returns_of,
    session_bars,
)
from core.prices import PriceHistory

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

# Assets each model is trained on (embedding rows in this order); others get the "unknown" row.
MODEL_ASSETS: dict[str, tuple[str, ...]] = {
    "hf": ("BTC", "ETH", "SOL", "XAU"),
    "lf_crypto": ("BTC", "ETH", "SOL", "XAU"),
    "lf_equity": ("SPYX", "NVDAX", "TSLAX", "AAPLX", "GOOGLX"),
}
CLOSURE_MAX_S = 4 * 86_400  # longest market closure (a holiday weekend) a session asset's piece may span
MIN_OBSERVED_STEPS = 12  # a window whose horizon has fewer observed returns teaches nothing


class DatasetError(ValueError):
    """Data that cannot be used for training (no held-out boundary, nothing left, bad manifest...)."""


def load_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.exists():
        raise DatasetError(f"{path} is missing: without it the held-out boundary is unknown")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable ({exc})") from exc
    return manifest


def _parse_utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


@dataclass(frozen=True)
class FileSlice:
    """What one file contributes: its pre-held-out history and where the joins and the cut are."""

    asset: str
    stem: str
    history: PriceHistory  # already cut at eval_start_ts
    eval_start_ts: int
    segment_starts: tuple[int, ...]


def held_out_start(manifest: Mapping[str, Any], stem: str) -> int | None:
    """The file's ``eval_start_ts``: where its held-out rows begin (None when the manifest does not say)."""
    entry = manifest.get(stem)
    cut = entry.get("eval_start_ts") if isinstance(entry, Mapping) else None
    return cut if isinstance(cut, int) else None


def before_cut(history: PriceHistory, cut: int) -> PriceHistory:
    """The bars known before ``cut``: a bar opening before it but closing after it (a cut off the bar grid)
    is held out too, since its close is a price from the held-out side."""
    return history.between(int(np.iinfo(np.int64).min), cut).known_at(cut)


def read_training_file(folder: Path, asset: str, step: int, manifest: Mapping[str, Any]) -> FileSlice | None:
    """The asset's file at ``step``, cut at its held-out boundary; None when there is no file."""
    path = find_file(folder, asset, step)
    if path is None:
        return None
    stem = path.name.split(".")[0]
    cut = held_out_start(manifest, stem)
    if cut is None:
        raise DatasetError(f"{stem}: no eval_start_ts in the manifest; refusing to train on it")
    history = before_cut(read_csv(path, step), cut)  # the cut comes before anything else
    return FileSlice(asset, stem, history, cut, segment_starts(manifest, stem))


def segment_starts(manifest: Mapping[str, Any], stem: str) -> tuple[int, ...]:
    """Where the file's source segments begin (the manifest's segment table), in time order."""
    entry = manifest.get(stem)
    segments = entry.get("segments", []) if isinstance(entry, Mapping) else []
    starts = []
    for segment in segments:
        if isinstance(segment, Mapping) and "start" in segment:
            try:
                starts.append(_parse_utc(segment["start"]))
            except (TypeError, ValueError) as exc:
                raise DatasetError(f"{stem}: segment start {segment['start']!r} is not a time ({exc})") from None
    return tuple(sorted(starts))


class HistoryReader(Protocol):
    """The history store or a cache: anything that reads bars by asset, step and time range."""

    def read(self, asset: str, step: int, start: int, end: int) -> PriceHistory: ...


@runtime_checkable
class SourcedReader(HistoryReader, Protocol):
    """A reader that knows where its bars change source (the history store: ``core.store_sources``)."""

    def read_sourced(self, asset: str, step: int, start: int, end: int) -> tuple[PriceHistory, tuple[int, ...]]:
        """``read``, and the bar times in it where the source changes."""
        ...


def histories_from_cache(cache: HistoryReader, assets: Iterable[str], step: int, start: int,
                         cut: int) -> dict[str, FileSlice]:
    """The history store as a training source: bars in [start, cut) that closed by ``cut``, the held-out start.

    ``cut`` need not sit on the bar grid (the retraining job's is a whole minute): a 5-minute bar opening
    before it may close after it, and its close is a price from the held-out side. Its source joins split
    the pieces, as a CSV file's manifest segments do.
    """
    out = {}
    for asset in assets:
        if isinstance(cache, SourcedReader):
            history, joins = cache.read_sourced(asset, step, start, cut)
        else:
            history, joins = cache.read(asset, step, start, cut), ()
        history = history.known_at(cut)
        if len(history):
            out[asset] = FileSlice(asset, asset.lower(), history, cut, joins)
    return out


def max_gap_s(asset: str, step: int) -> int:
    """Crypto trades around the clock, so any gap is missing data; gold and equities close."""
    spec = spec_for_any(asset)
    return step if spec.market == "crypto" else CLOSURE_MAX_S


def split_pieces(file: FileSlice, step: int) -> list[PriceHistory]:
    """Runs of rows with no segment join and no gap beyond the asset's allowance."""
    h = file.history
    if len(h) < 2:
        return []
    breaks = np.diff(h.ts) > max_gap_s(file.asset, step)
    joins = np.searchsorted(h.ts, np.asarray(file.segment_starts, np.int64), side="left")
    breaks[joins[(joins > 0) & (joins < len(h))] - 1] = True
    edges = np.r_[0, np.flatnonzero(breaks) + 1, len(h)]
    return [PriceHistory(step, h.ts[a:b], h.close[a:b]) for a, b in itertools.pairwise(edges.tolist()) if b - a > 1]


@dataclass
class WindowSet:
    """Training or validation windows of one model, as flat arrays (row i = one forecast origin)."""

    kind: str
    returns: FloatArray  # all pieces' one-step returns, concatenated
    ctx_end: IntArray  # [N] context = returns[ctx_end - context_len : ctx_end]
    scale: FloatArray  # [N] fast EWMA std: the context is standardised by it
    scalars: FloatArray  # [N, F] raw context features
    base: FloatArray  # [N, H] EWMA-t per-step std
    log_path: FloatArray  # [N, H + 1] log(price at origin + k*step / anchor), NaN where no bar
    anchor: FloatArray  # [N] last close known at origin - guard
    origin: IntArray  # [N]
    asset: IntArray  # [N] row of MODEL_ASSETS[kind]
    scorable: npt.NDArray[np.bool_]  # [N] first and last realised prices observed (a backtest prompt)
    val_start: dict[str, int]  # per asset: first validation origin

    def __len__(self) -> int:
        return int(self.origin.size)

    def subset(self, rows: IntArray) -> "WindowSet":
        return WindowSet(self.kind, self.returns, self.ctx_end[rows], self.scale[rows], self.scalars[rows],
                         self.base[rows], self.log_path[rows], self.anchor[rows], self.origin[rows],
                         self.asset[rows], self.scorable[rows], self.val_start)


@dataclass(frozen=True)
class _PieceWindows:
    ctx_end: list[int]
    scale: list[float]
    scalars: list[FloatArray]
    base: list[FloatArray]
    log_path: list[FloatArray]
    anchor: list[float]
    origin: list[int]
    scorable: list[bool]


def realised_lag(step: int) -> int:
    """Seconds between a grid time and the open of the bar whose close is its realised price."""
    return step - 60


def piece_windows(spec: FeatureSpec, piece: PriceHistory, stride_s: int, offset: int,
                  guard_s: int = LOOKAHEAD_GUARD_S) -> tuple[_PieceWindows, Returns]:
    """Every usable origin of one piece; ``offset`` is where this piece's returns start globally."""
    native = returns_of(piece)
    coarse = returns_of(piece.resample(300)) if spec.coarse_windows else None
    step, horizon, lag = spec.step, spec.horizon, realised_lag(spec.step)
    log_close = np.log(piece.close)
    first = int(piece.ts[0]) + spec.min_returns * step
    last = int(piece.ts[-1]) - horizon * step + lag  # the final grid point's bar must be inside the piece
    out = _PieceWindows([], [], [], [], [], [], [], [])
    first = first - first % stride_s + stride_s + lag
    for origin in range(first, last + 1, stride_s):
        known = origin - guard_s
        # Bar-exact lookback, as the snapshot the engine gets holds it: known_by alone kept a return or two
        # whose older bar opened before ``known - lookback_s`` (it moved the slow EWMA of equities and gold).
        since = known - spec.lookback_s
        ctx = native.known_by(known, spec.lookback_s).from_bars_since(since)
        if len(ctx) < spec.min_returns:
            continue
        grid = origin - lag + step * np.arange(horizon + 1, dtype=np.int64)  # bars giving the grid prices
        pos = np.minimum(np.searchsorted(piece.ts, grid), len(piece) - 1)
        seen = piece.ts[pos] == grid
        if int(np.sum(seen[1:] & seen[:-1])) < MIN_OBSERVED_STEPS:
            continue
        try:
            inputs = context_inputs(spec, ctx, known,
                                    coarse.known_by(known, spec.lookback_s).from_bars_since(since)
                                    if coarse is not None else None)
        except FeatureError:
            continue
        anchor_pos = int(np.searchsorted(piece.ts, known - step, side="right")) - 1
        out.ctx_end.append(offset + int(np.searchsorted(native.known_ts, known, side="right")))
        out.scale.append(float(np.sqrt(inputs.fast)))
        out.scalars.append(inputs.scalars)
        out.base.append(inputs.base)
        out.log_path.append(np.where(seen, log_close[pos] - log_close[anchor_pos], np.nan))
        out.anchor.append(float(piece.close[anchor_pos]))
        out.origin.append(origin)
        out.scorable.append(bool(seen[0] and seen[-1]))
    return out, native


def asset_row(kind: str, asset: str) -> int:
    """Embedding row of an asset: its own, a vocabulary asset with the same data (SP500 -> SPYX), or unknown."""
    vocab = MODEL_ASSETS[kind]
    if asset in vocab:
        return vocab.index(asset)
    stems = set(spec_for_any(asset).file_stems[1:])
    for i, known in enumerate(vocab):
        if stems & set(spec_for_any(known).file_stems):
            return i
    return len(vocab)


def build_windows(kind: str, files: Mapping[str, FileSlice], stride_s: int, val_frac: float = 0.2,
                  spec: FeatureSpec | None = None) -> WindowSet:
    """All windows of one model from its files (asset -> pre-held-out slice)."""
    spec = spec or FEATURE_SPECS[kind]
    if not 0.0 < val_frac < 1.0:
        raise DatasetError(f"val_frac must be in (0, 1), got {val_frac}")
    if stride_s % spec.step:
        raise DatasetError(f"stride {stride_s}s is not a multiple of the {spec.step}s step")
    returns: list[FloatArray] = []
    keys = ("ctx_end", "scale", "scalars", "base", "log_path", "anchor", "origin", "scorable")
    parts: dict[str, list[Any]] = {k: [] for k in (*keys, "asset")}
    val_start: dict[str, int] = {}
    offset = 0
    for asset, file in files.items():
        if len(file.history) < 2:
            continue
        if file.history.step != spec.step:
            raise DatasetError(f"{file.stem}: step {file.history.step}s, model {kind} needs {spec.step}s")
        file = replace(file, history=session_bars(spec, asset, file.history))  # what serving will feed the model
        if len(file.history) < 2:
            continue
        val_start[asset] = int(file.history.ts[int(len(file.history) * (1.0 - val_frac))])
        for piece in split_pieces(file, spec.step):
            found, native = piece_windows(spec, piece, stride_s, offset)
            returns.append(native.r)
            offset += len(native)
            for key in keys:
                parts[key] += getattr(found, key)
            parts["asset"] += [asset_row(kind, asset)] * len(found.origin)
    if not parts["origin"]:
        raise DatasetError(f"no usable {kind} windows in {sorted(files)}")
    n_feat = len(context_feature_names(spec))
    return WindowSet(
        kind=kind, returns=np.concatenate(returns),
        ctx_end=np.asarray(parts["ctx_end"], np.int64), scale=np.asarray(parts["scale"]),
        scalars=np.asarray(parts["scalars"]).reshape(-1, n_feat), base=np.asarray(parts["base"]),
        log_path=np.asarray(parts["log_path"]), anchor=np.asarray(parts["anchor"]),
        origin=np.asarray(parts["origin"], np.int64), asset=np.asarray(parts["asset"], np.int64),
        scorable=np.asarray(parts["scorable"], bool), val_start=val_start)


def split_train_val(windows: WindowSet) -> tuple[WindowSet, WindowSet]:
    """Time-ordered per asset: training windows end before validation starts.

    Bar-exact: the last bar a training target reads (it opens at origin - lag + horizon * step) opens
    before the asset's first validation bar, and a validation window's first grid bar opens at or
    after it, so no bar is both a training target and a validation one.
    """
    spec = FEATURE_SPECS[windows.kind]  # horizon and step are fixed per kind
    vocab = MODEL_ASSETS[windows.kind]
    starts = np.array([windows.val_start.get(a, np.iinfo(np.int64).max) for a in vocab]
                      + [np.iinfo(np.int64).max], np.int64)
    start = starts[windows.asset]
    lag = realised_lag(spec.step)
    train = np.flatnonzero(windows.origin - lag + spec.horizon * spec.step < start)
    val = np.flatnonzero(windows.origin - lag >= start)
    return windows.subset(train), windows.subset(val)


def load_csv_dir(folder: Path, kind: str) -> dict[str, FileSlice]:
    """The model's assets from a ../shared/data style folder, each cut at its held-out boundary."""
    manifest = load_manifest(folder)
    step = FEATURE_SPECS[kind].step
    files = {}
    for asset in MODEL_ASSETS[kind]:
        found = read_training_file(folder, asset, step, manifest)
        if found is not None:
            files[asset] = found
    if not files:
        raise DatasetError(f"no {STEP_SUFFIX[step]} file for any of {MODEL_ASSETS[kind]} in {folder}")
    return files

"""Which source wrote each stretch of an asset's stored bars, so that training never spans a source join.

A provider switch (Binance to Hyperliquid), an imported CSV file, or a segment of one prices the asset
from another feed, with a basis against the others (about -0.04 % for futures against spot, more between
a CFD and a perp): a training window across the join learns a move that never happened. The cache is
rebuilt on a switch (``core.refresh._forget_other_sources``), but the store keeps every source's bars and
the weekly retrain reads them all, as ``core.datasets`` reads a CSV file's manifest segments.

Each step folder of the store keeps ``sources.json``: the stretches ``[first, last]`` in time order, each
owned by the source that wrote its bars last (later writes win, as in the partitions). Bars stored before
this file existed belong to no stretch.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.atomic_files import atomic_write
from core.prices import MAX_EPOCH_S

SOURCES_FILE = "sources.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stretch:
    source: str
    first: int  # the first bar's open time
    last: int  # the last bar's open time


def written(stretches: Sequence[Stretch], source: str, first: int, last: int, step: int) -> list[Stretch]:
    """The stretches once ``source`` has written bars over ``[first, last]`` (on a ``step`` grid): it owns
    that span, the parts of others outside it keep theirs (cut on the grid: a cut off it made a false join a
    bar early), and neighbours of one source are one stretch (a gap is no join)."""
    kept: list[Stretch] = []
    for s in stretches:
        if s.last < first or s.first > last:
            kept.append(s)
            continue
        if s.first < first:
            kept.append(Stretch(s.source, s.first, first - step))
        if s.last > last:
            kept.append(Stretch(s.source, last + step, s.last))
    merged: list[Stretch] = []
    for s in sorted([*kept, Stretch(source, first, last)], key=lambda s: s.first):
        if merged and merged[-1].source == s.source:
            merged[-1] = Stretch(s.source, merged[-1].first, max(merged[-1].last, s.last))
        else:
            merged.append(s)
    return merged


def owners(stretches: Sequence[Stretch], ts: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.object_]]:
    """The source of each bar time: the stretch holding it, "" where none does (bars of unknown source).
    ``stretches`` apart and in time order, as ``written`` and ``read_stretches`` give them."""
    if not stretches:
        return np.full(len(ts), "", dtype=object)
    labels = np.array([s.source for s in stretches] + [""], dtype=object)
    firsts = np.array([s.first for s in stretches], np.int64)
    lasts = np.array([s.last for s in stretches], np.int64)
    i = np.searchsorted(firsts, ts, side="right") - 1
    inside = (i >= 0) & (ts <= lasts[np.maximum(i, 0)])
    return labels[np.where(inside, i, -1)]


def changes(ts: np.ndarray[Any, Any], owner: np.ndarray[Any, np.dtype[np.object_]]) -> tuple[int, ...]:
    """The bar times where the owning source differs from the bar before's: where a piece must begin."""
    return tuple(int(t) for t in ts[1:][owner[1:] != owner[:-1]])


def _stretch(item: object) -> Stretch:
    # Bar times the store could hold (``bar_time_problem``): one beyond int64 made ``owners`` raise OverflowError.
    if (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_EPOCH_S for v in item[1:])
            and item[1] <= item[2]):
        return Stretch(item[0], item[1], item[2])
    raise ValueError(f"not a [source, first, last] stretch: {item!r}"[:200])


def read_stretches(folder: Path) -> list[Stretch]:
    """The folder's stretches. A garbled file counts as none, and says so: the bars matter more than where
    they came from. A file that cannot be read (I/O, permissions) raises OSError: written over, every
    join it records would be lost."""
    path = folder / SOURCES_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    try:
        # Decoded here, not by read_text: bytes that are not UTF-8 (a torn or foreign file) raised
        # UnicodeDecodeError out of every merge and refresh of the step. Nesting too deep: RecursionError.
        raw = json.loads(data.decode())
        if not isinstance(raw, list):
            raise ValueError("not a list")
        out = sorted((_stretch(item) for item in raw), key=lambda s: s.first)
        # ``written`` keeps stretches apart: overlapping ones were not written by the store, and ``owners``
        # would give the bars of the overlap to whichever starts later.
        for before, after in zip(out, out[1:]):
            if after.first <= before.last:
                raise ValueError(f"stretches {before} and {after} overlap")
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError included
        log.warning("%s unusable (%s): its source joins are forgotten", path, exc)
        return []
    return out


def write_stretches(folder: Path, stretches: Sequence[Stretch]) -> None:
    path = folder / SOURCES_FILE
    try:
        with atomic_write(path, mode=0o644) as fh:
            fh.write(json.dumps([[s.source, s.first, s.last] for s in stretches]).encode())
    except OSError as exc:  # the bars are stored; only the record of their source is behind
        log.warning("%s not written (%s): the newest source join is not recorded", path, exc)

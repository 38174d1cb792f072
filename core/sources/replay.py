"""Replayed prices: a CSV folder shifted in time so its rows play up to "now". Runs the stack offline.

Crypto files are shifted so their newest row is "now". Files that keep market hours (equities in the
NYSE session, gold closed at weekends) are shifted by whole New York weeks instead, so their sessions
stay sessions: "now" then lands inside the file's last week, and its later rows appear as the clock
reaches them, like a live feed.
"""

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.assets import spec_for_any
from core.csv_history import load_asset
from core.market_calendar import SECONDS_PER_WEEK, new_york_week_shift
from core.prices import LatestPrice, PriceDataError, PriceHistory
from core.sources.base import ProviderError
from core.sources.http import UnsupportedAssetError

ALIGN = 300  # shift by whole 5-minute bars so 1m and 5m rows stay on their grids
STEPS = (60, 300)  # the file steps a replay serves
# A file with market hours shorter than this keeps the 5-minute shift: a week-aligned one could hide
# most of it until the clock reaches it.
CALENDAR_MIN_SPAN_S = 2 * SECONDS_PER_WEEK


def market_hours_shift(asset: str, start: int, end: int, now: int) -> int | None:
    """The shift for a file of ``asset`` spanning [start, end) that keeps its market hours, or None where the
    caller's own 5-minute shift will do (an asset trading around the clock, or a file under
    ``CALENDAR_MIN_SPAN_S``).

    Whole New York weeks (``new_york_week_shift``) moving ``end`` to or past ``now``: any other shift moves
    session bars into the night, where the models' session filter (gold's closure filter) drops them all and
    every equity forecast and gold grid falls back to EWMA-t. The caller then serves only rows closed by now.
    The one rule of ``ReplaySource`` and ``core.fake_providers.FakeMarket``.
    """
    spec = spec_for_any(asset)
    if (spec.us_session or spec.weekend_closed) and end - start >= CALENDAR_MIN_SPAN_S:
        return new_york_week_shift(end, now)
    return None


class ReplaySource:
    name = "replay"

    def __init__(self, folder: Path, clock: Callable[[], float] = time.time) -> None:
        if not folder.is_dir():
            raise ProviderError(f"replay folder {folder} does not exist")
        self.folder = folder
        self.clock = clock
        self._files: dict[str, tuple[PriceHistory | None, PriceHistory | None]] = {}
        self._shifts: dict[str, int] = {}  # asset -> seconds added to its file times

    def _load(self, asset: str) -> tuple[PriceHistory | None, PriceHistory | None]:
        if asset not in self._files:
            try:
                m1, m5 = load_asset(self.folder, asset)
            except PriceDataError as exc:  # a source fails with ProviderError: what its callers catch
                raise ProviderError(f"replay file for {asset} unreadable: {exc}") from exc
            if m1 is None and m5 is None:  # permanent: the refresh reports it once, not every minute
                raise UnsupportedAssetError(f"no replay file for {asset} in {self.folder}")
            self._files[asset] = (m1, m5)
        return self._files[asset]

    def _shift(self, asset: str) -> int:
        """Seconds to add to file times so the newest close lands within the 5 minutes before the first call
        (a file with market hours: the first whole New York week that reaches it, see the module doc).

        Fixed per asset (as ``FakeMarket.shift``): recomputed per call, the file's tail would be served
        again at every new "now", each refresh appending the same closes at later timestamps.
        """
        if asset not in self._shifts:
            files = [h for h in self._load(asset) if h is not None and len(h)]
            if not files:
                raise ProviderError(f"replay file for {asset} is empty")
            end = max(int(h.ts[-1]) + h.step for h in files)
            start = min(int(h.ts[0]) for h in files)
            now = int(self.clock())
            calendar = market_hours_shift(asset, start, end, now)
            self._shifts[asset] = calendar if calendar is not None else (now - end) // ALIGN * ALIGN
        return self._shifts[asset]

    def shifted(self, asset: str, step: int) -> PriceHistory:
        if step not in STEPS:  # the files hold 1m and 5m rows: any other step would mislabel them
            raise UnsupportedAssetError(f"replay: no history at step {step} s (only {', '.join(map(str, STEPS))})")
        m1, m5 = self._load(asset)
        shift = self._shift(asset)
        native = m1 if step == 60 else m5
        if native is None and step == 300 and m1 is not None:
            native = m1.resample(300, complete=False)
        if native is None:  # e.g. 5-minute rows only: no 1-minute history, now or later
            raise UnsupportedAssetError(f"no {step}s replay history for {asset}")
        # Only rows closed by now: a week-aligned shift puts the file's tail in the future.
        return PriceHistory(step, native.ts + np.int64(shift), native.close).known_at(int(self.clock()))

    async def history(self, asset: str, start: int, end: int, step: int = 60) -> PriceHistory:
        return self.shifted(asset, step).between(start, end)

    async def latest(self, asset: str) -> LatestPrice:
        self._load(asset)  # no file at all: UnsupportedAssetError, as from ``history``
        best: tuple[int, float] | None = None
        for step in (60, 300):
            try:
                hist = self.shifted(asset, step)
            except ProviderError:
                continue
            if len(hist):
                candidate = (int(hist.ts[-1]) + step, float(hist.close[-1]))
                best = candidate if best is None or candidate[0] > best[0] else best
        if best is None:
            raise ProviderError(f"no replay prices for {asset}")
        return LatestPrice(price=best[1], publish_time=best[0])

    async def close(self) -> None:
        return None

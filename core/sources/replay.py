"""Replayed prices: a CSV folder shifted in time so its newest row is "now". Runs the stack offline."""

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from core.csv_history import load_asset
from core.prices import LatestPrice, PriceHistory
from core.sources.base import ProviderError
from core.sources.http import UnsupportedAssetError

ALIGN = 300  # shift by whole 5-minute bars so 1m and 5m rows stay on their grids
STEPS = (60, 300)  # the file steps a replay serves


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
            m1, m5 = load_asset(self.folder, asset)
            if m1 is None and m5 is None:
                raise ProviderError(f"no replay file for {asset} in {self.folder}")
            self._files[asset] = (m1, m5)
        return self._files[asset]

    def _shift(self, asset: str) -> int:
        """Seconds to add to file times so the newest close lands within the 5 minutes before the first call.

        Fixed per asset (as ``FakeMarket.shift``): recomputed per call, the file's tail would be served
        again at every new "now", each refresh appending the same closes at later timestamps.
        """
        if asset not in self._shifts:
            ends = [h.last_close_time for h in self._load(asset) if h is not None and len(h)]
            if not ends:
                raise ProviderError(f"replay file for {asset} is empty")
            now = int(self.clock())
            self._shifts[asset] = (now - max(e for e in ends if e is not None)) // ALIGN * ALIGN
        return self._shifts[asset]

    def shifted(self, asset: str, step: int) -> PriceHistory:
        if step not in STEPS:  # the files hold 1m and 5m rows: any other step would mislabel them
            raise UnsupportedAssetError(f"replay: no history at step {step} s (only {', '.join(map(str, STEPS))})")
        m1, m5 = self._load(asset)
        shift = self._shift(asset)
        native = m1 if step == 60 else m5
        if native is None and step == 300 and m1 is not None:
            native = m1.resample(300, complete=False)
        if native is None:
            raise ProviderError(f"no {step}s replay history for {asset}")
        return PriceHistory(step, native.ts + np.int64(shift), native.close)

    async def history(self, asset: str, start: int, end: int, step: int = 60) -> PriceHistory:
        return self.shifted(asset, step).between(start, end)

    async def latest(self, asset: str) -> LatestPrice:
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

"""Price history as the whole system passes it around: bar open times and closes on a fixed step.

Convention (same as ../shared/data and the validators): the row at ``ts`` is the bar
``[ts, ts + step)`` and its close is the price at ``ts + step``. Gaps stay gaps: nothing is filled.
"""

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.constants import SECONDS_PER_DAY

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

# Unix seconds of the year 5138: no real bar is later, and a timestamp in milliseconds of any date after
# March 1973 is larger, so a file or reply in milliseconds is told apart instead of landing in year 55,000.
MAX_EPOCH_S = 100_000_000_000


class PriceDataError(ValueError):
    """History or a price that cannot be trusted (non-positive, non-finite, unsorted...)."""


def bar_time_problem(step: int, ts: IntArray) -> str | None:
    """Why bar open times ``ts`` are not unix seconds on a ``step`` grid that divides a day (None if fine)."""
    if step <= 0 or SECONDS_PER_DAY % step:
        return f"step {step} s does not divide a day (bars must sit on a grid that divides a day)"
    if not ts.size:
        return None
    first, last = int(ts.min()), int(ts.max())
    if last >= MAX_EPOCH_S:
        return f"timestamp {last} is not in unix seconds (milliseconds?)"
    if first < 0:
        return f"timestamp {first} is before 1970"
    off = np.flatnonzero(ts % step)
    if off.size:
        return f"timestamp {int(ts[off[0]])} is not on the {step} s grid ({off.size} bar(s) off it)"
    return None


@dataclass(frozen=True)
class PriceHistory:
    step: int  # seconds between bars: 60 or 300
    ts: IntArray  # bar open times, strictly increasing, multiples of step
    close: FloatArray  # close of each bar, > 0 and finite

    def __post_init__(self) -> None:
        if self.ts.shape != self.close.shape or self.ts.ndim != 1:
            raise PriceDataError(f"ts and close must be 1-D of one length, got {self.ts.shape} and {self.close.shape}")
        if self.ts.size and np.any(np.diff(self.ts) <= 0):
            raise PriceDataError("timestamps must be strictly increasing")
        if self.close.size and not (np.all(np.isfinite(self.close)) and np.all(self.close > 0)):
            raise PriceDataError("prices must be finite and > 0")

    @classmethod
    def from_arrays(cls, step: int, ts: npt.ArrayLike, close: npt.ArrayLike) -> "PriceHistory":
        return cls(step, np.asarray(ts, dtype=np.int64), np.asarray(close, dtype=np.float64))

    @classmethod
    def empty(cls, step: int) -> "PriceHistory":
        return cls(step, np.empty(0, np.int64), np.empty(0, np.float64))

    def __len__(self) -> int:
        return int(self.ts.size)

    @property
    def first_ts(self) -> int | None:
        return int(self.ts[0]) if self.ts.size else None

    @property
    def last_ts(self) -> int | None:
        return int(self.ts[-1]) if self.ts.size else None

    @property
    def last_close_time(self) -> int | None:
        """When the newest close became known (the end of its bar)."""
        return None if not self.ts.size else int(self.ts[-1]) + self.step

    def between(self, start: int, end: int) -> "PriceHistory":
        """Bars with start <= ts < end."""
        lo, hi = np.searchsorted(self.ts, [start, end], side="left")
        return PriceHistory(self.step, self.ts[lo:hi], self.close[lo:hi])

    def known_at(self, moment: int) -> "PriceHistory":
        """Only bars whose close was published by ``moment`` (ts + step <= moment): no look-ahead."""
        hi = int(np.searchsorted(self.ts, moment - self.step, side="right"))
        return PriceHistory(self.step, self.ts[:hi], self.close[:hi])

    def tail(self, seconds: int) -> "PriceHistory":
        if not self.ts.size:
            return self
        return self.between(int(self.ts[-1]) - seconds + self.step, int(self.ts[-1]) + 1)

    def merge(self, other: "PriceHistory") -> "PriceHistory":
        """Union of two histories; on equal timestamps ``other`` wins. Idempotent."""
        if other.step != self.step:
            raise PriceDataError(f"cannot merge step {other.step} into step {self.step}")
        ts = np.concatenate([self.ts, other.ts])
        close = np.concatenate([self.close, other.close])
        # Keep the last occurrence of each timestamp (other's), then sort.
        order = np.argsort(ts, kind="stable")
        ts, close = ts[order], close[order]
        keep = np.ones(ts.size, bool)
        keep[:-1] = ts[1:] != ts[:-1]
        return PriceHistory(self.step, ts[keep], close[keep])

    def resample(self, step: int, complete: bool = True) -> "PriceHistory":
        """Coarser bars, each closing at its window's last bar. ``complete``: only windows holding every bar
        (the 1 h model's 5-minute features were trained so); otherwise any bar makes a window, as an exchange
        builds its coarser candles (the 5-minute files agree with that bar for bar, where complete windows
        lose the 5-minute bars of every minute a 1-minute feed skipped). The newest window counts only once
        its last bar is there: until then it may still be forming, and its close would not be the bar's."""
        if step == self.step:
            return self
        if step % self.step:
            raise PriceDataError(f"cannot resample step {self.step} to {step}")
        if not self.ts.size:
            return PriceHistory.empty(step)
        ratio = step // self.step
        bucket = self.ts // step
        # A complete window has `ratio` bars; its close is the close of its last bar.
        starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        counts = np.diff(np.r_[starts, bucket.size])
        if complete:
            full = counts == ratio
        else:
            full = np.ones(starts.size, bool)
            full[-1] = (self.ts[-1] + self.step) % step == 0  # the newest window has ended

        last = (starts + counts - 1)[full]
        return PriceHistory(step, bucket[starts][full] * step, self.close[last])

    def log_returns(self) -> FloatArray:
        """Log returns between consecutive bars only (a return across a gap is not a step return)."""
        if self.ts.size < 2:
            return np.empty(0, np.float64)
        contiguous = np.diff(self.ts) == self.step
        returns: FloatArray = np.diff(np.log(self.close))[contiguous]
        return returns


@dataclass(frozen=True)
class LatestPrice:
    price: float
    publish_time: int  # unix seconds
    confidence: float | None = None


@dataclass(frozen=True)
class MarketSnapshot:
    """Everything an engine may see for one request: history known before the cut, and the anchor."""

    asset: str
    m1: PriceHistory | None  # 1-minute bars, when the source has them
    m5: PriceHistory | None  # 5-minute bars (native or resampled)
    anchor: float  # the latest known price: every path starts here
    anchor_time: int

    def best(self, step: int) -> PriceHistory | None:
        """History at ``step`` if available, else the other resolution resampled or as is."""
        native = self.m1 if step == 60 else self.m5
        if native is not None and len(native):
            return native
        if step == 300 and self.m1 is not None and len(self.m1):
            return self.m1.resample(300, complete=False)  # standing in for 5-minute candles
        return self.m5 if step == 60 else self.m1

"""Plausibility of new prices: a garbage print must never become a forecast's anchor.

Providers sometimes publish a bar or a latest price that is off by a factor (a wrong exponent, a
fat-finger print, a broken feed). Such a price is positive and finite, so the parsers accept it.
Every path starts at the anchor, so one such print would ruin a whole forecast.

The rule is about levels, not volatility: a close further than ``max_jump`` (log) from the last
accepted close is taken only once the next ``confirm_bars`` bars stay near it (the market really
moved there). A lone print that jumps out and back is dropped and leaves a gap; a jump at the very
end of a fetch, not yet confirmed, is held back and fetched again by the next refresh. The default
bound, 0.3 (a 26 % fall or a 35 % rise), sits above the largest real move between consecutive bars in
``../shared/data``: SOL's 5-minute wick of 2025-10-10 (-22 %, then +17 %); the errors it is for are
factors (x10, /100). An equity's overnight gap beyond it is confirmed by the bars that follow.
"""

import math
from dataclasses import dataclass

import numpy as np

from core.prices import LatestPrice, PriceHistory

ANCHOR_MATCH_S = 600  # a latest print is checked against a close at most this much older


@dataclass(frozen=True)
class Screened:
    kept: PriceHistory  # bars accepted now
    dropped: PriceHistory  # lone prints far from their neighbours: never stored
    held_back: int  # newest bars whose jump is not confirmed yet: fetched again next time

    def describe(self) -> str:
        ts = ", ".join(str(t) for t in self.dropped.ts[:5].tolist())
        return f"{len(self.dropped)} implausible bar(s) dropped (ts {ts})"


def _far(a: float, b: float, max_jump: float) -> bool:
    return abs(math.log(a / b)) > max_jump


def screen_bars(bars: PriceHistory, previous_close: float | None, max_jump: float,
                confirm_bars: int) -> Screened:
    """Split freshly fetched bars into accepted, dropped and held-back ones (see the module doc).

    ``previous_close`` is the newest close already accepted (the cache's); without one, the median
    of the first bars is the reference, so a garbage first bar is judged like any other.
    """
    if max_jump <= 0 or confirm_bars < 1:
        raise ValueError(f"need max_jump > 0 and confirm_bars >= 1, got {max_jump}, {confirm_bars}")
    close = bars.close
    n = close.size
    if n == 0:
        return Screened(bars, bars, 0)
    ref = previous_close if previous_close is not None else float(np.median(close[:2 * confirm_bars + 1]))
    keep = np.zeros(n, bool)
    drop = np.zeros(n, bool)
    held = 0
    for i in range(n):
        if not _far(float(close[i]), ref, max_jump):
            keep[i], ref = True, float(close[i])
            continue
        following = close[i + 1:i + 1 + confirm_bars]
        if any(_far(float(c), float(close[i]), max_jump) for c in following):
            drop[i] = True  # the next bars disagree: a lone print
        elif following.size < confirm_bars:
            held = n - i  # nothing contradicts it yet: wait for the bars that will
            break
        else:
            keep[i], ref = True, float(close[i])  # a new level: the market moved
    return Screened(PriceHistory(bars.step, bars.ts[keep], close[keep]),
                    PriceHistory(bars.step, bars.ts[drop], close[drop]), held)


def plausible_latest(latest: LatestPrice, newest: PriceHistory, max_jump: float) -> bool:
    """False when the print is far from an accepted close of the last ``ANCHOR_MATCH_S`` seconds."""
    close_time = newest.last_close_time
    if close_time is None or abs(latest.publish_time - close_time) > ANCHOR_MATCH_S:
        return True  # nothing recent to compare with (a market reopening): the print stands
    return not _far(latest.price, float(newest.close[-1]), max_jump)

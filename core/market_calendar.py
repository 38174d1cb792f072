"""When the markets our training files come from are open: New York time, the NYSE regular session
(holidays and early closes) and the CME gold closures (daily break and weekend).

The files hold what those markets traded: equities in NYSE regular hours, gold with its weekends
closed, while live tokens and perps trade around the clock. The models read a live feed through
their files' hours (``bars_in_hours``), so their inputs look like the ones they were trained on.
The step calendar (session state per horizon step) is a model input too.
"""

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt

from core.prices import PriceHistory

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

log = logging.getLogger(__name__)

NY = ZoneInfo("America/New_York")

# NYSE full closures and 13:00 early closes, 2021-2027 (published exchange calendars).
NYSE_HOLIDAYS: frozenset[date] = frozenset(date.fromisoformat(d) for d in (
    "2021-01-01", "2021-01-18", "2021-02-15", "2021-04-02", "2021-05-31", "2021-07-05", "2021-09-06",
    "2021-11-25", "2021-12-24",
    "2022-01-17", "2022-02-21", "2022-04-15", "2022-05-30", "2022-06-20", "2022-07-04", "2022-09-05",
    "2022-11-24", "2022-12-26",
    "2023-01-02", "2023-01-16", "2023-02-20", "2023-04-07", "2023-05-29", "2023-06-19", "2023-07-04",
    "2023-09-04", "2023-11-23", "2023-12-25",
    "2024-01-01", "2024-01-15", "2024-02-19", "2024-03-29", "2024-05-27", "2024-06-19", "2024-07-04",
    "2024-09-02", "2024-11-28", "2024-12-25",
    "2025-01-01", "2025-01-09", "2025-01-20", "2025-02-17", "2025-04-18", "2025-05-26", "2025-06-19",
    "2025-07-04", "2025-09-01", "2025-11-27", "2025-12-25",
    "2026-01-01", "2026-01-19", "2026-02-16", "2026-04-03", "2026-05-25", "2026-06-19", "2026-07-03",
    "2026-09-07", "2026-11-26", "2026-12-25",
    "2027-01-01", "2027-01-18", "2027-02-15", "2027-03-26", "2027-05-31", "2027-06-18", "2027-07-05",
    "2027-09-06", "2027-11-25", "2027-12-24",
))
NYSE_HALF_DAYS: frozenset[date] = frozenset(date.fromisoformat(d) for d in (
    "2021-11-26", "2022-11-25", "2023-07-03", "2023-11-24", "2024-07-03", "2024-11-29", "2024-12-24",
    "2025-07-03", "2025-11-28", "2025-12-24", "2026-11-27", "2026-12-24", "2027-11-26",
))
OPEN_MIN, CLOSE_MIN, HALF_CLOSE_MIN = 9 * 60 + 30, 16 * 60, 13 * 60  # New York minutes after midnight
SESSION_MIN = CLOSE_MIN - OPEN_MIN

_TABLE_START = int(datetime(2018, 1, 1, tzinfo=UTC).timestamp())
_TABLE_HOURS = 24 * 366 * 15  # 2018..2032


@lru_cache(maxsize=1)
def _ny_offset_table() -> IntArray:
    """UTC offset of New York (seconds) per UTC hour: DST switches fall on whole UTC hours."""
    base = datetime.fromtimestamp(_TABLE_START, UTC)
    offsets = np.empty(_TABLE_HOURS, np.int64)
    # Offsets only change twice a year: fill day by day and refine the two switch days hourly.
    for day in range(_TABLE_HOURS // 24):
        first = base + timedelta(days=day)
        a, b = first.astimezone(NY).utcoffset(), (first + timedelta(hours=23)).astimezone(NY).utcoffset()
        assert a is not None and b is not None
        if a == b:
            offsets[day * 24:(day + 1) * 24] = int(a.total_seconds())
        else:
            for h in range(24):
                off = (first + timedelta(hours=h)).astimezone(NY).utcoffset()
                assert off is not None
                offsets[day * 24 + h] = int(off.total_seconds())
    return offsets


@lru_cache(maxsize=1)
def _calendar_days() -> tuple[IntArray, IntArray]:
    """Sorted NY day numbers (days since 1970-01-01) of holidays and of half days."""
    epoch = date(1970, 1, 1)
    return (np.array(sorted((d - epoch).days for d in NYSE_HOLIDAYS), np.int64),
            np.array(sorted((d - epoch).days for d in NYSE_HALF_DAYS), np.int64))


def _offset_at(hour_start: int) -> int:
    off = datetime.fromtimestamp(hour_start, UTC).astimezone(NY).utcoffset()
    assert off is not None
    return int(off.total_seconds())


def ny_local_seconds(ts: npt.ArrayLike) -> IntArray:
    """Unix seconds shifted to New York wall-clock time (vectorised zoneinfo lookup)."""
    t = np.asarray(ts, dtype=np.int64)
    hour = (t - _TABLE_START) // 3600
    inside = (hour >= 0) & (hour < _TABLE_HOURS)
    if bool(inside.all()):
        out: IntArray = t + _ny_offset_table()[hour]
        return out
    # Outside the table (before 2018 or after 2032): zoneinfo once per distinct hour, slower but exact.
    offsets = np.empty_like(t)
    offsets[inside] = _ny_offset_table()[hour[inside]]
    hours, inverse = np.unique(hour[~inside], return_inverse=True)
    offsets[~inside] = np.array([_offset_at(_TABLE_START + 3600 * int(h)) for h in hours], np.int64)[inverse]
    shifted: IntArray = t + offsets
    return shifted


CALENDAR_LAST_DAY = (date(2027, 12, 31) - date(1970, 1, 1)).days  # the lists above end with 2027


@lru_cache(maxsize=1)
def _warn_calendar_ended() -> None:
    """Once per process: past the lists, NYSE holidays count as trading days until someone extends them."""
    log.warning("the NYSE holiday calendar in core/market_calendar.py ends on 2027-12-31: later holidays and "
                "early closes are treated as normal trading days; extend NYSE_HOLIDAYS and NYSE_HALF_DAYS")


@dataclass(frozen=True)
class UsSession:
    open: FloatArray  # 1 while the regular session is open
    since_open: FloatArray  # minutes since the open / 390 (0 when closed)
    to_close: FloatArray  # minutes to the close / 390 (0 when closed)
    trading_day: FloatArray  # 1 on NYSE trading days (New York date)
    half_day: FloatArray  # 1 on 13:00 early-close days


def us_session(ts: npt.ArrayLike) -> UsSession:
    """Regular-hours NYSE session state at each unix time."""
    local = ny_local_seconds(ts)
    day = local // 86_400
    minute = (local % 86_400) / 60.0
    weekday = (day + 3) % 7  # 1970-01-01 was a Thursday; 0 = Monday
    holidays, halves = _calendar_days()
    if day.size and int(day.max()) > CALENDAR_LAST_DAY:
        _warn_calendar_ended()
    trading = (weekday < 5) & ~np.isin(day, holidays)
    half = trading & np.isin(day, halves)
    close = np.where(half, HALF_CLOSE_MIN, CLOSE_MIN)
    is_open = trading & (minute >= OPEN_MIN) & (minute < close)
    f = np.float64
    return UsSession(open=is_open.astype(f),
                     since_open=np.where(is_open, (minute - OPEN_MIN) / SESSION_MIN, 0.0),
                     to_close=np.where(is_open, (close - minute) / SESSION_MIN, 0.0),
                     trading_day=trading.astype(f), half_day=half.astype(f))


SECONDS_PER_WEEK = 7 * 86_400


def new_york_week_shift(end: int, now: int) -> int:
    """The smallest shift (seconds) that moves time ``end`` to or past ``now`` and keeps its New York
    weekday and wall-clock time: whole weeks, plus the hour a DST change in between adds or removes.

    Replayed equity and gold files keep their sessions and weekends this way; a shift of any other
    length would move the regular-session bars into the night, where the session filter drops them.
    """
    def ny_offset(t: int) -> int:
        return int(ny_local_seconds(t)) - t

    weeks = max(0, -(-(now - end) // SECONDS_PER_WEEK))
    while True:  # at most twice: the DST hour can leave the first candidate an hour short of now
        shift = weeks * SECONDS_PER_WEEK
        shift += ny_offset(end) - ny_offset(end + shift)
        if end + shift >= now:
            return shift
        weeks += 1


# The XAU files' own gaps (CME gold), measured: none of their bars from 16:50 to 18:05 New York on any day,
# nor from Friday 16:50 to Sunday 18:05, while the live token trades through both.
GOLD_BREAK_FROM, GOLD_BREAK_TO = 16 * 60 + 50, 18 * 60 + 5  # New York minutes after midnight
WEEKEND_FROM, WEEKEND_TO = 4 * 1440 + GOLD_BREAK_FROM, 6 * 1440 + GOLD_BREAK_TO  # minutes from Monday 00:00


def in_regular_session(ts: npt.ArrayLike) -> BoolArray:
    """True where the NYSE regular session is open."""
    open_: BoolArray = us_session(ts).open == 1
    return open_


def outside_gold_closures(ts: npt.ArrayLike) -> BoolArray:
    """True except when CME gold is closed: daily from 16:50 to 18:05 New York, and from Friday 16:50 to
    Sunday 18:05. A 24/7 feed's bars there (flat, or nearly) would give the models a staleness and
    volatility no training window held: 0.45-1.85x the 1 h sigma around the daily break."""
    local = ny_local_seconds(ts)
    minute = (local % 86_400) // 60
    week_minute = ((local // 86_400 + 3) % 7) * 1440 + minute  # from Monday 00:00
    weekend = (week_minute >= WEEKEND_FROM) & (week_minute < WEEKEND_TO)
    daily = (minute >= GOLD_BREAK_FROM) & (minute < GOLD_BREAK_TO)
    keep: BoolArray = ~(weekend | daily)
    return keep


def bars_in_hours(history: PriceHistory, session_only: bool, weekend_closed: bool) -> PriceHistory:
    """The bars (by each bar's middle) inside the hours: the regular session when ``session_only``, all
    but the gold closures when ``weekend_closed``, else every bar."""
    if not len(history) or not (session_only or weekend_closed):
        return history
    middle = history.ts + history.step // 2
    keep = in_regular_session(middle) if session_only else outside_gold_closures(middle)
    return history if bool(keep.all()) else PriceHistory(history.step, history.ts[keep], history.close[keep])


"""The market calendar: New York time (DST switches, any year), the NYSE session with holidays and early
closes, the gold weekend, and the hour filters that keep a 24/7 feed's bars to its files' hours."""

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from core.market_calendar import (
    NY,
    _warn_calendar_ended,
    bars_in_hours,
    in_regular_session,
    new_york_week_shift,
    ny_local_seconds,
    outside_gold_closures,
    us_session,
)
from core.prices import PriceHistory


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def test_ny_offset_matches_zoneinfo_including_dst_switches() -> None:
    ny = ZoneInfo("America/New_York")
    rng = np.random.default_rng(1)
    ts = rng.integers(utc("2021-01-01T00:00:00"), utc("2027-12-31T00:00:00"), 2000)
    # Both 2026 switches (07:00 UTC on 8 March, 06:00 UTC on 1 November), either side.
    ts = np.r_[ts, utc("2026-03-08T06:59:59"), utc("2026-03-08T07:00:00"), utc("2026-11-01T05:59:59"),
               utc("2026-11-01T06:00:00")]
    expected = [int(datetime.fromtimestamp(int(t), ny).replace(tzinfo=UTC).timestamp()) for t in ts]
    assert ny_local_seconds(ts).tolist() == expected


def test_session_open_on_a_regular_day_with_dst() -> None:
    # 13:45 UTC is 09:45 in New York in summer time (open) but 08:45 in winter time (closed).
    summer = us_session([utc("2025-03-10T13:45:00")])
    winter = us_session([utc("2025-03-07T13:45:00")])
    assert summer.open[0] == 1.0 and summer.since_open[0] == pytest.approx(15 / 390)
    assert summer.to_close[0] == pytest.approx(375 / 390)
    assert winter.open[0] == 0.0 and winter.trading_day[0] == 1.0 and winter.since_open[0] == 0.0


def test_session_closed_on_holiday_and_weekend() -> None:
    christmas = us_session([utc("2025-12-25T16:00:00")])  # 11:00 New York on a Thursday holiday
    saturday = us_session([utc("2026-02-14T16:00:00")])
    for state in (christmas, saturday):
        assert state.open[0] == 0.0 and state.trading_day[0] == 0.0 and state.to_close[0] == 0.0


def test_half_day_closes_at_one_pm() -> None:
    state = us_session([utc("2025-11-28T17:30:00"), utc("2025-11-28T18:30:00")])  # 12:30 and 13:30 New York
    assert state.half_day.tolist() == [1.0, 1.0]
    assert state.open.tolist() == [1.0, 0.0]
    assert state.to_close[0] == pytest.approx(30 / 390)


def test_the_session_runs_from_the_open_up_to_but_not_including_the_close() -> None:
    """[09:30, close) New York: the closing instant itself (16:00, or 13:00 on a half day) is closed, as
    the 5-minute equity files' last bar opens at 15:55."""
    # 2025-03-10 is in summer time (UTC-4), 2025-11-28 a half day in winter time (UTC-5).
    regular = us_session([utc("2025-03-10T13:29:59"), utc("2025-03-10T13:30:00"), utc("2025-03-10T19:59:59"),
                          utc("2025-03-10T20:00:00")])
    assert regular.open.tolist() == [0.0, 1.0, 1.0, 0.0]
    half = us_session([utc("2025-11-28T17:59:59"), utc("2025-11-28T18:00:00")])
    assert half.open.tolist() == [1.0, 0.0]


def test_ny_offset_is_exact_outside_the_precomputed_years() -> None:
    """Before 2018 and after 2032 the table ends: zoneinfo answers instead of an error, DST included."""
    ny = ZoneInfo("America/New_York")
    ts = np.array([utc("2016-07-04T12:00:00"), utc("2017-11-05T05:59:59"), utc("2017-11-05T06:00:00"),
                   utc("2025-01-15T12:00:00"), utc("2040-03-11T06:59:59"), utc("2040-03-11T07:00:00"),
                   utc("2040-12-24T23:00:00")])
    expected = [int(datetime.fromtimestamp(int(t), ny).replace(tzinfo=UTC).timestamp()) for t in ts]
    assert ny_local_seconds(ts).tolist() == expected
    assert ny_local_seconds(ts[3:4]).tolist() == expected[3:4]  # the table alone


def test_gold_closes_daily_from_4_50_to_6_05_pm_and_from_friday_to_sunday_new_york() -> None:
    """The XAU files' own gaps. The weekend ran Friday to Sunday 17:00 and the daily break was kept: a 24/7
    feed's bars there gave the models a staleness and volatility no training window held."""
    # Friday 16:49 and 16:50, Saturday noon, Sunday 18:04 and 18:05 New York (EST: UTC-5).
    weekend = [utc("2026-02-13T21:49:00"), utc("2026-02-13T21:50:00"), utc("2026-02-14T17:00:00"),
               utc("2026-02-15T23:04:00"), utc("2026-02-15T23:05:00")]
    assert outside_gold_closures(weekend).tolist() == [True, False, False, False, True]
    # Tuesday 16:49, 16:50, 17:30, 18:04, 18:05 New York, in summer time too (EDT: UTC-4).
    for offset_h, day in ((5, "2026-02-10"), (4, "2026-07-14")):
        times = [f"{16 + offset_h}:49", f"{16 + offset_h}:50", f"{17 + offset_h}:30", f"{18 + offset_h}:04",
                 f"{18 + offset_h}:05"]
        daily = [utc(f"{day}T{t}:00") for t in times]
        assert outside_gold_closures(daily).tolist() == [True, False, False, False, True], day


def test_bars_in_hours_keep_the_session_or_all_but_the_weekend_by_each_bars_middle() -> None:
    monday = utc("2026-02-09T00:00:00")
    ts = np.arange(monday - 3 * 86_400, monday + 86_400, 300, dtype=np.int64)  # Friday to Monday night
    history = PriceHistory(300, ts, np.linspace(100.0, 101.0, ts.size))
    assert bars_in_hours(history, session_only=False, weekend_closed=False) is history
    session = bars_in_hours(history, session_only=True, weekend_closed=False)
    assert np.all(in_regular_session(session.ts + 150)) and len(session) == 2 * 78  # Friday and Monday
    weekdays = bars_in_hours(history, session_only=False, weekend_closed=True)
    assert np.all(outside_gold_closures(weekdays.ts + 150))
    assert len(history) - len(weekdays) == 591 + 15  # Friday 16:50 to Sunday 18:05, Monday's daily break
    assert np.array_equal(weekdays.close, history.close[np.isin(history.ts, weekdays.ts)])  # closes kept


def test_a_day_past_the_nyse_calendar_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    _warn_calendar_ended.cache_clear()
    with caplog.at_level("WARNING", logger="core.market_calendar"):
        us_session([utc("2027-12-31T15:00:00")])
        assert not caplog.records  # still inside the lists
        us_session([utc("2028-07-04T15:00:00")])
        us_session([utc("2028-12-25T15:00:00")])
    assert len(caplog.records) == 1 and "ends on 2027-12-31" in caplog.records[0].getMessage()


@pytest.mark.parametrize("end_iso, now_iso", [
    ("2026-02-06T16:00:00-05:00", "2026-12-07T02:50:00+00:00"),  # EST to EST
    ("2026-07-10T16:00:00-04:00", "2026-12-07T02:50:00+00:00"),  # EDT file, EST now
    ("2026-01-09T16:00:00-05:00", "2026-06-20T12:00:00+00:00"),  # EST file, EDT now
    ("2026-07-10T16:00:00-04:00", "2026-07-10T20:00:00+00:00"),  # already at now: no shift
])
def test_the_new_york_week_shift_keeps_weekday_and_wall_clock_and_reaches_now(end_iso: str, now_iso: str) -> None:
    end, now = int(datetime.fromisoformat(end_iso).timestamp()), int(datetime.fromisoformat(now_iso).timestamp())
    shift = new_york_week_shift(end, now)
    assert now <= end + shift < now + 7 * 86_400 + 3600 and shift % 300 == 0
    before, after = (datetime.fromtimestamp(t, UTC).astimezone(NY) for t in (end, end + shift))
    assert (after.weekday(), after.hour, after.minute) == (before.weekday(), before.hour, before.minute)
    bars = np.arange(end - 5 * 86_400, end, 300, dtype=np.int64)  # the file's last regular sessions stay sessions
    np.testing.assert_array_equal(in_regular_session(bars + 150), in_regular_session(bars + shift + 150))

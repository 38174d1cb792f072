"""Features: the US session calendar, step calendars, no look-ahead, normalisation fitted on training only."""

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from core.csv_history import load_asset
from core.engines.ewma import DEFAULT_CONFIGS, ewma_variance
from core.features import (
    FEATURE_SPECS,
    STEP_FEATURE_NAMES,
    FeatureError,
    NormStats,
    Returns,
    base_sigma,
    context_feature_names,
    context_inputs,
    history_context,
    returns_of,
    session_bars,
    step_features,
    us_closed_steps,
)
from core.market_calendar import ny_local_seconds, us_session
from core.prices import PriceHistory


def utc(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def col(name: str) -> int:
    return STEP_FEATURE_NAMES.index(name)


def test_closed_steps_follow_the_session_at_each_step_middle() -> None:
    origin = int(datetime(2026, 3, 6, 15, 0, tzinfo=UTC).timestamp())  # Friday 10:00 New York (EST)
    closed = us_closed_steps([origin, origin + 600], 300, 288)
    assert closed.shape == (2, 288)
    mids = origin + 300 * np.arange(288) + 150
    assert np.array_equal(closed[0], us_session(mids).open == 0)
    assert not closed[0, :72].any() and closed[0, 72:].all()  # open until 16:00, then the weekend


def test_step_features_shape_and_calendar() -> None:
    origin = utc("2026-02-13T20:00:00")  # Friday 15:00 New York: one hour before the close
    feats = step_features([origin, origin + 3600], 300, 288)
    assert feats.shape == (2, 288, len(STEP_FEATURE_NAMES))
    assert np.all(np.isfinite(feats))
    first = feats[0]
    assert first[:12, col("us_open")].tolist() == [1.0] * 12  # 15:00..16:00
    assert first[12:, col("us_open")].max() == 0.0  # then the weekend
    assert first[-1, col("weekend")] == 1.0 and first[0, col("weekend")] == 0.0
    # Hour marks are a 1-minute feature: the LF models never see a 5-minute step start on the hour.
    assert first[:, col("on_hour")].max() == 0.0 and first[:, col("on_half_hour")].max() == 0.0
    minutes = step_features([origin - 17 * 60], 60, 60)[0]
    assert np.flatnonzero(minutes[:, col("on_hour")]).tolist() == [17]
    assert np.flatnonzero(minutes[:, col("on_half_hour")]).tolist() == [17, 47]
    assert np.allclose(first[:, col("horizon_frac")], (np.arange(288) + 0.5) / 288)
    # Steps are labelled by their middle: same calendar for the same clock time.
    calendar = [i for i, n in enumerate(STEP_FEATURE_NAMES) if n != "horizon_frac"]
    assert np.allclose(feats[1, :276][:, calendar], feats[0, 12:][:, calendar])


def test_a_step_that_straddles_the_open_is_labelled_by_its_middle() -> None:
    """The LF models' 5-minute steps start at 240 s (mod 300): the step from 09:29 to 09:34 New York is
    mostly in the session, and the committed checkpoints learnt it as open. Labelled by its start, it
    would read as closed and the calendar would shift half a step."""
    origin = utc("2026-02-10T14:29:00")  # Tuesday 09:29 New York (EST)
    first = step_features([origin], 300, 288)[0, 0]
    assert first[col("us_open")] == 1.0 and first[col("us_since_open")] == pytest.approx(1.5 / 390)
    middle = 2 * np.pi * ((origin + 150) % 86_400) / 86_400
    assert first[col("tod_sin1")] == pytest.approx(np.sin(middle))


def synthetic(step: int, n: int, start: int, seed: int = 0) -> PriceHistory:
    rng = np.random.default_rng(seed)
    ts = start + step * np.arange(n, dtype=np.int64)
    close = 100.0 * np.exp(np.cumsum(rng.standard_t(5, n) * 1e-3))
    return PriceHistory(step, ts, close)


def test_returns_skip_gaps() -> None:
    h = PriceHistory.from_arrays(60, [0, 60, 120, 300, 360], [1.0, 2.0, 4.0, 8.0, 16.0])
    r = returns_of(h)
    assert np.allclose(r.r, np.log([2.0, 2.0, 2.0]))
    assert r.known_ts.tolist() == [120, 180, 420]  # close times of the later bars


def test_context_base_is_the_ewma_engine_term_structure() -> None:
    spec = FEATURE_SPECS["lf_crypto"]
    h = synthetic(300, 3000, utc("2026-01-01T00:00:00"))
    origin = int(h.ts[-1]) + 300
    inputs = history_context(spec, h, origin)
    r = h.log_returns()
    cfg = DEFAULT_CONFIGS[300]
    fast, slow = ewma_variance(r, cfg.half_life_bars), ewma_variance(r, cfg.long_half_life_bars)
    assert inputs.fast == pytest.approx(fast) and inputs.slow == pytest.approx(slow)
    decay = 0.5 ** (np.arange(288) / cfg.reversion_bars)
    assert np.allclose(inputs.base, np.sqrt(slow + (fast - slow) * decay))
    assert inputs.series.shape == (spec.context_len,)
    assert np.allclose(inputs.series, r[-spec.context_len:] / np.sqrt(fast))
    assert inputs.scalars.shape == (len(context_feature_names(spec)),)
    assert np.allclose(base_sigma(fast, slow, cfg, 288), inputs.base)


def test_no_look_ahead_bars_after_the_origin_change_nothing() -> None:
    spec = FEATURE_SPECS["hf"]
    h = synthetic(60, 6000, utc("2026-01-05T00:00:00"), seed=3)
    origin = int(h.ts[5000])
    before = history_context(spec, h, origin)
    poisoned = h.close.copy()
    poisoned[h.ts + 60 > origin] *= 50.0  # every close not yet published at the origin
    after = history_context(spec, PriceHistory(60, h.ts, poisoned), origin)
    for a, b in ((before.series, after.series), (before.scalars, after.scalars), (before.base, after.base)):
        assert np.array_equal(a, b)
    # ... while the last published close does matter.
    poisoned[h.ts + 60 == origin] *= 1.05
    assert not np.array_equal(history_context(spec, PriceHistory(60, h.ts, poisoned), origin).scalars,
                              before.scalars)


def test_too_short_history_is_a_feature_error() -> None:
    spec = FEATURE_SPECS["lf_crypto"]
    h = synthetic(300, spec.min_returns - 5, utc("2026-01-01T00:00:00"))
    with pytest.raises(FeatureError, match="need"):
        history_context(spec, h, int(h.ts[-1]) + 300)
    with pytest.raises(FeatureError, match="step"):
        history_context(spec, synthetic(60, 5000, 0), 10**9)
    hf = replace(FEATURE_SPECS["hf"], coarse_windows=(10_000,))
    with pytest.raises(FeatureError, match="resampled"):
        context_inputs(hf, returns_of(synthetic(60, 3000, 0)), 200_000, Returns(300, np.zeros(3), np.arange(3)))


def test_staleness_is_zero_when_fresh_and_grows_across_a_closure() -> None:
    spec = FEATURE_SPECS["lf_equity"]
    h = synthetic(300, 2000, utc("2026-01-05T00:00:00"))
    name = context_feature_names(spec).index("log_stale")
    fresh = history_context(spec, h, int(h.ts[-1]) + 300 + 60).scalars[name]
    stale = history_context(spec, h, int(h.ts[-1]) + 300 + 17 * 3600).scalars[name]
    slack = spec.stale_slack_s
    assert fresh == 0.0 and stale == pytest.approx(np.log1p((17 * 3600 - 300 - slack) / 300))


def test_the_live_serving_delay_is_not_staleness() -> None:
    """A live request comes ~120 s before its start and the newest cached bar may be a minute older:
    the model must see what training showed it (0), not a value it never saw."""
    spec = FEATURE_SPECS["hf"]
    h = synthetic(60, 3000, utc("2026-01-05T00:00:00"))
    name = context_feature_names(spec).index("log_stale")
    newest_close = int(h.ts[-1]) + 60
    origin = newest_close + 180  # start - 60 s; the request came at start - 120 s, two minutes after the close
    assert history_context(spec, h, origin).scalars[name] == 0.0
    late = history_context(spec, h, origin + 600).scalars[name]  # ten minutes more: an outage registers
    assert late == pytest.approx(np.log1p(9))  # 13 minutes past the close, less one step and the slack
    legacy = replace(spec, stale_slack_s=0)  # checkpoints trained before the slack keep their inputs
    assert history_context(legacy, h, origin).scalars[name] == pytest.approx(np.log1p(2))


def test_norm_stats_fit_on_training_rows_only() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(3.0, 2.0, size=(500, 4))
    train[:, 3] = 7.0  # a constant feature is only centred
    stats = NormStats.fit(train)
    assert np.allclose(stats.mean[:3], 3.0, atol=0.3) and np.allclose(stats.std[:3], 2.0, atol=0.3)
    assert stats.std[3] == 1.0
    z = stats.apply(np.array([[3.0, 3.0, 3.0, 9.0]]))
    assert abs(z[0, :3]).max() < 0.2 and z[0, 3] == pytest.approx(2.0)
    assert stats.apply(np.full((1, 4), 1e9)).max() == 8.0  # clipped
    with pytest.raises(FeatureError):
        stats.apply(np.zeros((1, 3)))
    with pytest.raises(FeatureError):
        NormStats.fit(np.zeros((1, 4)))


def test_real_data_context_is_finite(shared_data: Path) -> None:
    m1, m5 = load_asset(shared_data, "BTC")
    assert m1 is not None and m5 is not None
    origin = 1779667200 - 60
    for kind, h in (("hf", m1), ("lf_crypto", m5)):
        spec = FEATURE_SPECS[kind]
        inputs = history_context(spec, h.between(origin - spec.lookback_s, origin), origin)
        assert np.all(np.isfinite(inputs.scalars)) and np.all(inputs.base > 0)


def test_session_bars_keep_the_regular_session_of_a_session_only_spec() -> None:
    monday = 1770595200  # 2026-02-09 00:00 UTC, a Monday and a trading day
    ts = np.arange(monday - 2 * 86_400, monday + 86_400, 300, dtype=np.int64)  # Saturday to Monday night
    history = PriceHistory(300, ts, np.linspace(100.0, 101.0, ts.size))
    kept = session_bars(FEATURE_SPECS["lf_equity"], "SPYX", history)
    middles = kept.ts + 150
    assert np.all(us_session(middles).open == 1)
    local = ny_local_seconds(kept.ts) % 86_400
    assert local.min() == 9 * 3600 + 30 * 60 and local.max() == 16 * 3600 - 300  # 09:30 .. 15:55 New York
    assert len(kept) == 78  # one regular session of 5-minute bars: the weekend and the nights are gone
    assert session_bars(FEATURE_SPECS["lf_crypto"], "BTC", history) is history  # around the clock: every bar


@pytest.mark.parametrize("kind", ["hf", "lf_crypto"])
def test_gold_loses_its_closure_bars_only(kind: str) -> None:
    friday = 1770336000  # 2026-02-06 00:00 UTC, a Friday (New York: UTC-5)
    ts = np.arange(friday, friday + 4 * 86_400, 60, dtype=np.int64)  # Friday to Monday, every minute
    history = PriceHistory(60, ts, np.full(ts.size, 2000.0))
    kept = session_bars(FEATURE_SPECS[kind], "XAU", history)
    gone = np.setdiff1d(ts, kept.ts)
    # Friday 16:50 New York (21:50 UTC) to Sunday 18:05 (23:05 UTC), then Monday's 16:50 to 18:05 break.
    weekend, monday = gone[gone < friday + 3 * 86_400], gone[gone >= friday + 3 * 86_400]
    assert weekend.size == 49 * 60 + 15 and weekend[0] == friday + 21 * 3600 + 50 * 60
    assert weekend[-1] == friday + 71 * 3600 + 4 * 60
    assert monday.size == 75 and monday[0] == friday + 3 * 86_400 + 21 * 3600 + 50 * 60
    assert session_bars(FEATURE_SPECS[kind], "BTC", history) is history

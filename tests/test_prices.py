import numpy as np
import pytest

from core.prices import MarketSnapshot, PriceDataError, PriceHistory


def hist(ts: list[int], step: int = 60) -> PriceHistory:
    return PriceHistory.from_arrays(step, ts, np.arange(1, len(ts) + 1, dtype=float))


def test_known_at_cuts_bars_not_yet_closed() -> None:
    h = hist([0, 60, 120, 180])
    assert h.known_at(180).ts.tolist() == [0, 60, 120]  # bar 120 closes at 180
    assert h.known_at(179).ts.tolist() == [0, 60]


def test_merge_is_idempotent_and_newer_wins() -> None:
    a, b = hist([0, 60, 120]), PriceHistory.from_arrays(60, [120, 180], [9.0, 10.0])
    merged = a.merge(b)
    assert merged.ts.tolist() == [0, 60, 120, 180] and merged.close.tolist() == [1, 2, 9, 10]
    assert merged.merge(b).close.tolist() == merged.close.tolist()


def test_resample_drops_incomplete_windows_and_log_returns_skip_gaps() -> None:
    h = hist([0, 60, 120, 180, 240, 300, 360, 420, 480, 540, 660])
    five = h.resample(300)
    assert five.ts.tolist() == [0, 300] and five.close.tolist() == [5, 10]
    assert len(PriceHistory.empty(60).resample(300)) == 0
    gappy = hist([0, 60, 300, 360])
    assert gappy.log_returns().size == 2  # the return across the gap is not a one-step return


@pytest.mark.parametrize("close", [[1.0, np.nan], [1.0, 0.0], [1.0, -2.0]])
def test_bad_prices_are_refused(close: list[float]) -> None:
    with pytest.raises(PriceDataError):
        PriceHistory.from_arrays(60, [0, 60], close)


def test_unsorted_is_refused() -> None:
    with pytest.raises(PriceDataError):
        PriceHistory.from_arrays(60, [60, 0], [1.0, 2.0])


@pytest.mark.parametrize(("ts", "close"), [
    ([0, 60, 120], [1.0, 2.0]),
    ([0], [1.0, 2.0]),
    ([[0, 60]], [[1.0, 2.0]]),
], ids=["more times", "more closes", "2-D"])
def test_times_and_closes_that_are_not_two_1d_arrays_of_one_length_are_refused(ts: list[int],
                                                                               close: list[float]) -> None:
    with pytest.raises(PriceDataError, match="ts and close must be 1-D of one length"):
        PriceHistory.from_arrays(60, ts, close)


def test_merging_another_step_is_refused() -> None:
    minutes, five = hist([0, 60, 120]), hist([0, 300], step=300)
    with pytest.raises(PriceDataError, match="cannot merge step 300 into step 60"):
        minutes.merge(five)
    with pytest.raises(PriceDataError, match="cannot merge step 60 into step 300"):
        five.merge(minutes)
    assert minutes.ts.tolist() == [0, 60, 120] and five.ts.tolist() == [0, 300]


@pytest.mark.parametrize(("step", "to"), [(60, 90), (300, 60), (300, 450)])
def test_resampling_to_a_step_that_is_not_a_multiple_is_refused(step: int, to: int) -> None:
    with pytest.raises(PriceDataError, match=f"cannot resample step {step} to {to}"):
        hist([0, step, 2 * step], step=step).resample(to)


def test_a_5_minute_stand_in_keeps_every_window_an_exchange_would() -> None:
    # Minutes 0-4 complete; minute 7 missing from the second window; only minute 12 in the third; the
    # fourth has its last minute (19).
    h = PriceHistory.from_arrays(60, [0, 60, 120, 180, 240, 300, 360, 480, 540, 720, 1140], np.arange(1.0, 12.0))
    assert h.resample(300).ts.tolist() == [0]  # complete windows only (the 1 h model's features)
    candles = h.resample(300, complete=False)
    assert candles.ts.tolist() == [0, 300, 600, 900] and candles.close.tolist() == [5.0, 9.0, 10.0, 11.0]


def test_the_newest_window_is_a_candle_only_once_it_has_ended() -> None:
    # At 12:03:03 the cache holds minutes up to 12:02: the 12:00 window is still forming.
    forming = PriceHistory.from_arrays(60, [0, 60, 120, 180, 240, 300, 360, 420], np.arange(1.0, 9.0))
    assert forming.resample(300, complete=False).ts.tolist() == [0]
    ended = PriceHistory.from_arrays(60, [0, 60, 120, 180, 240, 300, 360, 420, 540], np.arange(1.0, 10.0))
    assert ended.resample(300, complete=False).close.tolist() == [5.0, 9.0]


def test_a_snapshot_without_5_minute_bars_stands_in_with_exchange_like_candles() -> None:
    m1 = PriceHistory.from_arrays(60, [0, 60, 120, 180, 240, 300, 360, 540, 600, 660], np.arange(1.0, 11.0))
    snap = MarketSnapshot("BTC", m1, None, 10.0, 720)  # minute 8 skipped; the 10-minute window still forming
    best = snap.best(300)
    assert best is not None and best.ts.tolist() == [0, 300] and best.close.tolist() == [5.0, 8.0]

import numpy as np
import pytest

from core.prices import PriceDataError, PriceHistory


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

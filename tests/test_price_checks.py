"""Plausibility screening of new bars and latest prints: garbage is refused, real moves are kept."""

from pathlib import Path

import numpy as np
import pytest

from core.csv_history import read_csv
from core.price_checks import plausible_latest, screen_bars
from core.prices import LatestPrice, PriceHistory

JUMP, CONFIRM = 0.3, 2  # the settings' defaults


def bars(*close: float, t0: int = 60_000) -> PriceHistory:
    return PriceHistory.from_arrays(60, t0 + 60 * np.arange(len(close)), close)


def test_ordinary_bars_are_all_kept() -> None:
    out = screen_bars(bars(100, 101, 99.5, 102, 100), 100.2, JUMP, CONFIRM)
    assert len(out.kept) == 5 and len(out.dropped) == 0 and out.held_back == 0


@pytest.mark.parametrize("garbage", [1000.0, 10.0, 0.001])
def test_a_lone_print_off_by_a_factor_is_dropped(garbage: float) -> None:
    fetched = bars(100, 101, garbage, 100.5, 100)
    out = screen_bars(fetched, 100.0, JUMP, CONFIRM)
    np.testing.assert_array_equal(out.kept.close, [100, 101, 100.5, 100])
    assert out.dropped.ts.tolist() == [fetched.ts[2]] and out.held_back == 0
    assert "1 implausible bar(s) dropped" in out.describe()


def test_two_garbage_bars_in_a_row_are_dropped_too() -> None:
    out = screen_bars(bars(100, 900, 905, 100.4, 100.1, 99.8), 100.0, JUMP, CONFIRM)
    np.testing.assert_array_equal(out.kept.close, [100, 100.4, 100.1, 99.8])
    assert len(out.dropped) == 2


def test_a_confirmed_level_shift_is_kept() -> None:
    # An equity reopening 50 % higher after earnings: the next bars stay there.
    out = screen_bars(bars(150, 151, 150.5, 152), 100.0, JUMP, CONFIRM)
    assert len(out.kept) == 4 and len(out.dropped) == 0 and out.held_back == 0


@pytest.mark.parametrize("tail", [(300.0,), (300.0, 301.0)])
def test_an_unconfirmed_jump_at_the_end_is_held_back_not_dropped(tail: tuple[float, ...]) -> None:
    out = screen_bars(bars(100, 100.5, *tail), 100.0, JUMP, CONFIRM)
    np.testing.assert_array_equal(out.kept.close, [100, 100.5])
    assert out.held_back == len(tail) and len(out.dropped) == 0


def test_a_jump_contradicted_by_the_last_bar_is_dropped() -> None:
    out = screen_bars(bars(100, 100.5, 300, 100.7), 100.0, JUMP, CONFIRM)
    np.testing.assert_array_equal(out.kept.close, [100, 100.5, 100.7])
    assert len(out.dropped) == 1 and out.held_back == 0


def test_a_cold_cache_judges_the_first_bar_against_the_median() -> None:
    out = screen_bars(bars(5000, 100, 100.2, 99.9, 100.1), None, JUMP, CONFIRM)
    np.testing.assert_array_equal(out.kept.close, [100, 100.2, 99.9, 100.1])
    assert len(out.dropped) == 1


def test_empty_fetch_and_bad_arguments() -> None:
    empty = PriceHistory.empty(60)
    out = screen_bars(empty, 100.0, JUMP, CONFIRM)
    assert len(out.kept) == len(out.dropped) == out.held_back == 0
    with pytest.raises(ValueError, match="max_jump"):
        screen_bars(empty, 100.0, 0.0, CONFIRM)
    with pytest.raises(ValueError, match="confirm_bars"):
        screen_bars(empty, 100.0, JUMP, 0)


@pytest.mark.parametrize("name", ["btc_1m", "eth_1m", "sol_5m", "xau_5m", "nvda_5m", "tsla_5m"])
def test_real_history_loses_no_bar(shared_data: Path, name: str) -> None:
    """Five years of real crypto minutes, SOL's 22 % wick of 2025-10-10, gold with its weekends,
    equities with their overnight gaps, segment joins: the default bound drops and holds back nothing."""
    history = read_csv(shared_data / f"{name}.csv.gz", 60 if name.endswith("1m") else 300)
    out = screen_bars(history, None, JUMP, CONFIRM)
    assert len(out.dropped) == 0 and out.held_back == 0 and len(out.kept) == len(history)


def test_latest_print_is_checked_against_a_recent_close() -> None:
    newest = bars(100.0, t0=60_000)  # closes at 60_060
    assert plausible_latest(LatestPrice(120.0, 60_090), newest, JUMP)
    assert not plausible_latest(LatestPrice(1040.0, 60_090), newest, JUMP)
    assert not plausible_latest(LatestPrice(1.04, 60_090), newest, JUMP)
    # Nothing recent to compare with: a market reopening after a weekend keeps its first print.
    assert plausible_latest(LatestPrice(160.0, 60_060 + 3 * 86_400), newest, JUMP)
    assert plausible_latest(LatestPrice(1040.0, 60_090), PriceHistory.empty(60), JUMP)

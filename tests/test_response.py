import numpy as np
import pytest

from core.engines.ewma import EwmaTEngine
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest
from core.response import ResponseError, build_response, check_paths, render_json, round_for_wire
from core.response_checks import head_point_error, validate_response_head, validate_response_upstream

REQ = ForecastRequest("XRP", 1_767_225_660, 60, 3_600, 50)


def test_rounding_respects_both_digit_rules_at_every_magnitude() -> None:
    rng = np.random.default_rng(0)
    prices = 10.0 ** rng.uniform(-3.5, 6.9, size=(50, 61))
    rounded = round_for_wire(prices)
    big = prices >= 1  # 8 significant digits kept; below 1 the printed leading zeros use up the budget
    assert np.allclose(rounded[big], prices[big], rtol=5e-8, atol=0)
    assert np.allclose(rounded, prices, rtol=5e-4, atol=0)
    response = build_response(REQ, prices)
    args = (REQ.start_ts, REQ.time_increment, REQ.time_length, REQ.num_simulations)
    assert validate_response_head(response, *args) == "CORRECT"
    assert validate_response_upstream(response, *args) == "CORRECT"


def test_known_values() -> None:
    got = round_for_wire(np.array([100123.456789, 2.123456789, 0.27123456789, 0.0271234567]))
    assert got.tolist() == [100123.46, 2.1234568, 0.2712346, 0.0271235]


def test_response_layout_is_ints_then_lists() -> None:
    response = build_response(REQ, np.full((50, 61), 2.5, dtype=np.float32))
    assert type(response[0]) is int and type(response[1]) is int
    assert all(type(p) is list and len(p) == 61 for p in response[2:])
    args = (REQ.start_ts, REQ.time_increment, REQ.time_length, REQ.num_simulations)
    assert validate_response_head(response, *args) == validate_response_upstream(response, *args) == "CORRECT"


def test_render_json_matches_the_list() -> None:
    import json

    rounded = round_for_wire(np.random.default_rng(1).uniform(1, 1e5, size=(50, 61)))
    assert json.loads(render_json(REQ, rounded)) == [REQ.start_ts, 60, *rounded.tolist()]


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1.0])
def test_garbage_prices_are_refused(bad: float) -> None:
    paths = np.full((50, 61), 2.0)
    paths[3, 7] = bad
    with pytest.raises(ResponseError):
        build_response(REQ, paths)


def test_wrong_shape_and_header_are_refused() -> None:
    with pytest.raises(ResponseError, match="shape"):
        check_paths(round_for_wire(np.ones((49, 61))), REQ)
    args = (REQ.start_ts, REQ.time_increment, REQ.time_length, REQ.num_simulations)
    for position, value in ((0, float(REQ.start_ts)), (1, 300)):  # what the validators refuse in a header
        response = build_response(REQ, np.ones((50, 61)))
        response[position] = value
        assert validate_response_head(response, *args) != "CORRECT"
        assert validate_response_upstream(response, *args) != "CORRECT"


def test_prices_below_1e_4_keep_the_4_significant_digits_head_allows() -> None:
    # Below 1e-4 str() prints "1.2345e-05": the four characters of "e-05" leave HEAD four of its eight.
    import json

    prices = 10.0 ** np.random.default_rng(2).uniform(-18, -3.5, size=(50, 61))
    rounded = round_for_wire(prices)
    assert np.allclose(rounded, prices, rtol=5e-4, atol=0)
    assert round_for_wire(np.array([1.23456789e-5, 9.87654321e-13])).tolist() == [1.235e-5, 9.877e-13]
    check_paths(rounded, REQ)
    response = json.loads(render_json(REQ, rounded))
    args = (REQ.start_ts, REQ.time_increment, REQ.time_length, REQ.num_simulations)
    assert validate_response_head(response, *args) == "CORRECT"
    assert validate_response_upstream(response, *args) == "CORRECT"


def test_a_meme_coin_forecast_is_served() -> None:
    # Any asset with price files may be forecast (core.batch): one trading at 1e-6 was refused outright.
    close = 1.2e-6 * np.exp(np.cumsum(np.random.default_rng(3).normal(0, 0.004, 3_000)))
    m1 = PriceHistory.from_arrays(60, np.arange(close.size) * 60, close)
    snap = MarketSnapshot("PEPE", m1, None, float(close[-1]), int(m1.ts[-1]) + 60)
    for inc, length in ((300, 86_400), (60, 3_600)):
        request = ForecastRequest("PEPE", int(m1.ts[-1]) + 120, inc, length, 1000)
        response = build_response(request, EwmaTEngine().forecast(request, snap, np.random.default_rng(0)))
        args = (request.start_ts, inc, length, 1000)
        assert validate_response_head(response, *args) == "CORRECT"
        assert validate_response_upstream(response, *args) == "CORRECT"


def test_a_price_of_ten_million_or_more_is_refused_not_sent() -> None:
    """From 1e7 up ``str()`` prints 9 digit characters ("15000000.0"), which HEAD rejects: such a reply must be
    refused by the self-check (the fallback or an error answers), never sent to fail validation."""
    paths = np.full((50, 61), 9_999_999.0)
    args = (REQ.start_ts, REQ.time_increment, REQ.time_length, REQ.num_simulations)
    assert validate_response_head(build_response(REQ, paths), *args) == "CORRECT"  # the largest that passes
    paths[3, 7] = 1.5e7
    assert head_point_error(float(round_for_wire(paths)[3, 7])) is not None  # what HEAD would say
    with pytest.raises(ResponseError, match="must lie in"):
        build_response(REQ, paths)

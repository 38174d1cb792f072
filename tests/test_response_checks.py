"""core.response_checks: each rejection rule of the HEAD and UPSTREAM validators."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import numpy as np
import pytest

from core.response_checks import (
    CORRECT,
    ERROR_DURING_VALIDATION,
    proven_valid,
    validate_response_head,
    validate_response_upstream,
)

START = 1_672_531_200
TI, TL, N = 1, 10, 2  # 11 points per path, 2 paths
Check = Callable[[object, int, int, int, int], str]
HEAD: Check = validate_response_head
UPSTREAM: Check = validate_response_upstream
BOTH = pytest.mark.parametrize("check", [HEAD, UPSTREAM], ids=["head", "upstream"])


def response(*paths: object, start: object = START, inc: object = TI) -> list[object]:
    return [start, inc, *paths]


def good_path() -> list[float]:
    return [123.45] * (TL // TI + 1)


def run(check: Check, resp: object, n: int = N) -> str:
    return check(resp, START, TI, TL, n)


def with_point(value: object, n_paths: int = 1) -> list[object]:
    path: list[object] = [value, 123.45, 123.45]
    return [START, TI, *([path] * n_paths)]


def single(check: Check, value: object) -> str:
    # one path of 3 points
    return check(with_point(value), START, TI, 2, 1)


# ---------------------------------------------------------------- structure, both rule sets


@BOTH
def test_correct_list_and_tuple_responses(check: Check) -> None:
    assert run(check, response(good_path(), good_path())) == CORRECT
    assert run(check, tuple(response(good_path(), good_path()))) == CORRECT


@BOTH
@pytest.mark.parametrize("resp", [None, [], ()])
def test_empty(check: Check, resp: object) -> None:
    assert run(check, resp) == "Response is empty"


@BOTH
def test_not_a_sequence(check: Check) -> None:
    assert run(check, {"paths": []}) == "Response format is incorrect: expected tuple or list, got <class 'dict'>"


@BOTH
def test_one_element_response_is_an_error_during_validation(check: Check) -> None:
    assert run(check, [START]) == ERROR_DURING_VALIDATION


@BOTH
def test_float_start_ts_rejected(check: Check) -> None:
    resp = response(good_path(), good_path(), start=float(START))
    assert run(check, resp) == "Start time format is incorrect: expected int, got <class 'float'>"


@BOTH
def test_string_time_increment_rejected(check: Check) -> None:
    resp = response(good_path(), good_path(), inc="1")
    assert run(check, resp) == "Time increment format is incorrect: expected int, got <class 'str'>"


@BOTH
def test_bool_start_ts_passes_the_type_check_but_not_the_value(check: Check) -> None:
    resp = response(good_path(), good_path(), start=True)
    assert run(check, resp) == f"Start time timestamp is incorrect: expected {START}, got True"


@BOTH
def test_wrong_start_and_increment_values(check: Check) -> None:
    assert run(check, response(good_path(), good_path(), start=START + 60)) == (
        f"Start time timestamp is incorrect: expected {START}, got {START + 60}"
    )
    assert run(check, response(good_path(), good_path(), inc=2)) == "Time increment is incorrect: expected 1, got 2"


@BOTH
def test_wrong_number_of_paths(check: Check) -> None:
    assert run(check, response(good_path())) == "Number of paths is incorrect: expected 2, got 1"
    assert run(check, response()) == "Number of paths is incorrect: expected 2, got 0"


@BOTH
def test_tuple_path_rejected(check: Check) -> None:
    resp = response(good_path(), tuple(good_path()))
    assert run(check, resp) == "Path format is incorrect: expected list, got <class 'tuple'>"


@BOTH
def test_wrong_path_length(check: Check) -> None:
    resp = response(good_path(), good_path()[:-1])
    assert run(check, resp) == "Number of time points is incorrect: expected 11, got 10"


@BOTH
def test_string_point_rejected(check: Check) -> None:
    assert single(check, "123.45") == "Price format is incorrect: expected int or float, got <class 'str'>"


@BOTH
def test_none_point_rejected(check: Check) -> None:
    assert single(check, None) == "Price format is incorrect: expected int or float, got <class 'NoneType'>"


def test_shape_before_points_only_upstream() -> None:
    # Path 0 has a bad point, path 1 a bad length: HEAD walks path by path,
    # UPSTREAM shape-checks every path before any point.
    bad_point = good_path()
    bad_point[3] = 123.456789
    resp = response(bad_point, good_path()[:-1])
    assert run(HEAD, resp) == "Price format is incorrect: too many digits 123.456789"
    assert run(UPSTREAM, resp) == "Number of time points is incorrect: expected 11, got 10"


# ---------------------------------------------------------------- HEAD digit rule (printed characters)


@pytest.mark.parametrize(
    ("value", "head_ok", "upstream_ok"),
    [
        (0.12345678, False, True),  # the leading "0" counts for HEAD
        (-12345.678, False, True),  # so does the sign
        (12345678.0, False, True),  # "12345678.0" -> 9 characters
        (123456789, False, False),
        (1234567.8, True, True),
        (-1234567, True, True),
        (-12345678, False, True),
        (0.0, True, True),
        (1e-05, True, True),  # "1e-05": 5 characters
        (float("nan"), True, False),
        (float("inf"), True, False),
        (float("-inf"), True, False),
        (1e40, True, False),  # "1e+40" for HEAD, beyond float32 for UPSTREAM
        (1e-300, True, False),  # "1e-300": 6 characters, but underflows float32
        (True, True, False),  # a bool is an int for HEAD
        (10**400, False, False),
    ],
)
def test_point_rules_differ(value: object, head_ok: bool, upstream_ok: bool) -> None:
    assert (single(HEAD, value) == CORRECT) is head_ok
    assert (single(UPSTREAM, value) == CORRECT) is upstream_ok


def test_head_messages() -> None:
    assert single(HEAD, 0.12345678) == "Price format is incorrect: too many digits 0.12345678"
    assert single(HEAD, -12345678) == "Price format is incorrect: too many digits -12345678"


# ---------------------------------------------------------------- UPSTREAM point rule


def reference_verdict(point: object) -> str:
    """The UPSTREAM per-point rule restated with struct, as the validator does it."""
    if isinstance(point, bool) or not isinstance(point, (int, float)):
        return f"Price format is incorrect: expected int or float, got {type(point)}"
    try:
        value = float(point)
    except OverflowError:
        return f"Price format is incorrect: too many digits {point}"
    if not math.isfinite(value):
        return f"Price format is incorrect: non-finite value {point}"
    try:
        f32 = struct.unpack("<f", struct.pack("<f", value))[0]
    except OverflowError:
        return f"Price format is incorrect: exceeds float32 range {point}"
    if f32 == 0.0 and value != 0.0:
        return f"Price format is incorrect: underflows float32 {point}"
    if float(f"{value:.7e}") != value:
        return f"Price format is incorrect: too many digits {point}"
    return CORRECT


EDGE_VALUES: list[object] = [
    123.45678, 123.456789, 1234567.8, 9999999.5, 9999999.25, 12345678.0, 10000000.0, 1.0, 0.5,
    0.0001234, 0.00012345678, 0.000123456789, 1e-05, 1.2345e-05, 1.23456789e-05, 1e16, 1.2345e20,
    1.23456789e20, 12345678, 123456789, 99999999, 100000000, 0, 1, -123.45, -1234567.8, -123.456789,
    -99999999, float("nan"), float("inf"), float("-inf"), 0.1 + 0.2, 2**53 + 1.0, 5e-324, 1e-20, 1e20,
    10**400, 3.4e38, 3.5e38, 1e39, -1e39, 1e300, 1e-45, 1e-300, 1e-15, 1e30, 9.9999999e29, 99999999.6,
    3.4028235e38, 3.4028236e38, 1.1754944e-38, 2**64 - 1,
]


@pytest.mark.parametrize("value", EDGE_VALUES, ids=repr)
def test_upstream_matches_reference_rule(value: object) -> None:
    assert single(UPSTREAM, value) == reference_verdict(value)


def test_upstream_messages() -> None:
    assert single(UPSTREAM, float("nan")) == "Price format is incorrect: non-finite value nan"
    assert single(UPSTREAM, 1e39) == "Price format is incorrect: exceeds float32 range 1e+39"
    assert single(UPSTREAM, 1e-300) == "Price format is incorrect: underflows float32 1e-300"
    assert single(UPSTREAM, True) == "Price format is incorrect: expected int or float, got <class 'bool'>"


def test_upstream_bool_hidden_among_floats_and_zero_one_still_valid() -> None:
    check = UPSTREAM
    assert check([START, TI, [123.45, True, 123.45]], START, TI, 2, 1).endswith("<class 'bool'>")
    assert check([START, TI, [True, False, True]], START, TI, 2, 1).endswith("<class 'bool'>")
    assert check([START, TI, [1.0, 0.0, 1, 0]], START, TI, 3, 1) == CORRECT


def test_upstream_point_that_is_a_list() -> None:
    resp = [START, TI, [[1.0, 2.0], [3.0, 4.0]]]
    assert UPSTREAM(resp, START, TI, 1, 1) == "Price format is incorrect: expected int or float, got <class 'list'>"


def test_upstream_reports_first_offender_in_scan_order() -> None:
    resp = [START, TI, [1e-20, 123.456789, 999.9999999], [999.9999999, 1.0, 2.0]]
    assert UPSTREAM(resp, START, TI, 2, 2) == "Price format is incorrect: too many digits 123.456789"


def test_proven_valid_never_proves_an_invalid_point() -> None:
    rng = np.random.default_rng(11)
    mags = 10.0 ** rng.uniform(-40, 40, size=20_000)
    raw = mags * rng.choice([-1.0, 1.0], size=mags.size)
    eight = np.array([float(f"{v:.7e}") for v in raw])  # valid unless out of float32 range
    nine = np.array([float(f"{v:.8e}") for v in raw])  # mostly invalid
    values = np.concatenate([raw, eight, nine])
    proven = proven_valid(values)
    verdicts = np.array([reference_verdict(float(v)) == CORRECT for v in values])
    assert not np.any(proven & ~verdicts)
    # ...and proves nearly every valid point inside its band, so the scalar fallback stays rare.
    band = (np.abs(values) >= 1e-14) & (np.abs(values) <= 1e29)
    assert proven[band & verdicts].mean() > 0.999


def test_upstream_equals_reference_on_random_paths() -> None:
    rng = np.random.default_rng(12)
    for _ in range(200):
        values = [float(f"{v:.7e}") for v in 10.0 ** rng.uniform(-20, 35, size=5)]
        values[int(rng.integers(5))] = float(10.0 ** rng.uniform(-50, 50))  # one arbitrary point
        first_error = next((v for v in map(reference_verdict, values) if v != CORRECT), CORRECT)
        assert UPSTREAM([START, TI, values], START, TI, 4, 1) == first_error


# ---------------------------------------------------------------- full-size response


def full_size_response(ti: int, tl: int) -> list[object]:
    rng = np.random.default_rng(13)
    n_points = tl // ti + 1
    paths = 97_123.4 * np.cumprod(1 + rng.normal(0, 1e-3, size=(1000, n_points)), axis=1)
    rounded = [[float(f"{v:.7e}") for v in row] for row in paths]  # 8 significant digits
    return [START, ti, *rounded]


@pytest.mark.parametrize(("ti", "tl"), [(300, 86_400), (60, 3_600)])
def test_full_size_rounded_response_passes_both(ti: int, tl: int) -> None:
    resp = full_size_response(ti, tl)
    assert validate_response_head(resp, START, ti, tl, 1000) == CORRECT
    assert validate_response_upstream(resp, START, ti, tl, 1000) == CORRECT

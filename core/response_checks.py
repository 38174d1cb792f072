"""The validators' response-format checks, re-implemented to test our output against.

``validate_response_head`` follows mode-network/synth-subnet ``response_validation_v2``
(HEAD); ``validate_response_upstream`` follows synthdataco/synth-subnet @6bbb152 (PR #301).
Both return ``"CORRECT"`` or the validator's error string. The process-time check
(a timeout) is the caller's business and is left out. An exception inside the checks
is what the validator's caller stores as ``"error during validation"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import numpy.typing as npt

CORRECT = "CORRECT"
ERROR_DURING_VALIDATION = "error during validation"
MAX_SIGNIFICANT_DIGITS = 8

# Exact powers of ten (1e0 .. 1e22 are all representable in float64).
_POW10 = np.array([float(f"1e{k}") for k in range(23)], dtype=np.float64)


def _guarded(check: Callable[[], str]) -> str:
    try:
        return check()
    except Exception:  # noqa: BLE001 - the validator's forward() does the same
        return ERROR_DURING_VALIDATION


def _header_error(
    response: object, start_ts: int, time_increment: int, num_simulations: int
) -> str | None:
    """Checks shared by both rule sets, in the validators' order."""
    if response is None:
        return "Response is empty"
    if not isinstance(response, (tuple, list)):
        return f"Response format is incorrect: expected tuple or list, got {type(response)}"
    if len(response) == 0:
        return "Response is empty"
    # bool passes here, as in the validator; response[1] raises IndexError on a 1-element response.
    if not isinstance(response[0], int):
        return f"Start time format is incorrect: expected int, got {type(response[0])}"
    if not isinstance(response[1], int):
        return f"Time increment format is incorrect: expected int, got {type(response[1])}"
    if response[0] != start_ts:
        return f"Start time timestamp is incorrect: expected {start_ts}, got {response[0]}"
    if response[1] != time_increment:
        return f"Time increment is incorrect: expected {time_increment}, got {response[1]}"
    n_paths = len(response[2:])
    if n_paths != num_simulations:
        return f"Number of paths is incorrect: expected {num_simulations}, got {n_paths}"
    return None


def _path_shape_error(path: object, n_points: int) -> str | None:
    if not isinstance(path, list):
        return f"Path format is incorrect: expected list, got {type(path)}"
    if len(path) != n_points:
        return f"Number of time points is incorrect: expected {n_points}, got {len(path)}"
    return None


# ---------------------------------------------------------------- HEAD


def head_point_error(point: object) -> str | None:
    """HEAD's per-point rule: int or float, at most 8 characters once dots are removed."""
    if not isinstance(point, (int, float)):
        return f"Price format is incorrect: expected int or float, got {type(point)}"
    # Counts printed characters: a sign and a leading "0" count, "nan"/"inf" pass.
    if len(str(point).replace(".", "")) > MAX_SIGNIFICANT_DIGITS:
        return f"Price format is incorrect: too many digits {point}"
    return None


def validate_response_head(
    response: object, start_ts: int, time_increment: int, time_length: int, num_simulations: int
) -> str:
    def check() -> str:
        error = _header_error(response, start_ts, time_increment, num_simulations)
        if error:
            return error
        items = cast(Sequence[object], response)
        n_points = time_length // time_increment + 1
        # Path by path: a bad point in path 0 wins over a bad shape in path 5.
        for path in items[2:]:
            error = _path_shape_error(path, n_points)
            if error:
                return error
            for point in cast(list[object], path):
                error = head_point_error(point)
                if error:
                    return error
        return CORRECT

    return _guarded(check)


# ---------------------------------------------------------------- UPSTREAM


def upstream_point_error(point: object) -> str | None:
    """UPSTREAM's per-point rule: int/float but not bool, finite, float32-representable
    without overflow or underflow to 0, at most 8 significant digits."""
    if isinstance(point, bool) or not isinstance(point, (int, float)):
        return f"Price format is incorrect: expected int or float, got {type(point)}"
    try:
        value = float(point)
    except OverflowError:  # int beyond float64
        return f"Price format is incorrect: too many digits {point}"
    if not math.isfinite(value):
        return f"Price format is incorrect: non-finite value {point}"
    # The validator packs into float32 with struct: the same C cast, which only
    # overflows where the rounded value is inf.
    with np.errstate(over="ignore", under="ignore"):
        as_float32 = float(np.float32(value))
    if math.isinf(as_float32):
        return f"Price format is incorrect: exceeds float32 range {point}"
    if as_float32 == 0.0 and value != 0.0:
        return f"Price format is incorrect: underflows float32 {point}"
    if float(f"{value:.{MAX_SIGNIFICANT_DIGITS - 1}e}") != value:
        return f"Price format is incorrect: too many digits {point}"
    return None


def proven_valid(values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Vectorised sufficient test for the UPSTREAM point rule.

    True only where the value is exactly the float64 nearest to a decimal of at most
    8 significant digits (scaled by an exact power of ten, rounded to an integer
    mantissa, scaled back with one correctly rounded operation), inside [1e-15, 1e30)
    where float32 neither overflows nor underflows. False means "check the point with
    the scalar rule", never "invalid". 0 and 1 are never proven: they may be bools that
    numpy coerced, and only the original object can tell.
    """
    candidate = np.isfinite(values) & (values != 0.0) & (values != 1.0)
    magnitude = np.where(candidate, np.abs(values), 1.0)
    shift = (MAX_SIGNIFICANT_DIGITS - 1) - np.floor(np.log10(magnitude)).astype(np.int64)
    candidate &= np.abs(shift) <= 22
    power = _POW10[np.minimum(np.abs(shift), 22)]
    up = shift >= 0
    with np.errstate(over="ignore", invalid="ignore"):  # the unused np.where branch may overflow
        mantissa = np.rint(np.where(up, magnitude * power, magnitude / power))
        back = np.where(up, mantissa / power, mantissa * power)
    proven: npt.NDArray[np.bool_] = candidate & (mantissa < 10.0**MAX_SIGNIFICANT_DIGITS) & (
        back == magnitude
    )
    return proven


def _upstream_points_error(paths: Sequence[list[object]]) -> str | None:
    try:
        matrix = np.asarray(paths)
    except ValueError:  # a point that is itself a sequence, ragged
        matrix = None
    if matrix is None or matrix.ndim != 2 or matrix.dtype.kind not in "iuf":
        for path in paths:
            for point in path:
                error = upstream_point_error(point)
                if error:
                    return error
        return None
    proven = proven_valid(matrix.astype(np.float64, copy=False))
    if proven.all():
        return None
    # Row-major order of np.nonzero is the scan order: the first offender wins.
    for i, j in zip(*np.nonzero(~proven)):
        error = upstream_point_error(paths[int(i)][int(j)])
        if error:
            return error
    return None


def validate_response_upstream(
    response: object, start_ts: int, time_increment: int, time_length: int, num_simulations: int
) -> str:
    def check() -> str:
        error = _header_error(response, start_ts, time_increment, num_simulations)
        if error:
            return error
        items = cast(Sequence[object], response)
        n_points = time_length // time_increment + 1
        paths = items[2:]
        # Every path's shape is checked before any point.
        for path in paths:
            error = _path_shape_error(path, n_points)
            if error:
                return error
        error = _upstream_points_error(cast(Sequence[list[object]], paths))
        return error or CORRECT

    return _guarded(check)

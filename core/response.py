"""Turning paths into the validator's response, and refusing to send one that would fail validation.

Wire format: ``[start_ts, time_increment, path_1, ..., path_N]``, each path a list of
``time_length // time_increment + 1`` prices. Validators (HEAD) count the printed digit characters of
each price (``len(str(p).replace(".", "")) <= 8``, a leading ``0`` counts); UPSTREAM asks for at most
8 significant digits, finite, float32-representable values. Rounding to the digit budget below
satisfies both for every price in (1e-18, 1e7): below 1e-4 ``str()`` prints ``1.234e-05``, whose
``e-05`` leaves HEAD 4 digits (a meme coin at 1e-6 keeps 4 significant digits). From 1e7 up no float
passes HEAD ("12345678.0" has 9 characters), so such a price is refused.
"""

from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from core.constants import SIGNIFICANT_DIGITS
from core.prompts import ForecastRequest

FloatArray = npt.NDArray[np.float64]

# From WIRE_MIN up the 4-digit rounding divides by at most 10**22, the largest power of ten exact in float64
# (by 10**23 the quotient may miss the nearest double to the kept digits); from WIRE_MAX up str() has 9 characters.
WIRE_MIN, WIRE_MAX = 1e-18, 1e7
SCI_EXPONENT = -4  # str() switches to scientific notation below 10**SCI_EXPONENT...
SCI_DIGITS = 4  # ...where "e-05" takes 4 of HEAD's 8 characters


class ResponseError(ValueError):
    """A reply that a validator would reject; it is never sent."""


_POW10 = 10.0 ** np.arange(-30, 31)  # table lookup: np.power per element is the slow part
_POW10_OFFSET = 30


def round_for_wire(prices: npt.ArrayLike) -> FloatArray:
    """Vectorised rounding to the digit budget; exact decimal results (integer / power of ten)."""
    a = np.asarray(prices, dtype=np.float64)
    if not (np.all(np.isfinite(a)) and np.all(a > 0)):
        raise ResponseError("prices must be finite and > 0 before rounding")
    exponent = np.floor(np.log10(a)).astype(np.int64)
    # decimals = budget - 1 - exponent, which is 7 below 1 and 7 - exponent from 1 up;
    # in scientific notation (below 1e-4) 4 significant digits: 3 - exponent.
    decimals = np.where(exponent < SCI_EXPONENT, SCI_DIGITS - 1 - exponent,
                        SIGNIFICANT_DIGITS - 1 - np.maximum(exponent, 0))
    decimals = np.clip(decimals, -_POW10_OFFSET, _POW10_OFFSET)
    scale = _POW10.take(decimals + _POW10_OFFSET)
    # Dividing an integer-valued float by a power of ten is correctly rounded, so repr() prints
    # exactly the kept digits; multiplying by 10**-k would not be.
    rounded: FloatArray = np.round(a * scale) / scale
    return rounded


def check_paths(rounded: FloatArray, request: ForecastRequest) -> None:
    """Vectorised check of the point rules of both rule sets on the rounded price matrix."""
    expected = (request.num_simulations, request.n_points)
    if rounded.shape != expected:
        raise ResponseError(f"paths have shape {rounded.shape}, expected {expected}")
    if not np.all(np.isfinite(rounded)):
        raise ResponseError("paths contain NaN or inf")
    if not (np.all(rounded > WIRE_MIN) and np.all(rounded < WIRE_MAX)):
        raise ResponseError(f"prices must lie in ({WIRE_MIN}, {WIRE_MAX})")
    if not np.array_equal(round_for_wire(rounded), rounded):
        raise ResponseError("prices carry more digits than validators accept")


def build_response(request: ForecastRequest, paths: npt.ArrayLike) -> list[Any]:
    """The checked response as Python lists (ints first, then lists of floats)."""
    rounded = round_for_wire(paths)
    check_paths(rounded, request)
    response: list[Any] = [int(request.start_ts), int(request.time_increment)]
    response.extend(rounded.tolist())
    return response


def render_json(request: ForecastRequest, rounded: FloatArray) -> bytes:
    """The response as compact JSON bytes, from the rounded matrix without building Python floats."""
    head = orjson.dumps([int(request.start_ts), int(request.time_increment)])
    body = orjson.dumps(rounded, option=orjson.OPT_SERIALIZE_NUMPY)
    return head[:-1] + b"," + body[1:]

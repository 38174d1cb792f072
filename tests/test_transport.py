import numpy as np
import pytest

from core.transport import TransportError, decode_paths, encode_error, encode_paths


def test_round_trip_is_exact_float32() -> None:
    paths = np.random.default_rng(0).uniform(1, 1e5, size=(1000, 289)).astype(np.float32)
    blob = encode_paths(paths)
    assert len(blob) < 1000 * 289 * 4 + 16
    assert np.array_equal(decode_paths(blob), paths)


def test_errors_and_garbage_are_typed() -> None:
    with pytest.raises(TransportError, match="worker error: boom"):
        decode_paths(encode_error("boom"))
    with pytest.raises(TransportError):
        decode_paths(b"junk")
    with pytest.raises(TransportError, match="does not hold"):
        decode_paths(encode_paths(np.ones((3, 4), np.float32))[:-4])

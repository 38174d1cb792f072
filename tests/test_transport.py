import numpy as np
import pytest

from core.transport import TransportError, decode_paths, decode_result, encode_error, encode_paths


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
    with pytest.raises(TransportError, match="does not hold"):  # trailing bytes: not the shape it names
        decode_paths(encode_paths(np.ones((3, 4), np.float32)) + bytes(4))


def test_the_engine_and_its_stand_in_reason_travel_with_the_paths() -> None:
    paths = np.arange(12, dtype=np.float32).reshape(3, 4)
    served = decode_result(encode_paths(paths, "patchtst"))
    assert (served.engine, served.fallback_reason) == ("patchtst", None)
    assert np.array_equal(served.paths, paths)
    stood_in = decode_result(encode_paths(paths, "ewma_t", "patchtst: need 576 returns, history has 12 — é"))
    assert stood_in.engine == "ewma_t"
    assert stood_in.fallback_reason == "patchtst: need 576 returns, history has 12 — é"
    assert np.array_equal(stood_in.paths, paths)
    long = decode_result(encode_paths(paths, "ewma_t", "é" * 5000))  # cut, on a character boundary
    assert long.fallback_reason is not None and set(long.fallback_reason) == {"é"} and len(long.fallback_reason) < 1000


def test_an_earlier_workers_untagged_blob_is_still_read() -> None:
    """A miner upgraded before its workers reads their P1 blobs: the engine is unknown, the paths intact."""
    paths = np.random.default_rng(1).uniform(1, 10, size=(5, 7)).astype(np.float32)
    blob = b"P1" + np.asarray(paths.shape, dtype="<i4").tobytes() + paths.astype("<f4").tobytes()
    served = decode_result(blob)
    assert (served.engine, served.fallback_reason) == ("", None)
    assert np.array_equal(served.paths, paths)


def test_a_tag_length_that_overruns_the_blob_is_refused() -> None:
    blob = bytearray(encode_paths(np.ones((2, 2), np.float32), "patchtst"))
    blob[10:14] = np.asarray([10_000], dtype="<i4").tobytes()  # the tag length field
    with pytest.raises(TransportError, match="tag of 10000 bytes"):
        decode_result(bytes(blob))
    with pytest.raises(TransportError, match="shorter than its header"):
        decode_result(b"P2" + bytes(6))
    with pytest.raises(TransportError, match="NUL"):
        encode_paths(np.ones((2, 2), np.float32), "a\0b")

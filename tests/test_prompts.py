import time
from datetime import datetime

import pytest

from core.prompts import RequestError, check_request, parse_start_time


def check(**overrides: object):  # type: ignore[no-untyped-def]
    fields = {"asset": "BTC", "start_time": "2026-01-01T00:01:00+00:00", "time_increment": 300,
              "time_length": 86_400, "num_simulations": 1000, **overrides}
    return check_request(max_num_simulations=10_000, **fields)  # type: ignore[arg-type]


def test_valid_lf_and_hf_requests() -> None:
    lf = check()
    assert (lf.n_steps, lf.n_points, lf.is_hf, lf.start_ts) == (288, 289, False, 1767225660)
    hf = check(time_increment=60, time_length=3_600)
    assert (hf.n_points, hf.is_hf, hf.prompt.name) == (61, True, "high")


def test_start_time_forms() -> None:
    assert parse_start_time("2026-01-01T00:01:00Z") == 1767225660
    assert parse_start_time("2026-01-01T00:01:00") == 1767225660  # naive = UTC
    assert parse_start_time("2026-01-01T01:01:00+01:00") == 1767225660


@pytest.mark.parametrize("overrides,needle", [
    ({"asset": "DOGE"}, "unknown asset"),
    ({"asset": 5}, "unknown asset"),
    ({"time_length": 86_401}, "not a multiple"),
    ({"time_increment": 0}, "positive"),
    ({"time_increment": 120, "time_length": 3_600}, "unsupported grid"),
    ({"num_simulations": 0}, "num_simulations"),
    ({"num_simulations": 10_001}, "num_simulations"),
    ({"num_simulations": True}, "integer"),
    ({"time_length": "86400"}, "integer"),
    ({"start_time": "garbage"}, "ISO-8601"),
    ({"start_time": ""}, "ISO-8601"),
    ({"start_time": None}, "ISO-8601"),
])
def test_bad_requests_raise_clear_errors(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(RequestError, match=needle):
        check(**overrides)


def test_identical_requests_share_a_key() -> None:
    assert check().key() == check(start_time="2026-01-01T00:01:00Z").key()
    assert check().key() != check(asset="ETH").key()


def test_the_largest_allowed_path_count_is_served() -> None:
    """``max_num_simulations`` is the largest count served, not the first refused: with it set to the validators'
    1000, an off-by-one there refused every real request."""
    assert check(num_simulations=10_000).num_simulations == 10_000
    served = check_request("BTC", "2026-01-01T00:01:00+00:00", 300, 86_400, 1000, max_num_simulations=1000)
    assert served.num_simulations == 1000


def test_start_ts_is_the_validators_truncated_timestamp() -> None:
    """The validator expects ``response[0] == int(datetime.fromisoformat(start_time).timestamp())``: a start time
    with a fraction of a second is truncated, as theirs is, not rounded to the next second."""
    for text in ("2026-01-01T00:01:00.9+00:00", "2026-01-01T00:01:00.5+00:00", "2026-01-01T00:00:59.999999Z"):
        expected = int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
        assert parse_start_time(text) == expected, text
    assert parse_start_time("2026-01-01T00:01:00.9") == 1767225660


def test_a_naive_start_time_is_utc_whatever_the_hosts_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Naive times are UTC, as the validators' are: read in the host's zone, a miner on a machine set to local
    time answered with a start timestamp hours off, which every validator rejects."""
    monkeypatch.setenv("TZ", "IST-5:30")  # a POSIX zone: no tzdata needed
    time.tzset()
    try:
        assert parse_start_time("2026-01-01T00:01:00") == 1767225660
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("text", ["0001-01-01T00:00:00+01:00", "1969-12-31T23:59:59Z", "9999-12-31T23:30:00-01:00"])
def test_a_start_time_no_utc_datetime_holds_is_refused_by_the_miner_as_by_the_worker(text: str) -> None:
    """The worker rebuilds the request from its start_ts as a UTC time: a start the miner accepted but the
    worker could not rebuild always fell back. Both now refuse it, with the same message."""
    from workers.tasks import checked_request

    with pytest.raises(RequestError, match="outside 1970-01-01 to 9999-12-31 UTC"):
        check(start_time=text)
    edge = check(start_time="9999-12-31T23:59:59Z")
    request = {"asset": edge.asset, "start_ts": edge.start_ts, "time_increment": edge.time_increment,
               "time_length": edge.time_length, "num_simulations": edge.num_simulations}
    assert checked_request(request, 1000) == edge

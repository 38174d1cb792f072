"""benchmarks/chaos.py's arguments (the soak itself is a benchmark, run by hand: python -m benchmarks.chaos)."""

import pytest

from benchmarks.chaos import parse_args, schedule


def test_default_schedule_fits_six_minutes() -> None:
    args = parse_args([])
    phases = schedule(args.lanes * 3)
    assert {"worker-kill9", "worker-sigstop", "redis-restart-kept", "redis-restart-empty", "redis-sigstop",
            "cpu-hog", "beat-kill9", "burst-4x", "together"} <= {p.name for p in phases}
    # Phases and warm-up; the stack's start (~10 s) and the last replies' judging come on top.
    assert args.warm_up + sum(p.seconds for p in phases) * args.scale <= 300


def test_unknown_phase_or_bad_numbers_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--only", "baseline,cpu-hog", "--scale", "2"]).only == "baseline,cpu-hog"
    with pytest.raises(SystemExit):
        parse_args(["--only", "baseline,meteor"])
    assert "unknown phase(s) ['meteor']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--lanes", "1"])
    assert "--lanes must be at least 2" in capsys.readouterr().err

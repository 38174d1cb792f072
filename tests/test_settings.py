"""Settings refuse values the miner cannot serve with, and the CLI says so in one line."""

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from core.settings import Settings
from synth_miner.cli import app


@pytest.mark.parametrize("bad", [{"engine": "bogus"}, {"axon_port": 99_999}, {"log_level": "LOUD"},
                                 {"seed": -1}, {"calibration_engine": "nope"}])
def test_unservable_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, **bad)  # type: ignore[arg-type]


def test_log_level_is_case_insensitive() -> None:
    assert Settings(_env_file=None, log_level="debug").log_level == "DEBUG"  # type: ignore[call-arg,arg-type]


def test_cli_turns_a_bad_setting_into_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNTH_ENGINE", "bogus")
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 2 and "engine" in result.output and "Traceback" not in result.output


def test_workers_and_beat_need_a_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SYNTH_REDIS_URL", raising=False)
    for command in ("worker", "beat"):
        result = CliRunner().invoke(app, [command])
        assert result.exit_code == 2 and "SYNTH_REDIS_URL" in result.output, result.output


def test_status_fails_when_the_fleet_cannot_be_read() -> None:
    down = CliRunner().invoke(app, ["status", "--redis-url", "redis://127.0.0.1:1/0"])
    assert down.exit_code == 1 and "redis" in down.output
    garbage = CliRunner().invoke(app, ["status", "--redis-url", "notaurl"])
    assert garbage.exit_code == 1 and "Traceback" not in garbage.output

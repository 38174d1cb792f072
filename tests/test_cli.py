"""The process commands of ``synth-miner`` (worker, beat, flower) refuse what would quietly go wrong."""

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synth_miner.cli import app

runner = CliRunner()


def test_flower_without_a_redis_url_is_refused_like_the_worker_and_beat(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    """Without SYNTH_REDIS_URL the Celery app falls back to this host's default Redis: Flower would watch a
    fleet that is not there (or someone else's) instead of saying what is missing."""
    import workers.app

    started: list[list[str]] = []
    monkeypatch.setattr(workers.app.app, "start", lambda argv: started.append(argv))
    monkeypatch.delenv("SYNTH_REDIS_URL", raising=False)
    monkeypatch.setenv("SYNTH_FLOWER_PASSWORD", "pw")
    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    result = runner.invoke(app, ["flower"])
    assert result.exit_code == 2 and not started, result.output
    assert "SYNTH_REDIS_URL" in result.output


def test_flower_with_an_empty_password_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``SYNTH_FLOWER_PASSWORD=`` (an empty line in .env) is no password: Flower must not start with the
    basic auth ``admin:`` that anyone can type."""
    import workers.app

    started: list[list[str]] = []
    monkeypatch.setattr(workers.app.app, "start", lambda argv: started.append(argv))
    monkeypatch.setenv("SYNTH_FLOWER_PASSWORD", "")
    monkeypatch.delenv("SYNTH_REDIS_URL", raising=False)  # restored afterwards, whatever the command sets
    monkeypatch.chdir(tmp_path)  # no .env from the checkout
    result = runner.invoke(app, ["flower", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 2 and not started, result.output
    assert "SYNTH_FLOWER_PASSWORD" in result.output
    assert "SYNTH_REDIS_URL" not in os.environ  # a refused start changes nothing for the rest of the process

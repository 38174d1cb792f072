"""Logging set-up: our modules' warnings survive bittensor's import, which mutes existing loggers."""

import logging
from pathlib import Path

import pytest

from core.logs import setup_logging


def test_our_warnings_are_shown_after_bittensor_is_imported(restored_root: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import core.artifacts  # noqa: F401  (a module that logs, imported before bittensor as in serve)
    import miner.runtime  # noqa: F401  (imports bittensor)

    muted = logging.getLogger("core.artifacts")
    muted.setLevel(logging.CRITICAL)  # what bittensor's import does to every logger existing by then
    setup_logging("INFO")
    assert muted.getEffectiveLevel() == logging.INFO
    muted.warning("artifact refused")
    assert "artifact refused" in capsys.readouterr().err


def test_a_bittensor_line_is_written_once_and_as_json() -> None:
    """bittensor's own coloured console handler wrote every refused request a second time, which broke
    JSON logs; its lines now go through our handler only. (A fresh process: bittensor's console handler
    writes from a thread to the streams it found at import.)"""
    import json
    import subprocess
    import sys

    script = ("import time, bittensor\n"
              "from core.logs import setup_logging\n"
              "setup_logging('INFO', as_json=True)\n"
              "bittensor.logging.error('SynapseException: num_simulations must be in [1, 10000]')\n"
              "time.sleep(0.5)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "num_simulations" in line]
    assert len(lines) == 1, lines
    assert json.loads(lines[0])["logger"] == "bittensor"

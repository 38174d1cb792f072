"""Logging set-up: our modules' warnings survive bittensor's import, which mutes existing loggers."""

import logging

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

"""Shared fixtures: a private redis-server per test session, shared data, no internet."""

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from synth_miner.devstack import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """A clean database of the session's private server for each test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: CI places a copy of shared/ beside the checkout")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _no_internet() -> Iterator[None]:
    """bittensor looks up the machine's public IP on outside hosts; never let it."""
    os.environ.setdefault("SYNTH_LOG_LEVEL", "WARNING")
    from miner.offline import patch_bittensor_networking

    patch_bittensor_networking()
    yield


@pytest.fixture(autouse=True)
def _no_retry_after_holds() -> Iterator[None]:
    """Retry-After holds are process-wide (core.sources.holds): one test's 429 must not silence the next test's
    server should it get the same loopback port. Shared ones live in the test's Redis, emptied per test."""
    from core.sources.holds import HOST_HOLDS

    HOST_HOLDS.clear()
    yield
    HOST_HOLDS.clear()


@pytest.fixture
def restored_root() -> Iterator[None]:
    """Code under test (setup_logging, serve) installs its own root handler: put the old ones back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)

"""End to end, all real: redis-server, a Celery worker process, the miner's axon, a signed dendrite.

Then the faults of the walking skeleton: the worker stopped, and Redis stopped — replies stay valid
and in time (the in-process fallback answers).
"""

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.constants import LIVE_READERS_CHECK_S
from core.prompts import parse_start_time
from synth_miner.devstack import (
    Proc,
    Validator,
    assert_valid_reply,
    make_wallet,
    start_miner,
    start_time_in,
    start_worker,
)
from tests.conftest import RedisServer, free_port


class Stack:
    def __init__(self, tmp: Path, shared_data: Path) -> None:
        self.tmp = tmp
        wallets = tmp / "wallets"
        self.miner_wallet = make_wallet(wallets, "miner")
        self.validator_wallet = make_wallet(wallets, "validator")
        self.redis = RedisServer(tmp).start()
        self.port = free_port()
        self.env = {"SYNTH_REDIS_URL": self.redis.url, "SYNTH_WALLET_PATH": str(wallets),
                    "SYNTH_WALLET_NAME": "miner", "SYNTH_PRICE_PROVIDER": "replay",
                    "SYNTH_REPLAY_DIR": str(shared_data), "SYNTH_DATA_DIR": str(tmp / "data"),
                    "SYNTH_ARTIFACTS_DIR": str(tmp / "artifacts"), "SYNTH_LOG_LEVEL": "INFO",
                    "SYNTH_ALLOWED_HOTKEYS": f'["{self.validator_wallet.hotkey.ss58_address}"]'}
        self.worker: Proc | None = start_worker(tmp, self.env)
        self.miner = start_miner(tmp, self.port, self.env)

    def validator(self) -> Validator:
        return Validator(self.validator_wallet, self.miner_wallet.hotkey.ss58_address, self.port)

    def close(self) -> None:
        self.miner.stop()
        if self.worker:
            self.worker.stop()
        self.redis.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("celery-stack"), shared_data)
    yield s
    s.close()


SLOTS = itertools.count()  # every request its own start time: its own key and its own log line


def answered_from(stack: Stack, key: str) -> str:
    """Which part answered this request ("pool" or "fallback"), from its own line in the miner log."""
    marker = f"answered {key} from "
    sources = [line.split(marker, 1)[1].split()[0] for line in stack.miner.text().splitlines() if marker in line]
    assert len(sources) == 1, f"{key} answered {len(sources)} times in the miner log:\n{stack.miner.text()[-3000:]}"
    return sources[0]


async def ask_valid(stack: Stack, asset: str, increment: int, length: int, timeout: float) -> tuple[float, str]:
    """A valid reply in time; the seconds it took and which part answered it."""
    validator = stack.validator()
    start = start_time_in(120 + 60 * next(SLOTS))  # a repeated key would be served from the miner's done cache
    try:
        reply, seconds = await validator.ask(asset, increment, length, 1000, start_time=start, timeout=timeout)
    finally:
        await validator.close()
    assert_valid_reply(reply)
    assert seconds < timeout
    return seconds, answered_from(stack, f"{asset}:{parse_start_time(start)}:{increment}:{length}:1000")


@pytest.mark.parametrize("asset,increment,length", [("BTC", 300, 86_400), ("BTC", 60, 3_600)])
async def test_pool_answers_through_celery(stack: Stack, asset: str, increment: int, length: int) -> None:
    assert stack.worker is not None
    forecasts_before = stack.worker.text().count("synth.forecast")
    _, source = await ask_valid(stack, asset, increment, length, timeout=30)
    assert source == "pool", stack.miner.text()[-3000:]
    assert stack.worker.text().count("synth.forecast") > forecasts_before, stack.worker.text()[-3000:]


async def test_worker_stopped_fallback_in_time(stack: Stack) -> None:
    assert stack.worker is not None
    stack.worker.stop()
    stack.worker = None
    await asyncio.sleep(LIVE_READERS_CHECK_S + 0.5)  # once the miner has read the heartbeats again
    seconds, source = await ask_valid(stack, "ETH", 300, 86_400, timeout=8)
    assert seconds < 8
    assert source == "fallback", stack.miner.text()[-3000:]
    # The stopped worker removed its heartbeat: the miner sent nothing and did not wait for the pool.
    assert "no live worker reads queue infer.lf" in stack.miner.text(), stack.miner.text()[-3000:]


async def test_redis_stopped_fallback_in_time(stack: Stack) -> None:
    stack.redis.stop()
    for asset, increment, length in (("XAU", 60, 3_600), ("BTC", 300, 86_400)):
        _, source = await ask_valid(stack, asset, increment, length, timeout=8)
        assert source == "fallback", (asset, stack.miner.text()[-3000:])
    assert stack.miner.proc.poll() is None

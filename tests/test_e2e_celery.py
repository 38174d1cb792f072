"""End to end, all real: redis-server, a Celery worker process, the miner's axon, a signed dendrite.

Then the faults of the walking skeleton: the worker stopped, and Redis stopped — replies stay valid
and in time (the in-process fallback answers).
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

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


async def ask_valid(stack: Stack, asset: str, increment: int, length: int, timeout: float) -> float:
    validator = stack.validator()
    try:
        reply, seconds = await validator.ask(asset, increment, length, 1000, start_time=start_time_in(120),
                                             timeout=timeout)
    finally:
        await validator.close()
    assert_valid_reply(reply)
    assert seconds < timeout
    return seconds


@pytest.mark.parametrize("asset,increment,length", [("BTC", 300, 86_400), ("BTC", 60, 3_600)])
async def test_pool_answers_through_celery(stack: Stack, asset: str, increment: int, length: int) -> None:
    await ask_valid(stack, asset, increment, length, timeout=30)
    assert f"{asset}:" in stack.miner.text() and "from pool" in stack.miner.text()
    assert "synth.forecast" in stack.worker.text()  # type: ignore[union-attr]


async def test_worker_stopped_fallback_in_time(stack: Stack) -> None:
    assert stack.worker is not None
    stack.worker.stop()
    stack.worker = None
    seconds = await ask_valid(stack, "ETH", 300, 86_400, timeout=8)
    assert seconds < 8
    assert "fallback" in stack.miner.text()


async def test_redis_stopped_fallback_in_time(stack: Stack) -> None:
    stack.redis.stop()
    await ask_valid(stack, "XAU", 60, 3_600, timeout=8)
    await ask_valid(stack, "BTC", 300, 86_400, timeout=8)
    assert stack.miner.proc.poll() is None

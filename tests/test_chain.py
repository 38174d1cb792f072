"""The production metagraph refresh: a stand-in subtensor (the chain is on the internet) that fails
on demand, read through the real refresh loop and access policy."""

import asyncio
from dataclasses import dataclass, field

import pytest

from core.settings import Settings
from miner.access import AccessPolicy, MetagraphView
from miner.chain import first_metagraph, keep_metagraph_fresh, read_metagraph


@dataclass
class Graph:
    """The fields of bittensor's metagraph the miner reads."""

    hotkeys: list[str]
    S: list[float]
    validator_permit: list[bool]


@dataclass
class FlakySubtensor:
    """``metagraph(netuid)`` raises for the first ``failures`` calls, as a dropped websocket does."""

    failures: int
    graph: Graph
    calls: list[int] = field(default_factory=list)

    def metagraph(self, netuid: int) -> Graph:
        self.calls.append(netuid)
        if len(self.calls) <= self.failures:
            raise ConnectionError("websocket closed")
        return self.graph


GRAPH = Graph(["5vali", "5miner"], [250_000.0, 10.0], [True, False])


def test_read_metagraph_maps_stake_and_permit() -> None:
    neurons = read_metagraph(FlakySubtensor(0, GRAPH), 50)  # type: ignore[arg-type]
    assert neurons["5vali"].stake == 250_000.0 and neurons["5vali"].validator_permit
    assert neurons["5miner"].stake == 10.0 and not neurons["5miner"].validator_permit


async def test_a_failed_first_read_is_retried_within_seconds_not_a_period() -> None:
    settings = Settings(_env_file=None, netuid=50)  # type: ignore[call-arg]
    view, chain = MetagraphView(), FlakySubtensor(2, GRAPH)
    access = AccessPolicy(settings, view)
    assert access.refuse("5vali", True) == "metagraph not read yet: try again shortly"
    task = asyncio.create_task(keep_metagraph_fresh(settings, view, chain,  # type: ignore[arg-type]
                                                    refresh_s=3600.0, retry_s=(0.05, 0.1)))
    try:
        assert await first_metagraph(view, wait_s=5.0)
        assert chain.calls == [50, 50, 50]  # two failures, then the read, well inside a refresh period
        assert access.refuse("5vali", True) is None
        assert access.refuse("5stranger", True) == "hotkey not registered on the subnet"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_failed_refresh_keeps_the_previous_view() -> None:
    settings = Settings(_env_file=None, netuid=50)  # type: ignore[call-arg]
    chain = FlakySubtensor(0, GRAPH)
    view = MetagraphView()
    task = asyncio.create_task(keep_metagraph_fresh(settings, view, chain,  # type: ignore[arg-type]
                                                    refresh_s=0.05, retry_s=(0.05, 0.1)))
    try:
        assert await first_metagraph(view, wait_s=5.0)
        chain.failures = 10**6  # the chain goes away
        await asyncio.sleep(0.3)
        assert len(chain.calls) > 2 and view.get("5vali") is not None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_first_metagraph_gives_up_after_its_wait() -> None:
    assert not await first_metagraph(MetagraphView(), wait_s=0.2)

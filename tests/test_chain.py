"""The production metagraph refresh: a stand-in subtensor (the chain is on the internet) that fails
on demand, read through the real refresh loop and access policy."""

import asyncio
from dataclasses import dataclass, field

import bittensor as bt
import pytest
from bittensor.core.types import ExtrinsicResponse
from bittensor_wallet.mock import get_mock_wallet

from core.settings import Settings
from miner.access import AccessPolicy, MetagraphView
from miner.chain import first_metagraph, keep_metagraph_fresh, publish_axon, read_metagraph
from miner.startup import StartupError
from synth_miner.devstack import free_port


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


class Stop(Exception):
    """Raised by the stand-in sleep to end the refresh loop once it has waited enough times."""


async def test_the_first_read_is_retried_at_doubling_waits_up_to_the_cap_then_every_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No wall clock: the loop's sleep records what it was asked to wait, the chain fails six reads."""
    waits: list[float] = []

    async def record(delay: float) -> None:
        waits.append(delay)
        if len(waits) == 9:
            raise Stop

    monkeypatch.setattr(asyncio, "sleep", record)
    settings = Settings(_env_file=None, netuid=50)
    view, chain = MetagraphView(), FlakySubtensor(6, GRAPH)
    with pytest.raises(Stop):
        await keep_metagraph_fresh(settings, view, chain,  # type: ignore[arg-type]
                                   refresh_s=3600.0, retry_s=(1.0, 8.0))
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 3600.0, 3600.0, 3600.0]
    assert chain.calls == [50] * 9 and view.get("5vali") is not None


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


@dataclass
class ServingSubtensor:
    """``serve_axon`` answers as bittensor's does: failures come back as a response, never raised."""

    response: ExtrinsicResponse | None = None
    error: Exception | None = None
    calls: list[int] = field(default_factory=list)

    def serve_axon(self, netuid: int, axon: bt.Axon, certificate: object = None) -> ExtrinsicResponse:
        self.calls.append(netuid)
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response


def an_axon() -> bt.Axon:
    port = free_port()
    return bt.Axon(wallet=get_mock_wallet(), ip="127.0.0.1", port=port, external_ip="10.0.0.1", external_port=port)


def test_a_refused_axon_publication_stops_the_start() -> None:
    """bittensor's Axon.serve dropped the chain's refusal (a rate limit, a bad address): the miner then
    served at an address no validator could find, having said nothing."""
    settings = Settings(_env_file=None, netuid=50)  # type: ignore[call-arg]
    axon = an_axon()
    chain = ServingSubtensor(ExtrinsicResponse(False, "Subtensor returned `ServingRateLimitExceeded` error"))
    with pytest.raises(StartupError, match=r"cannot publish the axon at 10\.0\.0\.1:\d+ on netuid 50 of finney "
                                           r"\(Subtensor returned `ServingRateLimitExceeded` error\)"):
        publish_axon(settings, axon, chain)  # type: ignore[arg-type]
    assert chain.calls == [50]
    with pytest.raises(StartupError, match=r"cannot publish the axon on the chain finney \(ConnectionError: gone\)"):
        publish_axon(settings, axon, ServingSubtensor(error=ConnectionError("gone")))  # type: ignore[arg-type]
    served = ServingSubtensor(ExtrinsicResponse(message="Axon already served"))
    publish_axon(settings, axon, served)  # type: ignore[arg-type]
    assert served.calls == [50]


async def test_a_deregistered_hotkey_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A miner deregistered while it runs kept serving, unseen by every validator, and said nothing."""
    settings = Settings(_env_file=None, netuid=50)  # type: ignore[call-arg]
    chain, view = FlakySubtensor(0, GRAPH), MetagraphView()
    task = asyncio.create_task(keep_metagraph_fresh(settings, view, chain,  # type: ignore[arg-type]
                                                    refresh_s=0.02, retry_s=(0.02, 0.05), hotkey="5miner"))
    try:
        assert await first_metagraph(view, wait_s=5.0)
        await asyncio.sleep(0.1)
        assert not [r for r in caplog.records if r.levelname == "ERROR"]
        chain.graph = Graph(["5vali", "5other"], [250_000.0, 10.0], [True, False])  # our slot was taken
        calls = len(chain.calls)
        await asyncio.sleep(0.2)
        assert len(chain.calls) > calls + 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert errors == ["hotkey 5miner is no longer registered on netuid 50 of finney: no validator will query "
                          "this miner until it is registered again (btcli subnets register)"], errors
        chain.graph = GRAPH
        await asyncio.sleep(0.1)
        assert any("registered on netuid 50 again" in r.getMessage() for r in caplog.records)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_a_refusal_without_a_message_still_stops_the_start() -> None:
    """bittensor may refuse with no message at all: success=False alone must stop the start, the line then
    says no reason was given instead of the miner serving unpublished."""
    settings = Settings(_env_file=None, netuid=50)  # type: ignore[call-arg]
    with pytest.raises(StartupError, match=r"on netuid 50 of finney \(no reason given\)"):
        publish_axon(settings, an_axon(), ServingSubtensor(ExtrinsicResponse(False)))  # type: ignore[arg-type]

"""The chain side of the miner (production only): registration check, axon serving, metagraph sync."""

import asyncio
import logging

import bittensor as bt

from core.constants import METAGRAPH_FIRST_WAIT_S, METAGRAPH_REFRESH_S, METAGRAPH_RETRY_S
from core.settings import Settings
from miner.access import MetagraphView, Neuron

log = logging.getLogger(__name__)


def read_metagraph(subtensor: "bt.Subtensor", netuid: int) -> dict[str, Neuron]:
    graph = subtensor.metagraph(netuid)
    stakes = [float(s) for s in graph.S]
    permits = [bool(p) for p in graph.validator_permit]
    return {hk: Neuron(hk, stakes[i], permits[i]) for i, hk in enumerate(graph.hotkeys)}


async def keep_metagraph_fresh(settings: Settings, view: MetagraphView, subtensor: "bt.Subtensor",
                               refresh_s: float = METAGRAPH_REFRESH_S,
                               retry_s: tuple[float, float] = METAGRAPH_RETRY_S) -> None:
    """Refresh in a thread every ``refresh_s``; a failed refresh keeps the previous view.

    Until the first read succeeds the view is empty and every validator is refused, so that read is
    retried after ``retry_s[0]`` seconds, doubling up to ``retry_s[1]``, not after a full period.
    """
    retry = retry_s[0]
    while True:
        try:
            view.replace(await asyncio.to_thread(read_metagraph, subtensor, settings.netuid))
            log.info("metagraph refreshed: %d neurons", len(view))
        except Exception as exc:
            if view.loaded:
                log.warning("metagraph refresh failed, keeping the previous one: %s", exc)
            else:
                log.error("metagraph not read yet, validators are refused until it is (retry in %.0f s): %s",
                          retry, exc)
        if view.loaded:
            await asyncio.sleep(refresh_s)
        else:
            await asyncio.sleep(retry)
            retry = min(2 * retry, retry_s[1])


async def first_metagraph(view: MetagraphView, wait_s: float = METAGRAPH_FIRST_WAIT_S) -> bool:
    """Wait up to ``wait_s`` for the first metagraph read, so a normal start refuses no validator."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while not view.loaded and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.1)
    return view.loaded


def register_axon(settings: Settings, wallet: "bt.Wallet", axon: "bt.Axon") -> "bt.Subtensor":
    """Check the hotkey is registered and publish the axon's address on the chain."""
    subtensor = bt.Subtensor(network=settings.network)
    if not subtensor.is_hotkey_registered(netuid=settings.netuid, hotkey_ss58=wallet.hotkey.ss58_address):
        raise SystemExit(f"hotkey {wallet.hotkey.ss58_address} is not registered on netuid {settings.netuid}: "
                         "register it with btcli first")
    axon.serve(netuid=settings.netuid, subtensor=subtensor)
    return subtensor

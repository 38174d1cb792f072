"""The chain side of the miner (production only): registration check, axon serving, metagraph sync."""

import asyncio
import logging

import bittensor as bt

from core.settings import Settings
from miner.access import MetagraphView, Neuron

log = logging.getLogger(__name__)

METAGRAPH_REFRESH_S = 600.0


def read_metagraph(subtensor: "bt.Subtensor", netuid: int) -> dict[str, Neuron]:
    graph = subtensor.metagraph(netuid)
    stakes = [float(s) for s in graph.S]
    permits = [bool(p) for p in graph.validator_permit]
    return {hk: Neuron(hk, stakes[i], permits[i]) for i, hk in enumerate(graph.hotkeys)}


async def keep_metagraph_fresh(settings: Settings, view: MetagraphView, subtensor: "bt.Subtensor") -> None:
    """Refresh in a thread every few minutes; a failed refresh keeps the previous view."""
    while True:
        try:
            view.replace(await asyncio.to_thread(read_metagraph, subtensor, settings.netuid))
            log.info("metagraph refreshed: %d neurons", len(view))
        except Exception as exc:
            log.warning("metagraph refresh failed, keeping the previous one: %s", exc)
        await asyncio.sleep(METAGRAPH_REFRESH_S)


def register_axon(settings: Settings, wallet: "bt.Wallet", axon: "bt.Axon") -> "bt.Subtensor":
    """Check the hotkey is registered and publish the axon's address on the chain."""
    subtensor = bt.Subtensor(network=settings.network)
    if not subtensor.is_hotkey_registered(netuid=settings.netuid, hotkey_ss58=wallet.hotkey.ss58_address):
        raise SystemExit(f"hotkey {wallet.hotkey.ss58_address} is not registered on netuid {settings.netuid}: "
                         "register it with btcli first")
    axon.serve(netuid=settings.netuid, subtensor=subtensor)
    return subtensor

"""The chain side of the miner (production only): registration check, axon serving, metagraph sync."""

import asyncio
import logging

import bittensor as bt

from core.constants import METAGRAPH_FIRST_WAIT_S, METAGRAPH_REFRESH_S, METAGRAPH_RETRY_S
from core.logs import reason
from core.settings import Settings
from miner.access import MetagraphView, Neuron
from miner.startup import StartupError

log = logging.getLogger(__name__)


def read_metagraph(subtensor: "bt.Subtensor", netuid: int) -> dict[str, Neuron]:
    graph = subtensor.metagraph(netuid)
    stakes = [float(s) for s in graph.S]
    permits = [bool(p) for p in graph.validator_permit]
    return {hk: Neuron(hk, stakes[i], permits[i]) for i, hk in enumerate(graph.hotkeys)}


async def keep_metagraph_fresh(settings: Settings, view: MetagraphView, subtensor: "bt.Subtensor",
                               refresh_s: float = METAGRAPH_REFRESH_S,
                               retry_s: tuple[float, float] = METAGRAPH_RETRY_S, hotkey: str | None = None) -> None:
    """Refresh in a thread every ``refresh_s``; a failed refresh keeps the previous view.

    Until the first read succeeds the view is empty and every validator is refused, so that read is
    retried after ``retry_s[0]`` seconds, doubling up to ``retry_s[1]``, not after a full period.
    A miner's ``hotkey`` missing from a read (deregistered) is logged once, as an error.
    """
    retry = retry_s[0]
    registered = True
    while True:
        try:
            neurons = await asyncio.to_thread(read_metagraph, subtensor, settings.netuid)
            view.replace(neurons)
            log.info("metagraph refreshed: %d neurons", len(view))
            if hotkey is not None and registered != (hotkey in neurons):
                registered = not registered
                if registered:
                    log.warning("hotkey %s is registered on netuid %d again", hotkey, settings.netuid)
                else:  # validators no longer query this miner: it would serve on, unseen, without a word
                    log.error("hotkey %s is no longer registered on netuid %d of %s: no validator will query "
                              "this miner until it is registered again (btcli subnets register)", hotkey,
                              settings.netuid, settings.network)
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


def connect_chain(settings: Settings, wallet: "bt.Wallet") -> "bt.Subtensor":
    """The chain connection, once the hotkey is known to be registered on the subnet."""
    try:
        subtensor = bt.Subtensor(network=settings.network)
        registered = subtensor.is_hotkey_registered(netuid=settings.netuid, hotkey_ss58=wallet.hotkey.ss58_address)
    except Exception as exc:  # no network, a bad endpoint, a dropped websocket
        raise StartupError(f"cannot reach the chain {settings.network} ({reason(exc)})") from None
    if not registered:
        raise StartupError(f"hotkey {wallet.hotkey.ss58_address} is not registered on netuid {settings.netuid} "
                           f"of {settings.network}: register it with btcli first")
    return subtensor


def publish_axon(settings: Settings, axon: "bt.Axon", subtensor: "bt.Subtensor") -> None:
    """Publish the axon's address on the chain.

    Not ``axon.serve``: it drops the extrinsic's response, and bittensor turns every failure (a rate
    limit, a bad address, a dropped websocket) into a response, so a miner nobody can find served on.
    """
    try:
        response = subtensor.serve_axon(netuid=settings.netuid, axon=axon)
    except Exception as exc:
        raise StartupError(f"cannot publish the axon on the chain {settings.network} ({reason(exc)})") from None
    if not response.success:
        detail = " ".join(str(response.message or "no reason given").split())[:300]
        raise StartupError(f"cannot publish the axon at {axon.external_ip}:{axon.external_port} on netuid "
                           f"{settings.netuid} of {settings.network} ({detail})")

"""The bittensor adapter: checks the Simulation request, hands it to the service, sends the reply.

The reply body is pre-rendered (the synapse's small fields, then the paths as JSON straight from
numpy): bittensor's default path re-validates and re-serialises 289k floats (~0.8 s per 24 h reply).
"""

import asyncio
import logging
import time
import typing

import bittensor as bt
from bittensor.core.errors import SynapseException
from starlette.responses import Response

from core.prices import PriceDataError
from core.prompts import RequestError, check_request
from core.settings import Settings
from miner.access import AccessPolicy
from miner.metrics import MinerMetrics, fallback_reason
from miner.protocol import Simulation
from miner.service import MinerService

log = logging.getLogger(__name__)


def reject(synapse: Simulation, status: int, message: str) -> typing.NoReturn:
    synapse.axon.status_code = status
    synapse.axon.status_message = message
    raise SynapseException(message, synapse=synapse)


def render_reply(synapse: Simulation, paths_json: bytes) -> Response:
    synapse.axon.status_code = 200
    synapse.axon.status_message = "Success"
    head = synapse.model_dump_json(exclude={"simulation_output"}).encode()
    body = head[:-1] + b',"simulation_output":' + paths_json + b"}"
    response = Response(content=body, media_type="application/json")
    response.synapse = synapse  # type: ignore[attr-defined]  # bittensor reads it for the headers
    return response


class AxonHandlers:
    """forward / blacklist / priority bound to a service living on the miner's own event loop."""

    def __init__(self, settings: Settings, service: MinerService, access: AccessPolicy,
                 loop: asyncio.AbstractEventLoop, metrics: MinerMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or MinerMetrics()
        self.service = service
        self.access = access
        self.loop = loop  # the axon serves from uvicorn's thread; the service runs here

        async def forward(synapse: Simulation) -> Simulation:
            return await self.forward(synapse)  # type: ignore[return-value]

        async def blacklist(synapse: Simulation) -> typing.Tuple[bool, str]:  # noqa: UP006 (bittensor checks it)
            return self.blacklist(synapse)

        async def priority(synapse: Simulation) -> float:
            return self.access.priority(synapse.dendrite.hotkey if synapse.dendrite else None)

        self.forward_fn, self.blacklist_fn, self.priority_fn = forward, blacklist, priority

    def blacklist(self, synapse: Simulation) -> typing.Tuple[bool, str]:  # noqa: UP006
        dendrite = synapse.dendrite
        hotkey = dendrite.hotkey if dendrite else None
        signed = bool(dendrite and dendrite.signature)
        reason = self.access.refuse(hotkey, signed)
        if reason:
            log.info("refused %s: %s", hotkey, reason)
            self.metrics.requests.labels(synapse.simulation_input.asset[:16], "-", "refused").inc()
            return True, reason
        return False, "allowed"

    async def forward(self, synapse: Simulation) -> Response:
        received = time.time()
        raw = synapse.simulation_input
        try:
            request = check_request(raw.asset, raw.start_time, raw.time_increment, raw.time_length,
                                    raw.num_simulations, self.settings.max_num_simulations)
        except RequestError as exc:
            self.metrics.requests.labels("-", "-", "bad_request").inc()
            reject(synapse, 400, f"bad request: {exc}")
        deadline = self.service.deadline_for(received, synapse.timeout)
        future = asyncio.run_coroutine_threadsafe(self.service.answer(request, deadline), self.loop)
        try:
            answer = await asyncio.wrap_future(future)
        except PriceDataError as exc:
            self.metrics.requests.labels(request.asset, request.prompt.name, "no_price").inc()
            reject(synapse, 503, f"no price available: {exc}")
        except Exception as exc:  # the self-check refused even the fallback's reply: never send it
            self.metrics.invalid.inc()
            log.error("no valid reply for %s: %s", request.key(), exc)
            reject(synapse, 500, f"no valid reply could be built: {type(exc).__name__}")
        done = time.time()
        prompt = request.prompt.name
        self.metrics.requests.labels(request.asset, prompt, answer.source).inc()
        self.metrics.latency.labels(prompt).observe(done - received)
        self.metrics.deadline_margin.labels(prompt).observe(max(0.0, deadline + self.settings.reply_margin_s - done))
        if answer.source == "fallback":
            self.metrics.fallbacks.labels(fallback_reason(answer.reason)).inc()
        log.info("answered %s from %s in %.0f ms%s", request.key(), answer.source, (time.time() - received) * 1e3,
                 f" (fallback: {answer.reason})" if answer.reason else "")
        return render_reply(synapse, answer.body)


def build_axon(settings: Settings, wallet: "bt.Wallet", handlers: AxonHandlers) -> "bt.Axon":
    external_ip = settings.axon_external_ip or ("127.0.0.1" if settings.local else None)
    axon = bt.Axon(wallet=wallet, ip=settings.axon_host, port=settings.axon_port, external_ip=external_ip,
                   external_port=settings.axon_external_port or settings.axon_port)
    axon.fast_server.config.host = settings.axon_host  # bittensor hard-codes 0.0.0.0
    axon.attach(forward_fn=handlers.forward_fn, blacklist_fn=handlers.blacklist_fn,
                priority_fn=handlers.priority_fn)
    return axon

"""The bittensor adapter: checks the Simulation request, hands it to the service, sends the reply.

The reply body is pre-rendered (the synapse's small fields, then the paths as JSON straight from
numpy): bittensor's default path re-validates and re-serialises 289k floats (~0.8 s per 24 h reply).
"""

import asyncio
import json
import logging
import math
import re
import resource
import threading
import time
import typing
from collections.abc import Callable

import bittensor as bt
import h11
import orjson
from bittensor.core.errors import SynapseException
from bittensor.core.settings import version_as_int
from bittensor.core.synapse import TerminalInfo
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.constants import AXON_REFUSAL_LINES_PER_MINUTE
from core.prices import PriceDataError
from core.prompts import RequestError, check_request
from core.settings import Settings
from miner.access import AccessPolicy
from miner.metrics import MinerMetrics, fallback_reason
from miner.protocol import Simulation
from miner.service import Answer, MinerService

log = logging.getLogger(__name__)


def terminal(synapse: Simulation) -> TerminalInfo:
    if synapse.axon is None:
        synapse.axon = TerminalInfo()
    return synapse.axon


def reject(synapse: Simulation, status: int, message: str) -> typing.NoReturn:
    message = header_safe(message)
    terminal(synapse).status_code = status
    terminal(synapse).status_message = message
    raise SynapseException(message, synapse=synapse)


def header_safe(message: str, limit: int = 500) -> str:
    """bittensor echoes the status message in a header: there a line break or a trailing space (an
    exception with an empty message) makes uvicorn drop the connection without an answer, and a
    character beyond latin-1 turns the 400 into a bare "500 Internal Server Error". The cut at ``limit``
    can end on a space too: stripped again after it."""
    text = " ".join(message.split()).encode("latin-1", "replace").decode("latin-1")
    return text[:limit].rstrip() or "error"


MAX_BODY_BYTES = 64 * 1024  # a Simulation request is ~1 KB; nothing a validator sends comes near this


def body_problem(body: bytes) -> str | None:
    """Why a request body cannot be a Simulation synapse, or None when it can.

    Parsed the two ways the axon parses it: orjson (bittensor's body-hash check; integers past 64 bits
    become floats) and the standard library (FastAPI's endpoint argument).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "request body is not UTF-8 text"
    for loads in (orjson.loads, json.loads):
        try:
            doc = loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, int digit limit, nesting depth
            return f"request body is not valid JSON ({str(exc)[:120]})"
        if not isinstance(doc, dict):
            return f"request body must be a JSON object (a Simulation synapse), got {type(doc).__name__}"
        try:
            Simulation(**doc)
        except Exception as exc:  # pydantic's ValidationError, or a validator raising anything else
            return f"request body is not a Simulation synapse: {summary(exc)}"
    return None


def summary(exc: Exception) -> str:
    """A pydantic error in a line: the first few field paths and messages."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        text = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors()[:3])
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text[:300]


def headers_problem(headers: dict[bytes, bytes]) -> str | None:
    """Why the synapse headers do not parse, as bittensor's middleware parses them, or None."""
    try:
        Simulation.from_headers({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers.items()})
    except Exception as exc:  # ValidationError, TypeError, ValueError: what bittensor turns into a 500
        return f"request headers do not describe a Simulation synapse: {summary(exc)}"
    return None


def with_caller_timeout(body: bytes, headers: dict[bytes, bytes]) -> bytes:
    """The body with its ``timeout`` set to the one in the headers: how long the caller really waits.

    Synth's validator (``dendrite_multiprocess``) puts its timeout, start_time - now (50-120 s), only
    in the headers: it dumps the JSON body from a synapse it never set it on, so the body keeps
    bittensor's default 12 s, and the body is all the forward handler sees. Trusting it gave the pool
    9 s instead of the validator's minute or two. bittensor's own ``Dendrite.call`` sets both alike.
    A Simulation hashes none of its fields into ``computed_body_hash``, so the rewrite is invisible to
    the axon's integrity check.
    """
    try:
        timeout = float(headers.get(b"timeout", b"").decode("latin-1"))
    except ValueError:
        return body
    if not (math.isfinite(timeout) and timeout > 0):
        return body
    doc = json.loads(body)
    if doc.get("timeout") == timeout:
        return body
    doc["timeout"] = timeout
    return json.dumps(doc).encode()


# bittensor reads a terminal's field from any header whose name *contains* one of these (last one wins, the
# axon's prefix checked first): see Synapse.parse_headers_to_inputs.
AXON_FIELD, DENDRITE_FIELD = b"bt_header_axon_", b"bt_header_dendrite_"

Refuse = Callable[[str | None, bool], str | None]  # (hotkey, signed) -> the reason to refuse, or None


def caller_fields(headers: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The dendrite's fields (hotkey, signature, nonce...) as bittensor's ``from_headers`` reads them, raw."""
    fields: dict[bytes, bytes] = {}
    for key, value in headers.items():
        if AXON_FIELD in key:
            continue
        if DENDRITE_FIELD in key:
            fields[key.split(DENDRITE_FIELD)[1]] = value
    return fields


class RequestGuard:
    """Outermost ASGI layer: any other route gets a 404; on the Simulation route a caller bittensor would
    refuse anyway gets its 403 / 401, and a body that is too large, or headers or a body that are not a
    well-formed synapse, get a 4xx with a message, all before bittensor sees them.

    bittensor reads any body whole into memory and answers every malformed one (bad JSON, wrong types,
    missing fields, no JSON content type) with "500 Internal Server Error" from its body-hash check;
    headers it cannot parse get a 500 too (its SynapseParsingError is not a SynapseException), and
    an unknown route whose name it cannot echo in a header (``/x%00``) gets no answer at all. And its
    refusal of a caller (~0.9 ms of CPU: the synapse parsed from all headers, signed, logged, turned back
    into headers) came after ours had parsed the headers and read and parsed the body.
    """

    def __init__(self, app: ASGIApp, name: str, refuse: Refuse | None = None,
                 axon_fields: dict[bytes, bytes] | None = None, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.name = name
        self.refuse = refuse  # the blacklist bittensor would run (AxonHandlers.refusal); None: leave it to it
        self.axon_fields = list((axon_fields or {}).items())  # the axon's version and uuid, as bittensor sends them
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.time()
        # bittensor routes on the first path segment: /Simulation/anything reaches its middleware too.
        if scope["path"].split("/")[1:2] != [self.name]:
            await self._refuse(send, 404, f"unknown route {scope['path'][:80]!r}: this axon serves /{self.name} only")
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"0")
        # A short body of a declared length is left for uvicorn to drain (keep-alive, as after bittensor's own
        # refusal); a chunked one could go on for the whole request timeout: its connection is closed.
        drained = b"transfer-encoding" not in headers and declared.isdigit() and int(declared) <= self.max_bytes
        fields = caller_fields(headers)
        if self.refuse is not None:
            # bittensor runs the blacklist first, on these same fields: a stranger or an unsigned request
            # is refused whatever else it carries.
            hotkey = fields.get(b"hotkey")
            reason = self.refuse(None if hotkey is None else hotkey.decode("latin-1"), bool(fields.get(b"signature")))
            if reason:
                await self._refuse_as_axon(send, 403, f"Forbidden. Key is blacklisted: {reason}.", began, drained)
                return
        problem = headers_problem(headers)
        if problem:
            await self._refuse(send, 400, problem)
            return
        if self.refuse is not None and b"nonce" not in fields:  # bittensor's verify: 401 before the signature
            log.info("refused %s: %s", fields.get(b"hotkey", b"").decode("latin-1"), "no nonce")
            await self._refuse_as_axon(send, 401, "Not Verified with error: Missing Nonce", began, drained)
            return
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._refuse(send, 413, f"request body over {self.max_bytes} bytes")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:  # chunked transfer can exceed what it declared
                await self._refuse(send, 413, f"request body over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = body_problem(body)
        if problem:
            await self._refuse(send, 400, problem)
            return
        body = with_caller_timeout(body, headers)
        headers[b"content-length"] = str(len(body)).encode()
        # FastAPI parses only bodies labelled JSON; anything else reached bittensor as bytes (a 500).
        headers[b"content-type"] = b"application/json"
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then wait for the disconnect, as the app expects

        await self.app({**scope, "headers": list(headers.items())}, replay, send)

    @staticmethod
    async def _refuse(send: Send, status: int, message: str) -> None:
        """Closes the connection too: most refusals come before the body is read, and uvicorn read on and
        discarded whatever the client kept sending (an endless chunked body: for the whole request timeout)."""
        body = json.dumps({"message": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def _refuse_as_axon(self, send: Send, status: int, message: str, began: float, drained: bool) -> None:
        """The reply bittensor's own refusal makes, as a dendrite reads it: the status, ``{"message": ...}``,
        and the axon's status code and message in its headers (which the dendrite takes over the body's).
        Left out: the axon's signature (nothing checks it on a refusal; a signature each is what made them
        dear) and the echo of the caller's own fields. The connection stays open only if uvicorn can drain
        the unread body (``drained``)."""
        body = orjson.dumps({"message": message})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"bt_header_axon_status_code", str(status).encode()),
                   (b"bt_header_axon_status_message", header_safe(message).encode("latin-1")),
                   (b"bt_header_axon_nonce", str(time.time_ns()).encode()),
                   (b"bt_header_axon_process_time", str(time.time() - began).encode()), *self.axon_fields]
        if not drained:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RefusalLines(logging.Filter):
    """Each refused request wrote two log lines (ours, and bittensor's ERROR "BlacklistedException#<uuid>: ..."):
    a flood wrote ~300 bytes per refusal, ~1 GB an hour at the rate the axon refuses, to a log nothing rotates.
    Per kind and minute the first ``per_minute`` go through; the next one after that minute says how many were
    left out. The refusals are all counted in the metrics anyway."""

    BITTENSOR = re.compile(r"(\w+)#[0-9a-f-]{36}: ")  # bittensor's line for any request it answered with an error

    def __init__(self, per_minute: int = AXON_REFUSAL_LINES_PER_MINUTE, window_s: float = 60.0) -> None:
        super().__init__()
        self.per_minute = per_minute
        self.window_s = window_s
        self.windows: dict[str, tuple[float, int, int]] = {}  # kind -> (window start, lines let through, left out)
        self.lock = threading.Lock()  # the axon's thread and the miner's loop both log

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self.kind(record)
        if kind is None:
            return True
        now = time.monotonic()
        with self.lock:
            start, passed, left_out = self.windows.get(kind, (now, 0, 0))
            if now - start >= self.window_s:
                start, passed = now, 0
            if passed >= self.per_minute:
                self.windows[kind] = (start, passed, left_out + 1)
                return False
            self.windows[kind] = (start, passed + 1, 0)
        if left_out:
            record.msg, record.args = f"{record.getMessage()} (and {left_out} more like it not logged)", ()
        return True

    def kind(self, record: logging.LogRecord) -> str | None:
        if record.name == __name__:
            return str(record.msg) if str(record.msg).startswith("refused ") else None
        match = self.BITTENSOR.match(record.getMessage()) if record.name == "bittensor" else None
        return match.group(1) if match else None


REFUSAL_LINES = RefusalLines()


def quiet_refusals() -> None:
    for logger in (log, logging.getLogger("bittensor")):
        if REFUSAL_LINES not in logger.filters:
            logger.addFilter(REFUSAL_LINES)


def render_reply(synapse: Simulation, paths_json: bytes) -> Response:
    terminal(synapse).status_code = 200
    terminal(synapse).status_message = "Success"
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
            return self.priority(synapse)

        self.forward_fn, self.blacklist_fn, self.priority_fn = forward, blacklist, priority

    def blacklist(self, synapse: Simulation) -> typing.Tuple[bool, str]:  # noqa: UP006
        dendrite = synapse.dendrite
        reason = self.refusal(dendrite.hotkey if dendrite else None, bool(dendrite and dendrite.signature))
        return (True, reason) if reason else (False, "allowed")

    def refusal(self, hotkey: str | None, signed: bool) -> str | None:
        """The blacklist, logged and counted: run by the RequestGuard from the raw headers, and by bittensor
        (blacklist_fn) for what the guard let through."""
        reason = self.access.refuse(hotkey, signed)
        if reason:
            log.info("refused %s: %s", hotkey, reason)
            # Not the asset: a refused caller chooses it freely, and each new label is a new series.
            self.metrics.requests.labels("-", "-", "refused").inc()
        return reason

    def priority(self, synapse: Simulation) -> float:
        """Runs after bittensor verified the signature, so the rate limit charges the real signer."""
        hotkey = synapse.dendrite.hotkey if synapse.dendrite else None
        refusal = self.access.over_rate(hotkey) if hotkey else "unsigned request"
        if refusal:
            log.info("refused %s: %s", hotkey, refusal)
            self.metrics.requests.labels("-", "-", "rate_limited").inc()
            reject(synapse, 429, refusal)
        return self.access.priority(hotkey)

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
            # Counted with the others too: without it the 500s were missing from every ratio over requests.
            self.metrics.requests.labels(request.asset, request.prompt.name, "invalid").inc()
            log.error("no valid reply for %s: %s", request.key(), exc)
            reject(synapse, 500, f"no valid reply could be built: {type(exc).__name__}")
        done = time.time()
        prompt = request.prompt.name
        self.metrics.requests.labels(request.asset, prompt, answer.source).inc()
        self.metrics.latency.labels(prompt).observe(done - received)
        self.metrics.deadline_margin.labels(prompt).observe(max(0.0, deadline + self.settings.reply_margin_s - done))
        if answer.price_time is not None:  # a provider's print may be stamped a few seconds ahead of our clock
            self.metrics.price_age.labels(request.asset).set(max(0.0, done - answer.price_time))
        if answer.shared:
            self.metrics.shared.inc()
        self.metrics.engines.labels(prompt, answer.source, answer.engine or "unknown").inc()
        if answer.source == "fallback":
            label = fallback_reason(answer.reason)
            self.metrics.fallbacks.labels(label).inc()
            if label == "worker_lost":
                self.metrics.lost.labels("fallback").inc()
        elif answer.resent_after:
            self.metrics.lost.labels("resent").inc()
        log.info("answered %s from %s in %.0f ms%s", request.key(), provenance(answer), (time.time() - received) * 1e3,
                 " (an identical request's answer)" if answer.shared else "")
        return render_reply(synapse, answer.body)


def provenance(answer: Answer) -> str:
    """Who computed an answer, for the log: "pool (patchtst)", "pool (ewma_t, standing in: ...)", "fallback (...)",
    "pool (patchtst, sent again: worker ... stopped while running it)"."""
    engine = answer.engine or "engine unknown"
    if answer.resent_after:
        engine += f", sent again: {answer.resent_after}"
    if answer.reason is None:
        return f"{answer.source} ({engine})"
    return f"{answer.source} ({engine}, {'fallback' if answer.source == 'fallback' else 'standing in'}: {answer.reason})"


class WaitingConnections:
    """The axon's connections that hold no request in progress: one still arriving (nothing sent yet, headers
    or body unfinished) or one kept alive after its reply. Such a connection costs nothing to hold but a file
    descriptor, and uvicorn neither times out the first kind nor bounds how many there are: a few hundred
    sockets opened and left silent (or fed a byte now and then) took every descriptor the process had,
    forever, and validators were no longer served.

    Here each must deliver a complete request within ``request_timeout_s`` of opening, or of the first byte
    after a reply (a connection kept alive may idle ``keep_alive_s`` before that byte), and when more than
    ``limit`` wait, the one waiting longest is closed. A validator's connection waits for the milliseconds it
    takes to send its ~1 KB request; once the request is in, nothing here touches it, however long its answer
    takes. Used only from uvicorn's event loop.
    """

    def __init__(self, request_timeout_s: float, limit: int, keep_alive_s: float | None = None) -> None:
        self.request_timeout_s = request_timeout_s
        self.keep_alive_s = request_timeout_s if keep_alive_s is None else keep_alive_s
        self.limit = limit
        self.waiting: dict[GuardedH11Protocol, None] = {}  # an ordered set: oldest waiter first

    def watch(self, conn: "GuardedH11Protocol", idle: bool = False) -> None:
        """``idle``: kept alive after a reply, nothing of the next request received yet."""
        if conn in self.waiting:
            if idle or not conn.idle:
                return
            self.forget(conn)  # the next request has begun: it has the request timeout from now
        self.waiting[conn] = None
        conn.idle = idle
        conn.deadline = conn.loop.call_later(self.keep_alive_s if idle else self.request_timeout_s, conn.drop)
        while len(self.waiting) > self.limit:
            next(iter(self.waiting)).drop()

    def forget(self, conn: "GuardedH11Protocol") -> None:
        self.waiting.pop(conn, None)
        if conn.deadline is not None:
            conn.deadline.cancel()
            conn.deadline = None


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, with its waiting connections in a :class:`WaitingConnections`, and cut
    when its peer stops reading what it is sent (see :meth:`watch_writes`)."""

    waiting: WaitingConnections  # set on the subclass guarded_protocol() makes, one per axon
    deadline: asyncio.TimerHandle | None = None
    idle = False  # waiting kept alive after a reply, with nothing of the next request received (WaitingConnections)
    stalled: asyncio.TimerHandle | None = None  # the next check that the peer reads what is queued

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.track()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.track(idle=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.waiting.forget(self)
        if self.stalled is not None:
            self.stalled.cancel()
            self.stalled = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.watch_writes()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self.watch_writes()

    def track(self, idle: bool = False) -> None:
        """Waiting unless a whole request is in (the app runs, or its reply is under way) or it is closing."""
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.waiting.watch(self, idle)
        else:
            self.waiting.forget(self)

    def drop(self) -> None:
        """Closed as uvicorn closes an idle keep-alive connection: what the last reply left buffered still
        goes out first (if the peer reads it). An app waiting for the rest of the body gets ``http.disconnect``."""
        self.waiting.forget(self)
        if not self.transport.is_closing():
            self.transport.close()
        self.watch_writes()

    def watch_writes(self) -> None:
        """While a reply is queued here for the peer, the peer must read some of it every request timeout.

        A client that never reads (or reads a byte a second) stopped the reply's writer at uvicorn's
        buffer limit, a request in progress forever, never counted among the waiting; and a connection
        closed with its reply still queued stays open until it is sent. Pipelined requests filled such
        connections one by one, each holding a descriptor for good. A validator's client reads on.
        """
        if self.stalled is None and self.transport.get_write_buffer_size():
            self.stalled = self.loop.call_later(self.waiting.request_timeout_s, self.check_reading,
                                                self.transport.get_write_buffer_size())

    def check_reading(self, queued_before: int) -> None:
        self.stalled = None
        queued = self.transport.get_write_buffer_size()
        if queued and queued >= queued_before:
            log.info("cut %s: it read nothing of its reply for %.0f s", self.client, self.waiting.request_timeout_s)
            self.waiting.forget(self)
            self.transport.abort()
        else:
            self.watch_writes()


def guarded_protocol(request_timeout_s: float, limit: int, keep_alive_s: float | None = None) -> type[GuardedH11Protocol]:
    waiting = WaitingConnections(request_timeout_s, limit, keep_alive_s)
    return type("AxonH11Protocol", (GuardedH11Protocol,), {"waiting": waiting})


def waiting_limit(configured: int) -> int:
    """At most half the process's file descriptors wait, whatever is configured: the rest stay for requests
    being answered, the price sources, the pool and the logs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return configured if soft == resource.RLIM_INFINITY else max(1, min(configured, soft // 2))


def build_axon(settings: Settings, wallet: "bt.Wallet", handlers: AxonHandlers) -> "bt.Axon":
    external_ip = settings.axon_external_ip or ("127.0.0.1" if settings.local else None)
    axon = bt.Axon(wallet=wallet, ip=settings.axon_host, port=settings.axon_port, external_ip=external_ip,
                   external_port=settings.axon_external_port or settings.axon_port)
    axon.fast_server.config.host = settings.axon_host  # bittensor hard-codes 0.0.0.0
    axon.fast_server.config.http = guarded_protocol(settings.axon_request_timeout_s,
                                                    waiting_limit(settings.axon_max_waiting_connections),
                                                    settings.axon_keep_alive_s)
    # uvicorn's own idle close (5 s by default) would still come before the clients' (aiohttp: 15 s)
    axon.fast_server.config.timeout_keep_alive = math.ceil(settings.axon_keep_alive_s)
    axon.attach(forward_fn=handlers.forward_fn, blacklist_fn=handlers.blacklist_fn,
                priority_fn=handlers.priority_fn)
    serve_only(axon, Simulation.__name__)
    axon.app.add_middleware(RequestGuard, name=Simulation.__name__, refuse=handlers.refusal,
                            axon_fields={b"bt_header_axon_version": str(version_as_int).encode(),
                                         b"bt_header_axon_uuid": str(axon.uuid).encode()})
    quiet_refusals()
    return axon


def serve_only(axon: "bt.Axon", name: str) -> None:
    """Drop every other synapse route: bittensor attaches a ``Synapse`` ping that echoes any signed
    request with 200 and no blacklist, so an unregistered hotkey could use it. Unknown names get 404."""
    tables = (axon.forward_class_types, axon.forward_fns, axon.blacklist_fns, axon.priority_fns, axon.verify_fns)
    for other in [n for n in axon.forward_class_types if n != name]:
        for table in tables:
            table.pop(other, None)

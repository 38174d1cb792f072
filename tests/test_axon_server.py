"""The axon adapter: the caller's real timeout reaches the service, whichever dendrite sent it.

Synth's validator builds its request as ``dendrite_multiprocess`` does: the timeout (start_time - now)
goes into the signed headers only, and the JSON body is dumped from a synapse that never had it set,
so the body carries bittensor's default 12 s. Here a real in-process axon on loopback gets such a
request and the service must budget with the header's timeout.
"""

import asyncio
import json
import logging
import os
import socket
import threading
import time
import typing
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import bittensor as bt
import pytest
from bittensor.core.errors import SynapseException

from core.cache import MemoryHistoryCache
from core.engines_registry import build_forecaster
from core.market_data import MarketData, build_snapshot
from core.prompts import ForecastRequest
from core.settings import Settings
from core.sources.registry import sources_for
from core.sources.replay import ReplaySource
from miner.access import AccessPolicy, MetagraphView
from miner.axon_server import (
    AxonHandlers,
    RefusalLines,
    RequestGuard,
    WaitingConnections,
    build_axon,
    caller_fields,
    provenance,
    with_caller_timeout,
)
from miner.data import MinerData
from miner.metrics import FALLBACK_REASONS, LOST_ANSWERED_BY, MinerMetrics, fallback_reason, watch_queue_depth
from miner.offline import patch_bittensor_networking
from miner.pool import EmbeddedPool
from miner.protocol import Simulation, SimulationInput
from miner.service import Answer, MinerService
from synth_miner.devstack import (
    Proc,
    Validator,
    assert_valid_reply,
    cli,
    free_port,
    make_wallet,
    spawn,
    start_time_in,
    wait_port,
)


def body_with(timeout: float) -> bytes:
    return json.dumps({"simulation_input": {"asset": "BTC"}, "timeout": timeout}).encode()


@pytest.mark.parametrize(("header", "expected"), [
    (b"60.0", 60.0),  # the validator's real wait replaces the body's default
    (b"12.0", 12.0),  # already alike (bittensor's Dendrite.call): the body is left as it is
    (b"nan", 12.0), (b"-5", 12.0), (b"0", 12.0), (b"soon", 12.0),  # unusable header: body kept
])
def test_the_header_timeout_wins_when_it_is_usable(header: bytes, expected: float) -> None:
    body = body_with(12.0)
    out = with_caller_timeout(body, {b"timeout": header})
    assert json.loads(out)["timeout"] == expected
    assert json.loads(out)["simulation_input"] == {"asset": "BTC"}
    if expected == 12.0:
        assert out is body
    assert with_caller_timeout(body, {}) is body  # no header at all


def local_replay_miner(tmp_path: Path, shared_data: Path) -> tuple[bt.Wallet, bt.Wallet, Settings]:
    """A miner's and a validator's wallets, and local settings on a free loopback port that let that validator in
    and replay ``shared_data``."""
    patch_bittensor_networking("127.0.0.1")
    miner_wallet, vali_wallet = make_wallet(tmp_path, "miner"), make_wallet(tmp_path, "vali")
    cfg = Settings(_env_file=None, local=True, axon_host="127.0.0.1", axon_port=free_port(),  # type: ignore[call-arg]
                   allowed_hotkeys=[vali_wallet.hotkey.ss58_address], price_provider="replay",
                   replay_dir=shared_data)
    return miner_wallet, vali_wallet, cfg


async def test_a_synth_shaped_request_is_budgeted_with_the_header_timeout(tmp_path: Path, shared_data: Path) -> None:
    miner_wallet, vali_wallet, cfg = local_replay_miner(tmp_path, shared_data)
    port = cfg.axon_port
    forecaster = build_forecaster(cfg)
    service = MinerService(cfg, MinerData(MarketData(MemoryHistoryCache(), sources_for(cfg), 86_400)),
                           EmbeddedPool(forecaster), forecaster)
    budgets: list[float | None] = []
    real_deadline_for = service.deadline_for

    def spy(received: float, timeout: float | None) -> float:
        budgets.append(timeout)
        return real_deadline_for(received, timeout)

    service.deadline_for = spy  # type: ignore[method-assign]
    axon = build_axon(cfg, miner_wallet, AxonHandlers(cfg, service, AccessPolicy(cfg, MetagraphView()),
                                                      asyncio.get_running_loop()))
    axon.start()
    dendrite = bt.Dendrite(wallet=vali_wallet)
    try:
        await asyncio.sleep(0.5)
        info = bt.AxonInfo(version=0, ip="127.0.0.1", port=port, ip_type=4,
                           hotkey=miner_wallet.hotkey.ss58_address, coldkey="")
        synapse = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start_time_in(120),
                                                              time_increment=60, time_length=3600))
        body = synapse.model_dump()  # dumped before the timeout is set, as Synth's validator does
        signed = dendrite.preprocess_synapse_for_request(info, synapse.model_copy(), 75.0)
        assert body["timeout"] == 12.0 and signed.to_headers()["timeout"] == "75.0"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/Simulation", headers=signed.to_headers(), json=body,
                                 timeout=aiohttp.ClientTimeout(total=60)) as reply:
                assert reply.status == 200, await reply.text()
                paths = (await reply.json())["simulation_output"]
        assert budgets == [75.0]
        assert len(paths) == 2 + 1000 and len(paths[2]) == 61
        assert service.counters["fallbacks"] == 0
    finally:
        await dendrite.aclose_session()
        axon.stop()
        await service.pool.close()


DENDRITE_HEADERS = {"bt_header_dendrite_hotkey": "5Vali", "bt_header_dendrite_signature": "0xab",
                    "bt_header_dendrite_nonce": "17", "bt_header_dendrite_uuid": "u-1"}


@pytest.mark.parametrize("edits", [
    {},
    {"bt_header_dendrite_signature": None},
    {"bt_header_dendrite_hotkey": None, "bt_header_dendrite_nonce": None},
    {"bt_header_dendrite_signature": ""},
    {"x-bt_header_dendrite_hotkey": "5Other"},  # bittensor reads any name that contains the prefix: last wins
    {"bt_header_axon_bt_header_dendrite_nonce": "3", "bt_header_dendrite_nonce": None},  # the axon's prefix first
    {"abt_header_dendrite_signaturebt_header_dendrite_x": "0xcd"},  # split on the prefix: the second part
])
def test_the_guard_reads_the_caller_as_bittensor_does(edits: dict[str, str | None]) -> None:
    headers = {**DENDRITE_HEADERS, **{k: v for k, v in edits.items() if v is not None}}
    headers = {k: v for k, v in headers.items() if edits.get(k, "") is not None}
    raw = caller_fields({k.encode(): v.encode() for k, v in headers.items()})
    try:
        dendrite = Simulation.from_headers(headers).dendrite
    except Exception:  # bittensor cannot parse them: the guard answers 400 unless it refused first
        return
    assert dendrite is not None
    for field in ("hotkey", "signature", "nonce"):
        value = raw.get(field.encode())
        assert (None if value is None else type(getattr(dendrite, field) or "")(value.decode())) \
            == getattr(dendrite, field), field


def serve_axon(cfg: Settings, wallet: "bt.Wallet", service: MinerService, guard_refuses: bool) -> tuple["bt.Axon",
                                                                                                       MinerMetrics]:
    """An in-process axon; without ``guard_refuses`` bittensor's own middleware refuses, as before the guard did."""
    metrics = MinerMetrics()
    axon = build_axon(cfg, wallet, AxonHandlers(cfg, service, AccessPolicy(cfg, MetagraphView()),
                                                asyncio.get_running_loop(), metrics))
    if not guard_refuses:
        for middleware in axon.app.user_middleware:
            if typing.cast(object, middleware.cls) is RequestGuard:
                middleware.kwargs["refuse"] = None
    axon.start()
    return axon, metrics


async def test_the_guard_refuses_unwanted_callers_as_bittensor_would_without_bittensor(
        tmp_path: Path, shared_data: Path) -> None:
    """Unsigned, stranger-signed and nonce-less requests: the guard answers them from the raw headers, and a
    real dendrite reading its reply ends with what bittensor's own refusal gave it (status, message, 403 =
    blacklisted, 401 = failed verification), counted once in the metrics; bittensor's middleware never runs
    (its reply carries the axon's signature, the guard's none). Everything else still reaches bittensor."""
    patch_bittensor_networking("127.0.0.1")
    wallets = {name: make_wallet(tmp_path, name) for name in ("miner", "vali", "stranger")}
    vali_key = wallets["vali"].hotkey.ss58_address
    ports = free_port(), free_port()
    services, axons = [], []
    for port, guard_refuses in zip(ports, (True, False)):
        cfg = Settings(_env_file=None, local=True, axon_host="127.0.0.1", axon_port=port,  # type: ignore[call-arg]
                       allowed_hotkeys=[vali_key], price_provider="replay", replay_dir=shared_data)
        forecaster = build_forecaster(cfg)
        services.append(MinerService(cfg, MinerData(MarketData(MemoryHistoryCache(), sources_for(cfg), 86_400)),
                                     EmbeddedPool(forecaster), forecaster))
        axons.append(serve_axon(cfg, wallets["miner"], services[-1], guard_refuses))
    dendrites = {name: bt.Dendrite(wallet=wallets[name]) for name in ("vali", "stranger")}

    def prepared(name: str, port: int) -> Simulation:
        synapse = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start_time_in(120),
                                                              time_increment=60, time_length=3600, num_simulations=10))
        info = bt.AxonInfo(version=0, ip="127.0.0.1", port=port, ip_type=4,
                           hotkey=wallets["miner"].hotkey.ss58_address, coldkey="")
        return typing.cast(Simulation, dendrites[name].preprocess_synapse_for_request(info, synapse, 12.0))

    def drop(*names: str) -> "typing.Callable[[dict[str, str]], dict[str, str]]":
        return lambda h: {k: v for k, v in h.items() if k not in names}

    cases = {  # name: (signer, header edit, status, the guard answers)
        "stranger": ("stranger", dict, 403, True),
        "unsigned": ("vali", drop("bt_header_dendrite_signature"), 403, True),
        "no hotkey": ("vali", drop("bt_header_dendrite_hotkey"), 403, True),
        "empty signature": ("vali", lambda h: {**h, "bt_header_dendrite_signature": ""}, 403, True),
        "stranger without nonce": ("stranger", drop("bt_header_dendrite_nonce"), 403, True),
        "no nonce": ("vali", drop("bt_header_dendrite_nonce"), 401, True),
        # bittensor reads the validator's hotkey here: its blacklist passes, the signature check fails.
        "smuggled hotkey": ("stranger", lambda h: {**h, "x-bt_header_dendrite_hotkey": vali_key}, 401, False),
        "forged": ("vali", lambda h: {**h, "bt_header_dendrite_signature": "0x" + "ab" * 64}, 401, False),
    }
    try:
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as http:
            for name, (signer, edit, status, by_guard) in cases.items():
                seen = []
                for port in ports:
                    synapse = prepared(signer, port)
                    headers = edit({k: str(v) for k, v in synapse.to_headers().items()})
                    async with http.post(f"http://127.0.0.1:{port}/Simulation", headers=headers,
                                         json=synapse.model_dump(mode="json")) as reply:
                        dendrites[signer].process_server_response(reply, await reply.json(), synapse)
                        signed_by_axon = "bt_header_axon_signature" in reply.headers
                    assert synapse.dendrite is not None
                    message = (synapse.dendrite.status_message or "").split(" with ", 2)  # not the nonce it names
                    seen.append((reply.status, synapse.dendrite.status_code, " with ".join(message[:2]),
                                 synapse.is_blacklist, synapse.failed_verification))
                    if port == ports[0]:
                        assert signed_by_axon != by_guard, (name, "answered by bittensor" if signed_by_axon else
                                                            "answered by the guard")
                assert seen[0] == seen[1], name
                assert seen[0][:2] == (status, status), (name, seen[0])
        for _, metrics in axons:  # each 403 counted once as refused, whoever refused it
            assert metrics.registry.get_sample_value("synth_requests_total", {
                "asset": "-", "prompt": "-", "outcome": "refused"}) == 5
        honest = Validator(wallets["vali"], wallets["miner"].hotkey.ss58_address, ports[0])
        try:
            answer, _ = await honest.ask("BTC", 60, 3600, 10, timeout=30)
        finally:
            await honest.close()
        assert_valid_reply(answer)
        assert [s.counters["requests"] for s in services] == [1, 0]  # the validator's only
    finally:
        for dendrite in dendrites.values():
            await dendrite.aclose_session()
        for axon, _ in axons:
            axon.stop()
        for service in services:
            await service.pool.close()


@pytest.mark.parametrize(("reason", "label"), [
    # A Redis that drops packets times out connecting: the pool is down, not late.
    ("PoolError: pool unavailable: TimeoutError: Timeout connecting to server", "redis_down"),
    ("PoolError: pool unavailable: OperationalError: Error 111 connecting. Connection refused.", "redis_down"),
    ("PoolError: worker error: TimeoutError: model load timed out", "worker_error"),
    ("PoolError: no live worker reads queue infer.lf (no heartbeat in the last 75 s)", "no_worker"),
    # A worker killed or frozen mid-task, whatever came next (named after it: the pool noticed the loss at once).
    ("PoolError: worker gpu0@host:41 stopped while running the forecast (its lease lapsed); not sent again: no live "
     "worker reads queue infer.lf (none has announced itself in the last 25 s)", "worker_lost"),
    ("PoolError: worker gpu1@host:42 stopped while running the forecast (its lease lapsed); 0.4 s left, too little "
     "to send it again", "worker_lost"),
    ("PoolError: pool did not answer before the deadline (sent again after worker gpu0@host:41 stopped while running "
     "it)", "worker_lost"),
    ("PoolError: the task was lost with Redis's restart (neither queued, claimed nor answered); not sent again: no "
     "live worker reads queue infer.hf (none has announced itself in the last 25 s)", "redis_down"),
    ("PoolError: pool unavailable: ConnectionError: Error 111 connecting to 127.0.0.1:6379. Connection refused. "
     "(Redis unreachable until the deadline)", "redis_down"),
    ("PoolError: pool unavailable: worker heartbeats not read within 1 s", "redis_down"),
    ("PoolError: pool did not answer before the deadline", "timeout"),
    ("PoolError: embedded forecast timed out", "timeout"),
    ("shared forecast not ready by this request's deadline", "timeout"),
    ("ResponseError: paths contain NaN or inf", "invalid_paths"),
])
def test_fallback_reasons_are_labelled_by_where_the_pool_failed(reason: str, label: str) -> None:
    assert fallback_reason(reason) == label
    assert label in FALLBACK_REASONS  # exported at 0 from the start (below)


def test_the_counters_an_alert_watches_for_a_rise_start_at_zero() -> None:
    """A labelled series appears at its first event, at 1: Prometheus has no earlier sample, so increase() and
    rate() read no rise and the alerts on the first fallback or lost worker after a restart stayed silent."""
    metrics = MinerMetrics()
    for why in FALLBACK_REASONS:
        assert metrics.registry.get_sample_value("synth_fallbacks_total", {"reason": why}) == 0, why
    for by in LOST_ANSWERED_BY:
        assert metrics.registry.get_sample_value("synth_lost_forecasts_total", {"answered_by": by}) == 0, by
    assert fallback_reason("something nobody foresaw") in FALLBACK_REASONS


async def test_the_queue_depth_watcher_closes_its_connection_when_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    import redis.asyncio as aioredis

    class Client:
        closed = False

        async def llen(self, queue: str) -> int:
            return 3

        async def aclose(self) -> None:
            Client.closed = True

    monkeypatch.setattr(aioredis.Redis, "from_url", classmethod(lambda cls, url, **kw: Client()))
    metrics = MinerMetrics()
    watcher = asyncio.create_task(watch_queue_depth(metrics, "redis://unused", ["infer.hf"], every_s=0.01))
    while metrics.registry.get_sample_value("synth_queue_depth", {"queue": "infer.hf"}) != 3:
        await asyncio.sleep(0.01)
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    assert Client.closed  # it used to leave the socket open at shutdown


async def test_the_miner_shows_the_expired_tasks_the_workers_counted_in_redis(redis_url: str) -> None:
    """A prefork worker discards an expired forecast in its parent, which serves no metrics: the miner's own
    metrics show the workers' count from Redis beside the queue depths."""
    import redis

    from core.constants import EXPIRED_TASKS_KEY

    redis.Redis.from_url(redis_url).hset(EXPIRED_TASKS_KEY, mapping={"infer.hf": 4, "infer.lf": 1})
    metrics = MinerMetrics()
    watcher = asyncio.create_task(watch_queue_depth(metrics, redis_url, ["infer.hf", "infer.lf", "cpu"],
                                                    every_s=0.01))
    try:
        deadline = time.monotonic() + 5
        while metrics.registry.get_sample_value("synth_expired_tasks", {"queue": "infer.lf"}) != 1:
            assert time.monotonic() < deadline, "the expired counts never showed"
            await asyncio.sleep(0.01)
        assert metrics.registry.get_sample_value("synth_expired_tasks", {"queue": "infer.hf"}) == 4
        # None lost on cpu: 0, not absent, so its first discard is a rise the alert sees.
        assert metrics.registry.get_sample_value("synth_expired_tasks", {"queue": "cpu"}) == 0
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


FROZEN_S = 3600  # the frozen feed's newest price is at least this old


async def test_each_answer_shows_how_old_the_prices_it_was_forecast_from_are(tmp_path: Path,
                                                                             shared_data: Path) -> None:
    """synth_price_age_seconds per asset, through a real axon, service and market data: a feed that froze an
    hour ago (its replay plays up to an hour back, and no further) reads an hour old, a live one minutes. The
    fallback and valid-reply counters cannot tell them apart: both answers are valid and from the pool."""
    miner_wallet, vali_wallet, cfg = local_replay_miner(tmp_path, shared_data)
    port = cfg.axon_port
    feeds = {"BTC": ReplaySource(shared_data), "ETH": ReplaySource(shared_data, lambda: time.time() - FROZEN_S)}
    cache = MemoryHistoryCache()
    forecaster = build_forecaster(cfg)
    service = MinerService(cfg, MinerData(MarketData(cache, feeds.__getitem__, 86_400, settings=cfg)),
                           EmbeddedPool(forecaster), forecaster)
    axon, metrics = serve_axon(cfg, miner_wallet, service, guard_refuses=True)
    validator = Validator(vali_wallet, miner_wallet.hotkey.ss58_address, port)
    ages = {}
    try:
        await asyncio.sleep(0.5)
        for asset in feeds:
            before = time.time()
            reply, _ = await validator.ask(asset, 60, 3600, 10, timeout=30)
            after = time.time()
            assert_valid_reply(reply)
            ages[asset] = metrics.registry.get_sample_value("synth_price_age_seconds", {"asset": asset})
            assert ages[asset] is not None, asset
            # The snapshot the answer used: the cache is only refreshed by a request, so it is still the same.
            anchor = build_snapshot(cache, asset, int(after), cfg.cache_window_s(60)).anchor_time
            assert before - anchor <= ages[asset] <= after - anchor, (asset, ages[asset], anchor)
        assert ages["ETH"] >= FROZEN_S > ages["BTC"], ages
        assert service.counters["fallbacks"] == 0  # healthy by every other measure
        assert metrics.registry.get_sample_value("synth_invalid_replies_total") == 0
    finally:
        await validator.close()
        axon.stop()
        await service.pool.close()


def test_the_log_says_which_engine_computed_an_answer_and_why_another_stood_in() -> None:
    request = ForecastRequest("BTC", int(time.time()) + 120, 60, 3600, 1)
    assert provenance(Answer(request, b"", "pool", None, 0.0, engine="patchtst")) == "pool (patchtst)"
    assert provenance(Answer(request, b"", "pool", "history too short", 0.0, engine="ewma_t")) == \
        "pool (ewma_t, standing in: history too short)"
    assert provenance(Answer(request, b"", "fallback", "PoolError: late", 0.0, engine="ewma_t")) == \
        "fallback (ewma_t, fallback: PoolError: late)"
    assert provenance(Answer(request, b"", "pool", None, 0.0)) == "pool (engine unknown)"  # a P1 worker
    assert provenance(Answer(request, b"", "pool", None, 0.0, engine="patchtst",
                             resent_after="worker gpu0@host:41 stopped while running it")) == \
        "pool (patchtst, sent again: worker gpu0@host:41 stopped while running it)"


async def test_a_shared_answer_is_counted_as_shared() -> None:
    """synth_shared_requests_total was declared but never incremented: it read 0 whatever was shared."""
    cfg = Settings(_env_file=None)
    request = ForecastRequest("BTC", int(time.time()) + 120, 60, 3600, 1)
    body = f"[{request.start_ts},60,[1.0]]".encode()

    class Service:
        def deadline_for(self, received: float, timeout: float | None) -> float:
            return received + 10.0

        async def answer(self, asked: ForecastRequest, deadline: float) -> Answer:
            return Answer(asked, body, "pool", None, 0.0, shared=asked.num_simulations == 1, engine="patchtst")

    metrics = MinerMetrics()
    handlers = AxonHandlers(cfg, Service(), AccessPolicy(cfg, MetagraphView()),  # type: ignore[arg-type]
                            asyncio.get_running_loop(), metrics)
    for n in (1, 1, 2):
        synapse = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start_time_in(120),
                                                              time_increment=60, time_length=3600, num_simulations=n))
        reply = await handlers.forward(synapse)
        assert reply.status_code == 200
    assert metrics.registry.get_sample_value("synth_shared_requests_total") == 2
    assert metrics.registry.get_sample_value("synth_answers_by_engine_total",
                                             {"prompt": "high", "source": "pool", "engine": "patchtst"}) == 3


async def test_forecasts_whose_worker_stopped_are_counted_by_what_answered_them() -> None:
    """A worker killed mid-task: the request sent again (a model answer) or the fallback; operators see both."""
    cfg = Settings(_env_file=None)
    lost = "PoolError: worker gpu0@host:41 stopped while running the forecast (its lease lapsed); not sent again"

    class Service:
        def deadline_for(self, received: float, timeout: float | None) -> float:
            return received + 10.0

        async def answer(self, asked: ForecastRequest, deadline: float) -> Answer:
            body = f"[{asked.start_ts},60,[1.0]]".encode()
            if asked.num_simulations == 1:
                return Answer(asked, body, "pool", None, 0.0, engine="patchtst",
                              resent_after="worker gpu0@host:41 stopped while running it")
            return Answer(asked, body, "fallback", lost if asked.num_simulations == 2 else "PoolError: late", 0.0,
                          engine="ewma_t")

    metrics = MinerMetrics()
    handlers = AxonHandlers(cfg, Service(), AccessPolicy(cfg, MetagraphView()),  # type: ignore[arg-type]
                            asyncio.get_running_loop(), metrics)
    for n in (1, 1, 2, 3):
        synapse = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start_time_in(120),
                                                              time_increment=60, time_length=3600, num_simulations=n))
        assert (await handlers.forward(synapse)).status_code == 200
    assert metrics.registry.get_sample_value("synth_lost_forecasts_total", {"answered_by": "resent"}) == 2
    assert metrics.registry.get_sample_value("synth_lost_forecasts_total", {"answered_by": "fallback"}) == 1
    assert metrics.registry.get_sample_value("synth_fallbacks_total", {"reason": "worker_lost"}) == 1
    assert metrics.registry.get_sample_value("synth_fallbacks_total", {"reason": "other"}) == 1


async def test_a_request_refused_by_the_self_check_is_counted_among_the_requests() -> None:
    """A reply the self-check refused (a 500, nothing sent) was counted in synth_invalid_replies only: every
    outcome ratio over synth_requests_total read 100 % answered while validators got errors."""
    cfg = Settings(_env_file=None)

    class Service:
        def deadline_for(self, received: float, timeout: float | None) -> float:
            return received + 10.0

        async def answer(self, asked: ForecastRequest, deadline: float) -> Answer:
            raise ValueError("prices carry more digits than validators accept")

    metrics = MinerMetrics()
    handlers = AxonHandlers(cfg, Service(), AccessPolicy(cfg, MetagraphView()),  # type: ignore[arg-type]
                            asyncio.get_running_loop(), metrics)
    synapse = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start_time_in(120),
                                                          time_increment=60, time_length=3600, num_simulations=1))
    with pytest.raises(SynapseException):
        await handlers.forward(synapse)
    assert synapse.axon is not None and synapse.axon.status_code == 500
    assert metrics.registry.get_sample_value("synth_invalid_replies_total") == 1
    assert metrics.registry.get_sample_value("synth_requests_total",
                                             {"asset": "BTC", "prompt": "high", "outcome": "invalid"}) == 1


# --- held connections against a real miner process -------------------------------------------------------

MINER_NOFILE = 256  # the miner's file descriptor limit here: a small-scale stand-in for the host's


def start_small_miner(tmp: Path, shared_data: Path, env: dict[str, str] | None = None) -> tuple[Proc, Validator]:
    """A miner process limited to MINER_NOFILE descriptors, serving one validator."""
    root = tmp / "wallets"
    miner, vali = make_wallet(root, "miner"), make_wallet(root, "validator")
    port = free_port()
    args = ["prlimit", f"--nofile={MINER_NOFILE}:{MINER_NOFILE}", "--", *cli("serve", "--local", "--port", str(port))]
    proc = spawn(args, {"SYNTH_WALLET_PATH": str(root), "SYNTH_WALLET_NAME": "miner", "SYNTH_PRICE_PROVIDER": "replay",
                        "SYNTH_REPLAY_DIR": str(shared_data), "SYNTH_REDIS_URL": "", "SYNTH_DATA_DIR": str(tmp / "data"),
                        "SYNTH_ARTIFACTS_DIR": str(tmp / "artifacts"),
                        "SYNTH_ALLOWED_HOTKEYS": json.dumps([vali.hotkey.ss58_address]), **(env or {})},
                 tmp / "miner.log")
    try:
        wait_port(port, proc.proc, proc.log)
    except RuntimeError:
        proc.stop()
        raise
    return proc, Validator(vali, miner.hotkey.ss58_address, port)


@pytest.fixture
def held(tmp_path: Path, shared_data: Path) -> Iterator[tuple[Proc, Validator]]:
    proc, validator = start_small_miner(tmp_path, shared_data, {"SYNTH_AXON_REQUEST_TIMEOUT_S": "3",
                                                                "SYNTH_AXON_KEEP_ALIVE_S": "3"})
    try:
        yield proc, validator
    finally:
        proc.stop()


def hostile(port: int, kind: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    if kind == "slowloris":  # headers never finished
        sock.sendall(b"POST /Simulation HTTP/1.1\r\nHost: x\r\nX-a: ")
    elif kind == "slow body":  # a body declared and never sent
        sock.sendall(b"POST /Simulation HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 900\r\n\r\n{")
    sock.setblocking(False)
    return sock  # "silent": opened, nothing sent


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        while data := sock.recv(65_536):
            del data
        return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


async def test_held_connections_cannot_take_the_validators_place(held: tuple[Proc, Validator]) -> None:
    """Connections opened and left silent, or with headers or a body never finished: uvicorn kept each
    forever, and a few hundred used every file descriptor the miner had. The
    validator then got a 500 (the axon could not read its key file) or no connection at all, for as long
    as the attacker held them. Now the longest-waiting ones are closed past half the descriptor limit,
    and every one that has not sent a whole request within the request timeout."""
    proc, validator = held
    kinds = ("silent", "slowloris", "slow body")  # (idle kept-alive ones close after SYNTH_AXON_KEEP_ALIVE_S)
    socks = [hostile(validator.port, kinds[i % len(kinds)]) for i in range(MINER_NOFILE + 64)]
    stop = threading.Event()

    def keep_opening() -> None:  # the attacker takes any descriptor that comes free
        while not stop.wait(0.01):
            socks.append(hostile(validator.port, "silent"))

    opener = threading.Thread(target=keep_opening, daemon=True)
    opener.start()
    try:
        for _ in range(2):  # the connection the validator keeps alive is reused for the second
            reply, seconds = await validator.ask("BTC", 60, 3_600, 100, timeout=15)
            assert_valid_reply(reply)
            assert seconds < 5
        stop.set()
        opener.join()
        more = [hostile(validator.port, "slowloris") for _ in range(8)]
        await asyncio.sleep(0.5)
        assert not any(closed_by_peer(s) for s in more)  # the newest are left alone...
        await asyncio.sleep(3.5)  # (asleep, the validator's client sees its idle connection closed too)
        assert all(closed_by_peer(s) for s in more)  # ...until the request timeout (3 s here)
        assert sum(closed_by_peer(s) for s in socks) == len(socks)
        socks += more
        reply, seconds = await validator.ask("ETH", 300, 86_400, 1000, timeout=30)  # a several-MB reply
        assert_valid_reply(reply)
        assert seconds < 10
    finally:
        stop.set()
        opener.join()
        for sock in socks:
            sock.close()
        await validator.close()
    assert proc.proc.poll() is None


class Waiter:
    """What WaitingConnections keeps of a connection: its loop, its timer, and how it is dropped."""

    idle = False
    deadline: asyncio.TimerHandle | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop, waiting: WaitingConnections) -> None:
        self.loop, self.waiting, self.dropped_at = loop, waiting, None
        self.began = loop.time()

    def drop(self) -> None:
        self.waiting.forget(self)  # type: ignore[arg-type]
        self.dropped_at = self.loop.time() - self.began


async def test_a_kept_alive_connection_idles_longer_but_its_next_request_has_the_request_timeout() -> None:
    """Idle after a reply: keep_alive_s. Once a byte of the next request is in, that request must be whole
    within request_timeout_s of it, as on a new connection (a slowloris gains nothing by asking once first)."""
    loop = asyncio.get_running_loop()
    waiting = WaitingConnections(request_timeout_s=0.3, limit=10, keep_alive_s=1.5)
    fresh, kept, resumed = (Waiter(loop, waiting) for _ in range(3))
    waiting.watch(fresh)  # type: ignore[arg-type]
    waiting.watch(kept, idle=True)  # type: ignore[arg-type]
    waiting.watch(resumed, idle=True)  # type: ignore[arg-type]
    await asyncio.sleep(0.1)
    waiting.watch(resumed)  # type: ignore[arg-type]  # the first bytes of its next request
    waiting.watch(resumed)  # type: ignore[arg-type]  # more of them: the timer is not re-armed
    await asyncio.sleep(2.0)
    # Timers never fire early; a loaded host only makes them late, and the windows are a second apart.
    assert fresh.dropped_at is not None and 0.28 <= fresh.dropped_at < 1.2
    assert resumed.dropped_at is not None and 0.38 <= resumed.dropped_at < 1.3  # 0.1 idle, then 0.3 for the request
    assert kept.dropped_at is not None and kept.dropped_at >= 1.48
    assert not waiting.waiting


async def test_a_validator_whose_loop_was_busy_reuses_its_kept_alive_connection(tmp_path: Path,
                                                                                 shared_data: Path) -> None:
    """The dendrite's client (aiohttp) keeps an idle connection 15 s; uvicorn closed it after 5 s. A validator
    whose event loop was busy meanwhile (scoring other miners' replies) had not seen the close, sent its next
    request on the dead socket and got "Server disconnected" with no answer (the chaos soak's one miss).
    Kept alive SYNTH_AXON_KEEP_ALIVE_S (20 s) now: the client gives its connection up first."""
    proc, validator = start_small_miner(tmp_path, shared_data)
    try:
        for _ in range(2):
            reply, _ = await validator.ask("BTC", 60, 3_600, 100, timeout=15)
            assert_valid_reply(reply)
            time.sleep(7)  # the loop busy, not awaiting: the axon's close could not be seen before the next ask
    finally:
        await validator.close()
        proc.stop()


async def test_the_miner_signs_without_reading_its_key_file_again(tmp_path: Path, shared_data: Path) -> None:
    """bittensor's Wallet read the hotkey file at every ``wallet.hotkey``: twice a request. Out of file
    descriptors (held connections), that read failed and a validator whose connection got in still got a
    500. The key is read once at start now: with the file gone, requests are still answered."""
    proc, validator = start_small_miner(tmp_path, shared_data)
    try:
        key = tmp_path / "wallets" / "miner" / "hotkeys" / "default"
        key.rename(key.with_name("moved"))
        reply, seconds = await validator.ask("BTC", 60, 3_600, 100, timeout=20)
        assert_valid_reply(reply)
        assert seconds < 5
    finally:
        await validator.close()
        proc.stop()


def unread_request(validator: Validator, time_length: int, num_simulations: int) -> socket.socket:
    """A signed request for a reply of the given size, from a client that then never reads."""
    synapse = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start_time_in(120),
                                                          time_increment=300, time_length=time_length,
                                                          num_simulations=num_simulations))
    prepared = validator.dendrite.preprocess_synapse_for_request(validator.axon_info(), synapse, 20.0)
    body = json.dumps(prepared.model_dump(mode="json")).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in prepared.to_headers().items())
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the window a non-reader soon fills
    sock.connect(("127.0.0.1", validator.port))
    sock.sendall(f"POST /Simulation HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    sock.setblocking(False)
    return sock


def open_descriptors(proc: Proc) -> int:
    return len(os.listdir(f"/proc/{proc.proc.pid}/fd"))


async def test_a_client_that_never_reads_its_reply_is_cut(held: tuple[Proc, Validator]) -> None:
    """A client that asks and never reads (or reads a byte now and then): its reply waited in the miner's
    buffer forever, and neither the request timeout nor the waiting-connection limit touched it, so such
    connections each held a descriptor (and the reply's megabytes) for good; pipelined refusals fill one
    the same way. Now a peer that reads nothing of a queued reply for the request timeout (3 s here) is cut,
    and one whose whole reply the kernel's buffers took is closed as idle after the keep-alive (3 s here).
    A validator reading normally meanwhile gets its answers."""
    proc, validator = held
    assert_valid_reply((await validator.ask("ETH", 60, 3_600, 100, timeout=15))[0])  # its connection, kept alive
    idle = open_descriptors(proc)
    readers = [unread_request(validator, 86_400, 1000) for _ in range(4)]  # ~2.8 MB replies
    sipping = readers[2:]  # these read a byte a second
    try:
        await asyncio.sleep(1.0)
        assert open_descriptors(proc) >= idle + len(readers)
        began = sipped = time.monotonic()
        while open_descriptors(proc) > idle and time.monotonic() - began < 12:
            reply, seconds = await validator.ask("ETH", 60, 3_600, 100, timeout=15)
            assert_valid_reply(reply)
            assert seconds < 5
            if time.monotonic() - sipped >= 1:
                sipped = time.monotonic()
                for sock in sipping:
                    try:
                        sock.recv(1)
                    except OSError:  # cut (reset), or nothing arrived
                        pass
            await asyncio.sleep(0.2)
        assert open_descriptors(proc) <= idle, "the non-readers' connections are still open"
    finally:
        for sock in readers:
            sock.close()
        await validator.close()
    assert proc.proc.poll() is None


def test_refusal_lines_are_few_per_minute_and_say_how_many_were_left_out(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of refused requests wrote two lines each, ours and bittensor's ERROR: ~300 bytes a refusal."""
    quiet = RefusalLines(per_minute=2, window_s=0.3)
    ours, theirs = logging.getLogger("miner.axon_server"), logging.getLogger("bittensor")
    for logger in (ours, theirs):
        logger.addFilter(quiet)
    try:
        with caplog.at_level(logging.INFO):
            for i in range(10):
                ours.info("refused %s: %s", f"5Stranger{i}", "hotkey not in the allow-list")
                theirs.error(f"BlacklistedException#{'0' * 8}-0000-0000-0000-{i:012d}: Forbidden. Key is blacklisted")
                ours.info("answered BTC in %d ms", i)  # not a refusal: always logged
            time.sleep(0.35)
            ours.info("refused %s: %s", "5Late", "unsigned request")
        lines = [r.getMessage() for r in caplog.records]
    finally:
        for logger in (ours, theirs):
            logger.removeFilter(quiet)
    assert sum(line.startswith("answered") for line in lines) == 10
    assert [line for line in lines if line.startswith("refused")] == [
        "refused 5Stranger0: hotkey not in the allow-list", "refused 5Stranger1: hotkey not in the allow-list",
        "refused 5Late: unsigned request (and 8 more like it not logged)"]
    assert sum(line.startswith("BlacklistedException#") for line in lines) == 2

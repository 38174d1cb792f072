"""Builds and runs the miner process: data, pool, service, axon; then serves until stopped."""

import asyncio
import gc
import logging
import signal
import time
from dataclasses import dataclass

import bittensor as bt

from core.assets import ASSETS
from core.cache import HistoryCache, MemoryHistoryCache
from core.constants import AXON_START_S, DRAIN_POLL_S
from core.engines_registry import LiveForecaster
from core.history_store import HistoryStore
from core.logs import setup_logging
from core.market_data import MarketData
from core.refresh import durable_store
from core.settings import InsecureRedisError, Settings, check_redis_url
from core.sources.registry import SourceRegistry, sources_for
from miner.access import AccessPolicy, MetagraphView
from miner.axon_server import AxonHandlers, build_axon
from miner.data import MinerData
from miner.fallback import fallback_source
from miner.metrics import MinerMetrics, watch_queue_depth
from miner.offline import patch_bittensor_networking
from miner.pool import CeleryPool, EmbeddedPool, ForecastPool
from miner.service import MinerService
from miner.startup import (
    StartupError,
    check_metrics_port,
    check_port,
    check_replay,
    load_wallet,
    metrics_host,
    public_ip,
    static_metagraph,
)

__all__ = ["MinerApp", "StartupError", "build_app", "load_wallet", "serve", "served_engine"]

log = logging.getLogger("miner")


def build_cache(settings: Settings) -> HistoryCache:
    if settings.embedded:
        return MemoryHistoryCache()
    import redis

    from core.cache_redis import RedisHistoryCache

    client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=2.0, socket_connect_timeout=1.0)
    return RedisHistoryCache(client)


def build_store(settings: Settings) -> HistoryStore | None:
    """The durable history store (none for replayed prices, as in the refresh job); a miner that cannot
    write its data dir still serves (warning)."""
    try:
        return durable_store(settings)
    except Exception as exc:
        log.warning("history store unavailable (%s): history is kept in the cache only", exc)
        return None


@dataclass
class MinerApp:
    settings: Settings
    service: MinerService
    data: MinerData
    pool: ForecastPool
    metagraph: MetagraphView
    sources: SourceRegistry  # closed at shutdown
    forecaster: LiveForecaster | None = None  # the embedded pool's; None: the Celery workers compute


def build_app(settings: Settings, metagraph: MetagraphView | None = None) -> MinerApp:
    sources = sources_for(settings)
    window = {a: int(max(settings.cache_days_hf, settings.cache_days_lf) * 86_400) for a in ASSETS}
    shared = MarketData(build_cache(settings), sources, window, store=build_store(settings), settings=settings)
    data = MinerData(shared)
    # The models are loaded once: the fallback (EWMA-t) shares the embedded pool's engines, and a
    # miner whose workers compute loads no model at all.
    forecaster = LiveForecaster(settings) if settings.embedded else None
    pool: ForecastPool = EmbeddedPool(forecaster) if forecaster is not None else CeleryPool(settings)
    fallback = fallback_source(settings, forecaster)
    if metagraph is None:
        metagraph = static_metagraph(settings)
    return MinerApp(settings, MinerService(settings, data, pool, fallback), data, pool, metagraph, sources,
                    forecaster)


def served_engine(app: MinerApp) -> str:
    """The engine that really answers, for the start-up line: the one the embedded forecaster fell back
    to when the configured one did not load; in Celery mode the workers' choice (SYNTH_ENGINE)."""
    wanted = app.settings.engine
    if app.forecaster is None:
        return f"{wanted} on the workers"
    served = app.forecaster.current().default
    return served if served == wanted else f"{served} ({wanted} unavailable)"


async def listening(axon: "bt.Axon") -> bool:
    """Whether uvicorn's thread has bound the axon's socket: a failed bind ends that thread silently."""
    give_up = time.monotonic() + AXON_START_S
    while not axon.fast_server.started:
        if time.monotonic() > give_up:
            return False
        await asyncio.sleep(0.01)
    return True


async def drain(axon: "bt.Axon", grace_s: float) -> None:
    """Stop listening, then give the requests in flight up to ``grace_s`` to be answered. Their replies are
    computed on this loop: a miner that went on to exit (a deploy, ``docker stop``) dropped every one of them,
    which validators score as the worst. A second SIGINT or SIGTERM stops the wait."""
    state = axon.fast_server.server_state  # read from uvicorn's thread: sizes only, atomic
    in_flight = len(state.tasks)
    axon.stop()  # uvicorn closes its socket, then each connection once its reply is sent
    loop = asyncio.get_running_loop()
    hurry = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, hurry.set)
        except (NotImplementedError, RuntimeError):
            pass
    if in_flight:
        log.warning("miner draining: %d request(s) in flight, answered within %.0f s (signal again to stop now)",
                    in_flight, grace_s)
    began = loop.time()
    while (state.tasks or state.connections) and not hurry.is_set() and loop.time() - began < grace_s:
        await asyncio.sleep(DRAIN_POLL_S)
    if state.tasks:
        log.warning("miner stopping with %d request(s) unanswered", len(state.tasks))
    elif in_flight:
        log.info("miner drained in %.1f s", loop.time() - began)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run the miner until ``stop`` is set (or SIGINT/SIGTERM). Whatever makes starting impossible
    (configuration, wallet, public IP, chain) raises StartupError before the models are loaded."""
    setup_logging(settings.log_level, settings.log_json)
    try:
        check_redis_url(settings.redis_url)
    except InsecureRedisError as exc:
        raise StartupError(str(exc)) from None
    check_replay(settings)
    check_port(settings.axon_host, settings.axon_port)
    check_metrics_port(settings)
    metagraph = static_metagraph(settings)
    wallet = load_wallet(settings)
    subtensor: "bt.Subtensor | None" = None
    if settings.local:
        patch_bittensor_networking(settings.axon_external_ip or "127.0.0.1")
    else:
        from miner.chain import connect_chain

        if not settings.axon_external_ip:
            settings = settings.model_copy(update={"axon_external_ip": public_ip()})
            log.info("publishing the axon at %s (looked up; --external-ip sets it)", settings.axon_external_ip)
        subtensor = connect_chain(settings, wallet)
    app = build_app(settings, metagraph)
    loop = asyncio.get_running_loop()
    metrics = MinerMetrics()
    background: list[asyncio.Task[None]] = []
    axon: "bt.Axon | None" = None
    # From here on whatever ends the miner (a failed start included) stops the axon, the tasks and the
    # pool's and service's threads: a refused start must not leave the axon serving in this process.
    try:
        handlers = AxonHandlers(settings, app.service, AccessPolicy(settings, app.metagraph), loop, metrics)
        axon = build_axon(settings, wallet, handlers)
        if subtensor is not None:
            from miner.chain import first_metagraph, keep_metagraph_fresh, publish_axon

            publish_axon(settings, axon, subtensor)
            background.append(asyncio.create_task(keep_metagraph_fresh(settings, app.metagraph, subtensor,
                                                                        hotkey=wallet.hotkey.ss58_address)))
            if not await first_metagraph(app.metagraph):
                log.error("serving without a metagraph: validators are refused until the first read succeeds")
        axon.start()
        if not await listening(axon):
            raise StartupError(f"the axon is not listening on {settings.axon_host}:{settings.axon_port} after "
                               f"{AXON_START_S:g} s (the port was taken meanwhile?)", "--port / SYNTH_AXON_PORT")
        if settings.metrics_port:
            try:
                metrics.serve(settings.metrics_port, metrics_host(settings))
            except OSError as exc:  # taken since check_metrics_port
                raise StartupError(f"cannot listen on {metrics_host(settings)}:{settings.metrics_port}: "
                                   f"{exc.strerror or exc}", "--metrics-port / SYNTH_METRICS_PORT") from None
            if settings.redis_url:
                queues = [settings.queue_infer_hf, settings.queue_infer_lf, settings.queue_cpu]
                background.append(asyncio.create_task(watch_queue_depth(metrics, settings.redis_url, queues)))
        log.info("miner serving: hotkey %s on %s:%d (%s mode, %s pool, engine %s, %s prices)",
                 wallet.hotkey.ss58_address, settings.axon_host, settings.axon_port,
                 "local" if settings.local else f"netuid {settings.netuid}", app.pool.name, served_engine(app),
                 settings.price_provider)
        background.append(asyncio.create_task(app.data.warm(sorted(ASSETS))))
        gc.freeze()  # long-lived objects out of the collector: no random 100 ms pauses in replies
        stop = stop or asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        await stop.wait()
    finally:
        log.info("miner stopping")
        if axon is not None:
            await drain(axon, settings.shutdown_grace_s)
        for task in background:
            task.cancel()
        try:
            await app.pool.close()
        finally:  # the price sources' aiohttp sessions, even when the pool's close failed
            await app.sources.close()

"""Builds and runs the miner process: data, pool, service, axon; then serves until stopped."""

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass

import bittensor as bt

from core.assets import ASSETS
from core.cache import HistoryCache, MemoryHistoryCache
from core.engines_registry import LiveForecaster
from core.history_store import HistoryStore
from core.logs import setup_logging
from core.market_data import MarketData
from core.settings import InsecureRedisError, Settings, check_redis_url
from core.sources.registry import sources_for
from miner.access import AccessPolicy, MetagraphView
from miner.axon_server import AxonHandlers, build_axon
from miner.data import MinerData
from miner.metrics import MinerMetrics, watch_queue_depth
from miner.offline import patch_bittensor_networking
from miner.pool import CeleryPool, EmbeddedPool, ForecastPool
from miner.service import MinerService

log = logging.getLogger("miner")


def load_wallet(settings: Settings) -> "bt.Wallet":
    wallet = bt.Wallet(name=settings.wallet_name, hotkey=settings.wallet_hotkey, path=settings.wallet_path)
    if settings.local:
        # A local miner needs an identity to sign replies, never a funded key: create one if missing.
        wallet.create_if_non_existent(coldkey_use_password=False, hotkey_use_password=False, suppress=True)
    return wallet


def build_cache(settings: Settings) -> HistoryCache:
    if settings.embedded:
        return MemoryHistoryCache()
    import redis

    from core.cache_redis import RedisHistoryCache

    client = redis.Redis.from_url(settings.redis_url or "", socket_timeout=2.0, socket_connect_timeout=1.0)
    return RedisHistoryCache(client)


def build_store(settings: Settings) -> HistoryStore | None:
    """The durable history store; a miner that cannot write its data dir still serves (warning).

    Replayed prices are shifted copies of old data: they never enter the durable store."""
    if settings.price_provider == "replay":
        return None
    try:
        return HistoryStore.from_settings(settings)
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


def build_app(settings: Settings) -> MinerApp:
    sources = sources_for(settings)
    window = {a: int(max(settings.cache_days_hf, settings.cache_days_lf) * 86_400) for a in ASSETS}
    shared = MarketData(build_cache(settings), sources, window, store=build_store(settings), settings=settings)
    data = MinerData(shared)
    fallback = LiveForecaster(settings, engine="ewma_t")
    pool: ForecastPool = EmbeddedPool(LiveForecaster(settings)) if settings.embedded else CeleryPool(settings)
    metagraph = (MetagraphView.from_file(settings.metagraph_file) if settings.metagraph_file
                 else MetagraphView())
    return MinerApp(settings, MinerService(settings, data, pool, fallback), data, pool, metagraph)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    setup_logging(settings.log_level, settings.log_json)
    try:
        check_redis_url(settings.redis_url)
    except InsecureRedisError as exc:
        raise SystemExit(f"refusing to start: {exc}") from None
    if settings.local:
        patch_bittensor_networking(settings.axon_external_ip or "127.0.0.1")
    app = build_app(settings)
    wallet = load_wallet(settings)
    loop = asyncio.get_running_loop()
    metrics = MinerMetrics()
    handlers = AxonHandlers(settings, app.service, AccessPolicy(settings, app.metagraph), loop, metrics)
    axon = build_axon(settings, wallet, handlers)
    background: list[asyncio.Task[None]] = []
    if not settings.local:
        from miner.chain import first_metagraph, keep_metagraph_fresh, register_axon

        subtensor = register_axon(settings, wallet, axon)
        background.append(asyncio.create_task(keep_metagraph_fresh(settings, app.metagraph, subtensor)))
        if not await first_metagraph(app.metagraph):
            log.error("serving without a metagraph: validators are refused until the first read succeeds")
    axon.start()
    log.info("miner serving: hotkey %s on %s:%d (%s mode, %s pool, engine %s, %s prices)", wallet.hotkey.ss58_address,
             settings.axon_host, settings.axon_port, "local" if settings.local else f"netuid {settings.netuid}",
             app.pool.name, settings.engine, settings.price_provider)
    background.append(asyncio.create_task(app.data.warm(sorted(ASSETS))))
    if settings.metrics_port:
        metrics.serve(settings.metrics_port, "127.0.0.1" if settings.local else "0.0.0.0")
        if settings.redis_url:
            queues = [settings.queue_infer_hf, settings.queue_infer_lf, settings.queue_cpu]
            background.append(asyncio.create_task(watch_queue_depth(metrics, settings.redis_url, queues)))
    gc.freeze()  # long-lived objects out of the collector: no random 100 ms pauses in replies
    stop = stop or asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        log.info("miner stopping")
        axon.stop()
        for task in background:
            task.cancel()
        await app.pool.close()

"""MarketData against a Redis that accepts connections and never answers: the event loop must stay free."""

import asyncio
import time

import pytest
import redis

from core.cache_redis import RedisHistoryCache
from core.market_data import MarketData
from core.settings import Settings
from core.sources.registry import sources_for
from tests.conftest import free_port

SOCKET_TIMEOUT_S = 0.5


async def _never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # swallow the request until the client hangs up
    writer.close()


async def test_a_hung_redis_does_not_stall_the_event_loop() -> None:
    hung = await asyncio.start_server(_never_answer, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1]
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=SOCKET_TIMEOUT_S,
                         socket_connect_timeout=SOCKET_TIMEOUT_S)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: every provider call is refused at once
    settings = Settings(binance_url=url, hyperliquid_url=url, pyth_benchmarks_url=url, pyth_hermes_url=url,
                        http_retries=0)
    sources = sources_for(settings)
    data = MarketData(RedisHistoryCache(client), sources, 86_400, settings=settings)
    ticks: list[float] = []

    async def heartbeat() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)  # the heartbeat is ticking before the snapshot starts
    try:
        began = time.perf_counter()
        with pytest.raises(redis.RedisError):
            await data.snapshot("BTC")
        ticks.append(time.perf_counter())  # a loop blocked until the very end counts too
    finally:
        beat.cancel()
        client.close()
        await sources.close()
        hung.close()
    assert ticks[-1] - began >= SOCKET_TIMEOUT_S * 0.9, "the hung read was never waited for"
    # A read made on the loop would stop the heartbeat for a whole socket timeout; in a thread it ticks on.
    gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
    assert ticks[0] < began and max(gaps) < SOCKET_TIMEOUT_S, (len(ticks), max(gaps))

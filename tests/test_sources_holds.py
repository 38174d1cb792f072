"""Retry-After holds shared through a real Redis by clients that share nothing else (as two processes of the fleet),
against the local Binance server: a host that asked one of them to wait is left alone by all of them."""

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from core.constants import HOST_HOLD_MAX_S
from core.fake_providers import FakeMarket, FakeServer, FakeServerThread, ManualClock
from core.refresh import refresh_assets_sync
from core.settings import Settings
from core.sources import holds as holds_module
from core.sources.binance import BinanceSource
from core.sources.holds import HOST_HOLDS, Hold, LocalHostHolds, RedisHostHolds, hold_key, read_holds
from core.sources.http import HttpClient, ProviderUnavailable
from core.sources.registry import sources_for
from tests.conftest import ROOT, RedisServer, free_port
from tests.provider_fixtures import FAST_RETRIES, fake_provider_fixtures

csv_dir, clock, market, server = fake_provider_fixtures("binance", ["btc"], days=1)

LONGER_THAN_WE_WAIT = 1.5  # s: FAST_RETRIES waits at most 0.05 s, so a held request is refused, not slept out


@pytest.fixture(autouse=True)
def _outage_not_said() -> Iterator[None]:
    """Whether Redis being down was said is process-wide: each test starts, and leaves, with it unsaid."""
    holds_module._OUTAGE_SAID.clear()
    yield
    holds_module._OUTAGE_SAID.clear()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def another_process(url: str) -> RedisHostHolds:
    """Holds over the Redis at ``url`` that remember in a memory of their own, as another process would."""
    return RedisHostHolds.from_url(url, LocalHostHolds({}))


@pytest.fixture
async def binance_pair(server: FakeServer, clock: ManualClock,
                       redis_url: str) -> AsyncIterator[tuple[BinanceSource, BinanceSource]]:
    """Two Binance clients that share only the Redis."""
    made = [another_process(redis_url) for _ in range(2)]
    pair = [BinanceSource(server.url, FAST_RETRIES, clock, HttpClient("binance", FAST_RETRIES, holds=h)) for h in made]
    yield pair[0], pair[1]
    for source, holds in zip(pair, made):
        await source.close()
        holds.close()


async def lapsed(client: redis.Redis, origin: str, local: LocalHostHolds) -> None:
    """Wait until the hold on ``origin`` has run out in Redis (its TTL: Redis's clock) and in ``local``."""
    async with asyncio.timeout(60):  # the tests' holds last seconds: a hold that never lapses fails here
        while client.exists(hold_key(origin)) or local.left_now(origin) > 0:
            await asyncio.sleep(0.05)


async def test_a_host_that_asked_one_process_to_wait_is_left_alone_by_another_until_it_lapses(
        binance_pair: tuple[BinanceSource, BinanceSource], server: FakeServer, client: redis.Redis) -> None:
    first, second = binance_pair
    server.faults.set(status=429, retry_after_s=LONGER_THAN_WE_WAIT)
    with pytest.raises(ProviderUnavailable, match="HTTP 429.*Retry-After 1.5 s exceeds"):
        await first.latest("BTC")
    assert server.faults.requests == 1
    with pytest.raises(ProviderUnavailable, match="asked for no requests for"):
        await second.latest("BTC")  # it never heard the 429 itself: Redis told it
    assert server.faults.requests == 1
    [hold], _ = read_holds(client)
    assert (hold.origin, hold.asked_s, hold.status, hold.by) == (server.url, LONGER_THAN_WE_WAIT, 429, "binance")

    server.faults.set(status=None, retry_after_s=None)
    second_holds = second.http.holds
    assert isinstance(second_holds, RedisHostHolds)
    await lapsed(client, server.url, second_holds.local)
    assert (await second.latest("BTC")).price > 0  # lapsed: the host is asked again
    assert server.faults.requests == 2


async def test_a_short_hold_from_another_process_is_waited_out_not_refused(
        binance_pair: tuple[BinanceSource, BinanceSource], server: FakeServer, client: redis.Redis) -> None:
    """A hold within what a client may wait is slept out by every process, then the request goes: the one that
    asked is not failed for nothing."""
    _, second = binance_pair
    await RedisHostHolds(client, LocalHostHolds({})).hold(server.url, 0.04, 503, "binance")
    assert (await second.latest("BTC")).price > 0 and server.faults.requests == 1
    assert not client.exists(hold_key(server.url))  # the request went once the hold ran out


async def test_a_hold_another_process_extends_while_one_sleeps_out_a_short_one_is_honoured(
        server: FakeServer, clock: ManualClock, redis_url: str, client: redis.Redis) -> None:
    """A short 429 is slept out; if a longer hold (a 418 ban) is taken meanwhile, the request waiting is not sent."""
    patient = replace(FAST_RETRIES, backoff_max_s=5.0)
    holds = another_process(redis_url)
    source = BinanceSource(server.url, patient, clock, HttpClient("binance", patient, holds=holds))
    other = RedisHostHolds(client, LocalHostHolds({}))
    try:
        await other.hold(server.url, 2.0, 429, "binance")
        waiting = asyncio.create_task(source.latest("BTC"))
        async with asyncio.timeout(20):  # a regression fails here, not after minutes of spinning
            while holds.local.left_now(server.url) == 0:  # it has read the short hold and sleeps it out
                await asyncio.sleep(0.01)
        await other.hold(server.url, 300.0, 418, "binance")
        with pytest.raises(ProviderUnavailable, match="asked for no requests for 29[0-9] s more"):
            await waiting
    finally:
        await source.close()
        holds.close()
    assert server.faults.requests == 0


def test_two_refresh_processes_share_the_hold(csv_dir: Path, redis_url: str, tmp_path: Path,
                                              client: redis.Redis) -> None:
    """The refresh job in two real processes, as the cpu worker's prefork children run it: the first is answered
    429 with a Retry-After; the second, which never heard it, does not call the host until the hold lapses."""
    retry_after = 6.0  # the other process's start and refresh, with room to spare on a busy machine
    with FakeServerThread("binance", FakeMarket(csv_dir)) as fake:
        fake.faults.set(status=429, retry_after_s=retry_after)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTH_")} | {
            "PYTHONPATH": str(ROOT), "SYNTH_REDIS_URL": redis_url, "SYNTH_BINANCE_URL": fake.url,
            "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_HTTP_RETRIES": "1", "SYNTH_HTTP_BACKOFF_MAX_S": "0.02",
            "SYNTH_CACHE_DAYS_HF": "0.5", "SYNTH_CACHE_DAYS_LF": "0.5", "SYNTH_LOG_LEVEL": "WARNING"}
        code = ("import json; from core.refresh import refresh_assets_sync; from core.settings import Settings; "
                "print(json.dumps(list(refresh_assets_sync(['BTC'], Settings())[0].errors)))")
        other = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=120)
        assert other.returncode == 0, other.stderr
        errors = json.loads(other.stdout.splitlines()[-1])
        assert errors and all("Retry-After" in e for e in errors), errors
        assert fake.faults.requests == 1

        settings = Settings(_env_file=None, redis_url=redis_url, binance_url=fake.url, data_dir=tmp_path / "here",
                            http_retries=1, http_backoff_max_s=0.02, cache_days_hf=0.5, cache_days_lf=0.5)
        [held] = refresh_assets_sync(["BTC"], settings)
        assert not held.ok and all("asked for no requests" in e for e in held.errors), held.errors
        assert fake.faults.requests == 1  # this process never heard the 429: the hold came through Redis

        fake.faults.set(status=None, retry_after_s=None)
        asyncio.run(lapsed(client, fake.url, LocalHostHolds()))
        [after] = refresh_assets_sync(["BTC"], settings)
    assert after.ok and after.steps[0].new_in_cache > 0 and fake.faults.requests > 1


async def test_with_redis_down_the_holds_work_in_the_process_as_before(
        server: FakeServer, clock: ManualClock, caplog: pytest.LogCaptureFixture) -> None:
    holds = another_process(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    source = BinanceSource(server.url, FAST_RETRIES, clock, HttpClient("binance", FAST_RETRIES, holds=holds))
    try:
        with caplog.at_level(logging.WARNING, logger="core.sources.holds"):
            assert (await source.latest("BTC")).price > 0  # the refresh goes on without the shared holds
            server.faults.set(status=429, retry_after_s=30.0)
            with pytest.raises(ProviderUnavailable, match="Retry-After 30 s exceeds"):
                await source.latest("BTC")
            with pytest.raises(ProviderUnavailable, match="asked for no requests"):
                await source.latest("BTC")
    finally:
        await source.close()
        holds.close()
    assert server.faults.requests == 2  # the hold kept in the process held the third call back
    said = [r.getMessage() for r in caplog.records if "kept in this process only" in r.getMessage()]
    assert len(said) == 1 and "ConnectionError" in said[0], said  # once, not per request


async def test_holds_are_shared_again_once_redis_is_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = RedisServer(tmp_path).start()
    origin = "https://api.binance.com:443"
    holds = RedisHostHolds.from_url(own.url, LocalHostHolds({}), retry_s=0.0)  # Redis asked at every call
    try:
        with caplog.at_level(logging.INFO, logger="core.sources.holds"):
            own.stop()
            await holds.hold(origin, 60.0, 429, "binance")
            assert await holds.left(origin) > 59  # kept in the process
            own.start()  # the same port, empty
            await holds.hold(origin, 120.0, 418, "binance")
        [hold], problems = read_holds(holds.client)
        assert (hold.status, hold.asked_s, problems) == (418, 120.0, [])
    finally:
        holds.close()
        own.stop()
    said = [r.getMessage() for r in caplog.records]
    assert sum("kept in this process only" in m for m in said) == 1
    assert sum("shared through Redis again" in m for m in said) == 1


GARBAGE = [
    pytest.param(lambda c, k: c.set(k, b"\xff not json", px=60_000), "is no hold", id="not-json"),
    pytest.param(lambda c, k: c.set(k, json.dumps({"status": 429}), px=60_000), "is no hold", id="no-asked_s"),
    pytest.param(lambda c, k: c.set(k, json.dumps({"asked_s": "soon"}), px=60_000), "is no hold", id="asked-text"),
    # Numbers the readers refuse: kept by the writers' script before, so no real Retry-After replaced them.
    pytest.param(lambda c, k: c.set(k, json.dumps({"asked_s": -60}), px=60_000), "is no hold", id="asked-negative"),
    pytest.param(lambda c, k: c.set(k, b'{"asked_s": 1e999}', px=60_000), "is no hold", id="asked-infinite"),
    pytest.param(lambda c, k: c.hset(k, "asked_s", 60), "not a string", id="a-hash"),
    pytest.param(lambda c, k: c.set(k, json.dumps({"asked_s": 60})), "never expires", id="no-expiry"),
]


@pytest.mark.parametrize(("spoil", "why"), GARBAGE)
async def test_a_hold_key_holding_garbage_is_ignored_with_a_clear_log_then_replaced(
        binance_pair: tuple[BinanceSource, BinanceSource], server: FakeServer, client: redis.Redis,
        caplog: pytest.LogCaptureFixture, spoil: Callable[[redis.Redis, str], object], why: str) -> None:
    first, _ = binance_pair
    key = hold_key(server.url)
    spoil(client, key)
    with caplog.at_level(logging.WARNING, logger="core.sources.holds"):
        assert (await first.latest("BTC")).price > 0
        assert (await first.latest("BTC")).price > 0
    assert server.faults.requests == 2  # not a hold: the host is asked
    said = [r.getMessage() for r in caplog.records if key in r.getMessage()]
    assert len(said) == 1 and why in said[0] and "ignored" in said[0], said  # once per key, not per request
    holds, problems = read_holds(client)  # and `synth-miner status` names it
    assert holds == [] and len(problems) == 1 and problems[0].startswith(key) and why in problems[0]

    server.faults.set(status=429, retry_after_s=30.0)
    with pytest.raises(ProviderUnavailable, match="Retry-After 30 s"):
        await first.latest("BTC")
    [hold], problems = read_holds(client)  # the next Retry-After replaced the garbage
    assert (hold.asked_s, hold.status, problems) == (30.0, 429, []) and 29 < hold.left_s <= 30


async def test_a_shared_hold_only_grows(client: redis.Redis) -> None:
    origin = "https://api.binance.com:443"
    one, two = RedisHostHolds(client, LocalHostHolds({})), RedisHostHolds(client, LocalHostHolds({}))
    await one.hold(origin, 300.0, 429, "binance")
    await two.hold(origin, 5.0, 503, "binance")  # shorter: the longer one stands, and ``two`` learns it
    [hold], _ = read_holds(client)
    assert (hold.asked_s, hold.status) == (300.0, 429) and 290 < hold.left_s <= 300
    assert two.local.left_now(origin) > 290
    await two.hold(origin, 600.0, 418, "binance")
    [hold], _ = read_holds(client)
    assert (hold.asked_s, hold.status) == (600.0, 418) and hold.left_s > 590


async def test_an_absurd_retry_after_is_capped_in_redis_not_taken_for_redis_down(
        client: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    origin = "https://api.binance.com:443"
    holds = RedisHostHolds(client, LocalHostHolds({}))
    with caplog.at_level(logging.WARNING, logger="core.sources.holds"):
        await holds.hold(origin, 1e300, 429, "binance")
    assert caplog.records == []
    assert HOST_HOLD_MAX_S - 10 < client.pttl(hold_key(origin)) / 1000 <= HOST_HOLD_MAX_S
    assert holds.local.left_now(origin) > 1e299  # the process keeps what it was told, as before


async def test_a_hold_known_in_the_process_costs_no_redis_trip(client: redis.Redis) -> None:
    """The check runs before every provider request: a host known to be held is refused from memory, and one
    that is not costs one pipelined GET and PTTL."""
    origin, free = "https://api.binance.com:443", "https://hermes.pyth.network:443"
    await RedisHostHolds(client, LocalHostHolds({})).hold(origin, 120.0, 429, "binance")
    holds = RedisHostHolds(client, LocalHostHolds({}))  # another process: it has to ask Redis once
    client.config_resetstat()
    for _ in range(10):
        assert await holds.left(origin) > 110
    for _ in range(3):
        assert await holds.left(free) == 0
    stats = client.info("commandstats")
    assert stats["cmdstat_pttl"]["calls"] == 1 + 3 and stats["cmdstat_get"]["calls"] == 1 + 3


async def test_holds_in_force_are_listed_longest_first(client: redis.Redis) -> None:
    """`synth-miner status` lists them as read: the host that keeps the fleet off longest (a 418 ban) first."""
    holds = RedisHostHolds(client, LocalHostHolds({}))
    for origin, seconds in (("https://a.example:443", 30.0), ("https://b.example:443", 600.0),
                            ("https://c.example:443", 120.0)):
        await holds.hold(origin, seconds, 429, "binance")
    listed, problems = read_holds(client)
    assert [h.origin for h in listed] == ["https://b.example:443", "https://c.example:443",
                                          "https://a.example:443"] and problems == []


def test_the_registry_shares_its_sources_holds_through_the_settings_redis(redis_url: str) -> None:
    shared = sources_for(Settings(_env_file=None, redis_url=redis_url))
    alone = sources_for(Settings(_env_file=None, redis_url=None))
    try:
        assert isinstance(shared.holds, RedisHostHolds)
        assert all(shared.source(p).http.holds is shared.holds for p in ("binance", "pyth", "hyperliquid"))
        assert isinstance(alone.holds, LocalHostHolds) and alone.holds.until is HOST_HOLDS
    finally:
        asyncio.run(shared.close())
        asyncio.run(alone.close())


def test_a_hold_is_read_back_as_it_was_written() -> None:
    assert holds_module.parse_hold("o", json.dumps({"asked_s": 12, "status": 418, "by": "binance"}), 9_500) == \
        Hold("o", 9.5, 12.0, 418, "binance")
    assert holds_module.parse_hold("o", None, -2) is None  # gone between the two reads


async def test_a_redis_that_fails_is_asked_again_only_after_retry_s(tmp_path: Path) -> None:
    """The holds are looked up before every provider request: Redis failing (here refusing every command, as a
    server whose password the URL lacks) is asked once, then left alone for ``retry_s`` (a hung one would cost each
    request its timeout); meanwhile the holds are the process's own."""
    own = RedisServer(tmp_path, password="right").start()
    origin = "https://api.binance.com:443"
    holds = RedisHostHolds.from_url(own.url.replace(":right@", ""), LocalHostHolds({}), retry_s=600.0)
    admin = redis.Redis.from_url(own.url)
    try:
        assert await holds.left(origin) == 0
        refused_once = admin.info("errorstats")["errorstat_NOAUTH"]["count"]
        for _ in range(5):
            assert await holds.left(origin) == 0
        await holds.hold(origin, 30.0, 429, "binance")
        assert await holds.left(origin) > 29  # kept in the process
        refused = admin.info("errorstats")["errorstat_NOAUTH"]["count"]
    finally:
        holds.close()
        admin.close()
        own.stop()
    assert refused == refused_once, f"{refused - refused_once} more commands sent to a Redis that refuses them"

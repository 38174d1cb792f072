"""Set-up shared by the tests that run clients against the local provider servers or a real Redis.

Fixtures are made by factories and bound to names in each test module
(``csv_dir, clock, market, server = fake_provider_fixtures(...)``): pytest finds them there, and
nothing is imported only to be shadowed by a test's parameter.
"""

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
from aiohttp import web

from core.cache_redis import RedisHistoryCache
from core.constants import SECONDS_PER_DAY
from core.csv_history import read_csv, write_csv
from core.fake_providers import FAULTS_KEY, FakeMarket, FakeProvider, FakeServer, ManualClock, build_app, start_fake
from core.prices import PriceHistory
from core.sources.base import PriceSource
from core.sources.http import ClockAheadError, HttpConfig

T0 = 1_900_000_030  # not on a minute: the still-open bar must never be returned
FAST_RETRIES = HttpConfig(timeout_s=2.0, retries=2, backoff_s=0.01, backoff_max_s=0.05)

Fixture = Any  # what ``pytest.fixture`` returns (a private pytest class)


def write_held_in(out: Path, shared_data: Path, stems: Sequence[str], days: int, with_5m: bool = False) -> Path:
    """The last ``days`` of each ``<stem>_1m`` file before its held-out boundary, written to ``out``.

    Held-out rows never leave the shared folder. ``with_5m`` adds the 5-minute resample beside each.
    """
    manifest = json.loads((shared_data / "manifest.json").read_text())
    for stem in stems:
        cut = manifest[f"{stem}_1m"]["eval_start_ts"]
        m1 = read_csv(shared_data / f"{stem}_1m.csv.gz", 60).between(cut - days * SECONDS_PER_DAY, cut)
        write_csv(out / f"{stem}_1m.csv.gz", m1)
        if with_5m:
            write_csv(out / f"{stem}_5m.csv.gz", m1.resample(300))
    return out


def fake_provider_fixtures(provider: FakeProvider, stems: Sequence[str], days: int, *, with_5m: bool = False,
                           lead_s: int = 0) -> tuple[Fixture, Fixture, Fixture, Fixture]:
    """``csv_dir`` (per module), ``clock`` at ``T0``, ``market`` over the folder and a running ``server``."""

    @pytest.fixture(scope="module")
    def csv_dir(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
        return write_held_in(tmp_path_factory.mktemp(f"{provider}_csv"), shared_data, stems, days, with_5m)

    @pytest.fixture
    def clock() -> ManualClock:
        return ManualClock(T0)

    @pytest.fixture
    def market(csv_dir: Path, clock: ManualClock) -> FakeMarket:
        return FakeMarket(csv_dir, clock, lead_s=lead_s)

    @pytest.fixture
    async def server(market: FakeMarket) -> AsyncIterator[FakeServer]:
        srv = await start_fake(provider, market)
        yield srv
        await srv.stop()

    return csv_dir, clock, market, server


@asynccontextmanager
async def rewriting_fake(provider: FakeProvider, market: FakeMarket,
                         rewrite: Callable[[web.Request, Any], Any]) -> AsyncIterator[FakeServer]:
    """The local fake with each JSON data reply it answers 200 replaced by ``rewrite(request, reply)``: a
    provider sending garbage in its own wire format, over real HTTP."""

    @web.middleware
    async def rewriting(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        response = await handler(request)
        if request.path.startswith("/_faults") or response.status != 200:
            return response
        assert isinstance(response, web.Response) and isinstance(response.body, bytes)
        return web.Response(body=orjson.dumps(rewrite(request, orjson.loads(response.body))),
                            content_type="application/json")

    app = build_app(provider, market)
    app.middlewares.insert(0, rewriting)  # outermost: it sees what the fault middleware answered
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    server = FakeServer(runner, f"http://127.0.0.1:{runner.addresses[0][1]}", app[FAULTS_KEY])
    try:
        yield server
    finally:
        await server.stop()


def source_fixture(make: Callable[[str, ManualClock], PriceSource]) -> Fixture:
    """``source``: ``make(server.url, clock)``, closed after the test."""

    @pytest.fixture
    async def source(server: FakeServer, clock: ManualClock) -> AsyncIterator[PriceSource]:
        src = make(server.url, clock)
        yield src
        await src.close()

    return source


async def latest_from_a_clock_ahead(provider: FakeProvider, make: Callable[[str], PriceSource], csv_dir: Path,
                                    ahead_s: int, asset: str) -> ClockAheadError:
    """What ``latest`` raises against a local ``provider`` whose clock runs ``ahead_s`` ahead of ours: the error
    must say how far its newest bar lies past our clock."""
    fake = await start_fake(provider, FakeMarket(csv_dir, ManualClock(T0 + ahead_s)))
    src = make(fake.url)
    try:
        with pytest.raises(ClockAheadError, match=r"its newest bar opens \d+ s after our clock") as err:
            await src.latest(asset)
    finally:
        await src.close()
        await fake.stop()
    return err.value


def redis_cache_fixtures() -> tuple[Fixture, Fixture]:
    """``client`` (bytes replies) on the test's clean database and the ``cache`` over it."""

    @pytest.fixture
    def client(redis_url: str) -> Iterator[redis.Redis]:
        c = redis.Redis.from_url(redis_url)
        yield c
        c.close()

    @pytest.fixture
    def cache(client: redis.Redis) -> RedisHistoryCache:
        return RedisHistoryCache(client)

    return client, cache


def random_walk_bars(start: int, n: int, step: int = 60, drop: tuple[int, ...] = (), seed: int = 0,
                     level: float = 100.0) -> PriceHistory:
    """``n`` bars from ``start`` around ``level`` (log steps of 0.1 %), the indices in ``drop`` left out."""
    rng = np.random.default_rng(seed)
    ts = start + step * np.arange(n, dtype=np.int64)
    close = level * np.exp(np.cumsum(rng.normal(0, 1e-3, n)))
    keep = np.ones(n, bool)
    keep[list(drop)] = False
    return PriceHistory(step, ts[keep], close[keep])

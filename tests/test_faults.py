"""Faults on the real stack: every reply valid (both rule sets) and in time, recovery without help,
no corrupted data.

Two stacks of real processes, each with its own redis-server, Celery worker and miner (Celery pool):
one replays CSV history (Redis killed mid-request, a worker SIGKILLed mid-task, a worker frozen with
SIGSTOP, corrupt artifacts), the other reads prices through the real Binance client from a local server
speaking Binance's wire format (provider down, slow or returning garbage, with a warm and a cold cache;
the history store's disk failing). Validators ask with an 8 s timeout, so fallbacks show quickly.
Which part answered comes from the miner's log ("answered KEY from pool|fallback").

Prices are the last days *before* each file's held-out boundary (held-out rows never leave the shared
folder). Each ask uses its own start time, so every request is computed (no shared answers).
"""

import asyncio
import errno
import itertools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Self

import numpy as np
import pytest
import redis

from core import history_store
from core.artifacts import ArtifactStore
from core.cache_redis import RedisHistoryCache
from core.calibration import CALIBRATION_FILE, CalibrationState, Entry
from core.constants import JOB_RUNS_KEY, KEY_PREFIX, TASK_CLAIM_KEY, TASK_REFRESH_CACHE
from core.csv_history import read_csv, write_csv
from core.fake_providers import FakeMarket, FakeServerThread, ManualClock, start_fake
from core.history_store import HistoryStore
from core.prices import PriceHistory
from core.prompts import parse_start_time
from core.refresh import refresh_asset
from core.settings import Settings
from core.sources.binance import BinanceSource
from core.sources.http import HttpConfig
from miner.pool import celery_client
from miner.protocol import Simulation
from synth_miner.devstack import (
    Proc,
    RedisServer,
    Validator,
    assert_valid_reply,
    cli,
    free_port,
    make_wallet,
    spawn,
    start_time_in,
    start_worker,
    wait_port,
)
from tests.worker_apps import HOLD_FORECAST_KEY

TIMEOUT = 8.0  # the validators' timeout in these tests: pool deadline 5 s, fallback by 6 s
RECOVERY_S = 60.0  # a part that comes back is used again within this
STEMS = {"btc": "BTC", "eth": "ETH", "sol": "SOL", "xau": "XAU"}
SLICE_DAYS = 5


def training_slices(shared_data: Path, out: Path) -> Path:
    """1m and 5m rows of the last days before each file's held-out boundary."""
    manifest = json.loads((shared_data / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for stem in STEMS:
        for res, step in (("1m", 60), ("5m", 300)):
            name = f"{stem}_{res}"
            cut = int(manifest[name]["eval_start_ts"])
            rows = read_csv(shared_data / f"{name}.csv.gz", step).between(cut - SLICE_DAYS * 86_400, cut)
            write_csv(out / f"{name}.csv.gz", rows)
    return out


class Stack:
    """redis-server (restartable on its port, with its dump), one inference worker, the miner."""

    def __init__(self, tmp: Path, env: dict[str, str]) -> None:
        self.tmp = tmp
        wallets = tmp / "wallets"
        self.miner_hotkey = make_wallet(wallets, "miner").hotkey.ss58_address
        self.validator_wallet = make_wallet(wallets, "validator")
        self.redis = RedisServer(tmp).start()
        self.env = {"SYNTH_REDIS_URL": self.redis.url, "SYNTH_WALLET_PATH": str(wallets),
                    "SYNTH_WALLET_NAME": "miner", "SYNTH_DATA_DIR": str(tmp / "data"),
                    "SYNTH_ARTIFACTS_DIR": str(tmp / "artifacts"), "SYNTH_LOG_LEVEL": "INFO",
                    "SYNTH_ALLOWED_HOTKEYS": json.dumps([self.validator_wallet.hotkey.ss58_address]), **env}
        self.port = free_port()
        self._names = itertools.count(1)
        self._slots = itertools.count(2)
        self.worker: Proc | None = None
        self.miner = self._spawn_miner()
        try:
            self.worker = self.start_worker()
            wait_port(self.port, self.miner.proc, self.miner.log)
        except BaseException:
            self.close()  # a stack that failed to start leaves nothing running
            raise

    # --- processes -----------------------------------------------------------------------------------
    def _spawn_miner(self) -> Proc:
        return spawn(cli("serve", "--local", "--port", str(self.port)), self.env,
                     self.tmp / f"miner-{next(self._names)}.log")

    def restart_miner(self) -> None:
        self.miner.stop()
        self.miner = self._spawn_miner()
        wait_port(self.port, self.miner.proc, self.miner.log)

    def start_worker(self, queues: str = "infer.hf,infer.lf", **env: str) -> Proc:
        return start_worker(self.tmp, {**self.env, **env}, queues=queues, name=f"w{next(self._names)}")

    def restart_redis(self) -> None:
        """The same port and directory: it loads the dump, as a production Redis loads its AOF."""
        fresh = RedisServer(self.redis.workdir)
        fresh.port = self.redis.port
        self.redis = fresh.start()

    def client(self) -> "redis.Redis":
        return redis.Redis.from_url(self.redis.url, socket_timeout=5)

    def cache(self) -> RedisHistoryCache:
        return RedisHistoryCache(self.client())

    def close(self) -> None:
        if self.worker is not None:
            if self.worker.proc.poll() is None:
                os.killpg(self.worker.proc.pid, signal.SIGCONT)  # a test that failed while it was frozen
            self.worker.stop()
        self.miner.stop()
        self.redis.stop()

    # --- the validator's side ---------------------------------------------------------------------------
    async def ask(self, asset: str, increment: int, length: int,
                  timeout: float = TIMEOUT) -> tuple[Simulation, float, str]:
        start = start_time_in(120 + 60 * next(self._slots))
        validator = Validator(self.validator_wallet, self.miner_hotkey, self.port)
        try:
            reply, seconds = await validator.ask(asset, increment, length, 1000, start_time=start, timeout=timeout)
        finally:
            await validator.close()
        return reply, seconds, f"{asset}:{parse_start_time(start)}:{increment}:{length}:1000"

    async def ask_valid(self, asset: str, increment: int, length: int, timeout: float = TIMEOUT) -> str:
        """A valid reply before the deadline; returns which part answered ("pool" or "fallback")."""
        reply, seconds, key = await self.ask(asset, increment, length, timeout)
        assert_valid_reply(reply)
        assert seconds < timeout, (key, seconds)
        return self.outcome(key)

    def outcome(self, key: str) -> str:
        marker = f"answered {key} from "
        for line in self.miner.text().splitlines():
            if marker in line:
                return line.split(marker, 1)[1].split()[0]
        raise AssertionError(f"{key} not answered in the miner log:\n{self.miner.text()[-3000:]}")

    async def until_pool(self, asset: str, increment: int, length: int, within: float = RECOVERY_S) -> float:
        """Ask until the pool answers again; every reply meanwhile is valid and in time. Seconds taken."""
        began = time.monotonic()
        while await self.ask_valid(asset, increment, length) != "pool":
            assert time.monotonic() - began < within, f"no pool answer {within:.0f} s after recovery:\n" \
                                                      f"{self.miner.text()[-3000:]}"
            await asyncio.sleep(1.0)
        return time.monotonic() - began


# --- data integrity ----------------------------------------------------------------------------------


def check_rows(hist: PriceHistory) -> None:
    """Sorted, unique, on the grid, positive and finite."""
    assert len(hist) > 0
    assert np.all(np.diff(hist.ts) > 0), "not sorted or not unique"
    assert np.all(hist.ts % hist.step == 0), "off the grid"
    assert np.all(np.isfinite(hist.close)) and np.all(hist.close > 0), "non-finite or non-positive prices"


def check_kept(after: PriceHistory, before: PriceHistory, lo: int, hi: int) -> None:
    """Every row of ``before`` with lo <= ts < hi is still in ``after``, with the same price."""
    old = before.between(lo, hi)
    assert len(old) > 0
    index = np.searchsorted(after.ts, old.ts)
    assert np.all(index < len(after.ts)) and np.array_equal(after.ts[index], old.ts), "rows lost"
    assert np.array_equal(after.close[index], old.close), "rows changed"


def cache_rows(cache: RedisHistoryCache, asset: str, step: int) -> PriceHistory:
    span = cache.span(asset, step)
    assert span is not None, f"no {step}s cache for {asset}"
    hist = cache.read(asset, step, span[0], span[1] + step)
    check_rows(hist)
    return hist


# --- the replayed stack: Redis, workers, artifacts -----------------------------------------------------


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    return training_slices(shared_data, tmp_path_factory.mktemp("slices"))


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory, slices: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path_factory.mktemp("replay-stack"),
                  {"SYNTH_PRICE_PROVIDER": "replay", "SYNTH_REPLAY_DIR": str(slices)})
    yield stack
    stack.close()


def blocked_on_result(client: "redis.Redis") -> bool:
    """The miner is in BLPOP on a result key (the workers' BRPOP on the queues looks alike but is not it)."""
    return any(c.get("cmd") == "blpop" and "b" in c.get("flags", "") for c in client.client_list())


async def wait_until(predicate: Any, within: float = 5.0, every: float = 0.005) -> None:
    deadline = time.monotonic() + within
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, f"condition not met within {within} s"
        await asyncio.sleep(every)


async def test_redis_killed_during_a_request(replay: Stack) -> None:
    await replay.until_pool("BTC", 300, 86_400)
    before = {step: cache_rows(replay.cache(), "BTC", step) for step in (60, 300)}
    replay.client().save()  # what the production Redis's AOF gives: the data outlives a crash

    watcher = replay.client()
    request = asyncio.create_task(replay.ask("BTC", 300, 86_400))
    await wait_until(lambda: blocked_on_result(watcher))
    replay.redis.stop()  # SIGKILL while the miner waits for the worker's paths
    reply, seconds, key = await request
    assert_valid_reply(reply)
    assert seconds < TIMEOUT and replay.outcome(key) == "fallback"

    # While Redis is down: both prompts, from the miner's own copy of the market data.
    assert await replay.ask_valid("ETH", 60, 3_600) == "fallback"
    assert await replay.ask_valid("BTC", 300, 86_400) == "fallback"
    assert replay.miner.proc.poll() is None

    replay.restart_redis()
    await replay.until_pool("BTC", 60, 3_600)
    await replay.until_pool("XAU", 300, 86_400)
    for step, rows in before.items():
        after = cache_rows(replay.cache(), "BTC", step)
        check_kept(after, rows, int(rows.ts[0]) + 3_600, int(rows.ts[-1]) + 1)


async def test_worker_killed_during_a_task(replay: Stack) -> None:
    assert replay.worker is not None
    await replay.until_pool("SOL", 300, 86_400)
    worker = replay.worker
    seen = worker.text().count("] received")  # Celery logs "Task synth.forecast[id] received"
    request = asyncio.create_task(replay.ask("SOL", 300, 86_400))
    await wait_until(lambda: worker.text().count("] received") > seen)
    worker.stop(signal.SIGKILL)  # mid-task: the paths never come
    reply, seconds, key = await request
    assert_valid_reply(reply)
    assert seconds < TIMEOUT and replay.outcome(key) == "fallback"
    assert await replay.ask_valid("ETH", 60, 3_600) == "fallback"  # no worker at all now

    replay.worker = replay.start_worker()  # the part comes back
    await replay.until_pool("SOL", 300, 86_400)


async def test_worker_killed_during_a_forecast_another_worker_answers(replay: Stack) -> None:
    """A worker killed while it runs a forecast (kill -9, the OOM killer, a GPU crash) pushes nothing: the miner
    waited out its whole pool wait (SYNTH_MAX_WAIT_S, 30 s here) and answered from the fallback. The task's lease
    lapses within seconds instead, and the request is sent again to the other worker: a model answer, and the
    miner's log says why. Two workers of tests/worker_apps.py, whose first forecast runs until it is killed."""
    assert replay.worker is not None
    replay.worker.stop()  # the held forecast must go to one of the two below
    replay.worker = None
    env = {**replay.env, "SYNTH_LOG_LEVEL": "INFO"}
    workers = [spawn([sys.executable, "-m", "celery", "-A", "tests.worker_apps", "worker", "-Q", "infer.hf,infer.lf",
                      "-P", "solo", "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "-l", "INFO"], env,
                     replay.tmp / f"worker-{name}.log") for name in ("first", "second")]
    client = replay.client()
    try:
        await wait_until(lambda: all(" ready." in w.text() for w in workers), within=90, every=0.2)
        await replay.until_pool("BTC", 300, 86_400)  # the miner has seen them
        client.set(HOLD_FORECAST_KEY, 600)  # until it is killed
        asked = asyncio.create_task(replay.ask("BTC", 300, 86_400, timeout=40.0))


        def claimed() -> list[tuple[str, Proc]]:  # (a worker killed in an earlier test may have left its claim)
            names = [(client.get(k) or b"").decode() for k in client.scan_iter(TASK_CLAIM_KEY.format(request_id="*"))]
            return [(n, w) for n in names for w in workers if n.endswith(f":{w.proc.pid}")]

        await wait_until(claimed, within=30)
        [(name, held)] = claimed()
        held.stop(signal.SIGKILL)  # mid-forecast: it holds the task until killed
        reply, seconds, key = await asked
        assert_valid_reply(reply)
        answered = [line for line in replay.miner.text().splitlines() if f"answered {key} from " in line]
        assert len(answered) == 1 and replay.outcome(key) == "pool", replay.miner.text()[-3000:]
        assert f"sent again: worker {name} stopped while running it)" in answered[0], answered
    finally:
        client.delete(HOLD_FORECAST_KEY)
        for worker in workers:
            worker.stop()
    replay.worker = replay.start_worker()
    await replay.until_pool("BTC", 60, 3_600)


async def test_worker_hangs_then_resumes(replay: Stack) -> None:
    assert replay.worker is not None
    pid = replay.worker.proc.pid
    os.killpg(pid, signal.SIGSTOP)
    try:
        assert await replay.ask_valid("BTC", 60, 3_600) == "fallback"
        assert await replay.ask_valid("XAU", 300, 86_400) == "fallback"
    finally:
        os.killpg(pid, signal.SIGCONT)
    # The frozen worker finds expired tasks in the queue (revoked, not run) and serves again.
    await replay.until_pool("BTC", 60, 3_600)
    assert replay.worker.proc.poll() is None


async def test_redis_hangs_then_resumes(replay: Stack) -> None:
    """A hung Redis host (SIGSTOP: connections stay open, nothing answers) is worse than a dead one: no
    connection error comes. The request waiting on it, and new ones arriving together, are answered in
    time by the fallback; once Redis resumes the pool serves again, with nothing lost."""
    await replay.until_pool("ETH", 300, 86_400)
    assert replay.redis.proc is not None
    watcher = replay.client()
    request = asyncio.create_task(replay.ask("ETH", 300, 86_400))
    await wait_until(lambda: blocked_on_result(watcher))
    watcher.close()
    replay.redis.proc.send_signal(signal.SIGSTOP)
    try:
        reply, seconds, key = await request
        assert_valid_reply(reply)
        assert seconds < TIMEOUT and replay.outcome(key) == "fallback"
        # A burst while it hangs: each request's send is bounded, and they do not queue behind each other.
        burst = await asyncio.gather(*(replay.ask(asset, increment, length)
                                       for asset, increment, length in [("BTC", 60, 3_600), ("XAU", 300, 86_400)] * 2))
        for reply, seconds, key in burst:
            assert_valid_reply(reply)
            assert seconds < TIMEOUT and replay.outcome(key) == "fallback", (key, seconds)
        assert replay.miner.proc.poll() is None
    finally:
        replay.redis.proc.send_signal(signal.SIGCONT)
    await replay.until_pool("ETH", 300, 86_400)
    await replay.until_pool("BTC", 60, 3_600)
    assert replay.worker is not None and replay.worker.proc.poll() is None


async def test_a_miner_told_to_stop_answers_the_requests_in_flight_first(replay: Stack) -> None:
    """A deploy or ``docker stop`` sends SIGTERM: the miner exited at once and every request in flight got no
    reply (the worst score). It now stops listening and answers them first; a second signal stops the wait."""
    assert replay.worker is not None
    await replay.until_pool("BTC", 300, 86_400)
    watcher = replay.client()
    pid = replay.worker.proc.pid
    os.killpg(pid, signal.SIGSTOP)  # the pool answers nothing: each request waits for its pool deadline
    try:
        asks = [asyncio.create_task(replay.ask(asset, 300, 86_400)) for asset in ("BTC", "ETH")]
        await wait_until(lambda: sum(c.get("cmd") == "blpop" for c in watcher.client_list()) >= 2)
        miner = replay.miner
        miner.proc.send_signal(signal.SIGTERM)
        for reply, seconds, key in await asyncio.gather(*asks):
            assert_valid_reply(reply)
            assert seconds < TIMEOUT and replay.outcome(key) == "fallback", (key, seconds)
        assert await asyncio.to_thread(miner.proc.wait, 10) == 0
        assert "miner draining: 2 request(s) in flight" in miner.text() and "miner drained in" in miner.text()

        # Signalled twice (an operator's second Ctrl-C): it stops without waiting out a long request.
        replay.restart_miner()
        miner = replay.miner
        ask = asyncio.create_task(replay.ask("SOL", 300, 86_400, timeout=60.0))
        await wait_until(lambda: sum(c.get("cmd") == "blpop" for c in watcher.client_list()) >= 1)
        miner.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "miner draining" in miner.text())
        began = time.monotonic()
        miner.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(miner.proc.wait, 10) == 0
        assert time.monotonic() - began < 5 and "1 request(s) unanswered" in miner.text()
        reply, _, _ = await ask
        assert not reply.is_success
    finally:
        os.killpg(pid, signal.SIGCONT)
        watcher.close()
    replay.restart_miner()
    await replay.until_pool("BTC", 300, 86_400)


def served_version(stack: Stack) -> str:
    """The artifact version the running worker announces in its heartbeat (written after each task)."""
    assert stack.worker is not None
    client = stack.client()
    beats = [json.loads(client.get(k) or b"{}") for k in client.scan_iter(f"{KEY_PREFIX}:worker:*")]
    mine = [b for b in beats if b.get("pid") == stack.worker.proc.pid]
    assert len(mine) == 1, beats
    return str(mine[0].get("artifact_version"))


def publish_calibration(root: Path, scale: float) -> str:
    state = CalibrationState({"ewma_t:BTC:60": Entry("ewma_t", "BTC", 60, scale=scale)}, meta={"test": True})
    store = ArtifactStore(root)
    return store.publish(store.stage({CALIBRATION_FILE: state.to_json()}))


def point_current_at(root: Path, version: str) -> None:
    """What a bad copy or a manual switch does: ``current`` names a version, whatever it holds."""
    link = root / "current"
    tmp = root / f".current-test-{version}"
    os.symlink(f"versions/{version}", tmp)
    os.replace(tmp, link)


async def test_corrupt_artifacts_keep_the_worker_serving(replay: Stack) -> None:
    root = Path(replay.env["SYNTH_ARTIFACTS_DIR"])
    good = publish_calibration(root, 1.0)
    await replay.until_pool("BTC", 60, 3_600)
    assert served_version(replay) == good

    # 1. `current` switched to a version whose calibration no longer matches its manifest hash.
    bad = "bad-copy"
    shutil.copytree(root / "versions" / good, root / "versions" / bad)
    manifest = json.loads((root / "versions" / bad / "manifest.json").read_text())
    manifest["version"] = bad
    (root / "versions" / bad / "manifest.json").write_text(json.dumps(manifest))
    with (root / "versions" / bad / CALIBRATION_FILE).open("r+b") as fh:
        fh.seek(5)
        fh.write(b"\x00garbage\xff")
    point_current_at(root, bad)
    assert await replay.ask_valid("BTC", 60, 3_600) == "pool"  # the previous version keeps serving
    assert served_version(replay) == good
    assert f"artifact {bad} refused" in replay.worker.text()  # type: ignore[union-attr]

    # 2. A worker (re)started while `current` is corrupt serves the statistical engine, uncalibrated.
    assert replay.worker is not None
    replay.worker.stop()
    (root / "versions" / good / CALIBRATION_FILE).write_bytes(b"{not json")  # and the good one rots too
    point_current_at(root, good)
    replay.worker = replay.start_worker()
    assert await replay.ask_valid("BTC", 300, 86_400) == "pool"
    assert served_version(replay) == "None"

    # 3. A valid publication is picked up between tasks, without a restart.
    fresh = publish_calibration(root, 1.1)
    assert await replay.ask_valid("ETH", 60, 3_600) == "pool"
    assert served_version(replay) == fresh


# --- the provider stack: Binance wire format, warm and cold cache, disk failures ------------------------


class Market:
    def __init__(self, stack: Stack, fake: FakeServerThread) -> None:
        self.stack = stack
        self.fake = fake

    def faults(self, **changes: Any) -> None:
        self.fake.faults.reset()
        self.fake.faults.set(**changes)


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory, slices: Path) -> Iterator[Market]:
    fake = FakeServerThread("binance", FakeMarket(slices)).start()
    # The cache is warmed 10 minutes behind (a lagging feed), so every request after that finds it
    # stale and asks the provider again (at most every 30 s per asset): the faults are on that path.
    fake.faults.set(stale_s=600)
    env = {"SYNTH_PRICE_PROVIDER": "binance", "SYNTH_BINANCE_URL": fake.url, "SYNTH_HTTP_TIMEOUT_S": "1",
           "SYNTH_HTTP_RETRIES": "2", "SYNTH_HTTP_BACKOFF_S": "0.05", "SYNTH_HTTP_BACKOFF_MAX_S": "0.2"}
    stack = Stack(tmp_path_factory.mktemp("market-stack"), env)
    try:
        deadline = time.monotonic() + 30
        while any(stack.cache().span(a, 60) is None for a in ("BTC", "ETH", "SOL")):
            assert time.monotonic() < deadline, stack.miner.text()[-3000:]
            time.sleep(0.2)
        yield Market(stack, fake)
    finally:
        stack.close()
        fake.stop()


async def test_provider_faults_with_a_warm_cache(market: Market) -> None:
    """The cache holds days of history, 10 minutes old; the provider fails when the miner asks it.
    Each fault is switched on, then the miner restarted, so its first look at the stale cache (the
    warm-up) asks the faulty provider at once instead of after its 30 s retry pause."""
    stack = market.stack
    before = {a: cache_rows(stack.cache(), a, 60) for a in ("BTC", "ETH", "SOL")}
    # name: (faults, what the miner logs once it has met them)
    cases: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
        "down": ({"status": 503, "stale_s": 600}, ("answered HTTP 503",)),
        # Over the client's 1 s timeout: the refresh times out, or the warm-up gives up on it first.
        "slow": ({"latency_s": 3.0, "stale_s": 600}, ("ProviderTimeout", "BTC (TimeoutError")),
        # The 10 missing minutes come back with a NaN close, a short row and missing bars.
        "garbage": ({"bad_price": float("nan"), "mismatched": True, "missing_every": 7},
                    ("MalformedReplyError",)),
    }
    for name, (fault, logged) in cases.items():
        market.faults(**fault)
        stack.restart_miner()
        assert await stack.ask_valid("BTC", 300, 86_400) == "pool", name  # the workers read the warm cache
        assert await stack.ask_valid("ETH", 60, 3_600) == "pool", name
        assert await stack.ask_valid("SOL", 60, 3_600) == "pool", name
        await wait_until(lambda met=logged: any(n in stack.miner.text() for n in met), within=20)  # fault met
        for asset, rows in before.items():
            after = cache_rows(stack.cache(), asset, 60)  # no garbage got in, nothing lost
            check_kept(after, rows, int(rows.ts[0]) + 3_600, int(rows.ts[-1]) + 1)


async def test_provider_faults_with_a_cold_cache(market: Market) -> None:
    stack = market.stack
    assets = ["BTC", "ETH", "SOL"]
    store_dir = Path(stack.env["SYNTH_DATA_DIR"]) / "history"
    before = HistoryStore(store_dir).read("BTC", 60, 0, 2 ** 40)
    check_rows(before)

    # Redis lost its cache (a FLUSHALL, a fresh instance) and the provider is down: the durable
    # history store refills the cache, and the miner answers from it.
    stack.cache().clear(assets)
    market.faults(status=503)
    stack.restart_miner()
    assert await stack.ask_valid("BTC", 300, 86_400) in ("pool", "fallback")
    check_kept(cache_rows(stack.cache(), "BTC", 60), before, int(before.ts[0]) + 86_400, int(before.ts[-1]) + 1)

    # Nothing anywhere (no cache, no store); the provider is slow (0.4 s a reply, under the 1 s
    # timeout) and flaky (two 502s, retried). Filling 14 days of 1-minute bars for three assets takes
    # it ~7 s, longer than these tests' 8 s timeout allows: asked with the ~50 s a validator gives a
    # 1 h prompt (20 s here), the first requests join the fetch already under way and are answered.
    stack.cache().clear(assets)
    shutil.rmtree(store_dir)
    market.faults(latency_s=0.4, status=502, status_count=2)
    stack.restart_miner()
    assert await stack.ask_valid("ETH", 60, 3_600, timeout=20) in ("pool", "fallback")
    assert await stack.ask_valid("SOL", 300, 86_400, timeout=20) in ("pool", "fallback")
    check_rows(cache_rows(stack.cache(), "ETH", 60))

    # Nothing anywhere and the provider down: no price exists, so a clear error before the deadline.
    stack.cache().clear(assets)
    shutil.rmtree(store_dir)
    market.faults(status=503)
    stack.restart_miner()
    reply, seconds, _ = await stack.ask("BTC", 300, 86_400)
    assert reply.axon is not None and reply.axon.status_code == 503, reply.axon
    assert "no price available" in (reply.axon.status_message or "") and seconds < TIMEOUT
    assert reply.simulation_output is None

    market.faults()  # back: the miner retries by itself (at most every 30 s per asset)
    began = time.monotonic()
    while True:
        reply, seconds, _ = await stack.ask("BTC", 300, 86_400)
        assert seconds < TIMEOUT
        if reply.is_success:
            assert_valid_reply(reply)
            break
        assert reply.axon is not None and reply.axon.status_code == 503
        assert time.monotonic() - began < RECOVERY_S, stack.miner.text()[-3000:]
        await asyncio.sleep(2.0)
    await stack.until_pool("BTC", 60, 3_600)
    check_rows(cache_rows(stack.cache(), "BTC", 60))
    check_rows(HistoryStore(store_dir).read("BTC", 60, 0, 2 ** 40))


def send_refresh(stack: Stack, slot: int) -> dict[str, Any]:
    """Run the periodic cache refresh now on the cpu queue and wait for its run record."""
    app = celery_client(Settings(redis_url=stack.redis.url))
    app.send_task(TASK_REFRESH_CACHE, kwargs={"job": "refresh-cache", "period_s": 60.0, "slot": slot},
                  queue="cpu")
    client = stack.client()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for raw in client.lrange(JOB_RUNS_KEY, 0, -1):
            record: dict[str, Any] = json.loads(raw)
            if record.get("slot") == slot:
                return record
        time.sleep(0.2)
    raise AssertionError("the refresh job did not run")


async def test_history_store_disk_failing_in_the_refresh_job(market: Market, tmp_path: Path) -> None:
    """The data dir cannot be created (a file sits where a folder should be): the job still refills
    the cache (emptied, as after a Redis restart), reports the store failure, and writes the store
    once the path is usable again."""
    stack = market.stack
    market.faults()
    blocker = tmp_path / "disk"
    blocker.write_text("a file where the data folder should be")
    cpu = stack.start_worker(queues="cpu", SYNTH_DATA_DIR=str(blocker / "data"))
    try:
        before = cache_rows(stack.cache(), "BTC", 60)
        stack.cache().clear(["BTC"])
        record = send_refresh(stack, slot=int(time.time()))
        assert record["status"] == "ok", record
        errors = " ".join(record["result"]["failed"].get("BTC", []))
        assert "store write" in errors and "StoreWriteError" in errors, record
        after = cache_rows(stack.cache(), "BTC", 60)
        check_kept(after, before, int(before.ts[0]) + 3_600, int(before.ts[-1]) + 1)
        assert time.time() - after.ts[-1] < 300  # the cache was refreshed all the same
        assert await stack.ask_valid("BTC", 60, 3_600) == "pool"

        blocker.unlink()  # the disk is back
        (blocker / "data").mkdir(parents=True)
        stack.cache().clear(["BTC"])  # the refresh refills what the cache lacks, store first
        record = send_refresh(stack, slot=int(time.time()) + 1)
        assert not any("store" in e for e in record["result"]["failed"].get("BTC", [])), record
        stored = HistoryStore(blocker / "data" / "history").read("BTC", 60, 0, 2 ** 40)
        check_rows(stored)
        cached = cache_rows(stack.cache(), "BTC", 60)
        check_kept(cached, stored, int(stored.ts[0]), int(stored.ts[-1]) + 1)
    finally:
        cpu.stop()


# --- the history store at unit level: a write failing half-way, in-process -----------------------------


def _fail_half_way(fh: IO[bytes], data: bytes) -> None:
    fh.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device")


class Refresher:
    """The refresh of one asset as the job runs it, in-process: Binance client -> local server on a
    clock the test moves (new bars keep coming), real Redis cache, a store in a temporary folder."""

    def __init__(self, redis_url: str, folder: Path, slices: Path) -> None:
        self.clock = ManualClock(time.time())
        self.market = FakeMarket(slices, clock=self.clock, lead_s=3_600)
        self.cache = RedisHistoryCache(redis.Redis.from_url(redis_url))
        self.store = HistoryStore(folder)
        self.settings = Settings(redis_url=redis_url, cache_days_hf=1.0, cache_days_lf=1.0)

    async def __aenter__(self) -> Self:
        self.fake = await start_fake("binance", self.market)
        self.source = BinanceSource(self.fake.url, HttpConfig(timeout_s=5, retries=0), self.clock)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.source.close()
        await self.fake.stop()

    async def run(self, advance_s: float = 0.0) -> tuple[str, ...]:
        self.clock.advance(advance_s)
        report = await refresh_asset("BTC", self.source, self.cache, self.store, self.settings,
                                     now=int(self.clock()), steps=(60,))
        return report.errors

    def stored(self) -> PriceHistory:
        return self.store.read("BTC", 60, 0, 2 ** 40)


async def test_store_write_failing_half_way_keeps_old_partitions(
        redis_url: str, tmp_path: Path, slices: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Refresher(redis_url, tmp_path / "history", slices) as job:
        assert await job.run() == ()
        stored = job.stored()
        check_rows(stored)
        folder = job.store.folder("BTC", 60)
        files = {p: p.read_bytes() for p in folder.glob("*.day")}

        monkeypatch.setattr(history_store, "_write_bytes", _fail_half_way)
        errors = await job.run(advance_s=1_800)
        assert any("store write" in e and "No space left" in e for e in errors), errors
        assert {p: p.read_bytes() for p in folder.glob("*.day")} == files  # untouched
        assert not list(folder.glob(".*.tmp"))  # no half-written leftovers
        after_fault = job.stored()
        assert np.array_equal(after_fault.ts, stored.ts) and np.array_equal(after_fault.close, stored.close)
        cached = cache_rows(job.cache, "BTC", 60)
        assert cached.ts[-1] > stored.ts[-1] + 1_500  # the cache got the new bars all the same

        monkeypatch.undo()
        assert await job.run(advance_s=600) == ()
        healed = job.stored()
        check_rows(healed)
        check_kept(healed, stored, int(stored.ts[0]), int(stored.ts[-1]) + 1)
        assert healed.ts[-1] >= int(job.clock()) - 180  # new bars reach the store again


async def test_store_catches_up_on_bars_missed_while_it_failed(
        redis_url: str, tmp_path: Path, slices: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with Refresher(redis_url, tmp_path / "history", slices) as job:
        assert await job.run() == ()
        began = int(job.clock())
        monkeypatch.setattr(history_store, "_write_bytes", _fail_half_way)
        assert await job.run(advance_s=1_800) != ()
        monkeypatch.undo()
        for _ in range(3):
            assert await job.run(advance_s=300) == ()
        missed = cache_rows(job.cache, "BTC", 60).between(began + 60, began + 1_800)
        assert len(missed) > 20
        check_kept(job.stored(), missed, int(missed.ts[0]), int(missed.ts[-1]) + 1)

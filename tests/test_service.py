"""MinerService under deadlines: a request never waits past its own deadline, even one sharing a computation."""

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import numpy as np

from core.prices import MarketSnapshot
from core.prompts import ForecastRequest
from core.response_checks import validate_response_head
from core.settings import Settings
from core.transport import ComputedPaths
from miner.metrics import fallback_reason
from miner.pool import PoolError
from miner.service import MinerService

SNAP = MarketSnapshot("BTC", None, None, 100.0, int(time.time()))


class FakeData:
    async def snapshot(self, asset: str, lookback_s: int | None = None,
                       deadline: float | None = None) -> MarketSnapshot:
        return SNAP

    async def fallback_snapshot(self, asset: str, deadline: float | None = None,
                                lookback_s: int | None = None) -> MarketSnapshot:
        return SNAP


class LatePool:
    """A pool that is late: it answers nothing until the deadline it was given, then fails."""

    name = "late"

    def __init__(self) -> None:
        self.deadlines: list[float] = []

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        self.deadlines.append(deadline)
        await asyncio.sleep(max(0.0, deadline - time.time()))
        raise PoolError("pool did not answer before the deadline")

    async def close(self) -> None:
        pass


class FlatFallback:
    def current(self) -> Any:
        def run(request: ForecastRequest, snapshot: MarketSnapshot) -> Any:
            return SimpleNamespace(paths=np.full((request.num_simulations, request.n_points), 100.0, np.float32),
                                   engine="ewma_t")
        return SimpleNamespace(run=run)


def service(pool: Any) -> MinerService:
    settings = Settings(_env_file=None, fallback_budget_s=0.3, reply_margin_s=0.0, max_wait_s=30.0)
    return MinerService(settings, FakeData(), pool, FlatFallback())  # type: ignore[arg-type]


async def test_a_request_sharing_a_later_computation_still_answers_by_its_own_deadline() -> None:
    svc = service(LatePool())
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    now = time.time()
    first = asyncio.create_task(svc.answer(request, now + 6.0))  # a validator with a long timeout
    await asyncio.sleep(0.05)
    began = time.time()
    answer = await svc.answer(request, began + 0.8)  # an identical request whose caller waits less
    took = time.time() - began
    # It used to wait for the shared computation's deadline (6 s); the margin is for a loaded CI machine.
    assert took < 0.8 + 1.5, f"the second caller waited {took:.2f} s for a 0.8 s deadline"
    assert answer.source == "fallback"
    assert answer.body.startswith(f"[{request.start_ts},60,".encode())
    assert (await first).source == "fallback"




class SlowPool:
    """A pool that needs ``takes`` seconds: late for a short deadline, in time for a longer one."""

    name = "slow"

    def __init__(self, takes: float) -> None:
        self.takes = takes
        self.deadlines: list[float] = []

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        self.deadlines.append(deadline)
        if time.time() + self.takes > deadline:
            await asyncio.sleep(max(0.0, deadline - time.time()))
            raise PoolError("pool did not answer before the deadline")
        await asyncio.sleep(self.takes)
        return ComputedPaths(np.full((request.num_simulations, request.n_points), 101.0, np.float32), "patchtst")

    async def close(self) -> None:
        pass


async def test_a_joiner_with_a_later_deadline_asks_the_pool_when_the_shared_computation_fell_back() -> None:
    """The first caller's short timeout left the pool too little time; an identical request with a longer
    one used to take that fallback too, though its own deadline left the pool time to answer."""
    pool = SlowPool(takes=0.5)
    svc = service(pool)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    now = time.time()
    first = asyncio.create_task(svc.answer(request, now + 0.6))  # pool deadline now + 0.3: too short
    await asyncio.sleep(0.05)
    joiner = await svc.answer(request, now + 4.0)
    assert (await first).source == "fallback"
    assert joiner.source == "pool" and len(pool.deadlines) == 2
    # Without the time to spare, a joiner keeps the shared fallback (and the pool is not asked again).
    pool = SlowPool(takes=0.5)
    svc = service(pool)
    now = time.time()
    first = asyncio.create_task(svc.answer(request, now + 0.6))
    await asyncio.sleep(0.05)
    close_behind = await svc.answer(request, now + 0.9)
    assert close_behind.source == "fallback" and close_behind.shared and (await first).source == "fallback"
    assert len(pool.deadlines) == 1


async def test_a_joiner_does_not_ask_again_a_pool_that_failed_at_once() -> None:
    """No live worker, Redis down: the pool fails at once and would again; the fallback computed for the first
    asker is shared, not computed a second time while the miner is busiest."""
    pool = FlakyPool()  # down for its first call: it fails at once
    svc = service(pool)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    now = time.time()
    first = asyncio.create_task(svc.answer(request, now + 0.6))
    joiner = asyncio.create_task(svc.answer(request, now + 4.0))  # joins before the first is computed
    assert (await first).source == "fallback" and not (await first).pool_late
    got = await joiner
    assert got.source == "fallback" and got.shared and pool.calls == 1


class FlakyPool:
    """A pool down for its first request (a broker restart), answering again afterwards."""

    name = "flaky"

    def __init__(self) -> None:
        self.calls = 0

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        self.calls += 1
        if self.calls == 1:
            raise PoolError("pool unavailable: ConnectionError")
        return ComputedPaths(np.full((request.num_simulations, request.n_points), 101.0, np.float32), "patchtst")

    async def close(self) -> None:
        pass


async def test_a_fallback_answer_is_not_kept_for_later_askers_but_a_pool_answer_is() -> None:
    """The fallback is EWMA-t, worse than the pool's model: once the pool is back, the next validator asking
    the same prompt gets the model's answer, not the stand-in computed during the outage."""
    pool = FlakyPool()
    svc = service(pool)
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    first = await svc.answer(request, time.time() + 2.0)
    assert first.source == "fallback" and pool.calls == 1
    second = await svc.answer(request, time.time() + 2.0)
    assert second.source == "pool" and pool.calls == 2
    kept = await svc.answer(request, time.time() + 2.0)
    assert kept.body is second.body and kept.shared and pool.calls == 2  # kept and shared


class StandInPool:
    """A worker whose model could not serve the request answers with its own EWMA-t, and says so."""

    name = "stand-in"

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        return ComputedPaths(np.full((request.num_simulations, request.n_points), 99.0, np.float32), "ewma_t",
                             "patchtst: need 288 returns, history has 40")

    async def close(self) -> None:
        pass


async def test_the_answer_names_its_engine_and_a_workers_stand_in_is_not_kept() -> None:
    """A worker's EWMA-t stand-in used to read as the pool's model: it now says which engine computed it and
    why, and is not reused for the next asker, whose request the model may serve."""
    svc = service(StandInPool())
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    first = await svc.answer(request, time.time() + 2.0)
    assert (first.source, first.engine, first.reason) == ("pool", "ewma_t", "patchtst: need 288 returns, history "
                                                                             "has 40")
    again = await svc.answer(request, time.time() + 2.0)
    assert not again.shared  # computed anew
    model = await service(FastPool()).answer(request, time.time() + 2.0)
    assert (model.source, model.engine, model.reason) == ("pool", "patchtst", None)
    fallback = await service(LatePool()).answer(request, time.time() + 1.0)
    assert (fallback.source, fallback.engine) == ("fallback", "ewma_t") and fallback.reason


class FastPool:
    name = "fast"

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        return ComputedPaths(np.full((request.num_simulations, request.n_points), 101.0, np.float32), "patchtst")

    async def close(self) -> None:
        pass


async def test_replies_are_built_even_while_the_default_executor_is_stuck() -> None:
    """asyncio's default executor also runs the market data's blocking calls: a refresh waits there up to a
    minute on an asset's Redis lock while that asset's provider is down. Replies for other assets used to
    queue behind them, past their deadline, the fallback's included."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    gate = threading.Event()
    stuck = [asyncio.ensure_future(asyncio.to_thread(gate.wait, 60)) for _ in range(2)]
    svc = service(FastPool())
    try:
        await asyncio.sleep(0.05)
        request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
        answer = await asyncio.wait_for(svc.answer(request, time.time() + 5.0), 30.0)
        assert answer.source == "pool"
        svc.pool = LatePool()  # the fallback too
        other = ForecastRequest("ETH", int(time.time()) + 600, 60, 3600, 5)
        assert (await asyncio.wait_for(svc.answer(other, time.time() + 1.0), 30.0)).source == "fallback"
    finally:
        gate.set()
        await asyncio.gather(*stuck)


class HangingData(FakeData):
    """The shared computation's market data hangs (a slow provider); the fallback's honours its deadline."""

    def __init__(self) -> None:
        self.fallback_deadlines: list[float | None] = []

    async def snapshot(self, asset: str, lookback_s: int | None = None,
                       deadline: float | None = None) -> MarketSnapshot:
        await asyncio.sleep(max(0.0, (deadline or 0.0) - time.time()))
        return SNAP

    async def fallback_snapshot(self, asset: str, deadline: float | None = None,
                                lookback_s: int | None = None) -> MarketSnapshot:
        self.fallback_deadlines.append(deadline)
        await asyncio.sleep(max(0.0, min(2.0, (deadline or 0.0) - time.time())))  # a fresh anchor, up to then
        return SNAP


async def test_a_joiner_without_a_snapshot_leaves_its_fallback_time_to_compute() -> None:
    """The joiner's market data used to get up to its reply deadline itself: with a hung provider the
    fallback was computed only after the deadline had passed."""
    settings = Settings(_env_file=None, fallback_budget_s=1.0, reply_margin_s=0.0, max_wait_s=30.0)
    data = HangingData()
    svc = MinerService(settings, data, LatePool(), FlatFallback())  # type: ignore[arg-type]
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    first = asyncio.create_task(svc.answer(request, time.time() + 8.0))
    await asyncio.sleep(0.05)
    deadline = time.time() + 2.0
    answer = await svc.answer(request, deadline)
    assert data.fallback_deadlines == [deadline - settings.fallback_budget_s / 2]
    assert answer.source == "fallback"
    assert time.time() < deadline + 0.5
    for task, _ in list(svc._inflight.values()):  # the first caller's computation waits 8 s for nothing
        task.cancel()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_an_answer_taken_from_an_identical_request_says_so() -> None:
    svc = service(FastPool())
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    first, joined = await asyncio.gather(svc.answer(request, time.time() + 5.0), svc.answer(request, time.time() + 5.0))
    kept = await svc.answer(request, time.time() + 5.0)
    assert not first.shared and joined.shared and kept.shared
    assert first.body is joined.body is kept.body


async def test_every_answer_carries_the_time_of_the_price_it_was_forecast_from() -> None:
    """The axon's synth_price_age_seconds reads it: the pool's, the fallback's and a kept answer alike."""
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    pooled = service(FastPool())
    model = await pooled.answer(request, time.time() + 5.0)
    kept = await pooled.answer(request, time.time() + 5.0)
    fallback = await service(LatePool()).answer(request, time.time() + 1.0)
    assert (model.source, kept.shared, fallback.source) == ("pool", True, "fallback")
    assert model.price_time == kept.price_time == fallback.price_time == SNAP.anchor_time


class DecodingPool(FastPool):
    """Answers at once, then decodes the paths on asyncio's default executor, as the Celery pool does."""

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        return ComputedPaths(await asyncio.to_thread(np.full, (request.num_simulations, request.n_points), 101.0,
                                                   np.float32), "patchtst")


async def test_a_pool_that_overstays_its_deadline_is_not_waited_for() -> None:
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
    gate = threading.Event()
    stuck = asyncio.ensure_future(asyncio.to_thread(gate.wait, 60))
    settings = Settings(_env_file=None, fallback_budget_s=1.0, reply_margin_s=0.0, max_wait_s=30.0)
    svc = MinerService(settings, FakeData(), DecodingPool(), FlatFallback())  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.05)
        request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
        deadline = time.time() + 2.0
        answer = await asyncio.wait_for(svc.answer(request, deadline), 30.0)
        assert answer.source == "fallback" and answer.reason is not None
        # Said in words: the bare "TimeoutError: " the log showed named nothing.
        assert answer.reason.startswith("TimeoutError: the pool held past its deadline"), answer.reason
        assert fallback_reason(answer.reason) == "timeout"
        # Held to its deadline plus half the fallback's budget (at 1.5 s): the fallback is computed by 2 s.
        assert time.time() < deadline, f"answered {time.time() - deadline:.2f} s after the deadline"
    finally:
        gate.set()
        await stuck


class CountingPool(FastPool):
    """Answers at once; each forecast is anchored at the price the snapshot had then (the call number)."""

    def __init__(self) -> None:
        self.calls = 0

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        self.calls += 1
        return ComputedPaths(np.full((request.num_simulations, request.n_points), 100.0 + self.calls, np.float32),
                             "patchtst")


async def test_a_kept_answer_is_not_shared_once_it_is_stale(monkeypatch: Any) -> None:
    """Validators ask a prompt 50-120 s before it starts, so identical requests come within a minute or two
    of each other. A prompt asked far ahead (hours, days: legal, if odd) used to keep its answer, forecast
    from that moment's prices, for every later asker until the prompt started: a validator asking at the
    usual time got a forecast anchored hours in the past."""
    import miner.service as service_module

    pool = CountingPool()
    svc = service(pool)
    request = ForecastRequest("BTC", int(time.time()) + 6 * 3600, 60, 3600, 5)
    early = await svc.answer(request, time.time() + 2.0)
    assert early.source == "pool" and pool.calls == 1
    assert (await svc.answer(request, time.time() + 2.0)).shared  # identical, moments later: shared
    later = time.time() + 6 * 3600 - 120  # the validators ask it now
    monkeypatch.setattr(service_module, "time", SimpleNamespace(time=lambda: later, perf_counter=time.perf_counter))
    fresh = await svc.answer(request, later + 2.0)
    assert fresh.source == "pool" and not fresh.shared and pool.calls == 2
    assert fresh.body != early.body
    assert (await svc.answer(request, later + 2.0)).body is fresh.body  # the fresh one is shared in turn


def test_a_non_finite_timeout_counts_as_none() -> None:
    """A body's ``"timeout": 1e999`` parses as inf: the deadline, and the margin metric, became infinite."""
    svc = service(object())
    budget = svc.settings.max_wait_s - svc.settings.reply_margin_s
    for timeout in (float("inf"), float("nan"), None, 0.0, -5.0):
        assert svc.deadline_for(1000.0, timeout) == 1000.0 + budget, timeout
    assert svc.deadline_for(1000.0, 90.0) == 1000.0 + 90.0 - svc.settings.reply_margin_s


def test_the_reply_margin_is_kept_back_from_the_callers_timeout() -> None:
    """The reply must be ready ``reply_margin_s`` before the caller gives up, to be sent in time: a deadline
    past the caller's timeout is a reply the validator records as a time-out."""
    settings = Settings(_env_file=None, reply_margin_s=2.0, max_wait_s=30.0)
    svc = MinerService(settings, FakeData(), FastPool(), FlatFallback())  # type: ignore[arg-type]
    assert svc.deadline_for(1000.0, 90.0) == 1088.0
    assert svc.deadline_for(1000.0, None) == 1028.0


class MisshapenPool(FastPool):
    """A worker that reads the grid differently (another release): paths of the wrong shape."""

    def __init__(self, paths: int, points: int) -> None:
        self.less_paths, self.less_points = paths, points

    async def forecast(self, request: ForecastRequest, snapshot: MarketSnapshot, deadline: float,
                       request_id: str) -> ComputedPaths:
        shape = (request.num_simulations - self.less_paths, request.n_points - self.less_points)
        return ComputedPaths(np.full(shape, 101.0, np.float32), "patchtst")


async def test_pool_paths_of_the_wrong_shape_are_never_sent() -> None:
    """Validators reject a reply with a path too short or a path missing: the pool's paths are checked against
    the request before rendering, and the fallback answers instead of a reply that scores as a miss."""
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    for less_paths, less_points in ((0, 1), (1, 0)):
        answer = await service(MisshapenPool(less_paths, less_points)).answer(request, time.time() + 2.0)
        assert answer.source == "fallback" and "ResponseError" in (answer.reason or ""), answer.reason
        reply = json.loads(answer.body)
        assert validate_response_head(reply, request.start_ts, 60, 3600, 5) == "CORRECT"


async def test_a_joiner_falls_back_early_enough_to_send_its_reply_in_time() -> None:
    """A joiner waits for a computation working to a later deadline only while its own fallback still fits:
    waiting up to its deadline and computing the fallback after it made the reply late."""
    settings = Settings(_env_file=None, fallback_budget_s=1.0, reply_margin_s=0.0, max_wait_s=30.0)
    svc = MinerService(settings, FakeData(), LatePool(), FlatFallback())  # type: ignore[arg-type]
    request = ForecastRequest("BTC", int(time.time()) + 600, 60, 3600, 5)
    first = asyncio.create_task(svc.answer(request, time.time() + 8.0))
    await asyncio.sleep(0.05)
    deadline = time.time() + 1.5
    answer = await svc.answer(request, deadline)
    assert answer.source == "fallback"
    assert time.time() < deadline, f"answered {time.time() - deadline:.2f} s after the deadline"
    for task, _ in list(svc._inflight.values()):  # the first caller's computation waits 8 s for nothing
        task.cancel()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)

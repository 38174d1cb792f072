"""`synth-miner bench`: every stage alone, then the whole path through the real stack, beside the floor.

Prints a table and one JSON line. Stages: history read from the Redis cache, features + model
(the served engine's parameters), path sampling against the numpy floor (the raw cost of drawing the
same Student-t variates), rounding, response serialisation, Redis transport, the whole forecast
against the reference miner's GBM generator. End to end: dendrite -> axon -> Celery -> worker -> axon
for 1 h and 24 h prompts at several concurrencies, next to a floor axon (pre-rendered reply of the
same size) measured the same way: time to the last byte plus the validator-side parse.
"""

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import redis

from core.cache_redis import RedisHistoryCache
from core.engines.gbm import GbmEngine
from core.engines_registry import build_forecaster
from core.market_data import build_snapshot
from core.path_sampling import sample_paths, unit_t
from core.prompts import ForecastRequest
from core.response import check_paths, render_json, round_for_wire
from core.settings import Settings
from core.sources.replay import ReplaySource
from core.transport import decode_paths, encode_paths
from miner.protocol import Simulation, SimulationInput
from synth_miner.devstack import (
    Proc,
    RedisServer,
    Timed,
    Validator,
    assert_valid_reply,
    cli,
    free_port,
    make_wallet,
    spawn,
    start_miner,
    start_worker,
    timed_raw_call,
    wait_port,
)

PROMPTS = {"1h": (60, 3_600), "24h": (300, 86_400)}


def timeit(fn: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up."""
    fn()
    samples = []
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def stage_timings(data_dir: Path, redis_url: str, settings: Settings, repeat: int) -> dict[str, dict[str, float]]:
    client = redis.Redis.from_url(redis_url)
    cache = RedisHistoryCache(client)
    source = ReplaySource(data_dir)
    now = int(time.time())
    for step in (60, 300):
        cache.write("BTC", source.shifted("BTC", step).between(now - 15 * 86_400, now))
    forecaster = build_forecaster(settings)
    engine = forecaster.engines[forecaster.default]
    gbm = GbmEngine()
    out: dict[str, dict[str, float]] = {}
    for name, (inc, length) in PROMPTS.items():
        request = ForecastRequest("BTC", now + 120, inc, length, 1000)
        lookback = settings.cache_window_s(request.time_increment)
        snapshot = build_snapshot(cache, "BTC", now, lookback)
        row: dict[str, float] = {}
        row["cache_read_ms"] = timeit(lambda: build_snapshot(cache, "BTC", now, lookback), repeat) * 1e3
        params_fn = getattr(engine, "params", None)
        clear_laws = getattr(engine, "clear_cache", lambda: None)
        if params_fn is not None:
            # The engine caches laws per (asset, grid, minute): time the miss, which is what a request pays.
            def uncached() -> Any:
                clear_laws()
                return params_fn(request, snapshot)

            row["features_model_ms"] = timeit(uncached, repeat) * 1e3
            params = params_fn(request, snapshot)
            rng = np.random.default_rng(0)
            row["sampler_ms"] = timeit(lambda: sample_paths(snapshot.anchor, params.mu, params.sigma, params.nu, 1000,
                                                            rng, params.latent), repeat) * 1e3
            row["numpy_floor_ms"] = timeit(lambda: unit_t(rng, params.nu, (1000, request.n_steps)), repeat) * 1e3
            row["sampler_over_floor"] = row["sampler_ms"] / row["numpy_floor_ms"]
        paths = forecaster.run(request, snapshot).paths
        row["rounding_ms"] = timeit(lambda: check_paths(round_for_wire(paths), request), repeat) * 1e3
        rounded = round_for_wire(paths)
        row["serialise_ms"] = timeit(lambda: render_json(request, rounded), repeat) * 1e3

        def transport() -> None:
            key = "bench:transport"
            client.rpush(key, encode_paths(paths, "patchtst"))
            reply = client.blpop([key], timeout=5)
            assert reply is not None
            decode_paths(bytes(reply[1]))  # type: ignore[arg-type]

        row["redis_transport_ms"] = timeit(transport, repeat) * 1e3

        def forecast_uncached() -> Any:
            clear_laws()
            return forecaster.run(request, snapshot)

        row["forecast_ms"] = timeit(forecast_uncached, repeat) * 1e3
        row["gbm_reference_ms"] = timeit(lambda: gbm.forecast(request, snapshot, np.random.default_rng(0)), repeat) * 1e3
        row["forecast_over_gbm"] = row["forecast_ms"] / row["gbm_reference_ms"]
        out[name] = row
    client.close()
    return out


async def lane_requests(validator: Validator, inc: int, length: int, starts: list[str], asset: str) -> list[Timed]:
    results = []
    for start in starts:
        synapse = Simulation(simulation_input=SimulationInput(asset=asset, start_time=start, time_increment=inc,
                                                              time_length=length, num_simulations=1000))
        results.append(await timed_raw_call(validator, synapse, 60.0))
    return results


async def burst(validators: list[Validator], inc: int, length: int, per_lane: int, offset: int,
                check: bool) -> list[Timed]:
    """Each lane (its own dendrite, as each validator has) sends ``per_lane`` sequential requests."""
    base = datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=2)
    assets = ["BTC", "ETH", "XAU", "SOL"]
    lanes = []
    for i, validator in enumerate(validators):
        starts = [(base + timedelta(minutes=offset + i * per_lane + k)).isoformat() for k in range(per_lane)]
        lanes.append(lane_requests(validator, inc, length, starts, assets[i % len(assets)]))
    timed = [t for lane in await asyncio.gather(*lanes) for t in lane]
    if check:
        for t in timed:
            assert_valid_reply(t.reply)
    return timed


def summarise(timed: list[Timed]) -> dict[str, float]:
    parse = np.array([t.parsed_s for t in timed]) * 1e3
    ttlb = np.array([t.last_byte_s for t in timed]) * 1e3
    miner = np.array([t.miner_s for t in timed if t.miner_s is not None]) * 1e3
    return {"n": len(timed), "p50_ms": float(np.percentile(parse, 50)), "p99_ms": float(np.percentile(parse, 99)),
            "ttlb_p50_ms": float(np.percentile(ttlb, 50)),
            "miner_p50_ms": float(np.percentile(miner, 50)) if miner.size else float("nan")}


async def end_to_end(tmp: Path, env: dict[str, str], concurrencies: list[int], per_lane: int) -> dict[str, Any]:
    wallets = tmp / "wallets"
    miner_wallet = make_wallet(wallets, "miner")
    floor_wallet = make_wallet(wallets, "floor")
    lanes = [make_wallet(wallets, f"validator{i}") for i in range(max(concurrencies))]
    port, floor_port = free_port(), free_port()
    procs: list[Proc] = []
    report: dict[str, Any] = {}
    try:
        procs.append(start_worker(tmp, env))
        procs.append(start_miner(tmp, port, {**env, "SYNTH_WALLET_PATH": str(wallets),
                                             "SYNTH_WALLET_NAME": "miner"}))
        floor = spawn([*cli()[:2], "synth_miner.floor_axon", "--port", str(floor_port), "--wallet-path",
                       str(wallets), "--wallet-name", "floor"], env, tmp / "floor.log")
        procs.append(floor)
        wait_port(floor_port, floor.proc, floor.log)
        await asyncio.sleep(2)
        offset = 0
        for name, (inc, length) in PROMPTS.items():
            for conc in concurrencies:
                miners = [Validator(w, miner_wallet.hotkey.ss58_address, port) for w in lanes[:conc]]
                floors = [Validator(w, floor_wallet.hotkey.ss58_address, floor_port) for w in lanes[:conc]]
                try:
                    real = summarise(await burst(miners, inc, length, per_lane, offset, check=True))
                    base = summarise(await burst(floors, inc, length, per_lane, offset, check=False))
                finally:
                    for v in miners + floors:
                        await v.close()
                offset += conc * per_lane + 1
                report[f"{name}@{conc}"] = {"miner": real, "floor": base,
                                            "p50_over_floor": real["p50_ms"] / base["p50_ms"],
                                            "p99_over_floor": real["p99_ms"] / base["p99_ms"]}
        report["worker_peak_rss_mb"] = peak_rss_mb(procs[0].proc.pid)
    finally:
        for proc in reversed(procs):
            proc.stop()
    return report


def celery_transport(tmp: Path, env: dict[str, str], settings: Settings, repeat: int) -> dict[str, float]:
    """Enqueue -> result in the miner (CeleryPool), minus the worker's own compute on the same request."""
    from miner.pool import CeleryPool

    worker = start_worker(tmp, env, name="transport")
    client = redis.Redis.from_url(env["SYNTH_REDIS_URL"])
    cache = RedisHistoryCache(client)
    now = int(time.time())
    pool = CeleryPool(settings)
    forecaster = build_forecaster(settings)
    out: dict[str, float] = {}

    async def run() -> None:
        for name, (inc, length) in PROMPTS.items():
            request = ForecastRequest("BTC", now + 600, inc, length, 1000)
            snapshot = build_snapshot(cache, "BTC", now, 3 * 86_400)
            rounds = []
            for i in range(repeat + 1):
                began = time.perf_counter()
                await pool.forecast(request, snapshot, time.time() + 30, f"bench-{name}-{i}-{time.time_ns()}")
                rounds.append(time.perf_counter() - began)
            compute = timeit(lambda: forecaster.run(request, snapshot), repeat)
            out[f"{name}_roundtrip_ms"] = statistics.median(rounds[1:]) * 1e3
            out[f"{name}_compute_ms"] = compute * 1e3
            out[f"{name}_transport_ms"] = (statistics.median(rounds[1:]) - compute) * 1e3
        await pool.close()

    try:
        asyncio.run(run())
    finally:
        worker.stop()
        client.close()
    return out


def peak_rss_mb(pid: int) -> float:
    """The largest VmHWM of the worker process and its children: one model-holding process's peak (the bench's
    solo worker has no children; a prefork pool's peaks are not summed, since they need not coincide)."""
    peak = 0.0
    for candidate in [pid, *children(pid)]:
        try:
            for line in Path(f"/proc/{candidate}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            pass
    return peak


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_bench(data_dir: Path, artifacts_dir: Path | None, concurrencies: list[int], per_lane: int,
              repeat: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="synth-bench-"))
    server = RedisServer(tmp).start()
    env = {"SYNTH_REDIS_URL": server.url, "SYNTH_PRICE_PROVIDER": "replay", "SYNTH_REPLAY_DIR": str(data_dir),
           "SYNTH_DATA_DIR": str(tmp / "data"), "SYNTH_LOG_LEVEL": "WARNING",
           "SYNTH_ARTIFACTS_DIR": str(artifacts_dir or tmp / "artifacts")}
    settings = Settings(redis_url=server.url, price_provider="replay", replay_dir=data_dir,
                        artifacts_dir=artifacts_dir or tmp / "artifacts", data_dir=tmp / "data")
    try:
        stages = stage_timings(data_dir, server.url, settings, repeat)
        transport = celery_transport(tmp, env, settings, repeat)
        e2e = asyncio.run(end_to_end(tmp, env, concurrencies, per_lane))
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"engine": settings.engine, "stages": stages, "celery": transport, "e2e": e2e}


def print_report(report: dict[str, Any]) -> None:
    print(f"engine served: {report['engine']}")
    print("\nstages (median ms)          " + "".join(f"{p:>12}" for p in PROMPTS))
    keys = list(next(iter(report["stages"].values())))
    for key in keys:
        print(f"  {key:26}" + "".join(f"{report['stages'][p].get(key, float('nan')):12.2f}" for p in PROMPTS))
    print("\ncelery (median ms)")
    for key, value in report["celery"].items():
        print(f"  {key:26}{value:12.2f}")
    print("\nend to end (ms; time to last byte + validator parse)")
    print(f"  {'prompt@conc':14}{'p50':>8}{'p99':>8}{'floor p50':>10}{'floor p99':>10}{'p50/fl':>8}{'p99/fl':>8}"
          f"{'miner p50':>10}")
    for key, row in report["e2e"].items():
        if not isinstance(row, dict):
            continue
        m, f = row["miner"], row["floor"]
        print(f"  {key:14}{m['p50_ms']:8.0f}{m['p99_ms']:8.0f}{f['p50_ms']:10.0f}{f['p99_ms']:10.0f}"
              f"{row['p50_over_floor']:8.2f}{row['p99_over_floor']:8.2f}{m['miner_p50_ms']:10.1f}")
    print(f"\nworker peak RSS: {report['e2e'].get('worker_peak_rss_mb', float('nan')):.0f} MB")
    print(json.dumps(report, default=float))

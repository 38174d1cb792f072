"""Latency of Simulation requests through the real stack (dendrite -> axon -> Celery -> worker -> axon).

    python -m benchmarks.bench_e2e --mode celery --n 20          # the walking-skeleton figure
    python -m benchmarks.bench_e2e --mode embedded --n 20

Starts its own redis-server (celery mode), a solo Celery worker and the miner on free ports, replays
../shared/data, and sends N sequential signed requests per prompt type, each with a distinct start time
so every one is computed (no shared answers). Prints median and worst latency as the validator sees it:
time to the reply's last byte plus its parse, and bittensor's whole Dendrite.call for reference.
"""

import argparse
import asyncio
import json
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from miner.protocol import Simulation, SimulationInput
from synth_miner.devstack import (
    RedisServer,
    Validator,
    assert_valid_reply,
    free_port,
    make_wallet,
    percentiles,
    start_miner,
    start_worker,
    timed_raw_call,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PROMPTS = {"24h": (300, 86_400), "1h": (60, 3_600)}


async def measure(validator: Validator, n: int, increment: int, length: int) -> dict[str, dict[str, float]]:
    ttlb, parsed, call = [], [], []
    base = datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=2)
    for i in range(n):
        start = (base + timedelta(minutes=i)).isoformat()
        synapse = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start, time_increment=increment,
                                                              time_length=length, num_simulations=1000))
        timed = await timed_raw_call(validator, synapse, 60.0)
        assert_valid_reply(timed.reply)
        ttlb.append(timed.last_byte_s)
        parsed.append(timed.parsed_s)
    for i in range(min(n, 5)):  # bittensor's own client, for reference (adds its bookkeeping)
        start = (base + timedelta(minutes=n + i)).isoformat()
        began = time.perf_counter()
        reply, _ = await validator.ask("BTC", increment, length, 1000, start_time=start, timeout=60)
        call.append(time.perf_counter() - began)
        assert_valid_reply(reply)
    return {"ttlb": percentiles(ttlb), "ttlb+parse": percentiles(parsed), "dendrite.call": percentiles(call)}


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    miner_wallet, vali_wallet = make_wallet(tmp / "w", "miner"), make_wallet(tmp / "w", "validator")
    env = {"SYNTH_WALLET_PATH": str(tmp / "w"), "SYNTH_WALLET_NAME": "miner", "SYNTH_PRICE_PROVIDER": "replay",
           "SYNTH_REPLAY_DIR": str(args.data), "SYNTH_DATA_DIR": str(tmp / "data"), "SYNTH_LOG_LEVEL": "WARNING",
           "SYNTH_ARTIFACTS_DIR": str(args.artifacts) if args.artifacts else str(tmp / "artifacts")}
    procs, redis, validator = [], None, None
    try:
        if args.mode == "celery":
            redis = RedisServer(tmp).start()
            env["SYNTH_REDIS_URL"] = redis.url
            procs.append(start_worker(tmp, env))
        port = free_port()
        procs.append(start_miner(tmp, port, env))
        validator = Validator(vali_wallet, miner_wallet.hotkey.ss58_address, port)
        await asyncio.sleep(2)  # let the miner warm its cache
        results = {name: await measure(validator, args.n, inc, length) for name, (inc, length) in PROMPTS.items()}
    finally:
        if validator is not None:
            await validator.close()
        for proc in reversed(procs):
            proc.stop()
        if redis:
            redis.stop()
    return {"mode": args.mode, "n": args.n, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["celery", "embedded"], default="celery")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--artifacts", type=Path, default=None, help="artifacts dir to serve (default: empty)")
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print(f"mode={report['mode']} n={report['n']} (sequential, distinct start times)")
    print(f"{'prompt':6} {'measure':14} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for prompt, measures in report["results"].items():  # type: ignore[union-attr]
        for name, row in measures.items():
            print(f"{prompt:6} {name:14} {row['p50_ms']:8.0f} {row['p99_ms']:8.0f} {row['max_ms']:8.0f}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()

"""Load: bursts of concurrent signed Simulation requests, as several validators send them at once.

    python -m benchmarks.load                        # 64 x 24 h + 64 x 1 h per burst, 2 workers, 2 bursts
    python -m benchmarks.load --lf 32 --hf 32 --workers 1 --bursts 1 --timeout-lf 20 --timeout-hf 20

Starts its own stack (redis-server, N solo Celery workers, the miner with its metrics port) on free
loopback ports, replaying ../shared/data. Each concurrent lane has its own dendrite (the axon refuses
a nonce that is not newer than the last one from the same dendrite); the lanes belong to a few
validator hotkeys, as on the network. Lanes ask for distinct assets and start times, except a share
of them that repeat another lane's prompt in the same burst (several validators asking the same
prompt in the same minute).

Measured per request: time to the reply's last byte, in the burst; then, after the burst, the
validator's parse of that reply into its Simulation type (a validator parses its own reply on its own
machine, so parses are timed one at a time rather than piled into this one client process), and
both validator rule sets on it. Reported: validity, deadline misses (last byte + parse later than
the request's timeout, or no answer), the fallback rate from the miner's /metrics, and latency
percentiles. Prints a table, then one JSON line.
"""

import argparse
import asyncio
import itertools
import json
import random
import re
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import bittensor as bt
import numpy as np

from core.assets import ASSETS
from core.csv_history import find_file
from miner.protocol import Simulation, SimulationInput
from synth_miner.devstack import (
    Proc,
    RedisServer,
    Validator,
    assert_valid_reply,
    cli,
    free_port,
    make_wallet,
    spawn,
    start_worker,
    wait_port,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GRIDS = {"24h": (300, 86_400), "1h": (60, 3_600)}
HF_ASSETS = ("BTC", "ETH", "SOL", "XRP", "HYPE")  # the validators' 1 h prompt list


@dataclass(frozen=True)
class Prompt:
    grid: str
    asset: str
    start_time: str

    def synapse(self) -> Simulation:
        increment, length = GRIDS[self.grid]
        return Simulation(simulation_input=SimulationInput(asset=self.asset, start_time=self.start_time,
                                                          time_increment=increment, time_length=length,
                                                          num_simulations=1000))


@dataclass
class Outcome:
    prompt: Prompt
    duplicate: bool  # another lane of the burst asked the same prompt
    timeout: float
    status: int | None = None
    last_byte_s: float | None = None
    parse_s: float | None = None
    valid: bool = False
    error: str | None = None

    @property
    def total_s(self) -> float | None:
        return None if self.last_byte_s is None or self.parse_s is None else self.last_byte_s + self.parse_s

    @property
    def missed(self) -> bool:
        return self.total_s is None or self.total_s > self.timeout


def percentiles(seconds: list[float]) -> dict[str, float]:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()), "n": float(ms.size)}


def served_assets(folder: Path) -> list[str]:
    return [a for a in ASSETS if find_file(folder, a, 60) or find_file(folder, a, 300)]


def plan_burst(burst: int, lf: int, hf: int, duplicate_share: float, assets: list[str],
               rng: random.Random) -> list[tuple[Prompt, bool]]:
    """Distinct (asset, start time) per lane, then a share of lanes re-asking an earlier lane's prompt."""
    base = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=2)
    minutes = itertools.count(burst * 500)  # start times never repeat across bursts either
    hf_assets = [a for a in HF_ASSETS if a in assets] or assets
    lanes: list[tuple[Prompt, bool]] = []
    for grid, count, pool in (("24h", lf, assets), ("1h", hf, hf_assets)):
        fresh: list[Prompt] = []
        for i in range(count):
            if fresh and rng.random() < duplicate_share:
                lanes.append((rng.choice(fresh), True))
                continue
            start = (base + timedelta(minutes=next(minutes))).isoformat()
            prompt = Prompt(grid, pool[i % len(pool)], start)
            fresh.append(prompt)
            lanes.append((prompt, False))
    rng.shuffle(lanes)
    return lanes


async def one_lane(validator: Validator, prompt: Prompt, timeout: float, http: aiohttp.ClientSession,
                   outcome: Outcome) -> bytes | None:
    """Send one signed request and read the reply to its last byte; the parse comes later."""
    prepared = validator.dendrite.preprocess_synapse_for_request(validator.axon_info(), prompt.synapse(), timeout)
    began = time.perf_counter()
    try:
        async with http.post(f"http://127.0.0.1:{validator.port}/Simulation", headers=prepared.to_headers(),
                             json=prepared.model_dump(), timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            body = await resp.read()
            outcome.status = resp.status
    except (TimeoutError, aiohttp.ClientError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return None
    outcome.last_byte_s = time.perf_counter() - began
    if outcome.status != 200:
        outcome.error = f"HTTP {outcome.status}: {body[:200]!r}"
        return None
    return body


def judge(body: bytes, outcome: Outcome) -> None:
    """The validator's side after the fact: parse into its Simulation type, then both rule sets."""
    began = time.perf_counter()
    reply = Simulation(**json.loads(body))
    outcome.parse_s = time.perf_counter() - began
    reply.dendrite = reply.dendrite or bt.TerminalInfo()
    reply.dendrite.status_code = 200  # the dendrite sets it from HTTP
    try:
        assert_valid_reply(reply)
        outcome.valid = True
    except AssertionError as exc:
        outcome.error = f"invalid: {exc}"


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux), to see what the miner keeps between bursts."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> dict[str, float]:
    """The miner's request, fallback and lost-forecast counters, summed per outcome / reason / what answered."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    label = {"requests": "outcome", "fallbacks": "reason", "lost_forecasts": "answered_by"}
    short = {"requests": "outcome", "fallbacks": "reason", "lost_forecasts": "lost"}
    for line in text.splitlines():
        match = re.match(r'synth_(requests|fallbacks|lost_forecasts)_total\{([^}]*)\} ([0-9.e+-]+)$', line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        key = f"{short[match.group(1)]}:{labels.get(label[match.group(1)])}"
        totals[key] = totals.get(key, 0.0) + float(match.group(3))
    return totals


async def run_burst(burst: int, args: argparse.Namespace, wallets: list["bt.Wallet"], miner_hotkey: str,
                    port: int, assets: list[str], rng: random.Random) -> tuple[list[Outcome], float]:
    """The burst's outcomes, and its wall time from the first request sent to the last reply read."""
    lanes = plan_burst(burst, args.lf, args.hf, args.duplicates, assets, rng)
    timeouts = {"24h": args.timeout_lf, "1h": args.timeout_hf}
    validators = [Validator(wallets[i % len(wallets)], miner_hotkey, port) for i in range(len(lanes))]
    outcomes = [Outcome(prompt, dup, timeouts[prompt.grid]) for prompt, dup in lanes]
    connector = aiohttp.TCPConnector(limit=0)  # every lane at once, as separate validators would
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            began = time.perf_counter()
            bodies = await asyncio.gather(*(one_lane(v, o.prompt, o.timeout, http, o)
                                            for v, o in zip(validators, outcomes)))
            wall = time.perf_counter() - began
    finally:
        for validator in validators:
            await validator.close()
    for body, outcome in zip(bodies, outcomes):
        if body is not None:
            judge(body, outcome)
    return outcomes, wall


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    answered = [o for o in outcomes if o.total_s is not None]
    return {
        "requests": len(outcomes), "duplicates": sum(o.duplicate for o in outcomes),
        "valid": sum(o.valid for o in outcomes), "invalid_or_failed": sum(not o.valid for o in outcomes),
        "deadline_misses": sum(o.missed for o in outcomes),
        "ttlb": percentiles([o.last_byte_s for o in answered if o.last_byte_s is not None]),
        "parse": percentiles([o.parse_s for o in answered if o.parse_s is not None]),
        "ttlb+parse": percentiles([o.total_s for o in answered if o.total_s is not None]),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    miner_wallet = make_wallet(tmp / "w", "miner")
    wallets = [make_wallet(tmp / "w", f"validator{i}") for i in range(args.validators)]
    redis = RedisServer(tmp).start()
    port, metrics_port = free_port(), free_port()
    env = {"SYNTH_REDIS_URL": redis.url, "SYNTH_WALLET_PATH": str(tmp / "w"), "SYNTH_WALLET_NAME": "miner",
           "SYNTH_PRICE_PROVIDER": "replay", "SYNTH_REPLAY_DIR": str(args.data), "SYNTH_DATA_DIR": str(tmp / "data"),
           "SYNTH_ARTIFACTS_DIR": str(args.artifacts or tmp / "artifacts"), "SYNTH_LOG_LEVEL": "WARNING",
           "SYNTH_METRICS_PORT": str(metrics_port)}
    procs: list[Proc] = []
    rng = random.Random(args.seed)
    assets = served_assets(args.data)
    try:
        miner = spawn(cli("serve", "--local", "--port", str(port)), env, tmp / "miner.log")
        procs.append(miner)
        for i in range(args.workers):
            procs.append(start_worker(tmp, env, name=f"w{i}"))
        wait_port(port, miner.proc, miner.log)
        wait_port(metrics_port, miner.proc, miner.log)
        # Warm the cache and each worker's imports: one request per asset and grid, not measured.
        warm, _ = await run_burst(args.bursts, argparse.Namespace(**{**vars(args), "lf": len(assets), "hf": 3,
                                                          "duplicates": 0.0}),
                               wallets, miner_wallet.hotkey.ss58_address, port, assets, rng)
        if not all(o.valid for o in warm):
            raise RuntimeError(f"warm-up failed: {summarise(warm)['errors']}")
        warm_rss = round(rss_mb(miner.proc.pid), 1)
        bursts = []
        for burst in range(args.bursts):
            before = scrape(metrics_port)
            outcomes, wall = await run_burst(burst, args, wallets, miner_wallet.hotkey.ss58_address, port, assets,
                                             rng)
            after = scrape(metrics_port)
            delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}
            computed = delta.get("outcome:pool", 0.0) + delta.get("outcome:fallback", 0.0)
            bursts.append({
                "burst": burst, "wall_s": round(wall, 2),
                "by_grid": {g: summarise([o for o in outcomes if o.prompt.grid == g]) for g in GRIDS},
                "all": summarise(outcomes),
                "miner": {"pool": delta.get("outcome:pool", 0.0), "fallback": delta.get("outcome:fallback", 0.0),
                          "fallback_rate": round(delta.get("outcome:fallback", 0.0) / computed, 4) if computed else None,
                          "fallback_reasons": {k[7:]: v for k, v in delta.items() if k.startswith("reason:") and v},
                          "rss_mb": round(rss_mb(miner.proc.pid), 1)},
            })
            await asyncio.sleep(args.pause)
    finally:
        for proc in reversed(procs):
            proc.stop()
        redis.stop()
    return {"lf": args.lf, "hf": args.hf, "workers": args.workers, "validators": args.validators,
            "miner_rss_mb_after_warm_up": warm_rss,
            "duplicates": args.duplicates, "timeout_lf": args.timeout_lf, "timeout_hf": args.timeout_hf,
            "bursts": bursts}


def print_table(report: dict[str, Any]) -> None:
    print(f"load: {report['lf']} x 24h + {report['hf']} x 1h per burst, {report['workers']} workers, "
          f"{report['validators']} validator hotkeys, timeouts {report['timeout_lf']:g}/{report['timeout_hf']:g} s; "
          f"miner RSS after warm-up {report['miner_rss_mb_after_warm_up']:.0f} MB")
    head = (f"{'burst':>5} {'grid':5} {'n':>4} {'dup':>4} {'valid':>5} {'miss':>5} "
            f"{'ttlb p50':>9} {'p90':>7} {'p99':>7} {'max':>7} {'+parse p50':>10} {'p99':>7} {'max':>7}")
    print(head)
    for b in report["bursts"]:
        for grid, row in [*b["by_grid"].items(), ("all", b["all"])]:
            ttlb, total = row["ttlb"], row["ttlb+parse"]
            cells = (f"{ttlb.get('p50_ms', float('nan')):9.0f} {ttlb.get('p90_ms', float('nan')):7.0f} "
                     f"{ttlb.get('p99_ms', float('nan')):7.0f} {ttlb.get('max_ms', float('nan')):7.0f} "
                     f"{total.get('p50_ms', float('nan')):10.0f} {total.get('p99_ms', float('nan')):7.0f} "
                     f"{total.get('max_ms', float('nan')):7.0f}")
            print(f"{b['burst']:>5} {grid:5} {row['requests']:>4} {row['duplicates']:>4} {row['valid']:>5} "
                  f"{row['deadline_misses']:>5} {cells}")
        m = b["miner"]
        print(f"      burst: last reply read {b['wall_s']:.1f} s after the first request; miner: {m['pool']:.0f} from the pool, {m['fallback']:.0f} "
              f"fallbacks (rate {m['fallback_rate']}) {m['fallback_reasons'] or ''}; miner RSS {m['rss_mb']:.0f} MB")
        for error in b["all"]["errors"]:
            print(f"      error: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lf", type=int, default=64, help="24 h requests per burst")
    parser.add_argument("--hf", type=int, default=64, help="1 h requests per burst")
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between bursts")
    parser.add_argument("--workers", type=int, default=2, help="solo Celery worker processes")
    parser.add_argument("--validators", type=int, default=8, help="validator hotkeys the lanes belong to")
    parser.add_argument("--duplicates", type=float, default=0.25, help="share of lanes repeating a prompt")
    parser.add_argument("--timeout-lf", type=float, default=110.0, help="24 h timeout (validators: ~118 s)")
    parser.add_argument("--timeout-hf", type=float, default=50.0, help="1 h timeout (validators: ~50 s)")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--artifacts", type=Path, default=None, help="artifacts dir to serve (default: empty)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

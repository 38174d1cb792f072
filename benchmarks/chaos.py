"""Chaos soak: the whole fleet under a steady validator load while faults are injected one after another.

    python -m benchmarks.chaos                      # the default schedule, about 5 minutes
    python -m benchmarks.chaos --scale 3 --rounds 2 # each phase 3x longer, the schedule twice
    python -m benchmarks.chaos --only baseline,redis-stop --keep

Starts its own stack on free loopback ports (synth_miner.devstack): redis-server, two solo inference
workers, a cpu worker, the beat and the miner with its metrics port, replaying ../shared/data. Lanes of
signed Simulation requests (24 h and 1 h prompts, each with a start time of its own, the validators'
timeouts) run the whole time; the phases then break the fleet: kill -9 a worker and restart it, SIGSTOP
a worker, restart Redis on its port (with its data and without), SIGSTOP Redis, hog every core, kill -9
the beat, a burst of 4x the lanes, and several faults at once.

Per phase (a request belongs to the phase it was sent in): requests, valid %, deadline misses (the
reply's last byte later than the request's timeout, or no answer), fallbacks and their reasons (the
miner's /metrics), p50/p99/max time to the last byte, and the forecasts whose worker stopped mid-task
(kill -9, SIGSTOP: their lease lapsed) by what answered them, the re-sent task or the fallback. A forecast
running on the killed worker used to wait out SYNTH_MAX_WAIT_S (30 s). One the worker had taken from the
queue but not started yet still does (it holds no claim: killed in those milliseconds, or an idle worker
frozen by SIGSTOP, whose open BRPOP still takes a task): when it happens, that is the max of the worker
phases. A request waiting while Redis restarts reconnects and is answered by the pool. Every miss or invalid reply is listed with its prompt,
to be found in the miner's log (kept with --keep). Then one JSON line.

Replies are judged (parsed into the validator's Simulation type, both validator rule sets) in a separate
process, so the judging does not delay the lanes' clocks. The client shares the host with the stack: under
the CPU hog its own clock reads are late too, so its latencies there are an upper bound.
"""

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import redis

from benchmarks.load import GRIDS, SHARED, Prompt, percentiles, scrape, served_assets
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

HF_ASSETS = ("BTC", "ETH")  # the 1 h prompts the replayed files let the pool answer (see README: replay)


# --- the validators' side -------------------------------------------------------------------------------


@dataclass
class Outcome:
    phase: str
    prompt: Prompt
    timeout: float
    sent_at: float  # seconds since the soak began
    last_byte_s: float | None = None
    valid: bool = False
    error: str | None = None

    @property
    def missed(self) -> bool:
        return self.last_byte_s is None or self.last_byte_s > self.timeout


def judge(body: bytes) -> str | None:
    """In the judging process: None if the reply passes both validator rule sets, else why not."""
    from miner.protocol import Simulation

    try:
        reply = Simulation(**json.loads(body))
        reply.dendrite.status_code = 200  # type: ignore[union-attr]  # the dendrite sets it from HTTP
        assert_valid_reply(reply)
    except Exception as exc:  # noqa: BLE001 - any failure is an invalid reply, reported as such
        return f"invalid: {type(exc).__name__}: {str(exc)[:200]}"
    return None


class Load:
    """Lanes of sequential signed requests; each lane is one validator dendrite (its own nonces)."""

    def __init__(self, args: argparse.Namespace, wallets: list[Any], miner_hotkey: str, port: int,
                 assets: list[str], judges: ProcessPoolExecutor, began: float) -> None:
        self.args, self.wallets, self.miner_hotkey, self.port = args, wallets, miner_hotkey, port
        self.lf_assets = assets
        self.hf_assets = [a for a in HF_ASSETS if a in assets] or assets
        self.judges = judges
        self.phase = "warm-up"
        self.outcomes: list[Outcome] = []
        self.began = began  # the fleet's: send times and fault events on one clock
        self._minutes = itertools.count(1)  # every prompt its own start time: each one is computed
        self._base = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=2)
        self._lanes: list[asyncio.Task[None]] = []
        self._judging: set[asyncio.Future[None]] = set()
        self._rng = random.Random(args.seed)
        self.http: aiohttp.ClientSession | None = None

    def prompt(self, grid: str) -> Prompt:
        pool = self.lf_assets if grid == "24h" else self.hf_assets
        start = self._base + timedelta(minutes=next(self._minutes))
        return Prompt(grid, self._rng.choice(pool), start.isoformat())

    async def start(self, lanes: int) -> list[asyncio.Task[None]]:
        if self.http is None:
            self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        new = [asyncio.create_task(self._lane(len(self._lanes) + i)) for i in range(lanes)]
        self._lanes += new
        return new

    async def stop(self, lanes: list[asyncio.Task[None]] | None = None) -> None:
        """Stop these lanes (all by default) once their request in flight is answered."""
        for task in lanes if lanes is not None else self._lanes:
            task.cancel()
        await asyncio.gather(*(lanes if lanes is not None else self._lanes), return_exceptions=True)
        if lanes is None:
            while self._judging:  # every reply judged before the report
                await asyncio.gather(*list(self._judging), return_exceptions=True)
            if self.http is not None:
                await self.http.close()

    async def _lane(self, index: int) -> None:
        validator = Validator(self.wallets[index % len(self.wallets)], self.miner_hotkey, self.port)
        grid = "24h" if index % 2 == 0 else "1h"
        asking: asyncio.Future[None] | None = None
        try:
            while True:
                began = time.monotonic()
                asking = asyncio.ensure_future(self._one(validator, self.prompt(grid)))
                await asyncio.shield(asking)  # a stop lets it finish
                await asyncio.sleep(max(0.0, self.args.interval - (time.monotonic() - began)))
        finally:
            # Its answer read before the session closes: closed under it, the request read as a miss
            # ("Server disconnected") that the miner never made.
            if asking is not None and not asking.done():
                await asyncio.wait([asking])
            await validator.close()

    async def _one(self, validator: Validator, prompt: Prompt) -> None:
        assert self.http is not None
        timeout = self.args.timeout_lf if prompt.grid == "24h" else self.args.timeout_hf
        outcome = Outcome(self.phase, prompt, timeout, time.monotonic() - self.began)
        self.outcomes.append(outcome)
        prepared = validator.dendrite.preprocess_synapse_for_request(validator.axon_info(), prompt.synapse(), timeout)
        began = time.perf_counter()
        try:
            async with self.http.post(f"http://127.0.0.1:{self.port}/Simulation", headers=prepared.to_headers(),
                                      json=prepared.model_dump(),
                                      timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.read()
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcome.error = f"no answer: {type(exc).__name__}: {exc}"
            return
        outcome.last_byte_s = time.perf_counter() - began
        if status != 200:
            outcome.error = f"HTTP {status}: {body[:200]!r}"
            return
        judging = asyncio.ensure_future(self._judge(body, outcome))
        self._judging.add(judging)
        judging.add_done_callback(self._judging.discard)

    async def _judge(self, body: bytes, outcome: Outcome) -> None:
        outcome.error = await asyncio.get_running_loop().run_in_executor(self.judges, judge, body)
        outcome.valid = outcome.error is None


# --- the fleet and its faults -----------------------------------------------------------------------------


class Fleet:
    def __init__(self, tmp: Path, env: dict[str, str], port: int, metrics_port: int) -> None:
        self.tmp, self.env, self.port, self.metrics_port = tmp, env, port, metrics_port
        self.redis = RedisServer(tmp)
        self.procs: dict[str, Proc] = {}
        self._generation = itertools.count(1)
        self.events: list[tuple[float, str]] = []
        self.began = time.monotonic()

    def note(self, what: str) -> None:
        self.events.append((round(time.monotonic() - self.began, 1), what))
        # The wall clock too: the processes' logs are stamped with it.
        print(f"  [{time.monotonic() - self.began:6.1f} s {datetime.now().strftime('%H:%M:%S')}] {what}", flush=True)

    def start(self) -> None:
        self.redis.start()
        self.env["SYNTH_REDIS_URL"] = self.redis.url
        self.procs["miner"] = spawn(cli("serve", "--local", "--port", str(self.port)), self.env,
                                    self.tmp / "miner.log")
        for name in ("w0", "w1"):
            self.start_worker(name)
        self.start_worker("cpu")
        self.start_beat()
        wait_port(self.port, self.procs["miner"].proc, self.procs["miner"].log)
        wait_port(self.metrics_port, self.procs["miner"].proc, self.procs["miner"].log)

    def start_worker(self, name: str) -> None:
        queues = "cpu" if name == "cpu" else "infer.hf,infer.lf"
        # Each start its own log name, so the dead process's log stays for the post-mortem.
        self.procs[name] = start_worker(self.tmp, self.env, queues=queues, name=f"{name}-{next(self._generation)}")

    def start_beat(self) -> None:
        self.procs["beat"] = spawn(cli("beat", "--schedule-file", str(self.tmp / "beat.db")), self.env,
                                   self.tmp / f"beat-{next(self._generation)}.log")

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name].proc if name != "redis" else self.redis.proc
        assert proc is not None and proc.poll() is None, f"{name} is not running"
        os.kill(proc.pid, sig)  # the process itself, as the kernel's OOM killer or an operator would

    def restart_redis(self, keep_data: bool) -> None:
        """kill -9 and a fresh redis-server on the same port and folder: with its data (a snapshot taken
        just before, as a production Redis persists), or empty."""
        dump = self.redis.workdir / "dump.rdb"
        if keep_data:
            redis.Redis.from_url(self.redis.url, socket_timeout=10).save()
        self.redis.stop()
        if not keep_data:
            dump.unlink(missing_ok=True)
        fresh = RedisServer(self.redis.workdir)
        fresh.port = self.redis.port
        self.redis = fresh.start()

    def alive(self) -> dict[str, bool]:
        return {name: p.proc.poll() is None for name, p in self.procs.items()}

    def stop(self) -> None:
        for name in ("beat", "cpu", "w1", "w0", "miner"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.proc.poll() is None:
                os.kill(proc.proc.pid, signal.SIGCONT)  # a run stopped while a process was frozen
            proc.stop()
        if self.redis.proc is not None and self.redis.proc.poll() is None:
            os.kill(self.redis.proc.pid, signal.SIGCONT)
        self.redis.stop()


class Hog:
    """A busy loop on every core (normal priority), as another tenant or a runaway job would."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                      for _ in range(os.cpu_count() or 2)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(5)
        self.procs = []


@dataclass
class Phase:
    name: str
    seconds: float
    act: Callable[["Soak", float], Awaitable[None]]  # the faults, spread over the phase (given its length)
    extra_lanes: int = 0


@dataclass
class Soak:
    fleet: Fleet
    load: Load
    hog: Hog = field(default_factory=Hog)

    async def later(self, seconds: float, what: str, action: Callable[[], None]) -> None:
        await asyncio.sleep(seconds)
        self.fleet.note(what)
        await asyncio.to_thread(action)


async def nothing(soak: Soak, seconds: float) -> None:
    return None


async def kill_worker(soak: Soak, seconds: float) -> None:
    soak.fleet.note("kill -9 w0")
    soak.fleet.signal("w0", signal.SIGKILL)
    await soak.later(min(5.0, seconds / 4), "restart w0", lambda: soak.fleet.start_worker("w0"))


async def stop_worker(soak: Soak, seconds: float) -> None:
    soak.fleet.note("SIGSTOP w1")
    soak.fleet.signal("w1", signal.SIGSTOP)
    await soak.later(min(20.0, seconds * 0.8), "SIGCONT w1", lambda: soak.fleet.signal("w1", signal.SIGCONT))


async def redis_restart_kept(soak: Soak, seconds: float) -> None:
    soak.fleet.note("restart redis-server, data kept")
    await asyncio.to_thread(soak.fleet.restart_redis, True)


async def redis_restart_empty(soak: Soak, seconds: float) -> None:
    soak.fleet.note("restart redis-server, empty")
    await asyncio.to_thread(soak.fleet.restart_redis, False)


async def stop_redis(soak: Soak, seconds: float) -> None:
    soak.fleet.note("SIGSTOP redis")
    soak.fleet.signal("redis", signal.SIGSTOP)
    await soak.later(5.0, "SIGCONT redis", lambda: soak.fleet.signal("redis", signal.SIGCONT))


async def hog_cpu(soak: Soak, seconds: float) -> None:
    soak.fleet.note(f"CPU hog on {os.cpu_count()} cores")
    soak.hog.start()
    await soak.later(min(30.0, seconds), "CPU hog ends", soak.hog.stop)


async def kill_beat(soak: Soak, seconds: float) -> None:
    soak.fleet.note("kill -9 beat")
    soak.fleet.signal("beat", signal.SIGKILL)
    await soak.later(min(5.0, seconds / 3), "restart beat", soak.fleet.start_beat)


async def together(soak: Soak, seconds: float) -> None:
    """A worker killed, Redis frozen and the cores hogged at once, then everything restored."""
    soak.hog.start()
    soak.fleet.note("together: CPU hog, kill -9 w1, SIGSTOP redis")
    soak.fleet.signal("w1", signal.SIGKILL)
    soak.fleet.signal("redis", signal.SIGSTOP)
    await soak.later(5.0, "SIGCONT redis", lambda: soak.fleet.signal("redis", signal.SIGCONT))
    await soak.later(5.0, "restart w1", lambda: soak.fleet.start_worker("w1"))
    await soak.later(max(0.0, min(30.0, seconds) - 10.0), "CPU hog ends", soak.hog.stop)


def schedule(burst_lanes: int) -> list[Phase]:
    """Default lengths (seconds); --scale multiplies them. Each fault leaves the rest of its phase to recover."""
    return [
        Phase("baseline", 20, nothing),
        Phase("worker-kill9", 25, kill_worker),
        Phase("worker-sigstop", 30, stop_worker),
        Phase("redis-restart-kept", 20, redis_restart_kept),
        Phase("redis-restart-empty", 30, redis_restart_empty),
        Phase("redis-sigstop", 15, stop_redis),
        Phase("cpu-hog", 30, hog_cpu),
        Phase("beat-kill9", 15, kill_beat),
        Phase("burst-4x", 20, nothing, extra_lanes=burst_lanes),
        Phase("together", 35, together),
        Phase("recovery", 20, nothing),
    ]


# --- the run and its report ----------------------------------------------------------------------------


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    answered = [o.last_byte_s for o in outcomes if o.last_byte_s is not None]
    lat = percentiles(answered)
    n = len(outcomes)
    return {"requests": n, "valid": sum(o.valid for o in outcomes),
            "valid_pct": round(100.0 * sum(o.valid for o in outcomes) / n, 2) if n else None,
            "deadline_misses": sum(o.missed for o in outcomes),
            "p50_ms": round(lat.get("p50_ms", float("nan")), 1), "p99_ms": round(lat.get("p99_ms", float("nan")), 1),
            "max_ms": round(lat.get("max_ms", float("nan")), 1)}


def failures(outcomes: list[Outcome]) -> list[str]:
    return [f"{o.sent_at:6.1f} s {o.prompt.grid} {o.prompt.asset} {o.prompt.start_time} "
            f"({o.last_byte_s if o.last_byte_s is None else round(o.last_byte_s, 2)} s of {o.timeout:g}): {o.error}"
            for o in outcomes if o.missed or not o.valid]


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    miner_wallet = make_wallet(tmp / "w", "miner")
    wallets = [make_wallet(tmp / "w", f"validator{i}") for i in range(args.validators)]
    port, metrics_port = free_port(), free_port()
    env = {"SYNTH_WALLET_PATH": str(tmp / "w"), "SYNTH_WALLET_NAME": "miner",
           "SYNTH_PRICE_PROVIDER": "replay", "SYNTH_REPLAY_DIR": str(args.data), "SYNTH_DATA_DIR": str(tmp / "data"),
           "SYNTH_ARTIFACTS_DIR": str(tmp / "artifacts"), "SYNTH_LOG_LEVEL": "INFO",
           "SYNTH_METRICS_PORT": str(metrics_port)}
    fleet = Fleet(tmp, env, port, metrics_port)
    phases = [p for p in schedule(args.lanes * 3) if not args.only or p.name in args.only.split(",")]
    judges = ProcessPoolExecutor(max_workers=1)
    try:
        await asyncio.to_thread(fleet.start)
        load = Load(args, wallets, miner_wallet.hotkey.ss58_address, port, served_assets(args.data), judges,
                    fleet.began)
        soak = Soak(fleet, load)
        fleet.note(f"fleet up (logs in {tmp}); warm-up {args.warm_up:g} s")
        await load.start(args.lanes)
        await asyncio.sleep(args.warm_up)
        report: list[dict[str, Any]] = []
        metrics: list[tuple[str, dict[str, float]]] = []
        for round_ in range(args.rounds):
            for phase in phases:
                name = phase.name if args.rounds == 1 else f"{phase.name}#{round_ + 1}"
                seconds = phase.seconds * args.scale
                before = await asyncio.to_thread(scrape, metrics_port)
                load.phase = name
                fleet.note(f"phase {name} ({seconds:g} s)")
                extra = await load.start(phase.extra_lanes) if phase.extra_lanes else []
                began = time.monotonic()
                await phase.act(soak, seconds)
                await asyncio.sleep(max(0.0, seconds - (time.monotonic() - began)))
                if extra:
                    await load.stop(extra)
                metrics.append((name, {k: v - before.get(k, 0.0)
                                       for k, v in (await asyncio.to_thread(scrape, metrics_port)).items()}))
        load.phase = "drain"
        await load.stop()
        final = await asyncio.to_thread(scrape, metrics_port)
        for name, delta in metrics:
            rows = [o for o in load.outcomes if o.phase == name]
            report.append({"phase": name, **summarise(rows),
                           "by_grid": {g: summarise([o for o in rows if o.prompt.grid == g]) for g in GRIDS},
                           "pool": delta.get("outcome:pool", 0.0), "fallbacks": delta.get("outcome:fallback", 0.0),
                           "fallback_reasons": {k[7:]: v for k, v in delta.items() if k.startswith("reason:") and v},
                           "lost": {k[5:]: v for k, v in delta.items() if k.startswith("lost:") and v},
                           "failures": failures(rows)})
        measured = [o for o in load.outcomes if o.phase not in ("warm-up", "drain")]
        return {"lanes": args.lanes, "interval_s": args.interval, "timeout_lf": args.timeout_lf,
                "timeout_hf": args.timeout_hf, "scale": args.scale, "rounds": args.rounds,
                "alive_at_end": fleet.alive(), "phases": report, "all": summarise(measured),
                "warm_up_failures": failures([o for o in load.outcomes if o.phase == "warm-up"]),
                "fallbacks_total": final.get("outcome:fallback", 0.0), "events": fleet.events}
    finally:
        soak_hog = locals().get("soak")
        if soak_hog is not None:
            soak_hog.hog.stop()
        await asyncio.to_thread(fleet.stop)
        judges.shutdown(cancel_futures=True)


def print_table(report: dict[str, Any]) -> None:
    print(f"chaos: {report['lanes']} lanes (24 h and 1 h alternating, a request every {report['interval_s']:g} s "
          f"per lane), timeouts {report['timeout_lf']:g}/{report['timeout_hf']:g} s")
    print(f"{'phase':22} {'n':>5} {'valid %':>8} {'miss':>5} {'fallb':>6} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'max ms':>8}  fallback reasons; forecasts whose worker stopped mid-task, by what answered them")
    for row in [*report["phases"], {"phase": "all", **report["all"], "fallbacks": report["fallbacks_total"],
                                     "fallback_reasons": {}}]:
        lost = f"; lost {row['lost']}" if row.get("lost") else ""
        print(f"{row['phase']:22} {row['requests']:>5} {row['valid_pct'] if row['valid_pct'] is not None else '-':>8} "
              f"{row['deadline_misses']:>5} {row['fallbacks']:>6.0f} {row['p50_ms']:>8.0f} {row['p99_ms']:>8.0f} "
              f"{row['max_ms']:>8.0f}  {row['fallback_reasons'] or ''}{lost}")
        for line in row.get("failures", [])[:8]:
            print(f"      {line}")
    for line in report["warm_up_failures"][:8]:
        print(f"      warm-up: {line}")
    print(f"processes alive at the end: {report['alive_at_end']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lanes", type=int, default=4, help="steady lanes (24 h and 1 h alternate); the burst adds 3x")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds from one request's send to a lane's next")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every phase's length")
    parser.add_argument("--rounds", type=int, default=1, help="times the schedule runs")
    parser.add_argument("--only", default="", help="comma-separated phase names to run (default: all)")
    parser.add_argument("--warm-up", type=float, default=15.0, help="seconds of load before the first phase")
    parser.add_argument("--validators", type=int, default=4, help="validator hotkeys the lanes belong to")
    parser.add_argument("--timeout-lf", type=float, default=110.0, help="24 h timeout (validators: ~118 s)")
    parser.add_argument("--timeout-hf", type=float, default=50.0, help="1 h timeout (validators: ~50 s)")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--keep", action="store_true", help="keep the logs' folder")
    args = parser.parse_args(argv)
    names = {p.name for p in schedule(0)}
    unknown = set(filter(None, args.only.split(","))) - names
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}: choose from {sorted(names)}")
    if args.lanes < 2 or args.interval <= 0 or args.scale <= 0 or args.rounds < 1:
        parser.error("--lanes must be at least 2 (a 24 h and a 1 h lane); --interval, --scale, --rounds positive")
    return args


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    try:
        report = asyncio.run(run(args, tmp))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(report)
    print(json.dumps(report))


if __name__ == "__main__":
    main()

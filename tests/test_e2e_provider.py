"""A request served end to end reading history from the Redis cache fed by the real provider clients.

Local Binance and Hyperliquid servers speak the exact wire formats (core.fake_providers) over
loopback; the miner (Celery mode) warms the cache and the durable store through the real clients.
"""

import json
import time
from pathlib import Path

import redis

from core.cache_redis import RedisHistoryCache
from core.csv_history import read_csv, write_csv
from core.fake_providers import FakeMarket, FakeServerThread
from core.history_store import HistoryStore
from core.prompts import parse_start_time
from synth_miner.devstack import (
    RedisServer,
    Validator,
    assert_valid_reply,
    free_port,
    make_wallet,
    start_miner,
    start_time_in,
    start_worker,
)


def training_slice(shared_data: Path, out: Path, stem: str, days: int) -> None:
    """The last days before the held-out boundary (held-out rows never leave the shared folder)."""
    cut = json.loads((shared_data / "manifest.json").read_text())[f"{stem}_1m"]["eval_start_ts"]
    history = read_csv(shared_data / f"{stem}_1m.csv.gz", 60).between(cut - days * 86_400, cut)
    write_csv(out / f"{stem}_1m.csv.gz", history)


async def test_miner_serves_from_cache_fed_by_provider_clients(redis_server: RedisServer, redis_url: str,
                                                               tmp_path: Path, shared_data: Path) -> None:
    csv_dir = tmp_path / "csv"
    training_slice(shared_data, csv_dir, "btc", 4)
    training_slice(shared_data, csv_dir, "xau", 4)
    binance = FakeServerThread("binance", FakeMarket(csv_dir)).start()
    hyperliquid = FakeServerThread("hyperliquid", FakeMarket(csv_dir)).start()
    wallets = tmp_path / "wallets"
    miner_wallet, vali = make_wallet(wallets, "miner"), make_wallet(wallets, "validator")
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_WALLET_PATH": str(wallets), "SYNTH_WALLET_NAME": "miner",
           "SYNTH_PRICE_PROVIDER": "auto", "SYNTH_BINANCE_URL": binance.url,
           "SYNTH_HYPERLIQUID_URL": hyperliquid.url, "SYNTH_DATA_DIR": str(tmp_path / "data"),
           "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"), "SYNTH_LOG_LEVEL": "INFO"}
    worker = start_worker(tmp_path, env)
    port = free_port()
    miner = start_miner(tmp_path, port, env)
    validator = Validator(vali, miner_wallet.hotkey.ss58_address, port)
    try:
        for asset, inc, length in (("BTC", 60, 3_600), ("XAU", 300, 86_400)):
            start = start_time_in(120)
            reply, _ = await validator.ask(asset, inc, length, 1000, start_time=start, timeout=30)
            assert_valid_reply(reply)
            # This request's own line: the pool (the worker reading the cache) answered it, not the fallback.
            marker = f"answered {asset}:{parse_start_time(start)}:{inc}:{length}:1000 from "
            sources = [line.split(marker, 1)[1].split()[0] for line in miner.text().splitlines() if marker in line]
            assert sources == ["pool"], (sources, miner.text()[-3000:])
    finally:
        await validator.close()
        miner.stop()
        worker.stop()
        binance.stop()
        hyperliquid.stop()
    cache = RedisHistoryCache(redis.Redis.from_url(redis_url))
    now = time.time()
    for asset in ("BTC", "XAU"):
        span = cache.span(asset, 60)
        assert span is not None and now - span[1] < 600, (asset, span)
        history = cache.read(asset, 60, span[0], span[1] + 60)
        assert len(history) > 3 * 1440 * 0.9  # the provider's days, gaps kept as gaps
        assert cache.latest(asset) is not None
    stored = HistoryStore(tmp_path / "data" / "history")
    assert stored.root.is_dir() and any(stored.root.joinpath("BTC").rglob("*"))


async def test_a_miner_whose_redis_is_down_from_the_start_answers_from_the_provider(tmp_path: Path,
                                                                                   shared_data: Path) -> None:
    """No Redis at all (a wrong URL, or its host down when the miner starts): the warm-up fills nothing and
    nothing is kept, so each first request reads the provider directly, in time, and the reply starts at the
    market's price, not at a default."""
    csv_dir = tmp_path / "csv"
    training_slice(shared_data, csv_dir, "btc", 4)
    market = FakeMarket(csv_dir)
    binance = FakeServerThread("binance", market).start()
    wallets = tmp_path / "wallets"
    miner_wallet, vali = make_wallet(wallets, "miner"), make_wallet(wallets, "validator")
    env = {"SYNTH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "SYNTH_WALLET_PATH": str(wallets),
           "SYNTH_WALLET_NAME": "miner", "SYNTH_PRICE_PROVIDER": "auto", "SYNTH_BINANCE_URL": binance.url,
           "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
           "SYNTH_LOG_LEVEL": "INFO"}
    port = free_port()
    miner = start_miner(tmp_path, port, env)
    validator = Validator(vali, miner_wallet.hotkey.ss58_address, port)
    try:
        for inc, length in ((60, 3_600), (300, 86_400)):
            start = start_time_in(120)
            began = time.monotonic()
            reply, _ = await validator.ask("BTC", inc, length, 1000, start_time=start, timeout=30)
            assert time.monotonic() - began < 20, miner.text()[-3000:]
            assert_valid_reply(reply)
            marker = f"answered BTC:{parse_start_time(start)}:{inc}:{length}:1000 from "
            sources = [line.split(marker, 1)[1].split()[0] for line in miner.text().splitlines() if marker in line]
            assert sources == ["fallback"], (sources, miner.text()[-3000:])
            first = {path[0] for path in reply.simulation_output[2:]}
            newest = market.bars("BTC", 60).close[-1]
            assert len(first) == 1 and abs(first.pop() / newest - 1) < 0.01, (newest, miner.text()[-3000:])
        assert miner.proc.poll() is None
    finally:
        await validator.close()
        miner.stop()
        binance.stop()

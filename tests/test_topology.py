"""Queues and observability on the real stack: routing per queue, miner metrics, worker heartbeats, status."""

import asyncio
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from core.constants import LIVE_READERS_CHECK_S
from synth_miner.devstack import (
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


async def test_routing_metrics_and_status(redis_server: RedisServer, redis_url: str, tmp_path: Path,
                                          shared_data: Path) -> None:
    wallets = tmp_path / "wallets"
    miner_wallet, vali = make_wallet(wallets, "miner"), make_wallet(wallets, "validator")
    metrics_port, port = free_port(), free_port()
    env = {"SYNTH_REDIS_URL": redis_url, "SYNTH_WALLET_PATH": str(wallets), "SYNTH_WALLET_NAME": "miner",
           "SYNTH_PRICE_PROVIDER": "replay", "SYNTH_REPLAY_DIR": str(shared_data), "SYNTH_LOG_LEVEL": "INFO",
           "SYNTH_DATA_DIR": str(tmp_path / "data"), "SYNTH_ARTIFACTS_DIR": str(tmp_path / "artifacts")}
    hf = start_worker(tmp_path, env, queues="infer.hf", name="hf")
    lf = start_worker(tmp_path, env, queues="infer.lf", name="lf")
    miner = spawn(cli("serve", "--local", "--port", str(port), "--metrics-port", str(metrics_port)), env,
                  tmp_path / "miner.log")
    validator = Validator(vali, miner_wallet.hotkey.ss58_address, port)
    try:
        wait_port(port, miner.proc, miner.log)
        reply, _ = await validator.ask("SOL", 60, 3_600, 1000, start_time=start_time_in(120))
        assert_valid_reply(reply)
        assert "synth.forecast" in hf.text() and "SOL:" in hf.text()
        assert "SOL:" not in lf.text()

        lf.stop()  # no live process reads infer.lf now: the fallback answers, and nothing is sent
        await asyncio.sleep(LIVE_READERS_CHECK_S + 0.5)  # once the miner has read the heartbeats again
        reply, _ = await validator.ask("ETH", 300, 86_400, 1000, start_time=start_time_in(120), timeout=8)
        assert_valid_reply(reply)

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        assert 'synth_requests_total{asset="SOL",outcome="pool",prompt="high"} 1.0' in metrics
        assert 'synth_requests_total{asset="ETH",outcome="fallback",prompt="low"} 1.0' in metrics
        assert 'synth_fallbacks_total{reason="no_worker"} 1.0' in metrics
        for series in ("synth_request_seconds_bucket", "synth_deadline_margin_seconds_bucket",
                       "synth_invalid_replies_total", "synth_queue_depth"):
            assert series in metrics, series

        out = subprocess.run([sys.executable, "-m", "synth_miner.cli", "status", "--json"], env={**env},
                             capture_output=True, text=True, timeout=60)
        report = json.loads(out.stdout)
        assert any("infer.hf" in w["queues"] for w in report["workers"]), report["workers"]
        assert all(w["device"] == "cpu" for w in report["workers"]), report["workers"]  # no GPU here
        served = {kind: Path(path).parent.name for w in report["workers"] for kind, path in w["models"].items()}
        assert served == {"hf": "models", "lf_crypto": "models", "lf_equity": "models"}, report["workers"]
        assert report["cache"]["SOL"] is not None and report["cache"]["SOL"]["freshness_s"] < 600
        assert set(report["queues"]) == {"infer.hf", "infer.lf", "cpu"}
    finally:
        await validator.close()
        miner.stop()
        hf.stop()
        lf.stop()

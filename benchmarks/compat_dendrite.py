"""Check that replies parse with the validators' own bittensor (10.0.1 dendrite) — run it in a venv
holding that version, against a running miner:

    python3.11 -m venv /tmp/bt1001 && /tmp/bt1001/bin/pip install bittensor==10.0.1 async-substrate-interface==1.5.15
    synth-miner serve --local --replay-dir ../shared/data --port 8099 &      # in our own venv
    PYTHONPATH=. /tmp/bt1001/bin/python benchmarks/compat_dendrite.py --port 8099 --hotkey <miner ss58>

Imports only bittensor, pydantic and numpy from that venv (and our pure-Python protocol and checks).
"""

import argparse
import asyncio
import tempfile
import time
from datetime import datetime, timedelta, timezone

import bittensor as bt
from bittensor.utils import networking

from core.prompts import check_request
from core.response_checks import validate_response_head, validate_response_upstream
from miner.protocol import Simulation, SimulationInput

networking.get_external_ip = lambda: "127.0.0.1"  # never ask outside hosts


async def main(port: int, hotkey: str) -> None:
    wallet = bt.Wallet(name="compat", hotkey="default", path=tempfile.mkdtemp())
    wallet.create_if_non_existent(coldkey_use_password=False, hotkey_use_password=False, suppress=True)
    dendrite = bt.Dendrite(wallet=wallet)
    axon = bt.AxonInfo(version=0, ip="127.0.0.1", port=port, ip_type=4, hotkey=hotkey, coldkey="")
    start = (datetime.now(timezone.utc).replace(second=0, microsecond=0) + timedelta(minutes=2)).isoformat()
    print(f"bittensor {bt.__version__}")
    for inc, length in ((300, 86_400), (60, 3_600)):
        synapse = Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start, time_increment=inc,
                                                              time_length=length, num_simulations=1000))
        began = time.perf_counter()
        reply = await dendrite.call(target_axon=axon, synapse=synapse, timeout=60, deserialize=False)
        seconds = time.perf_counter() - began
        request = check_request("BTC", start, inc, length, 1000, 10_000)
        output = list(reply.simulation_output or [])
        args = (request.start_ts, inc, length, 1000)
        print(f"{length // 3600:>2}h: success={reply.is_success} status={reply.dendrite.status_code} "
              f"head={validate_response_head(output, *args)} upstream={validate_response_upstream(output, *args)} "
              f"{seconds * 1e3:.0f} ms")
    await dendrite.aclose_session()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hotkey", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.port, args.hotkey))

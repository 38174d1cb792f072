"""The protocol's latency floor: an axon that answers every Simulation with a pre-rendered reply.

No forecasting, no rounding, no checks: the same bittensor axon and the same reply size as a real
answer, so what a validator measures against it is the floor any miner pays (HTTP, signature
verification, ~2.9 MB of JSON for 24 h). `synth-miner bench` runs it beside the real miner.

    python -m synth_miner.floor_axon --port 9100 --wallet-path W --wallet-name floor
"""

import argparse
import signal
import threading

import bittensor as bt
import numpy as np
from starlette.responses import Response

from core.prompts import ForecastRequest
from core.response import render_json, round_for_wire
from miner.offline import patch_bittensor_networking
from miner.protocol import Simulation


def make_body(synapse: Simulation, cache: dict[tuple[int, int, int], bytes]) -> bytes:
    inp = synapse.simulation_input
    key = (inp.time_increment, inp.time_length, inp.num_simulations)
    if key not in cache:
        n_points = inp.time_length // inp.time_increment + 1
        paths = 100_000 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 1e-3, (inp.num_simulations, n_points)),
                                           axis=1))
        request = ForecastRequest(inp.asset, 0, inp.time_increment, inp.time_length, inp.num_simulations)
        cache[key] = render_json(request, round_for_wire(paths))
    return cache[key]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--wallet-path", required=True)
    parser.add_argument("--wallet-name", default="floor")
    args = parser.parse_args()
    patch_bittensor_networking()
    wallet = bt.Wallet(name=args.wallet_name, hotkey="default", path=args.wallet_path)
    wallet.create_if_non_existent(coldkey_use_password=False, hotkey_use_password=False, suppress=True)
    bodies: dict[tuple[int, int, int], bytes] = {}

    async def forward(synapse: Simulation) -> Simulation:
        paths = make_body(synapse, bodies)
        # The start timestamp is the only per-request part of a real reply header.
        synapse.axon.status_code = 200  # type: ignore[union-attr]
        head = synapse.model_dump_json(exclude={"simulation_output"}).encode()
        response = Response(content=head[:-1] + b',"simulation_output":' + paths + b"}",
                            media_type="application/json")
        response.synapse = synapse  # type: ignore[attr-defined]
        return response  # type: ignore[return-value]

    axon = bt.Axon(wallet=wallet, ip="127.0.0.1", port=args.port, external_ip="127.0.0.1", external_port=args.port)
    axon.fast_server.config.host = "127.0.0.1"
    axon.attach(forward_fn=forward)
    axon.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"floor axon on 127.0.0.1:{args.port} hotkey {wallet.hotkey.ss58_address}", flush=True)
    stop.wait()
    axon.stop()


if __name__ == "__main__":
    main()

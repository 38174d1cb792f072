"""The latency floor (synth_miner.floor_axon): a real axon whose pre-rendered reply has the size of a real one."""

import json
import signal
import sys
from pathlib import Path

from miner.protocol import Simulation, SimulationInput
from synth_miner.devstack import Validator, free_port, make_wallet, spawn, start_time_in, timed_raw_call, wait_port
from synth_miner.floor_axon import make_body


def simulation(time_increment: int, time_length: int, num_simulations: int) -> Simulation:
    return Simulation(simulation_input=SimulationInput(asset="BTC", start_time=start_time_in(120),
                                                       time_increment=time_increment, time_length=time_length,
                                                       num_simulations=num_simulations))


def test_the_body_has_the_shape_of_a_real_reply_and_is_rendered_once_per_prompt() -> None:
    cache: dict[tuple[int, int, int], bytes] = {}
    body = make_body(simulation(300, 86_400, 1000), cache)
    reply = json.loads(body)
    assert reply[:2] == [0, 300] and len(reply) == 2 + 1000
    assert all(len(path) == 289 for path in reply[2:])  # 24 h of 5 minutes, both ends included
    assert make_body(simulation(300, 86_400, 1000), cache) is body  # pre-rendered: the same bytes again
    small = json.loads(make_body(simulation(60, 3_600, 100), cache))
    assert len(small) == 2 + 100 and all(len(path) == 61 for path in small[2:])
    fewer = json.loads(make_body(simulation(300, 86_400, 10), cache))  # the count is part of the prompt
    assert len(fewer) == 2 + 10 and len(cache) == 3


async def test_the_floor_axon_answers_a_signed_request_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    wallets = tmp_path / "wallets"
    floor_wallet, validator_wallet = make_wallet(wallets, "floor"), make_wallet(wallets, "validator")
    port = free_port()
    floor = spawn([sys.executable, "-m", "synth_miner.floor_axon", "--port", str(port), "--wallet-path",
                   str(wallets), "--wallet-name", "floor"], {}, tmp_path / "floor.log")
    validator = Validator(validator_wallet, floor_wallet.hotkey.ss58_address, port)
    try:
        wait_port(port, floor.proc, floor.log)
        timed = await timed_raw_call(validator, simulation(60, 3_600, 100), 30.0)
        assert timed.reply.axon is not None and timed.reply.axon.status_code == 200  # as a real reply's header
        output = timed.reply.simulation_output
        assert output is not None and len(output) == 2 + 100
        assert all(isinstance(path, list) and len(path) == 61 for path in list(output)[2:])
        assert timed.miner_s is not None and 0 <= timed.miner_s < timed.last_byte_s  # the axon's own time
        floor.proc.send_signal(signal.SIGTERM)
        assert floor.proc.wait(15) == 0, floor.text()[-2000:]
    finally:
        await validator.close()
        floor.stop()

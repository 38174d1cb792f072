"""End to end in the embedded mode: a real axon process (no Redis), signed requests from a dendrite."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from synth_miner.devstack import Proc, Validator, assert_valid_reply, make_wallet, start_miner
from tests.conftest import free_port


@pytest.fixture(scope="module")
def wallets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("wallets")
    return {name: make_wallet(root, name) for name in ("miner", "validator", "stranger")}


@pytest.fixture(scope="module")
def embedded_miner(tmp_path_factory: pytest.TempPathFactory, wallets: dict[str, object],
                   shared_data: Path) -> Iterator[tuple[Proc, int]]:
    tmp = tmp_path_factory.mktemp("embedded")
    port = free_port()
    validator = wallets["validator"].hotkey.ss58_address  # type: ignore[attr-defined]
    env = {"SYNTH_WALLET_PATH": wallets["miner"].path,  # type: ignore[attr-defined]
           "SYNTH_WALLET_NAME": "miner", "SYNTH_PRICE_PROVIDER": "replay", "SYNTH_REPLAY_DIR": str(shared_data),
           "SYNTH_ALLOWED_HOTKEYS": f'["{validator}"]', "SYNTH_DATA_DIR": str(tmp / "data"),
           "SYNTH_ARTIFACTS_DIR": str(tmp / "artifacts")}
    env.pop("SYNTH_REDIS_URL", None)
    miner = start_miner(tmp, port, env)
    yield miner, port
    miner.stop()


def validator_for(wallets: dict[str, object], name: str, port: int) -> Validator:
    return Validator(wallets[name], wallets["miner"].hotkey.ss58_address, port)  # type: ignore[arg-type, attr-defined]


@pytest.mark.parametrize("asset,increment,length", [("BTC", 300, 86_400), ("BTC", 60, 3_600)])
async def test_signed_request_gets_valid_reply_in_time(embedded_miner: tuple[Proc, int], wallets: dict[str, object],
                                                       asset: str, increment: int, length: int) -> None:
    _, port = embedded_miner
    validator = validator_for(wallets, "validator", port)
    try:
        reply, seconds = await validator.ask(asset, increment, length, 1000, timeout=30)
    finally:
        await validator.close()
    assert_valid_reply(reply)
    assert seconds < 30
    paths = list(reply.simulation_output)[2:]  # type: ignore[arg-type]
    assert len(paths) == 1000 and len(paths[0]) == length // increment + 1
    assert len({p[-1] for p in paths}) > 900  # real Monte-Carlo spread, not copies


async def test_stranger_hotkey_is_refused(embedded_miner: tuple[Proc, int], wallets: dict[str, object]) -> None:
    _, port = embedded_miner
    stranger = validator_for(wallets, "stranger", port)
    try:
        reply, _ = await stranger.ask("BTC", 60, 3_600, 10)
    finally:
        await stranger.close()
    assert reply.axon.status_code == 403
    assert "allow-list" in (reply.axon.status_message or "")
    assert reply.simulation_output is None


async def test_unsigned_request_is_refused(embedded_miner: tuple[Proc, int], wallets: dict[str, object]) -> None:
    """A request dressed like a dendrite's, hotkey and all, but without the signature."""
    import aiohttp

    from miner.protocol import Simulation, SimulationInput

    _, port = embedded_miner
    validator = validator_for(wallets, "validator", port)
    synapse = Simulation(simulation_input=SimulationInput(start_time="2030-01-01T00:00:00+00:00",
                                                          time_increment=60, time_length=3600, num_simulations=10))
    prepared = validator.dendrite.preprocess_synapse_for_request(validator.axon_info(), synapse, 10.0)
    headers = prepared.to_headers()
    assert headers.pop("bt_header_dendrite_signature")
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/Simulation", json=prepared.model_dump(),
                                 headers=headers) as resp:
                status, text = resp.status, await resp.text()
    finally:
        await validator.close()
    assert status in (401, 403), text
    assert "unsigned" in text or "Signature" in text
    assert "simulation_output" not in text


@pytest.mark.parametrize("fields,needle", [
    ({"asset": "DOGE"}, "unknown asset"),
    ({"time_length": 3_601, "time_increment": 60}, "not a multiple"),
    ({"num_simulations": 0}, "num_simulations"),
    ({"num_simulations": 10_000_000}, "num_simulations"),
    ({"start_time": "yesterday at noon"}, "ISO-8601"),
])
async def test_bad_requests_get_clear_errors_and_miner_keeps_serving(
        embedded_miner: tuple[Proc, int], wallets: dict[str, object], fields: dict[str, object], needle: str) -> None:
    proc, port = embedded_miner
    validator = validator_for(wallets, "validator", port)
    request = {"asset": "BTC", "time_increment": 60, "time_length": 3_600, "num_simulations": 10, **fields}
    try:
        reply, _ = await validator.ask(**request)  # type: ignore[arg-type]
        assert reply.axon.status_code == 400, reply.axon.status_message
        assert needle in (reply.axon.status_message or "")
        assert reply.simulation_output is None
        good, _ = await validator.ask("ETH", 60, 3_600, 1000)
        assert_valid_reply(good)
    finally:
        await validator.close()
    assert proc.proc.poll() is None

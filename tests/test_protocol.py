"""The Simulation synapse: its headers are what bittensor's own code would write, only cheaper."""

import bittensor as bt
import pytest

from miner.protocol import Simulation, SimulationInput


def test_required_fields_are_the_schemas_and_the_schema_is_built_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """bittensor rebuilt the class's JSON schema at every to_headers(): ~2 ms of every reply, refusals
    included, so a flood of refused requests cost the miner 4-5 ms of CPU each."""
    synapse = Simulation(simulation_input=SimulationInput())
    expected = bt.Synapse.get_required_fields(synapse)  # type: ignore[no-untyped-call]  # bittensor's own
    assert synapse.get_required_fields() == expected == ["simulation_input"]
    headers = synapse.to_headers()
    assert "bt_header_input_obj_simulation_input" in headers

    def no_schema(*args: object, **kwargs: object) -> None:
        raise AssertionError("the JSON schema was built again")

    monkeypatch.setattr(Simulation, "model_json_schema", classmethod(no_schema))
    again = synapse.to_headers()
    del again["total_size"], headers["total_size"]  # sys.getsizeof over the fields: it drifts between calls anyway
    assert again == headers
    parsed = Simulation.from_headers(headers)
    assert isinstance(parsed, Simulation) and parsed.simulation_input == SimulationInput()

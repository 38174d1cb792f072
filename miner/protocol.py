"""The Simulation synapse, wire-compatible with the Synth validators' (synth/protocol.py).

Same class name (so the route is ``/Simulation``), same input fields, and the output field typed as
the validators type it: ``tuple[int | list[int | float], ...] | None`` behind a wrap validator that
hands back the raw value when it does not fit, so a validator sees exactly what was on the wire.
"""

import functools
import typing

import bittensor as bt
from pydantic import BaseModel, Field, ValidationInfo, ValidatorFunctionWrapHandler, WrapValidator


class SimulationInput(BaseModel):
    asset: str = Field("BTC", description="validator asset name, e.g. BTC, XAU, SPYX")
    start_time: str = Field("", description="ISO-8601 start of the forecast, whole minute")
    time_increment: int = Field(300, description="seconds between path points")
    time_length: int = Field(86_400, description="forecast horizon in seconds")
    num_simulations: int = Field(1000, description="number of paths")


def invalid_to_none(value: typing.Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> typing.Any:
    """Like the validators': a value that does not fit the type is kept as received (they judge it later)."""
    try:
        return handler(value)
    except Exception:
        return value


SimulationOutput = typing.Annotated[
    typing.Optional[tuple[typing.Union[int, list[typing.Union[int, float]]], ...]],
    WrapValidator(invalid_to_none),
]


class Simulation(bt.Synapse):
    simulation_input: SimulationInput
    simulation_output: SimulationOutput = None

    def deserialize(self) -> typing.Any:
        return self.simulation_output

    def get_required_fields(self) -> list[str]:
        """bittensor rebuilds the class's whole JSON schema for this at every ``to_headers()``, which the
        axon calls for every reply, refusals included: ~2 ms each, 80 % of what a refused request cost.
        The schema of a class never changes: built once."""
        return list(required_fields(type(self)))


@functools.cache
def required_fields(cls: type[bt.Synapse]) -> tuple[str, ...]:
    return tuple(cls.model_json_schema().get("required", []))

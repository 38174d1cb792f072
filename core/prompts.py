"""What a validator may ask, checked before any work is queued."""

from dataclasses import dataclass
from datetime import datetime, timezone

from core.assets import ASSETS
from core.constants import HF_INCREMENT, HF_LENGTH, LF_INCREMENT, LF_LENGTH


@dataclass(frozen=True)
class PromptSpec:
    name: str  # "low" (24 h) or "high" (1 h), the validators' labels
    time_increment: int
    time_length: int

    @property
    def n_steps(self) -> int:
        return self.time_length // self.time_increment


LOW_FREQUENCY = PromptSpec("low", LF_INCREMENT, LF_LENGTH)
HIGH_FREQUENCY = PromptSpec("high", HF_INCREMENT, HF_LENGTH)
PROMPTS = {(p.time_increment, p.time_length): p for p in (LOW_FREQUENCY, HIGH_FREQUENCY)}


class RequestError(ValueError):
    """A request we refuse to forecast; the message goes back to the caller verbatim."""


@dataclass(frozen=True)
class ForecastRequest:
    asset: str
    start_ts: int
    time_increment: int
    time_length: int
    num_simulations: int

    @property
    def n_steps(self) -> int:
        return self.time_length // self.time_increment

    @property
    def n_points(self) -> int:
        return self.n_steps + 1

    @property
    def prompt(self) -> PromptSpec:
        return PROMPTS.get((self.time_increment, self.time_length),
                           PromptSpec("custom", self.time_increment, self.time_length))

    @property
    def is_hf(self) -> bool:
        return self.time_increment < LF_INCREMENT

    def key(self) -> str:
        """Identical requests from several validators share this key and are computed once."""
        return f"{self.asset}:{self.start_ts}:{self.time_increment}:{self.time_length}:{self.num_simulations}"


LAST_UTC_TS = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp())


def parse_start_time(value: str) -> int:
    """ISO-8601 -> unix seconds. Naive times are UTC, as the validators' are."""
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"start_time must be an ISO-8601 string, got {value!r}")
    text = value.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise RequestError(f"start_time is not ISO-8601: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    start_ts = int(moment.timestamp())
    # A UTC time (the worker rebuilds the request from start_ts): an offset could push "0001-01-01" or
    # "9999-12-31" out of what a UTC datetime holds, and the pool's worker would refuse what the miner took.
    if not 0 <= start_ts <= LAST_UTC_TS:
        raise RequestError(f"start_time {value!r} is outside 1970-01-01 to 9999-12-31 UTC")
    return start_ts


def check_request(asset: object, start_time: object, time_increment: object, time_length: object,
                  num_simulations: object, max_num_simulations: int,
                  known_assets: frozenset[str] | None = None) -> ForecastRequest:
    """Validate raw request fields; raise RequestError with a message a validator operator can act on."""
    assets = known_assets if known_assets is not None else frozenset(ASSETS)
    if not isinstance(asset, str) or asset not in assets:
        raise RequestError(f"unknown asset {asset!r}; served: {', '.join(sorted(assets))}")
    for name, value in (("time_increment", time_increment), ("time_length", time_length),
                        ("num_simulations", num_simulations)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise RequestError(f"{name} must be an integer, got {value!r}")
    assert isinstance(time_increment, int) and isinstance(time_length, int)
    assert isinstance(num_simulations, int)
    if time_increment <= 0 or time_length <= 0:
        raise RequestError("time_increment and time_length must be positive")
    if time_length % time_increment:
        raise RequestError(f"time_length {time_length} is not a multiple of time_increment {time_increment}")
    if (time_increment, time_length) not in PROMPTS:
        grids = ", ".join(f"{i}s/{n}s" for i, n in PROMPTS)
        raise RequestError(f"unsupported grid {time_increment}s/{time_length}s; served: {grids}")
    if not 1 <= num_simulations <= max_num_simulations:
        raise RequestError(f"num_simulations must be in [1, {max_num_simulations}], got {num_simulations}")
    start_ts = parse_start_time(start_time)  # type: ignore[arg-type]
    return ForecastRequest(asset, start_ts, time_increment, time_length, num_simulations)

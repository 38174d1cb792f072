"""The batch forecast interface: request lines + a price folder -> synapse responses, one line each.

Stable contract (used by our backtests and by external evaluation):

* request line: ``{"id", "asset", "start_time", "time_increment", "time_length", "num_simulations"}``
  (``start_time`` ISO-8601 like the validators send; unknown extra keys are ignored);
* output line: ``{"id", "response": [start_ts, time_increment, path_1, ...]}``, exactly the synapse
  output (``core.response``), or ``{"id", "error": "..."}`` for a line that cannot be served; the
  other lines are processed regardless, in input order;
* no look-ahead: a request sees only bars closed ``LOOKAHEAD_GUARD_S`` before its start
  (``core.evaluation.snapshot_at``) within ``Settings.offline_lookback_s`` (the live cache window of
  its grid unless ``batch_lookback_days`` is set);
* deterministic: with a seed, a request's paths depend only on the seed, the request and the data it
  may see (``core.forecast.rng_for`` keys the RNG on the request itself).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from core.assets import ASSETS
from core.csv_history import STEP_SUFFIX, load_asset
from core.engines.base import Engine
from core.engines_registry import build_engines, calibration_lookup, served_engines
from core.evaluation import AssetHistory, EvaluationError, Lookback, lookback_for, snapshot_at
from core.forecast import Forecaster, ScaleLookup, no_calibration
from core.prices import PriceDataError
from core.prompts import ForecastRequest, RequestError, check_request
from core.response import FloatArray, ResponseError, check_paths, render_json, round_for_wire
from core.settings import Settings

__all__ = ["BatchInputError", "BatchItem", "BatchOutcome", "BatchRunner", "BatchSummary", "PriceFolder",
           "build_engines", "calibration_lookup", "parse_item", "parse_line", "run_file", "served_engines"]

ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")  # also keeps file lookups inside the folder
FIELDS = ("asset", "start_time", "time_increment", "time_length", "num_simulations")
RequestId = str | int


class BatchInputError(ValueError):
    """A request line (or the price folder) that cannot be served; the message goes to the output line."""


@dataclass(frozen=True)
class BatchItem:
    id: RequestId
    request: ForecastRequest


def _request_id(obj: Mapping[str, Any]) -> RequestId:
    value = obj.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BatchInputError(f"'id' must be a string or an integer, got {value!r}")
    return value


def parse_item(obj: object, max_num_simulations: int) -> BatchItem:
    """Validate one decoded request line; raises BatchInputError naming the bad field."""
    if not isinstance(obj, dict):
        raise BatchInputError(f"a request line must be a JSON object, got {type(obj).__name__}")
    request_id = _request_id(obj)
    missing = [f for f in FIELDS if f not in obj]
    if missing:
        raise BatchInputError(f"missing field(s): {', '.join(missing)}")
    asset = obj["asset"]
    if not isinstance(asset, str) or not ASSET_NAME.match(asset):
        raise BatchInputError(f"'asset' must be a ticker like 'BTC' (letters, digits, _ or -), got {asset!r}")
    # "xau" finds xau_1m.csv.gz too, but as an unregistered name it would be forecast with the generic
    # crypto spec (no gold weekend handling, no asset embedding, another seed): use the registry's name.
    asset = asset.upper() if asset.upper() in ASSETS else asset
    try:
        # Any asset with price files may be forecast, trained on or not (core.assets.spec_for_any).
        request = check_request(asset, obj["start_time"], obj["time_increment"], obj["time_length"],
                                obj["num_simulations"], max_num_simulations, known_assets=frozenset({asset}))
    except RequestError as exc:
        raise BatchInputError(str(exc)) from None
    return BatchItem(request_id, request)


def parse_line(line: str | bytes, max_num_simulations: int) -> BatchItem:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BatchInputError(f"line is not valid JSON ({exc})") from None
    return parse_item(obj, max_num_simulations)


class PriceFolder:
    """Per-asset 1-minute/5-minute history from a ../shared/data-style folder, loaded once per asset."""

    def __init__(self, folder: Path | None, histories: Mapping[str, AssetHistory] | None = None) -> None:
        if folder is not None and not folder.is_dir():
            raise BatchInputError(f"price folder {folder} does not exist")
        self.folder = folder
        self._histories: dict[str, AssetHistory] = dict(histories or {})

    @classmethod
    def from_histories(cls, histories: Mapping[str, AssetHistory]) -> PriceFolder:
        return cls(None, histories)

    def history(self, asset: str) -> AssetHistory:
        if asset not in self._histories:
            if self.folder is None:
                raise BatchInputError(f"no price history for {asset}")
            try:
                m1, m5 = load_asset(self.folder, asset)
            except PriceDataError as exc:
                raise BatchInputError(f"bad price file for {asset}: {exc}") from None
            if m1 is None and m5 is None:
                names = ", ".join(f"{asset.lower()}_{s}.csv.gz" for s in STEP_SUFFIX.values())
                raise BatchInputError(f"no price file for {asset} in {self.folder} (looked for {names})")
            self._histories[asset] = AssetHistory(m1, m5)
        return self._histories[asset]


@dataclass(frozen=True)
class BatchOutcome:
    id: RequestId | None
    request: ForecastRequest | None
    rounded: FloatArray | None  # the wire-rounded paths, exactly what the response carries
    engine_used: str | None
    fallback_reason: str | None
    error: str | None
    seconds: float

    def line(self) -> bytes:
        """One output line, without the newline."""
        if self.error is not None or self.rounded is None or self.request is None:
            return orjson.dumps({"id": self.id, "error": self.error or "no forecast"})
        head = orjson.dumps({"id": self.id})
        return head[:-1] + b',"response":' + render_json(self.request, self.rounded) + b"}"


class BatchRunner:
    """Serves parsed requests from a price folder with one engine, seeded, no look-ahead."""

    def __init__(self, prices: PriceFolder, engines: Mapping[str, Engine], engine: str, seed: int | None,
                 lookback_s: Lookback, max_num_simulations: int, scale: ScaleLookup = no_calibration) -> None:
        if engine not in engines:
            raise BatchInputError(f"unknown engine {engine!r}; available: {', '.join(sorted(engines))}")
        self.prices = prices
        self.engine = engine
        self.lookback_s = lookback_s
        self.max_num_simulations = max_num_simulations
        self.forecaster = Forecaster(engines, default=engine, seed=seed, scale=scale)

    @classmethod
    def from_settings(cls, prices: PriceFolder, settings: Settings, seed: int | None, engine: str | None = None,
                      calibrated: bool = True, engines: Mapping[str, Engine] | None = None) -> BatchRunner:
        if engines is None:  # models and calibration from one verified version of `current`
            served, scale = served_engines(settings, calibrated)
        else:
            served, scale = dict(engines), (calibration_lookup(settings) if calibrated else no_calibration)
        return cls(prices, served, engine or settings.engine, seed, settings.offline_lookback_s(),
                   settings.max_num_simulations, scale)

    def run_item(self, item: BatchItem) -> BatchOutcome:
        began = time.perf_counter()
        try:
            snapshot = snapshot_at(item.request.asset, self.prices.history(item.request.asset),
                                   item.request.start_ts, lookback_for(self.lookback_s, item.request.time_increment))
            result = self.forecaster.run(item.request, snapshot)
            rounded = round_for_wire(result.paths)
            check_paths(rounded, item.request)
        except (BatchInputError, EvaluationError, ResponseError, PriceDataError) as exc:
            return BatchOutcome(item.id, item.request, None, None, None, str(exc), time.perf_counter() - began)
        except Exception as exc:  # noqa: BLE001 - even the fallback failed: report it on this line, serve the rest
            return BatchOutcome(item.id, item.request, None, None, None, f"{type(exc).__name__}: {exc}",
                                time.perf_counter() - began)
        return BatchOutcome(item.id, item.request, rounded, result.engine, result.fallback_reason, None,
                            time.perf_counter() - began)

    def run_line(self, line: str | bytes, number: int | None = None) -> BatchOutcome:
        """``number``: the line's in its file, named in an error whose line has no readable id (no JSON, no
        object, a bad id), which otherwise said only "line 1 column 1" of itself: not findable in a big file."""
        try:
            item = parse_line(line, self.max_num_simulations)
        except BatchInputError as exc:
            request_id = _loose_id(line)
            where = f"line {number}: " if request_id is None and number is not None else ""
            return BatchOutcome(request_id, None, None, None, None, f"{where}{exc}", 0.0)
        return self.run_item(item)

    def run_lines(self, lines: Iterable[str | bytes]) -> Iterator[BatchOutcome]:
        for number, line in enumerate(lines, start=1):
            if line.strip():  # blank lines (a trailing newline) are not requests
                yield self.run_line(line, number)


def _loose_id(line: str | bytes) -> RequestId | None:
    """The id of a line that failed validation, when one can still be read, so the error is traceable."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if isinstance(obj, dict):
        value = obj.get("id")
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return value
    return None


@dataclass(frozen=True)
class BatchSummary:
    lines: int
    ok: int
    errors: int
    fallbacks: int
    seconds: float


def run_file(runner: BatchRunner, requests: Path, out: Path, on_line: Any = None) -> BatchSummary:
    """Stream a request file into an output file (written to a temp name, renamed when complete)."""
    began = time.perf_counter()
    if out.exists() and out.samefile(requests):  # renamed over the requests: the input was gone
        raise BatchInputError(f"--out {out} is the requests file: give another file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchInputError(f"--out {out}: cannot create its folder ({exc.strerror or exc})") from None
    if out.is_dir():
        raise BatchInputError(f"--out {out} is a directory: give a file name")
    tmp = out.with_name(out.name + ".tmp")
    n = ok = errors = fallbacks = 0
    try:
        dst_file = tmp.open("wb")
    except OSError as exc:
        raise BatchInputError(f"--out {out}: cannot be written ({exc.strerror or exc})") from None
    try:
        with requests.open("rb") as src, dst_file as dst:
            for outcome in runner.run_lines(src):
                dst.write(outcome.line() + b"\n")
                n += 1
                ok += outcome.error is None
                errors += outcome.error is not None
                fallbacks += outcome.fallback_reason is not None
                if on_line is not None:
                    on_line(outcome)
        tmp.replace(out)
    finally:  # interrupted or failed: no half-written file left beside the output (it may be GBs)
        tmp.unlink(missing_ok=True)
    return BatchSummary(n, ok, errors, fallbacks, time.perf_counter() - began)


def decode_response(response: list[Any]) -> tuple[int, int, FloatArray]:
    """(start_ts, time_increment, paths[n, T+1]) from a response list (what a validator receives)."""
    if not isinstance(response, list) or len(response) < 3:
        raise BatchInputError("a response is [start_ts, time_increment, path_1, ...]")
    return int(response[0]), int(response[1]), np.asarray(response[2:], dtype=np.float64)

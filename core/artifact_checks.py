"""Publish-time checks of a loaded set, beyond its hashes: the validators must accept what it would serve."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from core.artifact_files import ArtifactError
from core.artifact_sets import ArtifactSet
from core.assets import spec_for_any
from core.engines.ewma import EwmaTEngine
from core.evaluation import GRIDS
from core.prices import MarketSnapshot, PriceHistory
from core.prompts import ForecastRequest
from core.response import ResponseError, build_response

SAMPLE_PATHS = 64  # paths in the publish-time sample forecast
SAMPLE_START = 1_767_225_600  # 2026-01-01T00:00Z: any whole minute works for the sample request

Check = Callable[[ArtifactSet], None]  # extra publish-time validation (e.g. a model forward pass)


@lru_cache(maxsize=32)
def _sample_snapshot(asset: str) -> MarketSnapshot:
    """A day of seeded 1-minute GBM bars at the asset's table volatility: enough for EWMA."""
    n = 1440
    rng = np.random.default_rng(0)
    step_sigma = spec_for_any(asset).hourly_sigma / np.sqrt(60.0)
    close = 1000.0 * np.exp(np.cumsum(rng.normal(0.0, step_sigma, n)))
    ts = SAMPLE_START - 60 * n + 60 * np.arange(n, dtype=np.int64)
    m1 = PriceHistory(60, ts, close)
    return MarketSnapshot(asset, m1, m1.resample(300), float(close[-1]), SAMPLE_START)


def sample_forecast_check(artifact: ArtifactSet) -> None:
    """The EWMA engine at every calibrated scale must yield a response the validators accept."""
    engine = EwmaTEngine()
    keys = {(e.asset, e.time_increment, e.scale) for e in artifact.calibration.entries.values()
            if e.time_increment in GRIDS}
    keys |= {("BTC", inc, artifact.scale(engine.name, "BTC", inc)) for inc in GRIDS}
    for asset, inc, scale in sorted(keys):
        request = ForecastRequest(asset, SAMPLE_START, inc, GRIDS[inc], SAMPLE_PATHS)
        try:
            paths = engine.forecast(request, _sample_snapshot(asset), np.random.default_rng(0), scale)
            build_response(request, paths)
        except (ResponseError, ValueError) as exc:
            raise ArtifactError(f"sample forecast {asset} {inc}s at scale {scale:g} fails: {exc}") from None


def model_checkpoint_check(artifact: ArtifactSet) -> None:
    """A ``<kind>.pt`` is what the PatchTST engine will serve: it must be a checkpoint of that kind
    this code builds (same checks as ``core.checkpoint.load``), or the set is refused before publish."""
    names = sorted(n for n in artifact.files if n.endswith(".pt"))
    if not names:
        return
    from core.checkpoint import KINDS, CheckpointError, build_model, from_payload  # torch: only with checkpoints

    for name in names:
        kind = name.removesuffix(".pt")
        if kind not in KINDS:
            continue  # another torch file (e.g. a state dict): loading it was the check
        payload = artifact.files[name]
        try:
            if not isinstance(payload, dict):
                raise CheckpointError("not a checkpoint dictionary")
            build_model(from_payload(payload, expected_kind=kind))
        except CheckpointError as exc:
            raise ArtifactError(f"{artifact.path / name}: not a servable {kind} model ({exc})") from None

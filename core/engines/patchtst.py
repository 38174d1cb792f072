"""The PatchTST engine: per-step Student-t laws from the hybrid model, sampled by the shared sampler.

Routing: 1-minute grids go to the HF model; other grids to the asset's ``lf_route`` model
(``lf_crypto`` for crypto and gold, ``lf_equity`` for equities, indices and oil). Any problem with
the model, its checkpoint or the snapshot's history raises ``EngineError``, and the ``Forecaster``
answers with EWMA-t instead: the engine never guesses.

Inference runs once per (asset, grid, start time, model inputs): validators ask the same prompt
several times, so a small LRU keeps the last laws (a newer snapshot's inputs are inferred afresh).
One forward pass is a batch of one, cheap with a single torch thread (``benchmarks/bench_model.py``
measures it).
"""

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from core.assets import spec_for_any
from core.checkpoint import KINDS, Checkpoint, CheckpointError, checkpoint_path, load
from core.constants import LOOKAHEAD_GUARD_S
from core.datasets import asset_row
from core.devices import resolve_device
from core.engines.base import EngineError, ParametricEngine, StepParams
from core.features import (
    ContextInputs,
    FeatureError,
    history_context,
    sample_scale,
    session_bars,
    step_features,
    us_closed_steps,
)
from core.model import LawModel, series_channels
from core.prices import MarketSnapshot
from core.prompts import ForecastRequest
from core.settings import Settings

log = logging.getLogger(__name__)
CacheKey = tuple[str, int, int, int, bytes]


def _digest(inputs: ContextInputs) -> bytes:
    """The model inputs' fingerprint: with the request's asset and start, all the laws depend on."""
    h = hashlib.blake2b(digest_size=16)
    for part in (inputs.series, inputs.scalars, inputs.base):
        h.update(np.ascontiguousarray(part, dtype=np.float64).tobytes())
    return h.digest()


def route(request: ForecastRequest) -> str:
    """Which model serves a request: HF for 60 s grids, else the asset's LF route."""
    return "hf" if request.time_increment == 60 else spec_for_any(request.asset).lf_route


class PatchTSTEngine(ParametricEngine):
    name = "patchtst"

    def __init__(self, checkpoint_dirs: Path | Sequence[Path], cache_size: int = 256, device: str = "cpu") -> None:
        """Each kind is loaded from the first of ``checkpoint_dirs`` holding a loadable ``<kind>.pt``:
        a published artifact's retrained model first, the committed ``models/`` after it."""
        dirs = [Path(checkpoint_dirs)] if isinstance(checkpoint_dirs, (str, Path)) else [Path(d) for d in checkpoint_dirs]
        self.device = device
        self.cache_size = cache_size
        self.sources: dict[str, Path] = {}  # kind -> the checkpoint file it was loaded from
        self._models: dict[str, tuple[Checkpoint, LawModel]] = {}
        self._errors: dict[str, str] = {}
        self._cache: OrderedDict[CacheKey, StepParams] = OrderedDict()
        self._lock = threading.Lock()
        for kind in KINDS:
            problems = []
            for folder in dirs:
                path = checkpoint_path(folder, kind)
                if not path.exists() and folder != dirs[-1]:
                    continue  # this source does not carry the kind: not an error
                try:
                    checkpoint, model = load(path, expected_kind=kind)
                except CheckpointError as exc:
                    problems.append(str(exc))
                    continue
                self._models[kind] = (checkpoint, model.to(device))
                self.sources[kind] = path
                break
            if kind not in self._models:
                self._errors[kind] = "; ".join(problems)
                log.warning("PatchTST %s model unavailable: %s", kind, self._errors[kind])
            elif problems:
                log.warning("PatchTST %s served from %s instead: %s", kind, self.sources[kind], "; ".join(problems))
        log.info("PatchTST models %s on %s", ", ".join(f"{k} ({p})" for k, p in sorted(self.sources.items()))
                 or "none", device)

    @classmethod
    def from_settings(cls, settings: Settings, artifact_dir: Path | None = None) -> "PatchTSTEngine":
        """The engine over ``artifact_dir`` (a published artifact version, when it carries models)
        then ``settings.models_dir``, on ``settings.device``; raises if not a single model loads."""
        dirs = [settings.models_dir] if artifact_dir is None else [artifact_dir, settings.models_dir]
        engine = cls(dirs, device=resolve_device(settings.device))
        if not engine.kinds:
            raise EngineError(f"no usable PatchTST checkpoint in {', '.join(map(str, dirs))}: {engine._errors}")
        return engine

    @property
    def kinds(self) -> list[str]:
        return sorted(self._models)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def checkpoint(self, kind: str) -> Checkpoint:
        return self._model(kind)[0]

    def _model(self, kind: str) -> tuple[Checkpoint, LawModel]:
        if kind not in self._models:
            raise EngineError(f"PatchTST model {kind!r} unavailable: {self._errors.get(kind, 'unknown kind')}")
        return self._models[kind]

    def params(self, request: ForecastRequest, snapshot: MarketSnapshot) -> StepParams:
        kind = route(request)
        checkpoint, model = self._model(kind)
        spec = checkpoint.spec
        if request.time_increment != spec.step or request.n_steps != spec.horizon:
            raise EngineError(f"model {kind} forecasts {spec.horizon} steps of {spec.step}s, "
                              f"not {request.n_steps} of {request.time_increment}s")
        inputs = self._inputs(kind, checkpoint, request, snapshot)
        # The exact start, not its minute: the context cut and the calendar features follow the second.
        # The inputs' digest too: the same prompt asked again on a newer snapshot (another minute's
        # history) has other inputs, and must not be served laws computed from the older one.
        key = (request.asset, request.time_increment, request.time_length, request.start_ts, _digest(inputs))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        laws = self._infer(kind, checkpoint, model, request, inputs)
        with self._lock:
            self._cache[key] = laws
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return laws

    def _inputs(self, kind: str, checkpoint: Checkpoint, request: ForecastRequest,
                snapshot: MarketSnapshot) -> ContextInputs:
        spec = checkpoint.spec
        history = snapshot.best(spec.step)
        if history is None or history.step != spec.step:
            raise EngineError(f"{request.asset}: no {spec.step}s history for the {kind} model")
        history = session_bars(spec, request.asset, history)
        origin = request.start_ts - LOOKAHEAD_GUARD_S  # what the model saw in training: closes known by then
        try:
            return history_context(spec, history, origin)
        except FeatureError as exc:
            raise EngineError(f"{request.asset}: {exc}") from exc

    def _infer(self, kind: str, checkpoint: Checkpoint, model: LawModel, request: ForecastRequest,
               inputs: ContextInputs) -> StepParams:
        spec = checkpoint.spec
        f32 = torch.float32
        series = series_channels(torch.as_tensor(inputs.series, dtype=f32, device=self.device)[None])  # (1, C, L)
        context = torch.as_tensor(checkpoint.norm.apply(inputs.scalars)[None], dtype=f32, device=self.device)
        steps = torch.as_tensor(step_features([request.start_ts], spec.step, spec.horizon), dtype=f32,
                                device=self.device)  # (1, H, S)
        asset = torch.tensor([asset_row(kind, request.asset)], device=self.device)
        with torch.inference_mode():
            out = model(series, context, steps, asset)
        rel_mu, log_sigma, nu = (t[0].double().cpu().numpy() for t in out)
        scale = inputs.base * sample_scale(spec.ewma)  # the EWMA-t engine's std
        if checkpoint.closed_scale != 1.0:  # the overnight move's share, picked on validation
            closed = us_closed_steps([request.start_ts], spec.step, spec.horizon)[0]
            scale = np.where(closed, scale * checkpoint.closed_scale, scale)
        sigma = scale * np.exp(log_sigma)
        mu = scale * rel_mu
        if not (np.all(np.isfinite(sigma)) and np.all(sigma > 0) and np.all(np.isfinite(mu))
                and np.all(np.isfinite(nu)) and np.all(nu > 2)):
            raise EngineError(f"{request.asset}: the {kind} model produced unusable parameters")
        return StepParams(mu=mu, sigma=sigma, nu=nu, latent=checkpoint.latent)

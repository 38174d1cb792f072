"""Self-describing model checkpoints, and a loader that refuses anything it cannot vouch for.

A checkpoint carries everything needed to reproduce its inputs and judge it: model config and
weights, the feature spec and feature names, the normalisation statistics (fitted on training
windows only), the asset vocabulary, the data window it was trained and validated on, the code
versions and the validation metrics. Loading checks every one of these against the running code
and raises ``CheckpointError`` on any mismatch: a server must never forecast with a random or
mis-wired model (the failure that leads to silently wrong paths).
"""

import math
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.atomic_files import atomic_write
from core.datasets import MODEL_ASSETS
from core.engines.ewma import EwmaConfig
from core.features import (
    FEATURE_SPECS,
    FEATURE_VERSION,
    SERIES_NAMES,
    STEP_FEATURE_NAMES,
    FeatureSpec,
    NormStats,
    context_feature_names,
)
from core.model import MODEL_CODE_VERSION, LawModel, PatchTST, PatchTSTConfig, PatchTSTEnsemble
from core.path_sampling import LatentVol

FORMAT_VERSION = 1
KINDS = tuple(FEATURE_SPECS)
SESSION_KINDS = frozenset({"lf_equity"})  # models whose assets close outside the US regular session


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or does not match the running code."""


def spec_dict(spec: FeatureSpec) -> dict[str, Any]:
    d = asdict(spec)
    d["windows"], d["coarse_windows"] = list(spec.windows), list(spec.coarse_windows)
    d["weekend_closed"] = list(spec.weekend_closed)
    d["ewma"]["latent"] = asdict(spec.ewma.latent)
    return d


def ewma_from_dict(raw: Any) -> EwmaConfig:
    """The EWMA-t base a checkpoint was trained on: pinned, so retuning the engine cannot shift it."""
    if not isinstance(raw, dict):
        raise CheckpointError("feature spec has no EWMA base")
    values = dict(raw)
    values["latent"] = LatentVol(**(values.get("latent") or {}))
    config = EwmaConfig(**values)
    # The base every forecast is a correction of: a NaN or a non-positive value here serves NaN paths.
    numbers = {k: v for k, v in asdict(config).items() if k != "latent"}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
               for v in numbers.values()) or not config.nu > 2.0:
        raise CheckpointError(f"EWMA base invalid (positive finite numbers and nu > 2 needed): {numbers}")
    return config


@dataclass
class Checkpoint:
    kind: str
    config: PatchTSTConfig
    state_dict: dict[str, torch.Tensor]
    norm: NormStats
    ewma: EwmaConfig  # the base the head corrects
    latent: LatentVol = field(default_factory=LatentVol)  # per-path volatility used when sampling
    # Std multiplier on steps outside the US regular session (SESSION_KINDS only), picked on
    # validation: how much of the model's variance the overnight move really takes. 1 = none.
    closed_scale: float = 1.0
    stale_slack_s: int = 0  # the feature spec's staleness slack the model was trained with
    # Further ensemble members (same config and inputs, other seeds); their laws are averaged with
    # the first member's (``state_dict``). Empty for a single model.
    members: list[dict[str, torch.Tensor]] = field(default_factory=list)
    data_window: dict[str, Any] = field(default_factory=dict)  # per asset: train/val spans, eval_start_ts
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> FeatureSpec:
        return replace(FEATURE_SPECS[self.kind], ewma=self.ewma, stale_slack_s=self.stale_slack_s)

    @property
    def assets(self) -> tuple[str, ...]:
        return MODEL_ASSETS[self.kind]

    def payload(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "code": {"model": MODEL_CODE_VERSION, "features": FEATURE_VERSION, "torch": str(torch.__version__)},
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "feature_spec": spec_dict(self.spec),
            "series": list(SERIES_NAMES),
            "context_features": context_feature_names(self.spec),
            "step_features": list(STEP_FEATURE_NAMES),
            "assets": list(self.assets),
            "norm": {"mean": self.norm.mean.tolist(), "std": self.norm.std.tolist()},
            "latent": asdict(self.latent),
            "closed_scale": self.closed_scale,
            "members": [{k: v.detach().cpu() for k, v in m.items()} for m in self.members],
            "data_window": self.data_window,
            "metrics": self.metrics,
        }


def save(checkpoint: Checkpoint, path: Path) -> None:
    """Write atomically (temp file + fsync + rename): a reader never sees half a checkpoint.

    The temporary file has a unique name, so two writers of one path (the CLI and the retraining
    job) cannot rename each other's half-written file into place, and it is removed on failure.
    """
    payload = checkpoint.payload()
    with atomic_write(path, mode=0o644) as fh:  # 0644: workers of another user load it
        torch.save(payload, fh)


def _expect(what: str, found: object, expected: object) -> None:
    if found != expected:
        raise CheckpointError(f"{what} mismatch: checkpoint has {found!r}, this code expects {expected!r}")


def _check_crcs(path: Path) -> None:
    """torch.load does not verify the archive's CRC-32s: a flipped bit in a weight loaded as a silently
    different model (committed checkpoints carry no manifest hash). A file that is no zip archive is left to
    torch.load, which refuses it."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as exc:  # a truncated member raises as it is read
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if bad is not None:
        raise CheckpointError(f"{path}: corrupt checkpoint ({bad} fails its CRC-32 check)")


def read_payload(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    _check_crcs(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)  # no pickled code is executed
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a checkpoint dictionary")
    return payload


def from_payload(payload: dict[str, Any], expected_kind: str | None = None) -> Checkpoint:
    """Validate a payload against the running code; every mismatch raises CheckpointError."""
    try:
        _expect("format_version", payload.get("format_version"), FORMAT_VERSION)
        kind = payload.get("kind")
        if kind not in KINDS:
            raise CheckpointError(f"unknown model kind {kind!r}; known: {KINDS}")
        assert isinstance(kind, str)
        if expected_kind is not None:
            _expect("kind", kind, expected_kind)
        code = payload.get("code") or {}
        _expect("model code version", code.get("model"), MODEL_CODE_VERSION)
        _expect("feature code version", code.get("features"), FEATURE_VERSION)
        stored_spec = payload.get("feature_spec")
        if not isinstance(stored_spec, dict):
            raise CheckpointError("feature spec missing")
        # Checkpoints before the slack used none; those before ``session_only`` / ``weekend_closed`` were
        # trained on the CSV files (regular hours for equities, weekdays for gold): what the filters keep.
        default = spec_dict(FEATURE_SPECS[kind])
        stored_spec = {"stale_slack_s": 0, "session_only": default["session_only"],
                       "weekend_closed": default["weekend_closed"], **stored_spec}
        ewma = ewma_from_dict(stored_spec.get("ewma"))
        slack = stored_spec["stale_slack_s"]
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise CheckpointError(f"feature spec: stale_slack_s must be a whole number of seconds >= 0, got {slack!r}")
        spec = replace(FEATURE_SPECS[kind], ewma=ewma, stale_slack_s=slack)
        _expect("feature spec", stored_spec, spec_dict(spec))
        _expect("series", payload.get("series"), list(SERIES_NAMES))
        _expect("context features", payload.get("context_features"), context_feature_names(spec))
        _expect("step features", payload.get("step_features"), list(STEP_FEATURE_NAMES))
        _expect("assets", payload.get("assets"), list(MODEL_ASSETS[kind]))
        raw_cfg = payload.get("config")
        if not isinstance(raw_cfg, dict):
            raise CheckpointError("config missing")
        expected_keys = {f.name for f in fields(PatchTSTConfig)}
        if set(raw_cfg) != expected_keys:  # a missing field would silently take today's default
            raise CheckpointError(f"config invalid: missing {sorted(expected_keys - set(raw_cfg))}, "
                                  f"unknown {sorted(set(raw_cfg) - expected_keys)}")
        try:
            config = PatchTSTConfig(**raw_cfg)
            config.check()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"config invalid: {exc}") from exc
        _expect("config.context_len", config.context_len, spec.context_len)
        _expect("config.horizon", config.horizon, spec.horizon)
        _expect("config.n_context", config.n_context, len(context_feature_names(spec)))
        _expect("config.n_step", config.n_step, len(STEP_FEATURE_NAMES))
        _expect("config.n_series", config.n_series, len(SERIES_NAMES))
        _expect("config.n_assets", config.n_assets, len(MODEL_ASSETS[kind]))
        _expect("config.base_nu", config.base_nu, spec.ewma.nu)
        norm_raw = payload.get("norm") or {}
        mean = np.asarray(norm_raw.get("mean", []), np.float64)
        std = np.asarray(norm_raw.get("std", []), np.float64)
        if mean.shape != (config.n_context,) or std.shape != (config.n_context,):
            raise CheckpointError(f"normalisation stats have shapes {mean.shape}/{std.shape}, need ({config.n_context},)")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise CheckpointError("normalisation stats are not finite and positive")
        state = _weights(payload.get("state_dict"), "state_dict")
        raw_members = payload.get("members", [])  # absent in checkpoints that predate ensembles
        if not isinstance(raw_members, list):
            raise CheckpointError("members must be a list of state dicts")
        members = [_weights(m, f"members[{i}]") for i, m in enumerate(raw_members)]
        try:
            latent = LatentVol(**(payload.get("latent") or {}))
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"latent volatility invalid: {exc}") from exc
        closed_scale = payload.get("closed_scale", 1.0)  # absent in checkpoints that predate it: no change
        if isinstance(closed_scale, bool) or not isinstance(closed_scale, (int, float)) or not 0.1 <= float(closed_scale) <= 4.0:
            raise CheckpointError(f"closed_scale must be a number in [0.1, 4], got {closed_scale!r}")
        if float(closed_scale) != 1.0 and kind not in SESSION_KINDS:
            raise CheckpointError(f"closed_scale {closed_scale} on {kind}, which has no session steps")
        return Checkpoint(kind=kind, config=config, state_dict=state, norm=NormStats(mean, std), ewma=ewma,
                          latent=latent, closed_scale=float(closed_scale), stale_slack_s=slack, members=members,
                          data_window=dict(payload.get("data_window") or {}),
                          metrics=dict(payload.get("metrics") or {}))
    except CheckpointError:
        raise
    except Exception as exc:  # a malformed field of any type is still a bad checkpoint
        raise CheckpointError(f"malformed checkpoint: {type(exc).__name__}: {exc}") from exc


def _weights(raw: Any, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{what} missing or not tensors")
    # Every weight of the model is real floating point; an integer or complex tensor would be cast
    # silently on loading (a complex NaN would even slip past the finiteness check below).
    odd = sorted(k for k, v in raw.items() if not v.is_floating_point())
    if odd:
        raise CheckpointError(f"{what} holds non-floating-point tensors: {odd}")
    if not all(bool(torch.isfinite(v).all()) for v in raw.values()):
        raise CheckpointError(f"{what} holds non-finite weights")
    return raw


ENCODER_LAYER_PREFIX = "encoder.layers.layers."


def _check_fit(config: PatchTSTConfig, state: dict[str, torch.Tensor], where: str) -> None:
    """Weights' names and shapes against the config's network, before any real allocation: a hand-edited
    size (d_model = 8192, n_layers = 20000) would otherwise allocate and initialise gigabytes, or spin
    for minutes, before the strict load refuses it (an OOM-killed or stalled worker, not an error)."""
    # The layer count first: building even an empty (meta) network of 10^5 layers takes minutes.
    layers = {k[len(ENCODER_LAYER_PREFIX):].split(".", 1)[0] for k in state if k.startswith(ENCODER_LAYER_PREFIX)}
    if len(layers) != config.n_layers:
        raise CheckpointError(f"weights do not fit the config{where}: {len(layers)} encoder layers, "
                              f"config.n_layers = {config.n_layers}")
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            expected = {k: tuple(v.shape) for k, v in PatchTST(config).state_dict().items()}
    except Exception as exc:  # a Checkpoint built in code bypasses from_payload's config check
        raise CheckpointError(f"config invalid: {type(exc).__name__}: {exc}") from exc
    found = {k: tuple(v.shape) for k, v in state.items()}
    if found != expected:
        missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        resized = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
        raise CheckpointError(f"weights do not fit the config{where}: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}, resized {resized[:5]}")


def build_model(checkpoint: Checkpoint) -> LawModel:
    """The network (an ensemble when there are members) in eval mode; missing or extra weights raise."""
    nets = []
    for i, state in enumerate([checkpoint.state_dict, *checkpoint.members]):
        _check_fit(checkpoint.config, state, "" if i == 0 else f" (member {i})")
        try:
            net = PatchTST(checkpoint.config)
        except Exception as exc:  # a Checkpoint built in code bypasses from_payload's config check
            raise CheckpointError(f"config invalid: {type(exc).__name__}: {exc}") from exc
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            where = "" if i == 0 else f" (member {i})"
            raise CheckpointError(f"weights do not fit the config{where}: {exc}") from exc
        nets.append(net)
    model: LawModel = nets[0] if len(nets) == 1 else PatchTSTEnsemble(nets)
    return model.eval()


def load(path: Path, expected_kind: str | None = None) -> tuple[Checkpoint, LawModel]:
    """Read, validate and build. Raises CheckpointError; never returns an unchecked model."""
    try:
        checkpoint = from_payload(read_payload(path), expected_kind)
        return checkpoint, build_model(checkpoint)
    except CheckpointError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise CheckpointError(f"{path}: {exc}") from exc


def checkpoint_path(folder: Path, kind: str) -> Path:
    return folder / f"{kind}.pt"

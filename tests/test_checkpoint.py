"""Checkpoints: a faithful round trip, and every kind of mismatch refused with CheckpointError."""

import struct
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from core.checkpoint import (
    Checkpoint,
    CheckpointError,
    build_model,
    checkpoint_path,
    from_payload,
    load,
    read_payload,
    save,
)
from core.engines.ewma import DEFAULT_CONFIGS, EwmaConfig
from core.features import FEATURE_SPECS, STALE_SLACK_S, NormStats, context_feature_names
from core.model import PatchTST, PatchTSTEnsemble
from core.path_sampling import LatentVol
from core.training import model_config

ROOT = Path(__file__).resolve().parents[1]


def make_checkpoint(kind: str = "lf_crypto", seed: int = 0) -> Checkpoint:
    torch.manual_seed(seed)
    cfg = model_config(kind)
    model = PatchTST(cfg)
    with torch.no_grad():
        model.head.out.weight.normal_(0.0, 0.1)  # a non-trivial model: outputs differ from zero
    n = len(context_feature_names(FEATURE_SPECS[kind]))
    rng = np.random.default_rng(seed)
    return Checkpoint(kind=kind, config=cfg, state_dict=model.state_dict(),
                      norm=NormStats(rng.normal(size=n), rng.uniform(0.5, 2.0, size=n)),
                      ewma=DEFAULT_CONFIGS[FEATURE_SPECS[kind].step], latent=LatentVol(0.9, 0.05),
                      data_window={"BTC": {"eval_start_ts": 1779667200}}, metrics={"val_crps": 123.4})


def test_round_trip_is_exact(tmp_path: Path) -> None:
    ck = make_checkpoint()
    path = checkpoint_path(tmp_path, "lf_crypto")
    save(ck, path)
    loaded, model = load(path, expected_kind="lf_crypto")
    assert loaded.config == ck.config and loaded.ewma == ck.ewma and loaded.latent == ck.latent
    assert np.array_equal(loaded.norm.mean, ck.norm.mean) and np.array_equal(loaded.norm.std, ck.norm.std)
    assert loaded.data_window == ck.data_window and loaded.metrics == ck.metrics
    original = build_model(ck)
    cfg = ck.config
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 2, cfg.context_len, generator=g), torch.randn(2, cfg.n_context, generator=g),
            torch.randn(2, cfg.horizon, cfg.n_step, generator=g), torch.tensor([0, cfg.n_assets]))
    for a, b in zip(original(*args), model(*args)):
        assert torch.equal(a, b)
    assert not model.training
    assert path.stat().st_size < 5_000_000
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_closed_scale_round_trips_and_defaults_to_one_when_absent(tmp_path: Path) -> None:
    ck = replace(make_checkpoint("lf_equity"), closed_scale=0.7)
    save(ck, tmp_path / "eq.pt")
    assert load(tmp_path / "eq.pt", expected_kind="lf_equity")[0].closed_scale == 0.7
    older = ck.payload()
    del older["closed_scale"]  # checkpoints written before the field existed
    assert from_payload(older).closed_scale == 1.0


def test_an_ensemble_round_trips_and_averages_its_members(tmp_path: Path) -> None:
    first, second = make_checkpoint("lf_crypto", seed=0), make_checkpoint("lf_crypto", seed=1)
    ensemble = replace(first, members=[second.state_dict])
    save(ensemble, tmp_path / "ens.pt")
    loaded, model = load(tmp_path / "ens.pt", expected_kind="lf_crypto")
    assert isinstance(model, PatchTSTEnsemble) and len(loaded.members) == 1 and not model.training
    cfg = first.config
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(3, 2, cfg.context_len, generator=g), torch.randn(3, cfg.n_context, generator=g),
            torch.randn(3, cfg.horizon, cfg.n_step, generator=g), torch.tensor([0, 1, cfg.n_assets]))
    with torch.no_grad():
        a, b, both = build_model(first)(*args), build_model(second)(*args), model(*args)
    for x, y, avg in zip(a, b, both):
        assert torch.allclose(avg, (x + y) / 2, atol=1e-6)
    assert not torch.allclose(a.log_sigma, b.log_sigma)  # two different members really were averaged
    single = first.payload()
    del single["members"]  # checkpoints written before ensembles: one model
    assert isinstance(build_model(from_payload(single)), PatchTST)


def test_pinned_ewma_base_survives_a_retuned_engine(tmp_path: Path) -> None:
    ck = make_checkpoint()
    ck.ewma = replace(ck.ewma, half_life_bars=20.0, long_half_life_bars=500.0, reversion_bars=30.0, var_mult=0.5)
    save(ck, tmp_path / "x.pt")
    loaded, _ = load(tmp_path / "x.pt")
    assert loaded.spec.ewma == ck.ewma  # the base it was trained on, not today's default


def test_the_staleness_slack_is_pinned_and_absent_means_none(tmp_path: Path) -> None:
    ck = replace(make_checkpoint("hf"), stale_slack_s=STALE_SLACK_S)
    save(ck, tmp_path / "hf.pt")
    assert load(tmp_path / "hf.pt", expected_kind="hf")[0].spec.stale_slack_s == STALE_SLACK_S
    older = make_checkpoint("lf_crypto").payload()
    del older["feature_spec"]["stale_slack_s"]  # written before the slack existed: trained without one
    assert from_payload(older).spec.stale_slack_s == 0
    # The committed 1 h model was trained with the slack; the 24 h ones predate it and keep their inputs.
    assert load(checkpoint_path(ROOT / "models", "hf"))[0].spec.stale_slack_s == STALE_SLACK_S


Mutation = Callable[[dict[str, Any]], None]


def _set(path: tuple[str, ...], value: object) -> Mutation:
    def mutate(payload: dict[str, Any]) -> None:
        target = payload
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _drop_weight(payload: dict[str, Any]) -> None:
    payload["state_dict"].pop(next(iter(payload["state_dict"])))


def _nan_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in state.items()}
    out["head.out.bias"][0] = float("nan")
    return out


def _resized_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    out["head.out.bias"] = torch.zeros(5)
    return out


def _extra_weight(payload: dict[str, Any]) -> None:
    payload["state_dict"]["rogue.weight"] = torch.zeros(3)


def _nan_weight(payload: dict[str, Any]) -> None:
    key = "head.out.weight"
    payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], float("nan"))


def _resized_weight(payload: dict[str, Any]) -> None:
    payload["state_dict"]["asset.weight"] = torch.zeros(2, 8)


MUTATIONS: dict[str, tuple[Mutation, str]] = {
    "format": (_set(("format_version",), 99), "format_version"),
    "kind": (_set(("kind",), "weekly"), "unknown model kind"),
    "model code": (_set(("code", "model"), 0), "model code version"),
    "feature code": (_set(("code", "features"), 0), "feature code version"),
    "feature windows": (_set(("feature_spec", "windows"), [12, 48]), "feature spec"),
    "feature step": (_set(("feature_spec", "step"), 60), "feature spec"),
    "no ewma": (_set(("feature_spec", "ewma"), None), "EWMA base"),
    "context names": (_set(("context_features",), ["a", "b"]), "context features"),
    "step names": (_set(("step_features",), ["tod"]), "step features"),
    "series": (_set(("series",), ["ret"]), "series"),
    "assets": (_set(("assets",), ["BTC", "ETH"]), "assets"),
    "config field": (_set(("config", "n_context"), 3), "n_context"),
    "config unknown key": (_set(("config", "depth"), 3), "config invalid"),
    "config bad heads": (_set(("config", "n_heads"), 5), "config invalid"),
    "base nu": (_set(("config", "base_nu"), 7.0), "base_nu"),
    "norm shape": (_set(("norm", "mean"), [0.0]), "normalisation"),
    "norm zero std": (lambda p: p["norm"]["std"].__setitem__(0, 0.0), "normalisation"),
    "latent": (_set(("latent",), {"rho": 1.5, "s": 0.1}), "latent"),
    "closed scale not a number": (_set(("closed_scale",), "0.7"), "closed_scale must be"),
    "closed scale out of range": (_set(("closed_scale",), 0.0), "closed_scale must be"),
    "closed scale on a 24/7 model": (_set(("closed_scale",), 0.7), "no session steps"),
    "missing weight": (_drop_weight, "weights do not fit"),
    "extra weight": (_extra_weight, "weights do not fit"),
    "resized weight": (_resized_weight, "weights do not fit"),
    "nan weight": (_nan_weight, "non-finite"),
    "no config": (lambda p: p.pop("config"), "config missing"),
    "members not a list": (_set(("members",), {"a": 1}), "members must be a list"),
    "member nan weight": (lambda p: p.__setitem__("members", [_nan_state(p["state_dict"])]), r"members\[0\] holds"),
    "member resized weight": (lambda p: p.__setitem__("members", [_resized_state(p["state_dict"])]),
                              "do not fit the config \\(member 1\\)"),
    # A field absent from the file must not silently take today's default (it changes the laws).
    "config missing field": (lambda p: p["config"].pop("max_log_sigma"), r"missing \['max_log_sigma'\]"),
    "config float size": (_set(("config", "patch_len"), 24.0), "patch_len must be a positive integer"),
    "config nan bound": (_set(("config", "max_log_sigma"), float("nan")), "max_log_sigma must be a finite"),
    "config zero sigma bound": (_set(("config", "max_log_sigma"), 0.0), "max_log_sigma > 0"),
    "config dropout": (_set(("config", "dropout"), 5.0), "dropout must be in"),
    "complex weight": (lambda p: p["state_dict"].__setitem__("head.out.bias", torch.full((3,), complex("nan+0j"))),
                       "non-floating-point"),
    "integer weight": (lambda p: p["state_dict"].__setitem__("head.out.bias", torch.zeros(3, dtype=torch.int64)),
                       "non-floating-point"),
    "ewma nan": (_set(("feature_spec", "ewma", "half_life_bars"), float("nan")), "EWMA base invalid"),
    "ewma negative var_mult": (_set(("feature_spec", "ewma", "var_mult"), -1.0), "EWMA base invalid"),
    "ewma text": (_set(("feature_spec", "ewma", "reversion_bars"), "75"), "EWMA base invalid"),
    "stale slack negative": (_set(("feature_spec", "stale_slack_s"), -60), "stale_slack_s"),
    "stale slack text": (_set(("feature_spec", "stale_slack_s"), "180"), "stale_slack_s"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_every_mismatch_is_refused(tmp_path: Path, name: str) -> None:
    mutate, message = MUTATIONS[name]
    payload = make_checkpoint().payload()
    mutate(payload)
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=message):
        load(path)


def test_a_checkpoint_built_in_code_with_a_bad_config_is_refused() -> None:
    ck = make_checkpoint()
    ck.config = replace(ck.config, dropout=2.0)  # bypasses from_payload: build_model must still say so
    with pytest.raises(CheckpointError, match="config invalid"):
        build_model(ck)


@pytest.mark.parametrize("field, value", [("d_model", 1024), ("d_ff", 4096), ("n_layers", 40)])
def test_a_hand_edited_size_is_refused_before_the_network_is_allocated(
        field: str, value: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A size typed into a checkpoint (d_model = 32768, n_layers = 10^5) must be refused from the
    weights' shapes, not after allocating and initialising that network: an OOM-killed or stalled worker."""
    payload = make_checkpoint().payload()
    payload["config"][field] = value
    real_builds: list[str] = []

    class Recording(PatchTST):
        def __init__(self, cfg: Any) -> None:
            if str(torch.get_default_device()) != "meta":
                real_builds.append(field)
            super().__init__(cfg)

    monkeypatch.setattr("core.checkpoint.PatchTST", Recording)
    with pytest.raises(CheckpointError, match="weights do not fit the config"):
        build_model(from_payload(payload))
    assert real_builds == []


def test_a_failed_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lf_crypto.pt"
    save(make_checkpoint(seed=0), path)
    before = path.read_bytes()

    def broken(obj: object, f: Any) -> None:
        if isinstance(f, Path):
            f.write_bytes(b"half a checkpoint")
        else:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save(make_checkpoint(seed=1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lf_crypto.pt"]


def test_wrong_kind_for_the_slot_is_refused(tmp_path: Path) -> None:
    save(make_checkpoint("hf"), tmp_path / "lf_crypto.pt")
    with pytest.raises(CheckpointError, match="kind mismatch"):
        load(tmp_path / "lf_crypto.pt", expected_kind="lf_crypto")


def test_missing_corrupt_and_foreign_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="unreadable"):
        load(tmp_path / "junk.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint dictionary"):
        read_payload(tmp_path / "list.pt")
    # A pickled object is never executed: weights-only loading refuses it.
    torch.save({"format_version": 1, "obj": EwmaConfig()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="unreadable"):
        load(tmp_path / "pickle.pt")


def test_a_flipped_bit_in_a_weight_is_refused(tmp_path: Path) -> None:
    """torch.load does not check the archive's CRC-32s: the flipped weight loaded as another model."""
    path = tmp_path / "lf_crypto.pt"
    save(make_checkpoint(), path)
    with zipfile.ZipFile(path) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[member.header_offset + 26:member.header_offset + 30])
    raw[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x40  # an exponent bit
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="CRC-32"):
        load(path, expected_kind="lf_crypto")
    path.write_bytes(bytes(raw[: len(raw) // 2]))  # truncated: no zip directory left
    with pytest.raises(CheckpointError, match="unreadable"):
        load(path, expected_kind="lf_crypto")


def test_payload_validation_is_usable_without_a_file() -> None:
    payload = make_checkpoint("lf_equity").payload()
    assert from_payload(payload, "lf_equity").kind == "lf_equity"
    with pytest.raises(CheckpointError):
        from_payload(payload, "hf")


@pytest.mark.parametrize("kind", sorted(FEATURE_SPECS))
def test_committed_checkpoints_load_with_this_code(kind: str) -> None:
    """The models a fresh clone serves must match the code; a drift fails here, not in production."""
    path = checkpoint_path(ROOT / "models", kind)
    checkpoint, model = load(path, expected_kind=kind)
    assert path.stat().st_size < 5_000_000
    assert checkpoint.metrics["val_crps"] <= checkpoint.metrics["val_crps_ewma"]
    assert checkpoint.data_window  # says what it was trained on
    for entry in checkpoint.data_window.values():
        assert entry["train_origins"] is None or entry["train_origins"][1] < entry["eval_start_ts"]
    assert model.get_num_params() == checkpoint.metrics["num_params"]


def test_session_only_inputs_are_recorded_and_absent_means_the_kinds_own_rule(tmp_path: Path) -> None:
    equity = make_checkpoint("lf_equity")
    assert equity.payload()["feature_spec"]["session_only"] is True
    assert make_checkpoint("lf_crypto").payload()["feature_spec"]["session_only"] is False
    older = equity.payload()
    del older["feature_spec"]["session_only"]  # written before the field: trained on the regular-hours files
    assert from_payload(older).spec.session_only is True
    claims = equity.payload()
    claims["feature_spec"]["session_only"] = False  # trained on night bars the code would now drop
    with pytest.raises(CheckpointError, match="feature spec"):
        from_payload(claims)
    assert load(checkpoint_path(ROOT / "models", "lf_equity"))[0].spec.session_only is True
    gold = make_checkpoint("lf_crypto").payload()
    assert gold["feature_spec"]["weekend_closed"] == ["XAU"]
    del gold["feature_spec"]["weekend_closed"]
    assert from_payload(gold).spec.weekend_closed == ("XAU",)
    for kind in ("hf", "lf_crypto"):
        assert load(checkpoint_path(ROOT / "models", kind))[0].spec.weekend_closed == ("XAU",)

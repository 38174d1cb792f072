"""The PatchTST + Student-t model: shapes, parameter budget, output ranges, zero-correction start."""

import math

import pytest
import torch

from core.features import FEATURE_SPECS
from core.model import PatchTST, PatchTSTConfig, PatchTSTEnsemble, series_channels, unit_t_log_prob
from core.training import model_config


def inputs(cfg: PatchTSTConfig, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    series = series_channels(torch.randn(batch, cfg.context_len, generator=g))
    context = torch.randn(batch, cfg.n_context, generator=g)
    steps = torch.randn(batch, cfg.horizon, cfg.n_step, generator=g)
    asset = torch.arange(batch) % (cfg.n_assets + 1)  # includes the unknown-asset row
    return series, context, steps, asset


@pytest.mark.parametrize("kind", sorted(FEATURE_SPECS))
def test_shapes_per_model(kind: str) -> None:
    cfg = model_config(kind)
    model = PatchTST(cfg).eval()
    out = model(*inputs(cfg))
    for t in out:
        assert t.shape == (3, FEATURE_SPECS[kind].horizon)
        assert torch.isfinite(t).all()
    assert model.embed(torch.zeros(2, cfg.n_series, cfg.context_len)).shape == (2, cfg.n_series, cfg.n_patches,
                                                                                cfg.d_model)


def test_parameter_budget_and_head_share() -> None:
    cfg = model_config("lf_crypto")
    model = PatchTST(cfg)
    total, head = model.get_num_params(), model.head_params()
    assert total < 100_000  # a small model: trains on 2 CPU cores, checkpoint well under 5 MB
    # A flatten head would map every patch embedding of every channel to 3 x 288 outputs.
    flatten_head = cfg.n_series * cfg.d_model * cfg.n_patches * cfg.horizon * 3
    assert flatten_head > 10 * total
    assert head / total < 0.35
    # The head grows only by the low-rank horizon embedding when the horizon grows.
    longer = PatchTST(model_config("lf_crypto", {"horizon": 576, "context_len": cfg.context_len}))
    assert longer.head_params() - head == 288 * cfg.head_rank


def test_untrained_model_is_the_ewma_engine() -> None:
    cfg = model_config("hf")
    out = PatchTST(cfg).eval()(*inputs(cfg, batch=5))
    assert torch.equal(out.mu, torch.zeros_like(out.mu))
    assert torch.equal(out.log_sigma, torch.zeros_like(out.log_sigma))
    assert torch.allclose(out.nu, torch.full_like(out.nu, cfg.base_nu))


def test_outputs_stay_in_safe_ranges_for_any_weights() -> None:
    cfg = model_config("lf_equity")
    torch.manual_seed(7)
    model = PatchTST(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 3.0)  # wildly wrong weights
    series, context, steps, asset = inputs(cfg, batch=16, seed=4)
    out = model(series * 100, context * 100, steps * 100, asset)
    assert out.nu.min() >= cfg.nu_min and out.nu.max() <= cfg.nu_max and out.nu.min() > 2.5 - 1e-6
    assert out.log_sigma.abs().max() <= cfg.max_log_sigma
    assert out.mu.abs().max() <= cfg.max_mu
    assert out.nu.min() < cfg.base_nu < out.nu.max()  # the ranges are actually used


def test_unknown_asset_row_is_shared_and_served() -> None:
    cfg = model_config("lf_crypto")
    model = PatchTST(cfg)
    assert model.asset.num_embeddings == cfg.n_assets + 1 and model.unknown_asset == cfg.n_assets
    series, context, steps, _ = inputs(cfg, batch=2)
    out = model.eval()(series, context, steps, torch.full((2,), model.unknown_asset))
    assert torch.isfinite(out.log_sigma).all()


def test_unit_variance_student_t_density() -> None:
    z = torch.linspace(-60, 60, 400_001, dtype=torch.float64)
    dz = float(z[1] - z[0])
    for nu in (2.6, 4.5, 30.0):
        dens = torch.exp(unit_t_log_prob(z, torch.tensor(nu, dtype=torch.float64)))
        assert float(dens.sum() * dz) == pytest.approx(1.0, abs=2e-3)
        if nu > 4:  # heavier tails converge too slowly on a finite grid
            assert float((dens * z**2).sum() * dz) == pytest.approx(1.0, abs=5e-3)
    # Against torch's Student-t with scale sqrt((nu-2)/nu) (the std -> scale conversion).
    nu = torch.tensor(5.0, dtype=torch.float64)
    ref = torch.distributions.StudentT(nu, 0.0, math.sqrt(3 / 5)).log_prob(torch.tensor(0.7, dtype=torch.float64))
    assert float(unit_t_log_prob(torch.tensor(0.7, dtype=torch.float64), nu)) == pytest.approx(float(ref))


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="divisible"):
        PatchTST(PatchTSTConfig(d_model=30, n_heads=4))
    with pytest.raises(ValueError, match="nu_min"):
        PatchTST(PatchTSTConfig(nu_min=2.0))
    with pytest.raises(ValueError, match="patching"):
        PatchTST(PatchTSTConfig(context_len=8, patch_len=16))
    # max_log_sigma = 0 would divide 0 by 0 in the head: every law NaN, silently.
    with pytest.raises(ValueError, match="max_log_sigma > 0"):
        PatchTST(PatchTSTConfig(max_log_sigma=0.0))
    with pytest.raises(ValueError, match="max_mu >= 0"):
        PatchTST(PatchTSTConfig(max_mu=-0.1))
    with pytest.raises(ValueError, match="finite"):
        PatchTST(PatchTSTConfig(nu_max=float("nan")))
    with pytest.raises(ValueError, match="dropout"):
        PatchTST(PatchTSTConfig(dropout=1.0))
    for name, value in (("patch_len", 16.0), ("d_model", True), ("horizon", 0), ("n_assets", "4")):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            PatchTST(PatchTSTConfig(**{name: value}))
    cfg = model_config("hf")
    series, context, steps, asset = inputs(cfg)
    with pytest.raises(AssertionError, match="series"):
        PatchTST(cfg)(series[:, :, :-1], context, steps, asset)


def test_ensemble_averages_laws_and_refuses_mixed_configs() -> None:
    cfg = model_config("hf")
    torch.manual_seed(0)
    members = [PatchTST(cfg) for _ in range(3)]
    for m in members:
        with torch.no_grad():
            m.head.out.weight.normal_(0.0, 0.2)
    ensemble = PatchTSTEnsemble(members).eval()
    x = (torch.randn(2, 2, cfg.context_len), torch.randn(2, cfg.n_context), torch.randn(2, cfg.horizon, cfg.n_step),
         torch.tensor([0, 1]))
    with torch.no_grad():
        outs = [m.eval()(*x) for m in members]
        avg = ensemble(*x)
    for i in range(3):
        assert torch.allclose(avg[i], torch.stack([o[i] for o in outs]).mean(0), atol=1e-6)
    assert ensemble.get_num_params() == 3 * members[0].get_num_params()
    with pytest.raises(ValueError, match="share one config"):
        PatchTSTEnsemble([PatchTST(cfg), PatchTST(model_config("hf", {"d_model": 16, "n_heads": 2}))])
    with pytest.raises(ValueError, match="at least one"):
        PatchTSTEnsemble([])


def test_the_newest_returns_always_reach_a_patch() -> None:
    """With (context - patch) not a multiple of the stride, the oldest returns are left out, never the newest."""
    for patch_len, stride in ((16, 16), (16, 10), (24, 18)):
        cfg = PatchTSTConfig(context_len=64, horizon=5, patch_len=patch_len, stride=stride, n_context=3, n_step=4)
        embed = PatchTST(cfg).embed.eval()
        x = torch.randn(1, 2, cfg.context_len)
        newest, oldest = x.clone(), x.clone()
        newest[..., -1] += 1.0
        oldest[..., 0] += 1.0
        with torch.no_grad():
            base, moved = embed(x), embed(newest)
            assert base.shape[2] == cfg.n_patches
            assert not torch.equal(base[:, :, -1], moved[:, :, -1]), (patch_len, stride)  # in the newest patch
            assert torch.equal(base[:, :, :-1], moved[:, :, :-1])
            if (cfg.context_len - patch_len) % stride:
                assert torch.equal(base, embed(oldest))  # the oldest return is the one left out

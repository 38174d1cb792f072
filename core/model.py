"""PatchTST encoder with a Student-t head that corrects the EWMA-t engine (a hybrid model).

Reading order: config, RevIN, patch embedding, encoder, Student-t head, the model.

The network never forecasts volatility from scratch. For every horizon step it emits a bounded
log-correction to the EWMA-t engine's one-step std, a tail index and a small drift:

    sigma_h = base_sigma_h * exp(log_sigma_h)      (std of the one-step log return, as in
    nu_h    = nu_min + softplus(...)                core/path_sampling.py: NOT the t scale)
    mu_h    = base_sigma_h * mu_h_rel

The output layer starts at zero, so an untrained model *is* the EWMA-t engine (log_sigma = 0,
nu = the engine's nu, mu = 0): training can only learn deviations that pay on validation.
Where a loss needs the Student-t scale, scale = sigma * sqrt((nu - 2) / nu). ``max_mu = 0``
switches the drift off (the 24 h models: a drift compounds over 288 steps and fitted noise there).

A served model is usually a ``PatchTSTEnsemble``: a few members of one config trained from
different seeds, whose laws are averaged.

References: Nie et al. 2023 (PatchTST: patching, channel independence); Kim et al. 2022 (RevIN).
The head is shared across steps (a step query of calendar features plus a low-rank horizon
embedding) instead of PatchTST's flatten head, which at 288 steps would hold ~94% of the weights.
"""

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODEL_CODE_VERSION = 1  # bump when the module layout or output mapping changes


@dataclass
class PatchTSTConfig:
    context_len: int = 480  # returns in the encoder input
    horizon: int = 60  # forecast steps
    patch_len: int = 16
    stride: int = 16
    n_series: int = 2  # input channels, encoded independently with shared weights
    n_context: int = 14  # scalar context features
    n_step: int = 19  # calendar features per horizon step
    n_assets: int = 4  # known assets; embedding row n_assets is the shared "unknown asset"
    asset_dim: int = 8
    d_model: int = 32
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 64
    dropout: float = 0.1
    head_rank: int = 8  # width of the learned horizon embedding (H x rank)
    head_hidden: int = 32
    base_nu: float = 5.0  # the EWMA-t engine's nu: the head's starting point
    nu_min: float = 2.5  # > 2 keeps the variance finite and the unit-variance rescale defined
    nu_max: float = 60.0
    max_log_sigma: float = 1.5  # sigma stays within exp(+-1.5) of the EWMA-t std
    max_mu: float = 0.1  # |drift| <= 0.1 base std per step

    @property
    def n_patches(self) -> int:
        return (self.context_len - self.patch_len) // self.stride + 1

    def check(self) -> None:
        # A config also comes from a checkpoint file: wrong types or ranges must fail here, with a
        # clear message, not later inside torch (or, worse, as NaN laws: max_log_sigma = 0 divides by 0).
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type is int:
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.max_log_sigma > 0.0 or not self.max_mu >= 0.0:
            raise ValueError(f"need max_log_sigma > 0 and max_mu >= 0, got {self.max_log_sigma}, {self.max_mu}")
        if self.context_len < self.patch_len or self.patch_len < 1 or self.stride < 1:
            raise ValueError(f"bad patching: context {self.context_len}, patch {self.patch_len}, stride {self.stride}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 2.0 < self.nu_min < self.base_nu < self.nu_max:
            raise ValueError(f"need 2 < nu_min < base_nu < nu_max, got {self.nu_min}, {self.base_nu}, {self.nu_max}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StudentTParams(NamedTuple):
    mu: Tensor  # (B, H) drift in units of the base std
    log_sigma: Tensor  # (B, H) log of sigma / base sigma
    nu: Tensor  # (B, H) tail index


class RevIN(nn.Module):
    """Instance normalisation per series and channel; the statistics are returned for the head."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # x: (B, C, L)
        mean = x.mean(dim=-1, keepdim=True)  # (B, C, 1)
        std = torch.sqrt(x.var(dim=-1, keepdim=True, unbiased=False) + self.eps)  # (B, C, 1)
        stats = torch.cat([mean, torch.log(std)], dim=-1).flatten(1)  # (B, 2C)
        return (x - mean) / std, stats


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: PatchTSTConfig) -> None:
        super().__init__()
        self.patch_len, self.stride = cfg.patch_len, cfg.stride
        self.proj = nn.Linear(cfg.patch_len, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.n_patches, cfg.d_model) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, L) -> patches (B, C, N, P): the newest patch ends on the newest return. When
        # (L - P) is not a multiple of the stride, the oldest returns are left out, never the newest.
        skip = (x.shape[-1] - self.patch_len) % self.stride
        patches = x[..., skip:].unfold(-1, self.patch_len, self.stride)
        tokens: Tensor = self.drop(self.proj(patches) + self.pos)  # (B, C, N, d)
        return tokens


class Encoder(nn.Module):
    """Pre-norm Transformer over patches; channels are independent series with shared weights."""

    def __init__(self, cfg: PatchTSTConfig) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, tokens: Tensor) -> Tensor:
        b, c, n, d = tokens.shape
        h = self.norm(self.layers(tokens.reshape(b * c, n, d)))  # (B*C, N, d)
        pooled = torch.cat([h.mean(dim=1), h[:, -1]], dim=-1)  # (B*C, 2d): average and newest patch
        return pooled.reshape(b, c * 2 * d)  # (B, C*2d)


class StudentTHead(nn.Module):
    """Per-step (mu, log_sigma, nu) from one context vector and per-step queries; size independent of H."""

    def __init__(self, cfg: PatchTSTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.horizon_emb = nn.Parameter(torch.randn(cfg.horizon, cfg.head_rank) * 0.1)  # (H, r)
        self.query = nn.Linear(cfg.n_step + cfg.head_rank, cfg.head_hidden)
        self.mix = nn.Linear(cfg.head_hidden, cfg.head_hidden)
        self.out = nn.Linear(cfg.head_hidden, 3)
        nn.init.zeros_(self.out.weight)  # zero output: the untrained model is the EWMA-t engine
        nn.init.zeros_(self.out.bias)
        self.nu_offset = math.log(math.expm1(cfg.base_nu - cfg.nu_min))  # softplus^-1: nu starts at base_nu

    def forward(self, context: Tensor, steps: Tensor) -> StudentTParams:
        # context: (B, hidden), steps: (B, H, S)
        b, h, _ = steps.shape
        assert h == self.cfg.horizon, f"{h} step rows for a horizon of {self.cfg.horizon}"
        q = torch.cat([steps, self.horizon_emb.expand(b, h, -1)], dim=-1)  # (B, H, S + r)
        x = F.gelu(self.query(q) + context[:, None, :])  # (B, H, hidden)
        x = x + F.gelu(self.mix(x))
        raw = self.out(x)  # (B, H, 3)
        cfg = self.cfg
        mu = cfg.max_mu * torch.tanh(raw[..., 0])
        log_sigma = cfg.max_log_sigma * torch.tanh(raw[..., 1] / cfg.max_log_sigma)  # slope 1 at 0
        nu = (cfg.nu_min + F.softplus(raw[..., 2] + self.nu_offset)).clamp(max=cfg.nu_max)
        return StudentTParams(mu, log_sigma, nu)


class PatchTST(nn.Module):
    def __init__(self, cfg: PatchTSTConfig) -> None:
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.revin = RevIN()
        self.embed = PatchEmbedding(cfg)
        self.encoder = Encoder(cfg)
        self.asset = nn.Embedding(cfg.n_assets + 1, cfg.asset_dim)
        n_in = cfg.n_series * 2 * cfg.d_model + 2 * cfg.n_series + cfg.asset_dim + cfg.n_context
        self.context = nn.Sequential(nn.Linear(n_in, cfg.head_hidden), nn.GELU(), nn.Dropout(cfg.dropout),
                                     nn.Linear(cfg.head_hidden, cfg.head_hidden))
        self.head = StudentTHead(cfg)

    @property
    def unknown_asset(self) -> int:
        return self.cfg.n_assets

    def forward(self, series: Tensor, context: Tensor, steps: Tensor, asset: Tensor) -> StudentTParams:
        # series: (B, C, L) standardised returns; context: (B, F); steps: (B, H, S); asset: (B,) int64
        cfg = self.cfg
        assert series.shape[1:] == (cfg.n_series, cfg.context_len), f"series {tuple(series.shape)}"
        assert context.shape[1] == cfg.n_context, f"context {tuple(context.shape)}"
        x, stats = self.revin(series)  # (B, C, L), (B, 2C)
        encoded = self.encoder(self.embed(x))  # (B, C*2d)
        c = self.context(torch.cat([encoded, stats, self.asset(asset), context], dim=-1))  # (B, hidden)
        out: StudentTParams = self.head(c, steps)  # 3 x (B, H)
        return out

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def head_params(self) -> int:
        return sum(p.numel() for p in self.head.parameters())


class PatchTSTEnsemble(nn.Module):
    """Members of one config trained from different seeds; the laws they emit are averaged.

    Averaging log sigma (a geometric mean), drift and nu cuts the seed-to-seed noise of a small
    model's volatility correction; one forward pass per member, all on the same inputs.
    """

    def __init__(self, members: list[PatchTST]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if any(m.cfg != members[0].cfg for m in members):
            raise ValueError("ensemble members must share one config")
        self.cfg = members[0].cfg
        self.members = nn.ModuleList(members)

    def forward(self, series: Tensor, context: Tensor, steps: Tensor, asset: Tensor) -> StudentTParams:
        outs = [m(series, context, steps, asset) for m in self.members]  # K x 3 x (B, H)
        mu, log_sigma, nu = (torch.stack(parts).mean(dim=0) for parts in zip(*outs))
        return StudentTParams(mu, log_sigma, nu)

    def get_num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def head_params(self) -> int:
        return sum(m.head_params() for m in self.members if isinstance(m, PatchTST))


LawModel = PatchTST | PatchTSTEnsemble  # what checkpoints load into and the engine runs


def series_channels(returns: Tensor) -> Tensor:
    """(B, L) standardised returns -> (B, 2, L): the returns and their magnitudes."""
    return torch.stack([returns, returns.abs()], dim=1)


def unit_t_log_prob(z: Tensor, nu: Tensor) -> Tensor:
    """Log density of a unit-VARIANCE Student-t at z (scale sqrt((nu-2)/nu) folded in)."""
    return (torch.lgamma((nu + 1) / 2) - torch.lgamma(nu / 2) - 0.5 * torch.log(math.pi * (nu - 2))
            - (nu + 1) / 2 * torch.log1p(z * z / (nu - 2)))

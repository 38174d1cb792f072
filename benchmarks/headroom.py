"""How much CRPS is left to win? A model's laws against post-hoc variants and a volatility oracle.

On pre-cut validation prompts (the split training selects on; never the held-out windows), every
prompt is scored with the same random streams (paired) for:

* ``ewma_t`` (the reference) and ``model`` (the checkpoint's laws as served);
* post-hoc variants of the model: its log-sigma correction x0.8 / x1.2 / x1.4, its tail index
  nu - 2 scaled x0.8 / x1.25, the members pooled (each samples its share of the paths) instead of
  averaged, and 15 % of the paths from EWMA-t (a linear pool);
* two oracles that know the realised variance of the prompt's own horizon and rescale a forecast's
  per-step shape to it (latent volatility off, the level being known): ``oracle_ewma`` on EWMA-t's
  shape, ``oracle_model`` on the model's. They cheat, so they bound what any volatility-level
  forecast can gain here. Realised variance skips steps next to a missing price, so run it on the
  crypto models (equity windows miss the overnight move by construction).

The checkpoint must not have seen these windows: ``models/hf.pt`` (selected, not refitted) or one
trained with ``synth-miner train --model lf_crypto --members 2 --no-refit``; a refitted checkpoint is
refused.
Run: .venv/bin/python benchmarks/headroom.py --kind hf --checkpoint models/hf.pt --prompts 1500  (~4 min)
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from core.checkpoint import load
from core.datasets import build_windows, load_csv_dir, split_train_val
from core.features import sample_scale
from core.path_sampling import LatentVol, sample_paths
from core.scoring import score_prompt
from core.training import DEFAULT_STRIDE_S, StepLaws, predict, spaced_rows

PATHS = 1000
Mix = list[tuple[StepLaws, float, LatentVol]]  # laws, share of the paths, latent volatility


def realised_std(log_path: np.ndarray) -> np.ndarray:
    """Per prompt: RMS of the observed one-step log returns over the horizon."""
    steps = np.diff(np.concatenate([np.zeros((log_path.shape[0], 1)), log_path], axis=1), axis=1)
    seen = np.sum(~np.isnan(steps), axis=1)
    return np.sqrt(np.nansum(steps**2, axis=1) / np.maximum(seen, 1))


def rescaled(laws: StepLaws, target_std: np.ndarray) -> StepLaws:
    k = target_std / np.sqrt(np.mean(laws.sigma**2, axis=1))
    return StepLaws(laws.mu, laws.sigma * k[:, None], laws.nu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", required=True, choices=["hf", "lf_crypto", "lf_equity"])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--prompts", type=int, default=1500)
    args = ap.parse_args()
    torch.set_num_threads(1)

    ck, model = load(args.checkpoint, expected_kind=args.kind)
    if ck.metrics.get("refit"):
        raise SystemExit(f"{args.checkpoint} was refitted on the validation windows: train one with --no-refit")
    spec = ck.spec
    windows = build_windows(args.kind, load_csv_dir(args.data_dir, args.kind), DEFAULT_STRIDE_S[args.kind], 0.2, spec)
    _, val = split_train_val(windows)
    scorable = np.flatnonzero(val.scorable)
    rows = scorable[spaced_rows(scorable.size, args.prompts)]
    shrink = sample_scale(spec.ewma)

    def laws_of(m: torch.nn.Module | None) -> StepLaws:
        return predict(m, val, rows, ck.norm, ck.config, "cpu", shrink, closed_scale=ck.closed_scale)  # type: ignore[arg-type]

    ewma, served = laws_of(None), laws_of(model)
    members = [laws_of(m) for m in getattr(model, "members", [model])]
    correction = np.log(served.sigma / ewma.sigma)
    latent, off = ck.latent, LatentVol()
    realised = realised_std(val.log_path[rows])

    def gain(g: float) -> StepLaws:
        return StepLaws(served.mu, ewma.sigma * np.exp(g * correction), served.nu)

    def tails(f: float) -> StepLaws:
        return StepLaws(served.mu, served.sigma, 2.0 + (served.nu - 2.0) * f)

    variants: dict[str, Mix] = {
        "ewma_t": [(ewma, 1.0, spec.ewma.latent)],
        "model": [(served, 1.0, latent)],
        **{f"model, correction x{g}": [(gain(g), 1.0, latent)] for g in (0.8, 1.2, 1.4)},
        **{f"model, nu-2 x{f}": [(tails(f), 1.0, latent)] for f in (0.8, 1.25)},
        "model, 15 % EWMA-t paths": [(served, 0.85, latent), (ewma, 0.15, spec.ewma.latent)],
        "oracle_ewma (cheats)": [(rescaled(ewma, realised), 1.0, off)],
        "oracle_model (cheats)": [(rescaled(served, realised), 1.0, off)],
    }
    if len(members) > 1:
        variants["model, members pooled"] = [(m, 1 / len(members), latent) for m in members]
    scores = {name: np.empty(rows.size) for name in variants}
    for i, row in enumerate(rows.tolist()):
        real = val.anchor[row] * np.exp(val.log_path[row])
        for name, mix in variants.items():
            rng = np.random.default_rng([0, row])
            chunks: list[np.ndarray] = []
            for j, (laws, share, lat) in enumerate(mix):
                n = PATHS - sum(len(c) for c in chunks) if j == len(mix) - 1 else round(PATHS * share)
                chunks.append(sample_paths(float(val.anchor[row]), laws.mu[i], laws.sigma[i], laws.nu[i], n, rng, lat))
            scores[name][i] = score_prompt(np.concatenate(chunks).astype(np.float64), real, spec.step,
                                           spec.step * spec.horizon).total

    ref, model_scores = scores["ewma_t"], scores["model"]
    boot = np.random.default_rng(1).integers(0, rows.size, (2000, rows.size))
    print(f"{args.kind}: {rows.size} validation prompts, {PATHS} paths, paired; ratios with 95 % bootstrap intervals")
    print(f"{'variant':30s} {'mean CRPS':>10s} {'/ EWMA-t':>24s} {'/ model':>24s}")
    for name, s in scores.items():
        cells = []
        for base in (ref, model_scores):
            b = s[boot].sum(1) / base[boot].sum(1)
            cells.append(f"{s.sum() / base.sum():.4f} [{np.quantile(b, .025):.4f}, {np.quantile(b, .975):.4f}]")
        print(f"{name:30s} {s.mean():10.2f} {cells[0]:>24s} {cells[1]:>24s}")


if __name__ == "__main__":
    main()

"""Does the hourly calibration job help an engine? Replays it walk-forward on pre-cut validation prompts.

For the latest ``--days`` of each asset's validation windows (before the held-out cut, the split
training uses), every prompt is scored at a grid of sigma scales: with ``calibration_paths`` paths
(the job's objective) and with 1000 (what a validator scores). The job is then replayed hour by
hour with its own update rule (``core.calibration.next_scale``): at each run it fits the scale
minimising the mean objective over the newest prompts already realised, moves toward it, and the
next hour's prompts are served at that scale. Printed: calibrated / unscaled CRPS per engine.

The checkpoint should not have seen these windows: ``models/hf.pt`` (selected, not refitted) or a
model trained with ``synth-miner train --model lf_crypto --members 1 --no-refit``.
Run: .venv/bin/python benchmarks/replay_calibration.py --kind hf --checkpoint models/hf.pt --days 14
     [--assets BTC,ETH] [--alpha A --max-move M] [--tables /tmp/hf.npz]   (about 10 min per 2 assets)
"""

import argparse
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from core.calibration import UpdateRules, next_scale
from core.checkpoint import load
from core.datasets import MODEL_ASSETS, WindowSet, build_windows, load_csv_dir, split_train_val
from core.features import FEATURE_SPECS, sample_scale
from core.path_sampling import LatentVol, sample_paths
from core.scoring import score_prompt
from core.settings import Settings
from core.training import StepLaws, predict

GRID = np.exp(np.linspace(-0.16, 0.16, 9))  # sigma scales scored per prompt (4 % apart)
EVAL_PATHS = 1000


def score_grid(val: WindowSet, rows: np.ndarray, laws: StepLaws, latent: LatentVol, n_paths: int,
               seed: int) -> np.ndarray:
    spec = FEATURE_SPECS[val.kind]
    table = np.empty((rows.size, GRID.size))
    for i, row in enumerate(rows.tolist()):
        real = val.anchor[row] * np.exp(val.log_path[row])
        for j, scale in enumerate(GRID):  # the same draws at every scale, as the job's search
            paths = sample_paths(float(val.anchor[row]), laws.mu[i], laws.sigma[i], laws.nu[i], n_paths,
                                 np.random.default_rng([seed, row]), latent, sigma_scale=float(scale))
            table[i, j] = score_prompt(np.asarray(paths, np.float64), real, spec.step, spec.step * spec.horizon).total
    return table


def build_tables(args: argparse.Namespace, settings: Settings) -> dict[str, np.ndarray]:
    checkpoint, model = load(args.checkpoint, expected_kind=args.kind)
    spec = replace(FEATURE_SPECS[args.kind], ewma=checkpoint.ewma)
    hf = args.kind == "hf"
    spacing = settings.calibration_spacing_hf_s if hf else settings.calibration_spacing_lf_s
    _, val = split_train_val(build_windows(args.kind, load_csv_dir(args.data_dir, args.kind), spacing, 0.2, spec))
    names = MODEL_ASSETS[args.kind]
    keep = np.zeros(len(val), bool)
    for asset in args.assets.split(","):
        mine = val.asset == names.index(asset)
        keep |= mine & (val.origin >= val.origin[mine].max() - args.days * 86_400) & val.scorable
    rows = np.flatnonzero(keep)
    rows = rows[np.lexsort((val.origin[rows], val.asset[rows]))]
    print(f"{args.kind}: {rows.size} validation prompts, one per {spacing} s, last {args.days:g} days", flush=True)
    shrink = sample_scale(spec.ewma)
    engines = {"patchtst": (predict(model, val, rows, checkpoint.norm, checkpoint.config, "cpu", shrink,
                                    closed_scale=checkpoint.closed_scale), checkpoint.latent),
               "ewma_t": (predict(None, val, rows, checkpoint.norm, checkpoint.config, "cpu", shrink), spec.ewma.latent)}
    out = {"origin": val.origin[rows], "asset": np.array([names[i] for i in val.asset[rows]])}
    for name, (laws, latent) in engines.items():
        out[f"{name}_objective"] = score_grid(val, rows, laws, latent, settings.calibration_paths, 1)
        out[f"{name}_scored"] = score_grid(val, rows, laws, latent, EVAL_PATHS, 0)
        print(f"  {name} scored", flush=True)
    return out


def fitted_scale(curve: np.ndarray) -> float:
    """The job's target: the minimiser of the mean objective (a parabola through the best grid points)."""
    x = np.log(GRID)
    j = int(np.argmin(curve))
    if 0 < j < x.size - 1:
        a, b, _ = np.polyfit(x[j - 1:j + 2], curve[j - 1:j + 2], 2)
        if a > 0:
            return math.exp(min(max(-b / (2 * a), x[j - 1]), x[j + 1]))
    return float(GRID[j])


def replay(origin: np.ndarray, objective: np.ndarray, horizon: int, recent: int, rules: UpdateRules,
           spacing: int) -> tuple[np.ndarray, np.ndarray]:
    """Scales served per prompt by hourly runs, and the prompts served after the job's warm-up."""
    scale, served = 1.0, np.empty(origin.size)
    run = (int(origin[0]) // 3600 + 1) * 3600
    for i, start in enumerate(origin.tolist()):
        while run <= start:
            # As recent_cases at ``run``: the last grid bar (opening at start + horizon) must have closed.
            known = np.flatnonzero(origin < run - horizon - 60)[-recent:]
            if known.size >= rules.min_samples:
                scale = next_scale(scale, fitted_scale(objective[known].mean(axis=0)), rules)
            run += 3600
        served[i] = scale
    warm = origin >= origin[0] + horizon + (rules.min_samples + 1) * spacing
    return served, np.flatnonzero(warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=sorted(FEATURE_SPECS), required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--days", type=float, default=14.0)
    parser.add_argument("--assets", default=None, help="default: every asset of the model")
    parser.add_argument("--alpha", type=float, default=None, help="EMA weight (default: the settings')")
    parser.add_argument("--max-move", type=float, default=None, help="largest move per run (default: settings')")
    parser.add_argument("--tables", type=Path, default=None, help="cache of the scored grid (.npz): reused if present")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.assets = args.assets or ",".join(MODEL_ASSETS[args.kind])
    settings = Settings()
    if args.tables is not None and args.tables.exists():
        tables = dict(np.load(args.tables))
    else:
        tables = build_tables(args, settings)
        if args.tables is not None:
            np.savez(args.tables, **tables)

    hf = args.kind == "hf"
    rules = UpdateRules.for_prompt(settings, 60 if hf else 300)
    rules = replace(rules, alpha=args.alpha or rules.alpha, max_move=args.max_move or rules.max_move)
    recent = settings.calibration_windows_hf if hf else settings.calibration_windows_lf
    spacing = settings.calibration_spacing_hf_s if hf else settings.calibration_spacing_lf_s
    horizon = 3600 if hf else 86_400
    unit = int(np.argmin(np.abs(np.log(GRID))))
    print(f"{rules}, {recent} recent prompts per run")
    print(f"{'asset':<6} {'engine':<9} {'prompts':>7} {'scale mean [min, max]':>24} {'calibrated/unscaled':>20}")
    totals = {name: np.zeros(2) for name in ("patchtst", "ewma_t")}
    for asset in np.unique(tables["asset"]):
        mine = tables["asset"] == asset
        for name in totals:
            served, live = replay(tables["origin"][mine], tables[f"{name}_objective"][mine], horizon, recent,
                                  rules, spacing)
            if not live.size:
                print(f"{asset:<6} {name:<9} no prompt after the warm-up ({rules.min_samples} realised prompts "
                      "needed): use more --days")
                continue
            scored = tables[f"{name}_scored"][mine]
            calibrated = sum(float(np.interp(math.log(served[i]), np.log(GRID), scored[i])) for i in live)
            unscaled = float(scored[live, unit].sum())
            totals[name] += (calibrated, unscaled)
            print(f"{asset:<6} {name:<9} {live.size:>7} {served[live].mean():>10.3f} [{served[live].min():.3f}, "
                  f"{served[live].max():.3f}] {calibrated / unscaled:>20.4f}")
    pt, ew = totals["patchtst"], totals["ewma_t"]
    if not (pt[1] > 0 and ew[1] > 0):
        print("all    nothing scored after the warm-up")
        return
    print(f"all    calibrated/unscaled: patchtst {pt[0] / pt[1]:.4f}, ewma_t {ew[0] / ew[1]:.4f}; "
          f"patchtst/ewma_t unscaled {pt[1] / ew[1]:.4f}, both calibrated {pt[0] / ew[0]:.4f}")


if __name__ == "__main__":
    main()

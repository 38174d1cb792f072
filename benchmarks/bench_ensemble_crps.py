"""What stratifying the sampler's normal draws is worth to the validator's ensemble CRPS.

For a few laws, realised paths are drawn from the law itself (a perfectly calibrated forecast), and the
same law's 1000-path ensemble is scored against them twice, stratified and iid, paired on the same
realised paths. Printed: mean ensemble CRPS of the one-step returns and of k-step sums, stratified / iid,
with a standard error. Theory for iid members: the ensemble CRPS exceeds the law's own by E|X-X'|/2N,
about 1/N of it (0.1 % at N = 1000); stratified members remove most of that on the one-step terms.
Run: .venv/bin/python benchmarks/bench_ensemble_crps.py [--reps 200]
"""

import argparse

import numpy as np
import numpy.typing as npt

from core.path_sampling import LatentVol, sample_paths
from core.scoring import crps_ensemble

N_PATHS = 1000
STEP_STD = 0.002
CASES = {  # name: (steps, nu, latent, k for the k-step sums)
    "24 h, t5, no latent vol": (288, 5.0, LatentVol(), 6),
    "24 h, t5, latent vol": (288, 5.0, LatentVol(rho=0.98, s=0.15), 6),
    "1 h, t4, latent vol": (60, 4.0, LatentVol(rho=0.95, s=0.2), 5),
    "24 h, Gaussian": (288, float("inf"), LatentVol(), 6),
}


def law_returns(steps: int, nu: float, latent: LatentVol, n: int, rng: np.random.Generator,
                stratified: bool = True) -> npt.NDArray[np.float64]:
    """One-step log returns of n paths from the case's law: the realised path and the forecast share it."""
    paths = sample_paths(100.0, np.zeros(steps), np.full(steps, STEP_STD), nu, n, rng, latent, stratified=stratified)
    return np.diff(np.log(paths.astype(np.float64)), axis=1)


def crps_pair(steps: int, nu: float, latent: LatentVol, k: int, rng: np.random.Generator,
              stratified: bool, realised: npt.NDArray[np.float64]) -> tuple[float, float]:
    ens = law_returns(steps, nu, latent, N_PATHS, rng, stratified)
    one = float(crps_ensemble(realised, ens).mean())
    sums = ens.reshape(N_PATHS, steps // k, k).sum(axis=2)
    return one, float(crps_ensemble(realised.reshape(-1, k).sum(axis=1), sums).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{N_PATHS} paths, {args.reps} realised paths per case; ratio stratified / iid (SE)")
    print(f"{'case':28s} {'one-step':>18s} {'k-step sums':>18s}")
    for name, (steps, nu, latent, k) in CASES.items():
        ratios = []
        for _ in range(args.reps):
            realised = law_returns(steps, nu, latent, 1, rng)[0]
            strat = crps_pair(steps, nu, latent, k, rng, True, realised)
            iid = crps_pair(steps, nu, latent, k, rng, False, realised)
            ratios.append((strat[0] / iid[0], strat[1] / iid[1]))
        r = np.array(ratios)
        se = r.std(axis=0, ddof=1) / np.sqrt(len(r))
        print(f"{name:28s} {r[:, 0].mean():9.5f} ({se[0]:.5f}) {r[:, 1].mean():9.5f} ({se[1]:.5f})  k={k}")


if __name__ == "__main__":
    main()

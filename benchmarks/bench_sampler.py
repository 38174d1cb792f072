"""Time the path sampler against the raw cost of numpy's Student-t draws of the same size.

Target: sample_paths(1000 paths x 288 steps) <= 2x rng.standard_t(nu, (1000, 288)).
Run: .venv/bin/python benchmarks/bench_sampler.py [--repeats 50]
"""

import argparse
import time
from collections.abc import Callable

import numpy as np

from core.path_sampling import LatentVol, sample_paths

N_PATHS, N_STEPS, NU = 1000, 288, 5.0


def timings(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Interleaved runs, so drift in machine load hits every case alike."""
    for fn in cases.values():
        fn()  # warm-up: imports, allocator
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            began = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - began)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    mu = np.zeros(N_STEPS)
    sigma = np.full(N_STEPS, 0.002)
    nu_per_step = np.linspace(4.0, 8.0, N_STEPS)
    latent = LatentVol(rho=0.98, s=0.15)
    cases: dict[str, Callable[[], object]] = {
        "numpy standard_t (floor)": lambda: rng.standard_t(NU, (N_PATHS, N_STEPS)),
        "sample_paths, no latent vol": lambda: sample_paths(100.0, mu, sigma, NU, N_PATHS, rng),
        "sample_paths, latent vol": lambda: sample_paths(100.0, mu, sigma, NU, N_PATHS, rng, latent),
        "sample_paths, latent, per-step nu": lambda: sample_paths(100.0, mu, sigma, nu_per_step, N_PATHS,
                                                                  rng, latent),
        "sample_paths 1000x60, latent vol": lambda: sample_paths(100.0, mu[:60], sigma[:60], NU, N_PATHS,
                                                                 rng, latent),
    }
    results = timings(cases, args.repeats)
    floor = float(np.median(results["numpy standard_t (floor)"]))
    print(f"{N_PATHS} paths x {N_STEPS} steps, nu={NU}, {args.repeats} interleaved repeats")
    print(f"{'case':38s} {'median ms':>10s} {'min ms':>8s} {'x floor':>8s}")
    for name, values in results.items():
        median = float(np.median(values))
        print(f"{name:38s} {median * 1e3:10.2f} {min(values) * 1e3:8.2f} {median / floor:8.2f}")


if __name__ == "__main__":
    main()

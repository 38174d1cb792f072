"""Inference time of the PatchTST engine per request, against the EWMA-t engine it corrects.

Per model: features from a 14-day snapshot + one forward pass (cache cleared every time, so each
request pays full inference), the cached path (a repeated prompt), and the whole forecast with
1000 paths (sampling stays on the CPU). Target: a few ms per request for inference on one CPU thread.
With ``--device cuda`` (a GPU worker) the models run on the GPU and each model's laws are checked
against the CPU's on the same request.
Run: .venv/bin/python benchmarks/bench_model.py [--models models] [--data-dir ../shared/data] [--repeats 50]
     [--device cpu|cuda|auto]
"""

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from core.checkpoint import checkpoint_path
from core.csv_history import load_asset
from core.devices import resolve_device
from core.engines.ewma import EwmaTEngine
from core.engines.patchtst import PatchTSTEngine
from core.evaluation import AssetHistory, snapshot_at
from core.prices import MarketSnapshot
from core.prompts import ForecastRequest

CASES = {  # kind -> (asset, prompt start inside its held-out window, time_increment)
    "hf": ("BTC", 1779667200 + 3 * 86_400 + 17 * 60, 60),
    "lf_crypto": ("ETH", 1771113600 + 5 * 86_400 + 13 * 60, 300),
    "lf_equity": ("SPYX", 1770595200 + 86_400 + 15 * 3600 + 35 * 60, 300),
}


def time_ms(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up (on a GPU: kernels, allocator)
    out = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()  # the laws come back as numpy, so a GPU pass is complete when this returns
        out.append((time.perf_counter() - began) * 1000)
    return out


def max_rel_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)))


def bench(engine: PatchTSTEngine, ewma: EwmaTEngine, req: ForecastRequest, snap: MarketSnapshot,
          repeats: int) -> dict[str, list[float]]:
    def cold() -> object:
        engine.clear_cache()  # every request pays features + forward pass
        return engine.params(req, snap)

    def full() -> object:
        engine.clear_cache()
        return engine.forecast(req, snap, rng)

    rng = np.random.default_rng(0)
    return {"infer": time_ms(cold, repeats), "cached": time_ms(lambda: engine.params(req, snap), repeats),
            "ewma": time_ms(lambda: ewma.params(req, snap), repeats), "full": time_ms(full, max(repeats // 5, 3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    engine = PatchTSTEngine(args.models, device=device)
    reference = PatchTSTEngine(args.models) if device != "cpu" else None
    ewma = EwmaTEngine()
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {where}, {torch.get_num_threads()} CPU thread(s), {args.repeats} repeats; "
          "ms per request")
    print(f"{'model':<10} {'params':>7} {'file KiB':>8} {'inference (median, p90)':>24} {'cached':>8} "
          f"{'EWMA-t params':>14} {'forecast 1000 paths':>20}")
    for kind, (asset, start, inc) in CASES.items():
        if kind not in engine.kinds:
            print(f"{kind:<10} unavailable")
            continue
        snap = snapshot_at(asset, AssetHistory(*load_asset(args.data_dir, asset)), start, 14 * 86_400)
        req = ForecastRequest(asset, start, inc, 3600 if inc == 60 else 86_400, 1000)
        t = bench(engine, ewma, req, snap, args.repeats)
        size = checkpoint_path(args.models, kind).stat().st_size / 1024
        params = engine.checkpoint(kind).metrics.get("num_params", 0)
        print(f"{kind:<10} {params:>7} {size:>8.0f} {np.median(t['infer']):>15.2f}, {np.percentile(t['infer'], 90):>6.2f} "
              f"{np.median(t['cached']):>8.3f} {np.median(t['ewma']):>14.2f} {np.median(t['full']):>20.1f}")
        if reference is not None:
            got, want = engine.params(req, snap), reference.params(req, snap)
            print(f"{'':<10} laws vs cpu: max relative gap sigma {max_rel_gap(got.sigma, want.sigma):.1e}, "
                  f"nu {max_rel_gap(got.nu, want.nu):.1e}, mu {float(np.max(np.abs(got.mu - want.mu))):.1e} abs")


if __name__ == "__main__":
    main()

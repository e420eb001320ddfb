"""One prepared device check: correctness of the CUDA path against the CPU float64 result,
then Gram-matrix timings and the projection to N = 10,240 images (issue "Speed").

    python benchmarks/gpu_check.py --device cuda --out $OUT/gpu_check.json     # on a GPU
    python benchmarks/gpu_check.py --device cpu --n 4 --quick                    # smoke test here

Nothing here needs ../shared (it does not travel to a device machine): correctness uses
random images and scikit-learn's bundled digits, timing random 32×32×3 images (the cost does
not depend on pixel values). Every number lands in the JSON with the versions and the device.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import cnngp  # noqa: E402
from cnngp.provenance import versions  # noqa: E402
from cnngp.engine.storage import atomic_write  # noqa: E402

#: (name, architecture, readout) — the representation each one exercises in brackets
CORRECTNESS = [
    ("cnngp6_gap", "cnngp6", "constant"),  # full, independent convs
    ("cnngp6_matern", "cnngp6", "matern32:2.0"),  # full, general readout
    ("cnngp6_flatten", "cnngp6", "independent"),  # diagonal
    ("myrtle5_flatten", "myrtle5", "independent"),  # bands under the pools
    ("myrtle10_correlated", "myrtle10-correlated", "constant"),  # correlated 6×6 stride-2 convs
]
TIMING = [
    ("cnngp14_full", "cnngp14", "constant"),
    ("myrtle10_gap", "myrtle10", "constant"),
    ("myrtle10_correlated", "myrtle10-correlated", "constant"),
    ("myrtle10paper_flatten", "myrtle10-paper", "independent"),
    ("cnngp14_diag", "cnngp14", "independent"),
]


def _net(arch, readout):
    from cnngp.cli.main import load_network

    return load_network(arch, readout)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def correctness(device, n, budget):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(n, 16, 16, 3))
    out = []
    for name, arch, readout in CORRECTNESS:
        net = _net(arch, readout)
        ref = cnngp.kernel(net, x, device="cpu").numpy()
        row = {"workload": name}
        for dtype in ("float64", "float32"):
            k = cnngp.kernel(net, x, device=device, dtype=dtype, memory_budget=budget).double().numpy()
            row[f"rel_err_{dtype}"] = float(np.abs(k - ref).max() / np.abs(ref).max())
        out.append(row)
        print(f"  {name:22s} f64 {row['rel_err_float64']:.1e}  f32 {row['rel_err_float32']:.1e}", flush=True)
    return out


def timing(device, n, budget, dtypes, workloads):
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(n, 32, 32, 3)).astype(np.float32)
    out = []
    for name, arch, readout in TIMING:
        if workloads and name not in workloads:
            continue
        net = _net(arch, readout)
        for dtype in dtypes:
            cnngp.kernel(net, x[:2], device=device, dtype=dtype, memory_budget=budget)  # warm up
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            cnngp.kernel(net, x, device=device, dtype=dtype, memory_budget=budget)
            _sync(device)
            wall = time.perf_counter() - t0
            computed = n * (n + 1) // 2
            per_pair = wall / computed
            row = {
                "workload": name, "dtype": dtype, "n": n, "seconds": wall,
                "ms_per_computed_pair": 1e3 * per_pair, "ms_per_n2_pair": 1e3 * wall / n**2,
                "projected_hours_n10240": per_pair * 10240 * 10241 / 2 / 3600,
            }
            if torch.device(device).type == "cuda":
                row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out.append(row)
            print(f"  {name:22s} {dtype}: {wall:.2f} s for N={n} = {row['ms_per_computed_pair']:.3f} ms "
                  f"per computed pair; N=10,240 Gram ≈ {row['projected_hours_n10240']:.2f} h", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=64, help="images in the timed Gram matrices")
    p.add_argument("--n-check", type=int, default=4, help="images in the correctness checks")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--workloads", default="", help="comma-separated subset of the timed workloads")
    p.add_argument("--memory-budget-gib", type=float, default=None,
                   help="working memory per batch (default: half the GPU's, 2 GiB on the CPU)")
    p.add_argument("--quick", action="store_true", help="correctness on 2 images, one dtype timed")
    p.add_argument("--out", default="gpu_check.json")
    args = p.parse_args(argv)
    if args.n < 1 or args.n_check < 1:
        p.error(f"--n and --n-check: expected integers >= 1, got {args.n} and {args.n_check}")
    out_dir = Path(args.out).parent
    if not out_dir.is_dir():  # say so now, not after minutes of GPU time
        p.error(f"--out: folder {str(out_dir)!r} does not exist")
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda but torch finds no CUDA device")
    if args.memory_budget_gib is not None:
        budget = int(args.memory_budget_gib * 2**30)
    elif torch.device(device).type == "cuda":
        budget = torch.cuda.get_device_properties(torch.device(device)).total_memory // 2
    else:
        budget = None
    info = {"device": device, "versions": versions(), "python": platform.python_version(),
            "memory_budget_bytes": budget, "argv": sys.argv[1:] if argv is None else argv}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    print(json.dumps(info), flush=True)
    n_check = 2 if args.quick else args.n_check
    dtypes = args.dtypes.split(",")[:1] if args.quick else args.dtypes.split(",")
    workloads = [w for w in args.workloads.split(",") if w]
    print("correctness vs CPU float64:", flush=True)
    result = {"config": info, "correctness": correctness(device, n_check, budget)}
    print("timing:", flush=True)
    result["timing"] = timing(device, args.n, budget, dtypes, workloads)
    atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=1).encode()))
    worst = max(r["rel_err_float64"] for r in result["correctness"])
    print(f"worst float64 relative error {worst:.1e}; wrote {args.out}")
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())

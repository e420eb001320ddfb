"""One prepared device check: correctness of the CUDA path against the CPU float64 result,
then Gram-matrix timings and the projection to N = 10,240 images (issue "Speed").

    python benchmarks/gpu_check.py --device cuda --out $OUT/gpu_check.json     # on a GPU
    python benchmarks/gpu_check.py --device cpu --n 4 --quick                    # smoke test here
    TRITON_INTERPRET=1 python benchmarks/gpu_check.py --device cpu --triton-only --quick   # Triton smoke

The ``triton`` section (when triton runs on the device: CUDA, or the CPU under
TRITON_INTERPRET=1) checks ``engine="triton"`` against the CPU engine on real images
(scikit-learn's digits, upsampled) for the NNGP and NTK, then records ms per pair of the pair
pass for CNNGP-14 and Myrtle10 (NNGP and NTK, float32 and float64, several batch sizes) for
``engine="triton"`` and ``engine="torch"``. It drives GramPlan directly.

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


# -- engine="triton" ---------------------------------------------------------------------------

#: (name, architecture, readout) of the Triton checks and timings
TRITON_WORKLOADS = [("cnngp14", "cnngp14", "constant"), ("myrtle10", "myrtle10", "constant"),
                    ("myrtle10_correlated", "myrtle10-correlated", "constant")]


def _gram(net, x, device, dtype, engine, get, batch_size=None, x2=None):
    """(n_outputs, N1, N2) through GramPlan, and the seconds of the pair pass alone."""
    from cnngp.engine.gram import GramPlan

    gp = GramPlan(net, x.shape[1:], dtype=dtype, device=device, get=get, engine=engine, batch_size=batch_size)
    t = gp.images(x)
    rec = gp.self_records(t)
    t2, rec2 = (None, None) if x2 is None else (gp.images(x2, "x2"), None)
    if x2 is not None:
        rec2 = gp.self_records(t2)
    _sync(device)
    t0 = time.perf_counter()
    out = gp.block(t, rec, t2, rec2)
    _sync(device)
    return out.double().numpy(), time.perf_counter() - t0


def _digits(n, size):
    """Real images: scikit-learn's 8×8 digits scaled to [0, 1], upsampled to size×size×3."""
    from sklearn.datasets import load_digits

    d = load_digits().images[:n] / 16.0
    k = max(1, size // 8)
    x = np.kron(d, np.ones((k, k)))[:, :size, :size]
    return np.repeat(x[..., None], 3, axis=-1)


def triton_available(device):
    try:
        from cnngp.engine import gpu

        gpu.require(device)
        return True, ""
    except Exception as e:  # noqa: BLE001 - the reason lands in the JSON
        return False, str(e)


def triton_check(device, n, size):
    """engine="triton" on ``device`` against the CPU engine (fused, float64), NNGP and NTK."""
    x = _digits(n, size)
    out = []
    for name, arch, readout in TRITON_WORKLOADS:
        net = _net(arch, readout)
        ref, _ = _gram(net, x, "cpu", "float64", "fused", "both")
        row = {"workload": name, "n": n, "image": size}
        for dtype in ("float64", "float32"):
            k, _ = _gram(net, x, device, dtype, "triton", "both")
            for i, kind in enumerate(("nngp", "ntk")):
                row[f"rel_err_{kind}_{dtype}"] = float(np.abs(k[i] - ref[i]).max() / np.abs(ref[i]).max())
        out.append(row)
        print(f"  {name:22s} " + "  ".join(f"{k.removeprefix('rel_err_')} {v:.1e}" for k, v in row.items()
                                          if k.startswith("rel_err")), flush=True)
    return out


def triton_timing(device, size, batch_sizes, dtypes, engines, workloads):
    """ms per pair of the pair pass (self pass excluded) for each engine, dtype, kernel and
    batch size: a rectangular block of 2 × batch_size pairs after one warm-up block."""
    rng = np.random.default_rng(2)
    out = []
    for name, arch, readout in TRITON_WORKLOADS:
        if workloads and name not in workloads:
            continue
        net = _net(arch, readout)
        for dtype in dtypes:
            for get in ("nngp", "ntk"):
                for bs in batch_sizes:
                    x1 = rng.uniform(size=(2, size, size, 3))
                    x2 = rng.uniform(size=(bs, size, size, 3))
                    for engine in engines:
                        _gram(net, x1[:1], device, dtype, engine, get, bs, x2)  # warm up (compile)
                        if torch.device(device).type == "cuda":
                            torch.cuda.reset_peak_memory_stats()
                        _, wall = _gram(net, x1, device, dtype, engine, get, bs, x2)
                        row = {"workload": name, "engine": engine, "dtype": dtype, "kernel": get,
                               "batch_size": bs, "image": size, "pairs": 2 * bs, "seconds": wall,
                               "ms_per_pair": 1e3 * wall / (2 * bs)}
                        if torch.device(device).type == "cuda":
                            row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
                        out.append(row)
                        print(f"  {name:20s} {engine:6s} {dtype} {get:4s} batch {bs:4d}: "
                              f"{row['ms_per_pair']:.3f} ms/pair", flush=True)
    return out


def run_triton(args, device, quick):
    ok, why = triton_available(device)
    if not ok:
        print(f"triton: skipped ({why})", flush=True)
        return {"skipped": why}
    cuda = torch.device(device).type == "cuda"
    print("triton vs CPU engine (float64), digits:", flush=True)
    section = {"correctness": triton_check(device, 2 if quick else args.n_check, 16 if quick else 32)}
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")] if not quick else [2]
    engines = ["triton", "torch"] if cuda else ["triton"]
    dtypes = args.dtypes.split(",")[:1] if quick else args.dtypes.split(",")
    print("triton timing:", flush=True)
    section["timing"] = triton_timing(device, args.triton_image if not quick else 16, batch_sizes, dtypes,
                                      engines, [] if not quick else ["cnngp14"])
    return section


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
    p.add_argument("--triton-only", action="store_true", help="only the engine='triton' section")
    p.add_argument("--batch-sizes", default="16,64,256", help="pair batch sizes of the Triton timings")
    p.add_argument("--triton-image", type=int, default=32, help="image side of the Triton timings")
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
    result = {"config": info}
    if not args.triton_only:
        print("correctness vs CPU float64:", flush=True)
        result["correctness"] = correctness(device, n_check, budget)
        print("timing:", flush=True)
        result["timing"] = timing(device, args.n, budget, dtypes, workloads)
    if args.triton_only or torch.device(device).type == "cuda":
        result["triton"] = run_triton(args, device, args.quick)
    atomic_write(args.out, lambda f: f.write(json.dumps(result, indent=1).encode()))
    worst = max([r["rel_err_float64"] for r in result.get("correctness", [])]
                + [v for r in result.get("triton", {}).get("correctness", []) for k, v in r.items()
                   if k.startswith("rel_err") and k.endswith("float64")] + [0.0])
    print(f"worst float64 relative error {worst:.1e}; wrote {args.out}")
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())

"""NTK against NNGP, per image pair, on CNNGP-14 and Myrtle10 — and against neural-tangents' NTK.

    .venv/bin/python benchmarks/ntk.py [--n 8] [--nt-python /tmp/ntvenv/bin/python] [--out F.json]

For each workload (CNNGP-14 with a global-pooling readout, the full position-pair tensor; and
Myrtle10 3/3/3 with global pooling) it times, in fresh processes, ``cnngp.kernel(get="nngp")``
and ``cnngp.kernel(get="ntk")`` on the first N CIFAR-10 training images (float64 and float32,
best of --reps, each process warmed up on two images first), checks the NTK against
neural-tangents' when ``--nt-python`` is given (float64, one jit, ``benchmarks/nt_side.py --get
ntk``), and prints ms per pair and the ratios NTK/NNGP and NT/cnngp.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "cifar10_subset.npz")

CHILD = r"""
import json, sys, time, numpy as np, cnngp
name, get, dtype, n, reps, out = sys.argv[1:7]
n, reps = int(n), int(reps)
x = np.load(sys.argv[7])["x_train"][:n]
body = cnngp.io.architectures.body(name)
net = cnngp.Serial(*body, cnngp.Readout(correlation=cnngp.Constant()))
cnngp.kernel(net, x[:2], get=get, dtype=dtype)  # warm up (numba compiles once per process)
best = None
for _ in range(reps):
    t0 = time.perf_counter()
    k = cnngp.kernel(net, x, get=get, dtype=dtype)
    t = time.perf_counter() - t0
    best = t if best is None else min(best, t)
np.save(out, k.numpy())
print(json.dumps({"seconds": best, "pairs": n * (n + 1) // 2}))
"""

WORKLOADS = {"cnngp14_full": ("cnngp14", "cnngp14_full"), "myrtle10_gap": ("myrtle10", "myrtle10_gap")}


def _cnngp(name, get, dtype, n, reps, tmp):
    out = os.path.join(tmp, f"{name}_{get}_{dtype}.npy")
    r = subprocess.run([sys.executable, "-c", CHILD, name, get, dtype, str(n), str(reps), out, DATA],
                       capture_output=True, text=True, check=True)
    row = json.loads(r.stdout.strip().splitlines()[-1])
    import numpy as np

    return row["seconds"] / row["pairs"] * 1e3, np.load(out)


def _nt(python, workload, n, tmp):
    kpath = os.path.join(tmp, f"nt_{workload}.npz")
    r = subprocess.run([python, os.path.join(HERE, "nt_side.py"), "--quick", "--get", "ntk", "--n", str(n),
                        "--workloads", workload, "--kernels-out", kpath], capture_output=True, text=True)
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode or not recs:
        raise RuntimeError(f"neural-tangents failed: {r.stderr[-2000:]}")
    import numpy as np

    with np.load(kpath) as z:
        k = z[z.files[0]]
    return recs[0]["ms_per_pair"], k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--nt-python", help="python of a neural-tangents environment (../shared/bench/nt_env.sh)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads.split(","):
            name, nt_name = WORKLOADS[workload]
            row = {"workload": workload, "n": args.n}
            for dtype in ("float64", "float32"):
                for get in ("nngp", "ntk"):
                    ms, k = _cnngp(name, get, dtype, args.n, args.reps, tmp)
                    row[f"{get}_{dtype}_ms_per_pair"] = ms
                    if dtype == "float64":
                        row[f"{get}_kernel"] = k
                    else:
                        ref = row[f"{get}_kernel"]
                        row[f"{get}_float32_rel_err"] = float(np.abs(k - ref).max() / np.abs(ref).max())
            row["ntk_over_nngp_float64"] = row["ntk_float64_ms_per_pair"] / row["nngp_float64_ms_per_pair"]
            row["ntk_over_nngp_float32"] = row["ntk_float32_ms_per_pair"] / row["nngp_float32_ms_per_pair"]
            if args.nt_python:
                nt_ms, nt_k = _nt(args.nt_python, nt_name, args.n, tmp)
                row["nt_ntk_float64_ms_per_pair"] = nt_ms  # NT computes all N² entries
                row["nt_over_cnngp_ntk_float64"] = nt_ms / row["ntk_float64_ms_per_pair"]
                row["ntk_rel_err_vs_nt"] = float(np.abs(row["ntk_kernel"] - nt_k).max() / np.abs(nt_k).max())
            for key in ("nngp_kernel", "ntk_kernel"):
                row.pop(key)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"{'workload':14s} {'NNGP f64':>9s} {'NTK f64':>9s} {'NTK/NNGP':>9s} {'NNGP f32':>9s} {'NTK f32':>9s} "
          f"{'NTK/NNGP':>9s} {'NT NTK f64':>11s} {'NT/cnngp':>9s}   (ms per pair)")
    for r in rows:
        nt = r.get("nt_ntk_float64_ms_per_pair")
        print(f"{r['workload']:14s} {r['nngp_float64_ms_per_pair']:9.2f} {r['ntk_float64_ms_per_pair']:9.2f} "
              f"{r['ntk_over_nngp_float64']:9.2f} {r['nngp_float32_ms_per_pair']:9.2f} "
              f"{r['ntk_float32_ms_per_pair']:9.2f} {r['ntk_over_nngp_float32']:9.2f} "
              + (f"{nt:11.2f} {r['nt_over_cnngp_ntk_float64']:9.2f}" if nt is not None else f"{'-':>11s} {'-':>9s}"))
    if args.out:
        with open(args.out, "w") as f:
            from cnngp.provenance import versions

            json.dump({"rows": rows, "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                       "loadavg": os.getloadavg(), "versions": versions()}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

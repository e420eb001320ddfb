"""Peak memory of the sweep's cross-validation over a kernel store, against N.

    .venv/bin/python benchmarks/sweep_memory.py [--ns 1000,2000,4000] [--readouts 3] [--out F.json]

For each N, a fresh process writes a store of L random positive-definite N×N readouts (float32,
as a real run stores them) and runs the sweep's cross-validation over it (4 folds, the paper's
protocol, the default noise grid), reading one readout at a time as `cnngp sweep --kernel`
does. It reports the process's peak resident memory above its baseline, fits a + b·N², and
projects to N = 10,240 (the paper's largest) and 50,000.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, resource, sys, time, numpy as np
from cnngp.engine.store import KernelStore, StoredReadouts, tile_plan
from cnngp.experiments.sweep import _cross_validate_all
n, L, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
T = 1024
store = KernelStore.create(path, {"spec": "synthetic", "readouts": [str(i) for i in range(L)],
    "x1_sha256": "none", "x2_sha256": None, "dtype": "float32", "tile": T, "shape": [L, n, n]},
    np.zeros((n, 1, 1), np.float32), None, {}, {"versions": {}})
for l in range(L):  # K = F Fᵀ / d + I/10, written tile by tile (never whole in memory here)
    F = rng.standard_normal((n, 64)).astype(np.float32)
    for t in tile_plan(n, None, T):
        block = (F[t.rows] @ F[t.cols].T / 64)[None]
        if t.diagonal:
            block = block + np.eye(block.shape[1], dtype=np.float32)[None] / 10
        store.kernel[l:l + 1, t.rows, t.cols] = block
        if t.mirror:
            store.kernel[l:l + 1, t.cols, t.rows] = np.swapaxes(block, 1, 2)
    del F
records = StoredReadouts.__new__(StoredReadouts)  # the records are not written: skip verify
records.store, records.shape = store, store.shape
y = np.arange(n) % 10
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
labels = [(f"r{l}", float(l)) for l in range(L)]
_cross_validate_all(records, y, labels, [n], 10, 4, "paper", 0, 1000, False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"n": n, "readouts": L, "baseline_kib": base, "peak_kib": peak,
                  "seconds": time.perf_counter() - start}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="1000,2000,4000")
    p.add_argument("--readouts", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = []
    for n in (int(v) for v in args.ns.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            r = subprocess.run([sys.executable, "-c", CHILD, str(n), str(args.readouts),
                                os.path.join(tmp, "K.zarr")], capture_output=True, text=True, check=True)
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["above_baseline_mib"] = (row["peak_kib"] - row["baseline_kib"]) / 1024
        row["peak_mib"] = row["peak_kib"] / 1024
        row["matrix_mib"] = n * n * 8 / 1024**2
        rows.append(row)
        print(f"N={n:6d}: peak {row['peak_mib']:8.0f} MiB ({row['above_baseline_mib']:7.0f} above the "
              f"baseline = {row['above_baseline_mib'] / row['matrix_mib']:.2f} N×N float64 matrices), "
              f"{row['seconds']:.1f} s for {args.readouts} readouts", flush=True)
    import numpy as np

    n2 = np.array([r["n"] ** 2 for r in rows], dtype=float)
    peak = np.array([r["peak_mib"] for r in rows])
    b, a = np.polyfit(n2, peak, 1) if len(rows) > 1 else (peak[0] / n2[0], 0.0)
    projection = {str(n): float(a + b * n * n) for n in (10240, 50000)}
    per_readout = {str(n): float(rows[-1]["seconds"] / args.readouts * (n / rows[-1]["n"]) ** 3)
                   for n in (10240,)}
    print(f"fit: peak MiB = {a:.0f} + {b * 1e6:.2f}e-6 · N²  →  N=10,240: {projection['10240'] / 1024:.1f} GiB, "
          f"N=50,000: {projection['50000'] / 1024:.0f} GiB")
    print(f"time: ~{per_readout['10240'] / 60:.0f} min per readout at N=10,240 (N³ from the largest run)")
    result = {"rows": rows, "fit_mib": {"a": float(a), "b_per_n2": float(b)}, "projection_mib": projection,
              "projected_seconds_per_readout": per_readout, "command": " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d"), "maxrss_unit": "KiB (Linux ru_maxrss)"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

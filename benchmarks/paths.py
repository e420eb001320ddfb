"""Every path of the engine on the same image pairs: ms per pair, the ratio to the fastest path
and to the floor of the fused kernel (issue "Fast on every path").

    .venv/bin/python benchmarks/paths.py                       # CNNGP-14 and Myrtle10, float32, N = 32
    .venv/bin/python benchmarks/paths.py --n 16 --archs cnngp14 --out /tmp/p.json   # quicker

Paths (each timed in this process after a warm-up on 2 images, so numba's compile is not in
the numbers; the Dask run is timed whole, cluster start included, and also by its tiles):

* ``kernel``     ``cnngp.kernel(net, x)``: the in-memory Gram matrix, N(N+1)/2 pairs
* ``sweep27``    ``cnngp.readout_sweep(body, 27 readouts, x)``: the paper's sweep, one pass
* ``store``      ``store_kernel(..., out=K.zarr)`` in this process: the tiled store
* ``dask2``      the same store on a LocalCluster of 2 single-threaded workers (wall, start included)
* ``dask2-tiles`` the Dask run's tiles alone: Σ tile seconds / workers (what a long run converges to)
* ``rect``       ``cnngp.kernel(net, x[:N/2], x)``: a test × train block, N²/2 pairs
* ``ntk``        ``cnngp.kernel(net, x, get="ntk")``

Images: the first N CIFAR-10 training images of ../shared/data/cifar10_subset.npz when it is
there, else of the repository's examples/cifar10-small.npz (N ≤ 320), else uniform random 32×32×3 images (the cost does not depend on the pixel values).
The floor is that of benchmarks/README.md ("Physical limits"), for any network: every fused
conv + ReLU writes its output position pairs once, each costing one ReLU expectation at the
polynomial's rate on all cores (benchmarks/machine_limits.json) and one pass through the L3
cache. "Floor now" is the same with the ReLU at the rate the fused kernel evaluates it today
(timed in this run, one thread × cores): tighter, since the kernel's ReLU got faster. The machine's load average is printed and recorded: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
import cnngp  # noqa: E402
from cnngp.engine.distributed import store_kernel  # noqa: E402
from cnngp.engine.storage import atomic_write  # noqa: E402
from cnngp.io import architectures  # noqa: E402
from cnngp.kernels.layers import Conv  # noqa: E402
from cnngp.provenance import versions  # noqa: E402

CIFAR = HERE.parent.parent / "shared" / "data" / "cifar10_subset.npz"
CIFAR_SMALL = HERE.parent / "examples" / "cifar10-small.npz"  # committed, 320 training images
#: the paper's 27 readouts: independent, Matérn-3/2 at 25 lengthscales, mean pooling
LENGTHSCALES = [0.0] + list(np.logspace(-1, 4.5, 25)) + [math.inf]


def images(n: int) -> tuple[np.ndarray, str]:
    for path in (CIFAR, CIFAR_SMALL):
        if path.is_file():
            with np.load(path) as d:
                if len(d["x_train"]) >= n:
                    return d["x_train"][:n].astype(np.float32) / 255.0, f"{path.name} x_train[:{n}]"
    rng = np.random.default_rng(0)
    return rng.uniform(size=(n, 32, 32, 3)).astype(np.float32), f"uniform random ({n}, 32, 32, 3)"


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def fused_entries(body, spatial) -> int:
    """Position-pair entries the fused convs write per image pair (each conv's output grid²)."""
    total, grid = 0, tuple(spatial)
    for layer in body.layers:
        out = layer.output_spatial(grid) if hasattr(layer, "output_spatial") else grid
        if isinstance(layer, Conv):
            total += math.prod(out) ** 2
        grid = tuple(out)
    return total


def floor_ms(entries: int) -> dict | None:
    """The fused kernel's floor per computed pair from benchmarks/machine_limits.json."""
    try:
        ml = json.loads((HERE / "machine_limits.json").read_text())
    except (OSError, ValueError):
        return None
    cores = ml.get("cpu_count") or os.cpu_count() or 1

    def rate(test, threads):
        for r in ml.get("results", []):
            if r["test"].startswith(test) and r["dtype"] == "float32" and r["threads"] == threads:
                return r["value"]
        return None

    relu, l3 = rate("cnngp relu expectation", 1), rate("torch copy_ bandwidth [L3", cores)
    if not relu or not l3:
        return None
    relu_ms = 1e3 * entries / (cores * relu * 1e9)
    l3_ms = 1e3 * entries * 8 / (l3 * 1e9)  # float32: read and write 4 bytes per entry
    return {"relu_ms": relu_ms, "l3_ms": l3_ms, "floor_ms": relu_ms + l3_ms, "cores": cores}


def kernel_relu_rate(n: int = 16384, reps: int = 200) -> float | None:
    """Entries per second (one thread) of the balanced-ReLU expectation as the fused conv
    kernel evaluates it now (fused_kernels._relu_balanced32 in a loop over cache-resident
    float32 data): the second, tighter floor's ReLU part."""
    try:
        import numba

        from cnngp.engine import fused_kernels as fk
    except Exception:  # numba missing
        return None
    relu = fk._relu_balanced32

    @numba.njit(cache=False, fastmath={"contract", "nsz", "arcp"})
    def run(k, ns, inv, out, reps):
        for _ in range(reps):
            for i in range(k.shape[0]):
                out[i] = relu(k[i], ns[i], inv[i])

    rng = np.random.default_rng(0)
    v = (rng.random(n) + 0.5).astype(np.float32)
    k = ((rng.random(n) * 1.8 - 0.9) * v).astype(np.float32)
    ns, inv, out = (v / np.float32(math.pi)).astype(np.float32), (1 / v).astype(np.float32), np.empty_like(k)
    run(k, ns, inv, out, 1)
    best = min(timed(lambda: run(k, ns, inv, out, reps)) for _ in range(5))
    return n * reps / best


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_arch(arch: str, x: np.ndarray, dtype: str, tmp: Path, workers: int) -> dict:
    net = architectures.get(arch)
    body = net[:-1]
    const = cnngp.Serial(body, cnngp.Readout(correlation=cnngp.Constant()))
    readouts = [cnngp.Readout(correlation=cnngp.Matern(1.5, float(lam))) for lam in LENGTHSCALES]
    n = x.shape[0]
    half = n // 2
    sym_pairs, rect_pairs = n * (n + 1) // 2, half * n
    opts = dict(dtype=dtype)

    # warm-up: numba compiles (or loads its cache) once per process and signature
    xs = x[:2]
    cnngp.kernel(const, xs, **opts)
    cnngp.kernel(const, xs[:1], xs, **opts)
    cnngp.kernel(const, xs, get="ntk", **opts)
    cnngp.readout_sweep(body, readouts, xs, **opts)

    rows = {}

    def record(name, seconds, pairs, **extra):
        rows[name] = dict(seconds=seconds, pairs=pairs, ms_per_pair=1e3 * seconds / pairs, **extra)
        print(f"  {arch:10s} {name:12s} {pairs:6d} pairs {seconds:8.2f} s "
              f"{rows[name]['ms_per_pair']:8.2f} ms/pair  (load {loadavg()[:1]})", flush=True)

    record("kernel", timed(lambda: cnngp.kernel(const, x, **opts)), sym_pairs)
    record("sweep27", timed(lambda: cnngp.readout_sweep(body, readouts, x, **opts)), sym_pairs)
    out = tmp / f"{arch}-store.zarr"
    record("store", timed(lambda: store_kernel(const, x, out=out, progress=False, **opts)), sym_pairs)
    out = tmp / f"{arch}-dask.zarr"
    report = {}
    seconds = timed(lambda: report.setdefault("r", store_kernel(
        const, x, out=out, workers=workers, progress=False, **opts)))
    record(f"dask{workers}", seconds, sym_pairs, tile=report["r"].tile, tiles=report["r"].tiles_total)
    tile_seconds = sum(json.loads(p.read_text())["seconds"] for p in (out / "records").glob("tile-*.json"))
    record(f"dask{workers}-tiles", tile_seconds / workers, sym_pairs)
    record("rect", timed(lambda: cnngp.kernel(const, x[:half], x, **opts)), rect_pairs)
    record("ntk", timed(lambda: cnngp.kernel(const, x, get="ntk", **opts)), sym_pairs)

    entries = fused_entries(body, x.shape[1:-1])
    floor = floor_ms(entries)
    rate = kernel_relu_rate()
    if floor is not None and rate:  # the same floor at the ReLU rate of the kernel as it is now
        floor["kernel_relu_gelem_s_one_thread"] = rate / 1e9
        floor["kernel_relu_ms"] = 1e3 * entries / (floor["cores"] * rate)
        floor["floor_now_ms"] = floor["kernel_relu_ms"] + floor["l3_ms"]
    same_work = {k: v for k, v in rows.items() if k not in ("ntk", f"dask{workers}")}
    fastest = min(v["ms_per_pair"] for v in same_work.values())
    for name, v in rows.items():
        v["ratio_to_fastest"] = v["ms_per_pair"] / fastest
        v["ratio_to_floor"] = None if floor is None else v["ms_per_pair"] / floor["floor_ms"]
        v["ratio_to_floor_now"] = None if floor is None or "floor_now_ms" not in floor else (
            v["ms_per_pair"] / floor["floor_now_ms"])
    return {"paths": rows, "fastest_ms_per_pair": fastest, "entries_per_pair": entries, "floor": floor}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=32, help="images (default 32)")
    ap.add_argument("--archs", default="cnngp14,myrtle10")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(HERE.parent / "results" / "paths" / "paths.json"))
    a = ap.parse_args(argv)
    x, source = images(a.n)
    start_load = loadavg()
    print(f"{a.n} images ({source}), {a.dtype}, torch threads {torch.get_num_threads()}, "
          f"load average {start_load}", flush=True)
    if start_load and start_load[0] > 1.5:
        print("warning: the machine is busy (1-minute load > 1.5); the figures are not idle-machine figures")
    tmp = Path(tempfile.mkdtemp(prefix="cnngp-paths-"))
    results = {}
    try:
        for arch in a.archs.split(","):
            results[arch] = run_arch(arch, x, a.dtype, tmp, a.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| arch | path | ms/pair | × fastest | × floor | × floor now |")
    print("|---|---|---|---|---|---|")
    for arch, r in results.items():
        for name, v in r["paths"].items():
            fl = "-" if v["ratio_to_floor"] is None else f"{v['ratio_to_floor']:.2f}"
            fn = "-" if v.get("ratio_to_floor_now") is None else f"{v['ratio_to_floor_now']:.2f}"
            print(f"| {arch} | {name} | {v['ms_per_pair']:.2f} | {v['ratio_to_fastest']:.2f} | {fl} | {fn} |")
        if r["floor"]:
            f = r["floor"]
            print(f"| {arch} | floor | {f['floor_ms']:.2f} | | ReLU {f['relu_ms']:.2f} + L3 {f['l3_ms']:.2f} "
                  f"({r['entries_per_pair'] / 1e6:.2f} M entries) | |")
            if "floor_now_ms" in f:
                print(f"| {arch} | floor now | {f['floor_now_ms']:.2f} | | | ReLU at the kernel's rate "
                      f"{f['kernel_relu_ms']:.2f} + L3 {f['l3_ms']:.2f} |")
    doc = {
        "command": " ".join([Path(sys.executable).name, "benchmarks/paths.py", *(argv or sys.argv[1:])]),
        "images": source, "n": a.n, "dtype": a.dtype, "workers": a.workers,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": platform.platform(), "processor": platform.processor(),
        "loadavg_start": start_load, "loadavg_end": loadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions(), "results": results,
        "note": "ntk and dask (wall, cluster start included) are not counted in the fastest path",
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: f.write(json.dumps(doc, indent=1).encode()), what="--out")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

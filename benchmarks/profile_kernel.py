"""Time cnngp.kernel on a few real CIFAR-10 images (in-process, no startup cost).

    python benchmarks/profile_kernel.py cnngp14-gap myrtle10 --n 4 --dtype float32
    python benchmarks/profile_kernel.py all --n 8 --reference   # also compare fast vs torch path

Workloads: cnngp14-gap (full covariance, global pooling readout), cnngp14-matern
(full covariance, Matérn-3/2 λ=3 readout), cnngp14-flatten (diagonal path), myrtle10,
myrtle10-paper, myrtle10-correlated. Prints ms per computed pair (N(N+1)/2) and per N² entry.
With ``--reference`` the same Gram matrix is recomputed on the reference torch path
(CNNGP_FAST=0) and the max relative difference is printed.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

import cnngp
from cnngp import Matern
from cnngp.io import architectures

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_subset.npz"

WORKLOADS = {
    "cnngp14-gap": lambda: architectures.get("cnngp14", readout=cnngp.Constant()),
    "cnngp14-matern": lambda: architectures.get("cnngp14", readout=Matern(1.5, 3.0)),
    "cnngp14-flatten": lambda: architectures.get("cnngp14"),
    "myrtle10": lambda: architectures.get("myrtle10"),
    "myrtle10-paper": lambda: architectures.get("myrtle10-paper"),
    "myrtle10-correlated": lambda: architectures.get("myrtle10-correlated"),
}


def images(n):
    return np.load(DATA)["x_train"][:n].astype(np.float64) / 255.0


def run(net, x, dtype, fast=True):
    old = os.environ.get("CNNGP_FAST")
    os.environ["CNNGP_FAST"] = "1" if fast else "0"
    try:
        t = time.perf_counter()
        k = cnngp.kernel(net, x, dtype=dtype)
        return k, time.perf_counter() - t
    finally:
        if old is None:
            os.environ.pop("CNNGP_FAST", None)
        else:
            os.environ["CNNGP_FAST"] = old


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workloads", nargs="+")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--dtype", default="float64")
    p.add_argument("--reference", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    names = list(WORKLOADS) if a.workloads == ["all"] else a.workloads
    x = images(a.n)
    pairs = a.n * (a.n + 1) // 2
    run(WORKLOADS[names[0]](), x[:2], a.dtype)  # warm up (numba cache load, allocator)
    for name in names:
        net = WORKLOADS[name]()
        k, dt = run(net, x, a.dtype)
        line = (
            f"{name:22s} {a.dtype}  N={a.n}  {1e3 * dt / pairs:8.2f} ms/computed pair"
            f"  {1e3 * dt / a.n**2:8.2f} ms/N² pair"
        )
        if a.reference:
            k64, dt64 = run(net, x, "float64", fast=False)
            err = (k - k64).abs().max() / k64.abs().max()
            line += f"  | torch-f64 {1e3 * dt64 / pairs:8.2f} ms/pair  rel err {err:.2e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

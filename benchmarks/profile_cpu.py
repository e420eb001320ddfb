"""CPU-time per computed pair of a Gram matrix, single-threaded (robust on a shared machine).

    python benchmarks/profile_cpu.py myrtle10-paper myrtle10-correlated --n 6 --dtype float32

Single-threaded CPU time (time.process_time, min of --reps runs) is insensitive to other
processes competing for the cores, unlike wall time; divide by the thread count for an
estimate of the multi-threaded wall time on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import cnngp
from profile_kernel import WORKLOADS, images


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workloads", nargs="+")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--torch", action="store_true", help="the reference torch path (CNNGP_FAST=0)")
    a = p.parse_args()
    if a.torch:
        os.environ["CNNGP_FAST"] = "0"
    torch.set_num_threads(1)
    x = images(a.n)
    pairs = a.n * (a.n + 1) // 2
    names = list(WORKLOADS) if a.workloads == ["all"] else a.workloads
    cnngp.kernel(WORKLOADS[names[0]](), x[:2], dtype=a.dtype)  # warm up
    for name in names:
        net = WORKLOADS[name]()
        best = float("inf")
        for _ in range(a.reps):
            c = time.process_time()
            cnngp.kernel(net, x, dtype=a.dtype)
            best = min(best, time.process_time() - c)
        path = "torch" if a.torch else "fused"
        print(
            f"{name:22s} {a.dtype} {path}  N={a.n}  {1e3 * best / pairs:8.2f} ms CPU per computed pair"
            f"  {1e3 * best / a.n**2:8.2f} ms per N² pair (1 thread)",
            flush=True,
        )


if __name__ == "__main__":
    main()

"""CPU time of every fused kernel call in one Gram matrix, grouped by kernel and tensor shapes.

    python benchmarks/profile_calls.py myrtle10 --n 6 --dtype float32
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

import cnngp
from cnngp.engine import fused
from profile_kernel import WORKLOADS, images


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workload")
    p.add_argument("--n", type=int, default=6)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    torch.set_num_threads(1)
    x = images(a.n)
    net = WORKLOADS[a.workload]()
    cnngp.kernel(net, x[:2], dtype=a.dtype)
    orig = fused._run_shares  # every fused kernel call goes through it
    log = []

    def timed(kernel, args, shares):
        c = time.process_time()
        orig(kernel, args, shares)
        sym = bool(args[-1]) if kernel.__name__ == "kron_conv" else None
        log.append((kernel.__name__, args[0].shape[1:], args[1].shape[1:], sym, args[0].shape[0], time.process_time() - c))

    fused._run_shares = timed
    c = time.process_time()
    cnngp.kernel(net, x, dtype=a.dtype)
    total = time.process_time() - c
    fused._run_shares = orig
    agg = collections.defaultdict(lambda: [0, 0, 0.0])
    for name, si, so, sym, b, dt in log:
        agg[(name, si, so, sym)][0] += 1
        agg[(name, si, so, sym)][1] += b
        agg[(name, si, so, sym)][2] += dt
    pairs = a.n * (a.n + 1) // 2
    print(f"total {1e3 * total / pairs:.2f} ms CPU per computed pair; kernels:")
    for (name, si, so, sym), (calls, items, dt) in agg.items():
        what = "self" if sym else "pair"
        print(f"  {name:12s} {what} {str(si):28s} -> {str(so):28s} {1e3 * dt / items:7.2f} ms per item  ({1e3 * dt / pairs:6.2f} per pair)")
    kern = sum(v[2] for v in agg.values())
    print(f"  outside the kernels: {1e3 * (total - kern) / pairs:.2f} ms per pair")


if __name__ == "__main__":
    main()

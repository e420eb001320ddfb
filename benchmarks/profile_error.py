"""Float32 error of the fused path on real images: max |K32 − K64| / max |K64| on an N×N Gram
matrix, and the fused float64 path against the reference torch path on a few images.

    python benchmarks/profile_error.py --n 16 --n-torch 4
"""

from __future__ import annotations

import argparse
import os

import cnngp
from profile_kernel import WORKLOADS, images


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--n-torch", type=int, default=3)
    p.add_argument("workloads", nargs="*", default=["cnngp14-gap", "cnngp14-matern", "myrtle10", "myrtle10-correlated"])
    a = p.parse_args()
    x = images(a.n)
    for name in a.workloads:
        net = WORKLOADS[name]()
        k64 = cnngp.kernel(net, x, dtype="float64")
        k32 = cnngp.kernel(net, x, dtype="float32").double()
        line = f"{name:22s} N={a.n}: float32 vs float64 {rel(k32, k64):.2e}"
        if a.n_torch:
            os.environ["CNNGP_FAST"] = "0"
            ref = cnngp.kernel(net, x[: a.n_torch], dtype="float64")
            os.environ.pop("CNNGP_FAST")
            line += f" | fused f64 vs torch f64 (N={a.n_torch}) {rel(k64[: a.n_torch, : a.n_torch], ref):.2e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

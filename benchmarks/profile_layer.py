"""Time one 32×32 conv + ReLU layer on the position-pair tensor: fused numba path vs torch.

    python benchmarks/profile_layer.py [--pairs 1] [--threads 2] [--conv independent|matern|avgpool]

Prints wall and CPU milliseconds per pair (min over repeats; CPU time shows contention).
"""

from __future__ import annotations

import argparse
import time

import torch

from cnngp import AvgPool, Conv, Matern, ReLU
from cnngp.engine import fused
from cnngp.kernels.state import KernelState


def timeit(fn, reps):
    best_w = best_c = float("inf")
    for _ in range(reps):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best_w = min(best_w, time.perf_counter() - w)
        best_c = min(best_c, time.process_time() - c)
    return best_w, best_c


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--conv", default="independent")
    p.add_argument("--torch", action="store_true", help="also time the torch path")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
        import numba

        numba.set_num_threads(a.threads)
    conv = {
        "independent": Conv(3),
        "matern": Conv(6, stride=2, correlation=Matern(1.5, 3.0)),
        "avgpool": AvgPool(2),
    }[a.conv]
    relu = ReLU()
    n, b = a.n, a.pairs
    for dtype in (torch.float64, torch.float32):
        g = torch.Generator().manual_seed(0)
        x = torch.rand((b, n * n, 8), generator=g, dtype=torch.float64)
        y = torch.rand((b, n * n, 8), generator=g, dtype=torch.float64)
        v = (x @ y.transpose(1, 2)).reshape(b, n, n, n, n).to(dtype)
        state = KernelState(v, (n, n), True)
        q = conv.output_spatial((n, n))
        var1 = torch.rand((b,) + q, generator=g, dtype=torch.float64).to(dtype) + 4
        var2 = torch.rand((b,) + q, generator=g, dtype=torch.float64).to(dtype) + 4
        plan = fused.conv_plan(conv, (n, n))
        act = relu if a.conv != "avgpool" else None
        ws = fused.Workspace()
        x = fused.to_fused(v, plan.layout, (n, n), ws)
        # the output in the layout of a following 3×3 conv (what the executor writes)
        out_layout = fused.conv_plan(Conv(3), q).layout

        var_roots = fused.roots(var1, var2)

        def run_fused():
            return fused.conv_fused(x, plan, out_layout, act, var_roots, False, ws, conv.weight_var, conv.bias_var)

        run_fused()
        w, c = timeit(fused, a.reps)
        line = f"{a.conv} {dtype}  fused: {1e3 * w / b:7.2f} ms/pair wall {1e3 * c / b:7.2f} cpu"
        if a.torch:

            def ref():
                s = conv.propagate(state, True)
                if act is not None:
                    s = relu.propagate(s.with_variances(var1, var2), True)
                return s.cross

            r = ref()
            err = ((run_fused().standard() - r).abs().max() / r.abs().max()).item()
            w, c = timeit(ref, max(2, a.reps // 4))
            line += f" | torch: {1e3 * w / b:7.2f} ms/pair wall {1e3 * c / b:7.2f} cpu  max rel diff {err:.1e}"
        print(line, flush=True)


if __name__ == "__main__":
    main()

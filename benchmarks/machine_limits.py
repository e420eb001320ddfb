#!/usr/bin/env python
"""Physical limits of this machine, as seen from torch (CPU) and numpy.

Measures, for float32 and float64:

* memory copy bandwidth  - ``dst.copy_(src)`` on arrays much larger than the
  caches; GB/s counts bytes read + bytes written (2 x array size).
* elementwise throughput - torch.acos / atan2 / sqrt / exp / mul with ``out=``,
  in G elements per second, for a large (memory-resident) array and a small
  (L2-resident) one; numpy.arccos likewise (numpy is single-threaded).
* matmul - square torch matmul, GFLOP/s = 2 n^3 / t.
* cache-resident copy - ``dst.copy_(src)`` with --l3-mib MiB per array (source and
  destination together inside the L3 cache): the bandwidth a layer of the fused path sees
  when a pair's position-pair tensors stay in the L3 cache.
* cnngp's arccos-free ReLU expectation - the numba kernel ``relu_pointwise`` (polynomial,
  see src/cnngp/engine/fused_kernels.py) on a cache-resident array, one thread: the transcendental
  cost per entry the fused path actually pays (it also takes a sqrt and a division per entry,
  which the fused conv does not).

torch figures are measured with 1 thread and with --threads threads.  Times
are the best of --reps repetitions after one warm-up (best-of, because the
CPUs may be shared with other processes: see loadavg in the JSON).  Usage::

    .venv/bin/python benchmarks/machine_limits.py [--threads 2] \
        [--json benchmarks/machine_limits.json]
"""

import argparse
import json
import os
import platform
import time

import numpy as np
import torch


def best_time(fn, reps, min_time=0.03):
    """Best wall time, and best CPU time (user+sys of the whole process), of one
    call of fn.  Each repetition loops fn enough times to last ~min_time seconds.
    Short windows and best-of make the wall figure robust to other processes
    sharing the CPUs; the CPU-time figure is immune to being descheduled."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / one))
    best, best_cpu = float("inf"), float("inf")
    for _ in range(reps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        t1 = time.perf_counter()
        c1 = time.process_time()
        best = min(best, (t1 - t0) / inner)
        best_cpu = min(best_cpu, (c1 - c0) / inner)
    return best, max(best_cpu, 1e-12)


LOAD0 = None


def relu_kernel(dt, n):
    """A call of cnngp's numba ReLU-expectation kernel on n cache-resident entries (one
    thread), or None where numba is missing."""
    try:
        from cnngp.engine import fused_kernels as fk
    except Exception:  # numba missing
        return None
    npd = np.float32 if dt == torch.float32 else np.float64
    rng = np.random.default_rng(0)
    w = 64
    vx = (rng.random((n // w, w)) + 0.5).astype(npd)
    vy = (rng.random((n // w, w)) + 0.5).astype(npd)
    k = ((rng.random((n // w, w)) * 1.8 - 0.9) * np.sqrt(vx * vy)).astype(npd)
    out = np.empty_like(k)
    return lambda: fk.relu_pointwise(k, vx, vy, out, npd(0.0), npd(1.0), 0, 1)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--big-mib", type=int, default=256,
                   help="size of the large arrays (MiB) for bandwidth tests")
    p.add_argument("--small-elems", type=int, default=1 << 14,
                   help="elements of the small (cache-resident) arrays")
    p.add_argument("--l3-mib", type=int, default=8,
                   help="size of each array (MiB) for the cache-resident copy")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__),
                                                  "machine_limits.json"))
    args = p.parse_args()
    for name, least in (("threads", 1), ("reps", 1), ("big_mib", 1), ("l3_mib", 1),
                        ("small_elems", 64), ("matmul_n", 1)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be an integer >= {least}, "
                    f"got {getattr(args, name)}")
    global LOAD0
    LOAD0 = list(os.getloadavg())
    torch.manual_seed(0)

    rows = []

    def add(test, dtype, threads, work, tt, unit, **extra):
        """work / time; tt = (wall, cpu).  value: per wall second (all threads);
        value_per_cpu_s: per CPU second (per core)."""
        wall, cpu = tt
        v, vc = work / wall / 1e9, work / cpu / 1e9
        rows.append(dict(test=test, dtype=dtype, threads=threads, value=v,
                         value_per_cpu_s=vc, unit=unit, **extra))
        print(f"{test:30s} {dtype:8s} {threads:3d} {v:10.3f} {vc:10.3f}  {unit}",
              flush=True)

    print(f"{'test':30s} {'dtype':8s} {'thr':>3s} {'wall':>10s} {'per-cpu':>10s}  unit")
    thread_counts = sorted({1, args.threads})
    for dt in (torch.float32, torch.float64):
        name = str(dt).replace("torch.", "")
        esize = torch.finfo(dt).bits // 8
        nbig = args.big_mib * 2 ** 20 // esize
        m = args.matmul_n
        src = torch.rand(nbig, dtype=dt)
        dst = torch.empty_like(src)
        arrays = {}
        for size_name, n in (("big", nbig), ("small", args.small_elems)):
            a = torch.rand(n, dtype=dt) * 1.8 - 0.9      # in (-0.9, 0.9) for acos
            b = torch.rand(n, dtype=dt) + 0.1
            arrays[size_name] = (n, a, b, torch.empty_like(a))
        nl3 = args.l3_mib * 2 ** 20 // esize
        src3, dst3 = torch.rand(nl3, dtype=dt), torch.empty(nl3, dtype=dt)
        A = torch.rand(m, m, dtype=dt)
        B = torch.rand(m, m, dtype=dt)
        C = torch.empty(m, m, dtype=dt)

        for thr in thread_counts:
            torch.set_num_threads(thr)
            # --- memory bandwidth
            add("torch copy_ bandwidth (r+w)", name, thr, 2 * nbig * esize,
                best_time(lambda: dst.copy_(src), args.reps), "GB/s",
                bytes=nbig * esize)
            add(f"torch copy_ bandwidth [L3 {args.l3_mib} MiB] (r+w)", name, thr,
                2 * nl3 * esize, best_time(lambda: dst3.copy_(src3), args.reps), "GB/s",
                bytes=nl3 * esize)
            # --- elementwise throughput, large (memory) and small (cache) arrays
            for size_name, (n, a, b, o) in arrays.items():
                ops = {
                    "acos": lambda: torch.acos(a, out=o),
                    "atan2": lambda: torch.atan2(a, b, out=o),
                    "sqrt": lambda: torch.sqrt(b, out=o),
                    "exp": lambda: torch.exp(a, out=o),
                    "mul": lambda: torch.mul(a, b, out=o),
                }
                for op, fn in ops.items():
                    add(f"torch.{op} [{size_name} {n}]", name, thr, n,
                        best_time(fn, args.reps), "Gelem/s", n=n)
            # --- matmul
            add(f"torch.matmul {m}x{m}", name, thr, 2 * m ** 3,
                best_time(lambda: torch.matmul(A, B, out=C), args.reps), "GFLOP/s", n=m)

        # numpy (single-threaded ufuncs)
        srcn, dstn = src.numpy(), dst.numpy()
        add("numpy copyto bandwidth (r+w)", name, 1, 2 * nbig * esize,
            best_time(lambda: np.copyto(dstn, srcn), args.reps), "GB/s",
            bytes=nbig * esize)
        for size_name, (n, a, b, o) in arrays.items():
            an, on = a.numpy(), o.numpy()
            add(f"numpy.arccos [{size_name} {n}]", name, 1, n,
                best_time(lambda: np.arccos(an, out=on), args.reps), "Gelem/s", n=n)
        relu = relu_kernel(dt, args.small_elems)
        if relu is not None:
            add(f"cnngp relu expectation [small {args.small_elems}]", name, 1,
                args.small_elems, best_time(relu, args.reps), "Gelem/s", n=args.small_elems)
        del src, dst, src3, dst3, arrays, A, B, C
    torch.set_num_threads(args.threads)

    info = dict(
        cpu=cpu_model(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        loadavg_before=LOAD0, loadavg_after=list(os.getloadavg()),
        torch=torch.__version__, numpy=np.__version__, python=platform.python_version(),
        torch_parallel_info=torch.__config__.parallel_info().splitlines()[:6],
        notes="copy GB/s counts read+write bytes; Gelem/s = output elements per second; "
              "value = per wall second with `threads` threads (best of reps); "
              "value_per_cpu_s = per CPU second (process user+sys time, i.e. per "
              "core; immune to being descheduled by other processes); numpy ufuncs "
              "are single-threaded; CPUs were shared with other jobs (loadavg)",
        results=rows,
    )
    if args.json:
        tmp = args.json + ".partial"  # written whole, then renamed: never a half-written file
        with open(tmp, "w") as f:
            json.dump(info, f, indent=1)
        os.replace(tmp, args.json)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()

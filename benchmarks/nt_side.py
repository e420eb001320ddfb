#!/usr/bin/env python
"""neural-tangents side of the cnngp speed benchmark.

Run with the python of a neural-tangents environment, e.g. the one made by
``bash /work/shared/bench/nt_env.sh /tmp/ntvenv``::

    PY=$(bash /work/shared/bench/nt_env.sh /tmp/ntvenv)
    # float64 without nt.batch (NT's fastest configuration), ~6-10 min at N=16:
    $PY benchmarks/nt_side.py --quick --summary benchmarks/nt_results.json \
        --kernels-out benchmarks/nt_kernels_n16.npz
    # more configurations, merged into the same files (same-config runs: the
    # faster is kept):
    $PY benchmarks/nt_side.py --workloads myrtle10paper_gap,cnngp14_diag \
        --configs float64:8,float32:0 --merge \
        --summary benchmarks/nt_results.json --kernels-out benchmarks/nt_kernels_n16.npz
    # every dtype x batch size {0,2,4,8} (slow: float32 cnngp14_full ~3-4 s/pair):
    $PY benchmarks/nt_side.py --out all.jsonl --summary all.json

JSON lines go to stdout, or to --out.

For each workload and each configuration (dtype x nt.batch batch size) it
computes the N x N NNGP Gram matrix ``kernel_fn(x, None, 'nngp')`` on the
first N CIFAR-10 training images (uint8 / 255, NHWC) and emits one JSON line:
workload, dtype, batch_size, compile_s, steady_s (best of --reps),
s_per_pair = steady_s / N^2 (neural-tangents computes all N^2 entries even
when x2 is None), peak_rss_mib (VmHWM, reset before each workload).

float64 needs JAX_ENABLE_X64 set before jax is imported, and memory that XLA
frees stays in the process, so the parent starts one fresh child process per
(dtype, workload, batch size) (``--child-dtype``) and merges their results
and kernels.  peak_rss_mib includes ~0.8 GiB of jax + tensorflow imports
(rss_before_mib).  steady_cpu_s / ms_cpu_per_pair (user+sys CPU time) are
less sensitive than wall time to other processes sharing the CPUs.

Workloads (3x3 stride-1 SAME convs, W_std=1, no bias, balanced ReLU
``ABRelu(0, sqrt 2)``):

* cnngp14_full      14 x [conv, relu], GlobalAvgPool, Dense(1)
* cnngp14_diag      14 x [conv, relu], Flatten, Dense(1)
* myrtle10_gap      3/3/3 [conv, relu] blocks separated by AvgPool(2, 2, VALID),
                    GlobalAvgPool, Dense(1)  (Shankar et al.'s Myrtle10)
* myrtle10paper_gap 3/3/2 blocks (the variant used for the paper's figures)
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

WORKLOADS = ["cnngp14_full", "cnngp14_diag", "myrtle10_gap", "myrtle10paper_gap"]
DEFAULT_DATA = "/work/shared/data/cifar10_subset.npz"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="neural-tangents NNGP timings for the cnngp benchmark",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--n", type=int, default=16, help="number of images N")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma list out of " + ",".join(WORKLOADS))
    p.add_argument("--dtypes", default="float64,float32")
    p.add_argument("--batch-sizes", default="0,2,4,8",
                   help="nt.batch batch sizes; 0 = no nt.batch (one jit)")
    p.add_argument("--configs", default=None,
                   help="explicit list 'dtype:bs,...' (e.g. float64:0,float32:4); "
                        "overrides --dtypes/--batch-sizes")
    p.add_argument("--quick", action="store_true",
                   help="only float64 without nt.batch")
    p.add_argument("--reps", type=int, default=1, help="steady repetitions (best of)")
    p.add_argument("--out", default=None, help="write JSON lines here (else stdout)")
    p.add_argument("--kernels-out", default=None, help="save the N x N kernels to this npz")
    p.add_argument("--summary", default=None,
                   help="write all records + best config per workload to this JSON file")
    p.add_argument("--merge", action="store_true",
                   help="merge into existing --summary / --kernels-out instead of "
                        "overwriting (records with the same workload/dtype/bs/n replaced)")
    p.add_argument("--get", choices=["nngp", "ntk"], default="nngp",
                   help="the kernel timed: NNGP (default) or NTK")
    p.add_argument("--child-dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-bs", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------
# memory helpers (Linux /proc)

def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib():
    v = _status_kib("VmHWM")
    if v < 0:
        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return v / 1024.0


# ---------------------------------------------------------------------------
# child: runs all (workload, batch size) pairs for one dtype

def child(args):
    x64 = args.child_dtype == "float64"
    os.environ["JAX_ENABLE_X64"] = "1" if x64 else "0"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import jax
    jax.config.update("jax_enable_x64", x64)
    import neural_tangents as nt
    from neural_tangents import stax

    dtype = np.float64 if x64 else np.float32
    relu = stax.ABRelu(0.0, 2.0 ** 0.5)   # balanced ReLU: sqrt2 * max(0, x)

    def conv_relu(k):
        out = []
        for _ in range(k):
            out += [stax.Conv(1, (3, 3), strides=(1, 1), padding="SAME",
                              W_std=1.0, b_std=None), relu]
        return out

    def pool():
        return stax.AvgPool((2, 2), strides=(2, 2), padding="VALID")

    def build(name):
        if name.startswith("cnngp14"):
            body = conv_relu(14)
        elif name == "myrtle10_gap":
            body = conv_relu(3) + [pool()] + conv_relu(3) + [pool()] + conv_relu(3)
        elif name == "myrtle10paper_gap":
            body = conv_relu(3) + [pool()] + conv_relu(3) + [pool()] + conv_relu(2)
        else:
            raise ValueError(name)
        head = ([stax.Flatten()] if name.endswith("_diag") else [stax.GlobalAvgPool()])
        head += [stax.Dense(1, W_std=1.0, b_std=None)]
        return stax.serial(*(body + head))[2]

    z = np.load(args.data)
    x = (z["x_train"][: args.n].astype(np.float64) / 255.0).astype(dtype)
    n = x.shape[0]

    def block(t):
        return jax.tree_util.tree_map(lambda a: a.block_until_ready(), t)

    bss = [int(b) for b in args.child_bs.split(",")]
    kernels = {}
    for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        for bs in bss:
            if bs and n % bs:
                print(f"# skip {name} bs={bs}: does not divide N={n}", file=sys.stderr)
                continue
            kernel_fn = build(name)
            reset_peak_rss()
            rss0 = _status_kib("VmRSS") / 1024.0
            compile_aot = None
            if bs:
                fn = nt.batch(kernel_fn, batch_size=bs, device_count=0,
                              store_on_device=True)
                call = lambda: fn(x, None, args.get)  # noqa: E731
            else:
                jfn = jax.jit(kernel_fn, static_argnames=("get",))
                t0 = time.perf_counter()
                compiled = jfn.lower(x, None, get=args.get).compile()
                compile_aot = time.perf_counter() - t0
                call = lambda: compiled(x, None)  # noqa: E731
            t0 = time.perf_counter()
            k = block(call())
            t_first = time.perf_counter() - t0
            steady, cpu = [], []
            for _ in range(max(args.reps, 1)):
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                t0 = time.perf_counter()
                k = block(call())
                steady.append(time.perf_counter() - t0)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
            i = int(np.argmin(steady))
            t = steady[i]
            k = np.asarray(k, dtype=np.float64).reshape(n, n)
            rec = dict(
                workload=name, dtype=np.dtype(dtype).name, batch_size=bs, n=n, get=args.get,
                compile_s=(compile_aot if compile_aot is not None
                           else max(t_first - t, 0.0)),
                compile_method="aot" if compile_aot is not None else "first_minus_steady",
                first_call_s=t_first + (compile_aot or 0.0),
                steady_s=t, steady_all_s=steady,
                s_per_pair=t / (n * n), ms_per_pair=1e3 * t / (n * n),
                cpu_over_wall=cpu[i] / t if t > 0 else None,
                steady_cpu_s=cpu[i],   # user+sys CPU of the best steady call
                ms_cpu_per_pair=1e3 * cpu[i] / (n * n),
                peak_rss_mib=peak_rss_mib(),
                rss_before_mib=rss0,   # RSS right before (jax/nt/tf imported)
                k_diag_mean=float(np.diag(k).mean()),
                k_symmetry_maxabs=float(np.abs(k - k.T).max()),
                versions=dict(python=platform.python_version(), jax=jax.__version__,
                              neural_tangents=nt.__version__),
                cpu_count=os.cpu_count(),
                loadavg_1min_after=os.getloadavg()[0],
            )
            kernels[f"{name}__{rec['dtype']}__bs{bs}" + ("" if args.get == "nngp" else f"__{args.get}")] = k
            print("RESULT " + json.dumps(rec), flush=True)
            print(f"# {name:18s} {rec['dtype']} bs={bs}: compile {rec['compile_s']:.2f}s "
                  f"steady {t:.3f}s = {rec['ms_per_pair']:.3f} ms/pair "
                  f"peakRSS {rec['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
            if args.kernels_out:   # save incrementally so partial runs are kept
                np.savez(args.kernels_out, **kernels)


# ---------------------------------------------------------------------------
# parent: one subprocess per dtype, merge outputs

def parent(args):
    if args.quick:
        plan = {"float64": [0]}
    elif args.configs:
        plan = {}
        for item in args.configs.split(","):
            d, b = item.split(":")
            plan.setdefault(d.strip(), []).append(int(b))
    else:
        bss = [int(b) for b in args.batch_sizes.split(",")]
        plan = {d.strip(): bss for d in args.dtypes.split(",") if d.strip()}
    for d in plan:
        if d not in ("float32", "float64"):
            raise SystemExit(f"unknown dtype {d}")
    for w in args.workloads.split(","):
        if w.strip() and w.strip() not in WORKLOADS:
            raise SystemExit(f"unknown workload {w}")

    out = open(args.out, "w") if args.out else sys.stdout
    tmpdir = tempfile.mkdtemp(prefix="nt_side_")
    kernels, records = {}, []
    rc = 0
    # one fresh process per (dtype, workload, batch size): x64 must be fixed before jax is
    # imported, and memory freed by XLA stays in the process (RSS), which would
    # make the VmHWM of later workloads meaningless
    jobs = [(d, w.strip(), [b]) for d, bss in plan.items()
            for w in args.workloads.split(",") if w.strip() for b in bss]
    for d, w, bss in jobs:
        kpath = os.path.join(tmpdir, f"k_{d}_{w}_{bss[0]}.npz")
        cmd = [sys.executable, os.path.abspath(__file__), "--child-dtype", d,
               "--child-bs", ",".join(map(str, bss)), "--data", args.data,
               "--n", str(args.n), "--workloads", w,
               "--reps", str(args.reps), "--kernels-out", kpath, "--get", args.get]
        env = dict(os.environ, JAX_ENABLE_X64="1" if d == "float64" else "0")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        for line in proc.stdout:
            if line.startswith("RESULT "):
                out.write(line[len("RESULT "):])
                out.flush()
                records.append(json.loads(line[len("RESULT "):]))
        rc = rc or proc.wait()
        if os.path.exists(kpath):
            import numpy as np
            with np.load(kpath) as z:
                kernels.update({k: z[k] for k in z.files})
    if args.kernels_out and kernels:
        import numpy as np
        if args.merge and os.path.exists(args.kernels_out):
            with np.load(args.kernels_out) as z:
                kernels = {**{k: z[k] for k in z.files}, **kernels}
        np.savez_compressed(args.kernels_out, **kernels)
        print(f"# saved {len(kernels)} kernels to {args.kernels_out}", file=sys.stderr)
    if args.out:
        out.close()
    if args.summary:
        write_summary(args.summary, records, args.merge)
    return rc


def _key(r):
    return (r["workload"], r["dtype"], r["batch_size"], r["n"])


def _cpu_ms(r):
    if r.get("ms_cpu_per_pair") is None and r.get("cpu_over_wall") is not None:
        r["ms_cpu_per_pair"] = r["ms_per_pair"] * r["cpu_over_wall"]
    return r.get("ms_cpu_per_pair")


def merge_records(old, new):
    """Union of record lists; for the same workload/dtype/bs/n keep the faster
    run (best-of, like --reps) and list the other runs' steady times."""
    out = {}
    for r in list(old) + list(new):
        k = _key(r)
        if k in out:
            a, b = out[k], r
            keep, other = (a, b) if a["s_per_pair"] <= b["s_per_pair"] else (b, a)
            keep = dict(keep)
            keep["other_runs_steady_s"] = (keep.get("other_runs_steady_s", []) +
                                           [other["steady_s"]] +
                                           other.get("other_runs_steady_s", []))
            out[k] = keep
        else:
            out[k] = r
    return list(out.values())


def write_summary(path, records, merge):
    old = []
    if merge and os.path.exists(path):
        with open(path) as f:
            old = json.load(f).get("records", [])
    allrec = merge_records(old, records)
    allrec.sort(key=lambda r: (r["n"], WORKLOADS.index(r["workload"]),
                               r["dtype"], r["batch_size"]))
    for r in allrec:
        _cpu_ms(r)

    def best_of(recs, metric):
        best = {}
        for r in recs:
            if r.get(metric) is None:
                continue
            k = f"{r['workload']}@n{r['n']}"
            if k not in best or r[metric] < best[k][metric]:
                best[k] = {f: r.get(f) for f in ("dtype", "batch_size", "ms_per_pair",
                                                 "ms_cpu_per_pair", "peak_rss_mib")}
        return best

    with open(path, "w") as f:
        json.dump(dict(
            description="neural-tangents NNGP timings (benchmarks/nt_side.py). "
                        "ms_per_pair = best steady wall time / N^2; ms_cpu_per_pair = "
                        "user+sys CPU time of that call / N^2 (robust to other jobs "
                        "sharing the 2 CPUs; wall >= cpu/2 with 2 cores).",
            best_by_wall=best_of(allrec, "ms_per_pair"),
            best_by_cpu=best_of(allrec, "ms_cpu_per_pair"),
            best_float64_by_wall=best_of([r for r in allrec if r["dtype"] == "float64"],
                                         "ms_per_pair"),
            records=allrec), f, indent=1)
    print(f"# wrote {len(allrec)} records to {path}", file=sys.stderr)


if __name__ == "__main__":
    a = parse_args()
    if a.child_dtype:
        child(a)
    else:
        sys.exit(parent(a))

#!/usr/bin/env python
"""cnngp vs neural-tangents, side by side, in one run (issue 5, "Speed").

    .venv/bin/python benchmarks/run.py                 # full: N=16, all workloads, NT too, N=64 Gram
    .venv/bin/python benchmarks/run.py --no-nt         # NT numbers from benchmarks/nt_results.json
    .venv/bin/python benchmarks/run.py --quick         # N=4, no N=64 Gram run (a smoke test)
    .venv/bin/python benchmarks/run.py --workloads cnngp14_diag,myrtle10_gap --n 8

Inputs: the first N images of ``x_train`` in ../shared/data/cifar10_subset.npz (uint8, scaled by
1/255 by both sides), written to a temporary ``x.npz``.

cnngp is timed as a user runs it: one ``cnngp kernel --arch A --readout R --x1 x.npz --dtype D
--quiet`` process per measurement, wall time (``time.perf_counter``) around the whole process,
start-up and imports included; peak memory and CPU time are that process's own ``wait4``
rusage (``ru_maxrss``, user+sys).  Before timing, each (arch, readout, dtype) is run once on 2
images so that numba's on-disk cache is warm (a user pays the compile once per install; the
warm-up wall time is recorded).  Both float32 and float64 are timed.

neural-tangents runs through ``benchmarks/nt_side.py`` with the neural-tangents environment's
python (``bash ../shared/bench/nt_env.sh /tmp/ntvenv``), one fresh process per workload, in
its best configuration on this machine (float64, no ``nt.batch``: see nt_results.json); its
time is the steady (post-compile) call, its memory the child's VmHWM (includes ~0.8 GiB of
jax + tensorflow imports).  With ``--no-nt`` the NT numbers come from
``benchmarks/nt_results.json`` and the reference kernels from ``benchmarks/nt_kernels_n16.npz``
(N=16 only), and the output says so.

Time per pair = whole N x N Gram matrix time / N^2 for both (cnngp computes only the
N(N+1)/2 pairs x <= x', so its symmetric saving counts).  Relative error = max over entries
of |K - K_ref| / |K_ref| (all entries are positive for these ReLU networks), K_ref = the NT
float64 kernel where NT has the workload; otherwise (myrtle10_correlated, or no NT kernel for
this N) cnngp's own float64 reference path: the plain torch implementation of every layer,
fast paths disabled with ``CNNGP_FAST=0``.  The ratio NT/cnngp uses the cheapest cnngp dtype
whose error is <= 1e-5 (float32 if it qualifies, else float64).

Results: a table on stdout, PASS/FAIL lines for the acceptance targets, and
benchmarks/results.json (machine info, load averages, every measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
DEFAULT_DATA = SHARED / "data" / "cifar10_subset.npz"
NT_ENV_SH = SHARED / "bench" / "nt_env.sh"
NT_VENV = Path(tempfile.gettempdir()) / "ntvenv"

TOL = 1e-5  # max relative error on the Gram matrix for a dtype to count

#: name -> cnngp CLI arch/readout and the nt_side.py workload with the same network (or None)
WORKLOADS = {
    "cnngp14_full": dict(arch="cnngp14", readout="constant", nt="cnngp14_full",
                         what="CNNGP-14, global pooling (full position-pair covariance)"),
    "myrtle10_gap": dict(arch="myrtle10", readout="constant", nt="myrtle10_gap",
                         what="Myrtle10 3/3/3, global pooling"),
    "myrtle10paper_gap": dict(arch="myrtle10-paper", readout="constant", nt="myrtle10paper_gap",
                              what="Myrtle10 3/3/2 (paper), global pooling"),
    "myrtle10_correlated": dict(arch="myrtle10-correlated", readout="constant", nt=None,
                                what="Myrtle10 3/3/2, pool+conv -> 6x6 s2 Matern-3/2 conv"),
    "cnngp14_diag": dict(arch="cnngp14", readout="independent", nt="cnngp14_diag",
                         what="CNNGP-14, flatten readout (spatial diagonal only)"),
}

#: acceptance: workload -> minimum NT/cnngp ratio
SPEEDUP_TARGETS = {"cnngp14_full": 10.0, "myrtle10_gap": 5.0, "cnngp14_diag": 1.0}
CORRELATED_MAX_COST = 2.0  # myrtle10_correlated cost <= 2x myrtle10paper_gap's (same dtype)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="time cnngp and neural-tangents side by side on real CIFAR-10 images",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: N=4 (unless --n is given) and no Gram-matrix run")
    p.add_argument("--n", type=int, default=None, help="number of images N (default 16)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help="comma list out of " + ",".join(WORKLOADS))
    p.add_argument("--dtypes", default="float32,float64", help="cnngp dtypes to time")
    p.add_argument("--reps", type=int, default=1,
                   help="cnngp timed runs per configuration (best of; default 1)")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the 2-image warm-up run (numba cache) of each configuration")
    p.add_argument("--no-nt", action="store_true",
                   help="do not run neural-tangents: use benchmarks/nt_results.json and "
                        "benchmarks/nt_kernels_n16.npz")
    p.add_argument("--nt-python", default=None,
                   help="python of a neural-tangents environment (default: from "
                        f"bash {NT_ENV_SH} {NT_VENV})")
    p.add_argument("--nt-configs", default="float64:0",
                   help="nt_side.py configurations dtype:batch_size,... (best wall time used; "
                        "default float64:0, NT's best here)")
    p.add_argument("--nt-reps", type=int, default=1, help="NT steady repetitions (best of)")
    p.add_argument("--nt-results", default=str(HERE / "nt_results.json"))
    p.add_argument("--nt-kernels", default=str(HERE / "nt_kernels_n16.npz"))
    p.add_argument("--gram-n", type=int, default=64,
                   help="N of the Gram-matrix run (cnngp only); 0 = skip (default 64)")
    p.add_argument("--gram-workload", default="cnngp14_full")
    p.add_argument("--gram-dtype", default="float32")
    p.add_argument("--no-gram", action="store_true", help="skip the Gram-matrix run")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds allowed per cnngp or NT process (default 3600)")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(HERE / "results.json"),
                   help="results JSON (default benchmarks/results.json); '' = do not write")
    p.add_argument("--kernels-out", default=None,
                   help="also save every kernel computed to this .npz")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    if a.n is None:
        a.n = 4 if a.quick else 16
    if a.quick or a.no_gram:
        a.gram_n = 0
    a.workloads = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for w in a.workloads + ([a.gram_workload] if a.gram_n else []):
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    a.dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    for d in a.dtypes + [a.gram_dtype]:
        if d not in ("float32", "float64"):
            p.error(f"unknown dtype {d!r}")
    if a.n < 2:
        p.error("--n must be at least 2")
    return a


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -- machine ------------------------------------------------------------------------------------


def machine_info():
    info = {"hostname": platform.node(), "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, val = line.partition(":")
            key, val = key.strip(), val.strip()
            if key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
                       "L2 cache", "L3 cache", "Hypervisor vendor"):
                info["lscpu_" + key.lower().replace(" ", "_").replace("(s)", "s")] = val
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:  # versions of the installed cnngp environment (this interpreter)
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    try:
        import numba

        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = None
    info["numpy"] = np.__version__
    return info


def loadavg():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


# -- processes ----------------------------------------------------------------------------------


def run_process(cmd, env=None, timeout=None, log_path=None):
    """Run ``cmd``; return wall seconds, the child's own rusage (peak RSS, CPU) and exit code.

    ``os.wait4`` gives the rusage of exactly this child (and descendants it waited for), so
    the peak RSS is this process's, not a running maximum over all children.
    """
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    timed_out = threading.Event()

    def kill():
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    timer = threading.Timer(timeout, kill) if timeout else None
    if timer:
        timer.start()
    try:
        _, status, ru = os.wait4(proc.pid, 0)
    finally:
        if timer:
            timer.cancel()
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if log_path:
        out.close()
    return dict(wall_s=wall, rc=proc.returncode, timed_out=timed_out.is_set(),
                peak_rss_mib=ru.ru_maxrss / 1024.0, cpu_s=ru.ru_utime + ru.ru_stime)


def tail(path, n=6):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:]).strip()
    except OSError:
        return ""


def cnngp_command():
    exe = Path(sys.executable).with_name("cnngp")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; from cnngp.cli.main import main; sys.exit(main())"]


def run_cnngp(tmp, wl, xfile, dtype, timeout, tag, fast=True):
    """One ``cnngp kernel`` process; returns the measurement and the kernel (float64)."""
    spec = WORKLOADS[wl]
    kfile = tmp / f"k_{tag}.npz"
    cmd = cnngp_command() + ["kernel", "--arch", spec["arch"], "--readout", spec["readout"],
                             "--x1", str(xfile), "--out", str(kfile), "--dtype", dtype,
                             "--quiet"]
    env = dict(os.environ)
    if not fast:
        env["CNNGP_FAST"] = "0"
    lavg = loadavg()
    r = run_process(cmd, env=env, timeout=timeout, log_path=tmp / f"log_{tag}.txt")
    r.update(dtype=dtype, fast=fast, loadavg_before=lavg, command=" ".join(cmd))
    k = None
    if r["rc"] == 0 and kfile.exists():
        with np.load(kfile) as z:
            k = np.asarray(z["kernel"], np.float64)
    else:
        r["error"] = ("timed out" if r["timed_out"] else f"exit {r['rc']}: ") + \
            tail(tmp / f"log_{tag}.txt")
    return r, k


# -- neural-tangents ----------------------------------------------------------------------------


def nt_python(arg):
    if arg:
        return arg
    if NT_ENV_SH.exists():
        log(f"# neural-tangents env: bash {NT_ENV_SH} {NT_VENV}")
        res = subprocess.run(["bash", str(NT_ENV_SH), str(NT_VENV)], capture_output=True,
                             text=True)
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.strip().splitlines()[-1]
        raise SystemExit(f"nt_env.sh failed:\n{res.stderr[-2000:]}\n(use --nt-python or --no-nt)")
    cand = NT_VENV / "bin" / "python"
    if cand.exists():
        return str(cand)
    raise SystemExit("no neural-tangents environment found: pass --nt-python or --no-nt")


def run_nt(tmp, ntpy, wl_nt, n, configs, reps, data, timeout):
    """nt_side.py for one workload; returns (records, {dtype: kernel}) ."""
    jsonl, kpath = tmp / f"nt_{wl_nt}.jsonl", tmp / f"nt_{wl_nt}.npz"
    cmd = [ntpy, str(HERE / "nt_side.py"), "--configs", configs, "--n", str(n),
           "--workloads", wl_nt, "--data", str(data), "--reps", str(reps),
           "--out", str(jsonl), "--kernels-out", str(kpath)]
    r = run_process(cmd, timeout=timeout, log_path=tmp / f"log_nt_{wl_nt}.txt")
    recs = []
    if jsonl.exists():
        recs = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    kernels = {}
    if kpath.exists():
        with np.load(kpath) as z:
            kernels = {k: np.asarray(z[k], np.float64) for k in z.files}
    if not recs:
        return None, None, ("timed out" if r["timed_out"] else tail(tmp / f"log_nt_{wl_nt}.txt"))
    best = min(recs, key=lambda q: q["ms_per_pair"])
    ref = None
    f64 = [q for q in recs if q["dtype"] == "float64"]
    if f64:
        q = min(f64, key=lambda q: q["batch_size"])
        ref = kernels.get(f"{wl_nt}__float64__bs{q['batch_size']}")
    rec = dict(source="measured in this run", dtype=best["dtype"],
               batch_size=best["batch_size"], ms_per_pair=best["ms_per_pair"],
               ms_cpu_per_pair=best.get("ms_cpu_per_pair"), peak_rss_mib=best["peak_rss_mib"],
               compile_s=best.get("compile_s"), loadavg_after=best.get("loadavg_1min_after"),
               process_wall_s=r["wall_s"])
    return rec, ref, None


def nt_cached(wl_nt, n, results_path, kernels_path):
    """NT numbers from an earlier nt_side.py run (float64, no nt.batch preferred)."""
    rec, ref = None, None
    try:
        with open(results_path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None, None
    recs = [r for r in res.get("records", []) if r["workload"] == wl_nt and r["n"] == n]
    pick = [r for r in recs if r["dtype"] == "float64" and r["batch_size"] == 0] or \
        sorted(recs, key=lambda r: r["ms_per_pair"])
    if pick:
        b = pick[0]
        cpu = b.get("ms_cpu_per_pair")
        if cpu is None and b.get("cpu_over_wall") is not None:
            cpu = b["ms_per_pair"] * b["cpu_over_wall"]
        rec = dict(source=f"cached: {Path(results_path).name}", dtype=b["dtype"],
                   batch_size=b["batch_size"], ms_per_pair=b["ms_per_pair"],
                   ms_cpu_per_pair=cpu, peak_rss_mib=b["peak_rss_mib"],
                   compile_s=b.get("compile_s"), loadavg_after=b.get("loadavg_1min_after"))
    try:
        with np.load(kernels_path) as z:
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            key = f"{wl_nt}__float64__bs0"
            if key in z.files and z[key].shape == (n, n):
                ref = np.asarray(z[key], np.float64)
                if rec is not None:
                    rec["reference_from"] = f"{Path(kernels_path).name} ({meta.get('images', '')})"
    except (OSError, ValueError, KeyError):
        pass
    return rec, ref


# -- comparison ---------------------------------------------------------------------------------


def rel_err(k, ref):
    if k is None or ref is None or k.shape != ref.shape:
        return None
    den = np.maximum(np.abs(ref), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(k - ref) / den))


def fmt(v, spec=".3g", none="-"):
    return none if v is None else format(v, spec)


def limits_floor(n):
    """Floor for cnngp14_full per pair from benchmarks/machine_limits.json (float32)."""
    try:
        with open(HERE / "machine_limits.json") as f:
            ml = json.load(f)
    except (OSError, ValueError):
        return None
    cores = ml.get("cpu_count") or os.cpu_count() or 1

    def get(test, dtype, threads):
        for r in ml.get("results", []):
            if r["test"].startswith(test) and r["dtype"] == dtype and r["threads"] == threads:
                return r
        return None

    bw = get("torch copy_ bandwidth (r+w)", "float32", cores)
    acos = get("torch.acos [big", "float32", cores)
    if not bw or not acos:
        return None
    entries = 14 * 32**4                    # position-pair entries written per pair
    bytes_ = entries * 8                    # float32: read 4 B + write 4 B per entry
    out = dict(entries_per_pair=entries, bytes_per_pair=bytes_, limits_loadavg=ml.get(
        "loadavg_before"))
    # idle-machine estimate: the best copy rate per CPU-second (not scaled by cores: they
    # share the memory system) and the best acos rate per CPU-second times the cores
    bw_idle = max(r["value_per_cpu_s"] for r in ml["results"]
                  if r["test"].startswith("torch copy_ bandwidth (r+w)") and r["dtype"] == "float32")
    acos_idle = cores * max(r["value_per_cpu_s"] for r in ml["results"]
                            if r["test"].startswith("torch.acos [big")
                            and r["dtype"] == "float32")
    for label, scale_bw, scale_tr in (
            ("measured", bw["value"], acos["value"]),
            ("idle_estimate", bw_idle, acos_idle)):
        mem_ms = 1e3 * bytes_ / (scale_bw * 1e9)
        tr_ms = 1e3 * entries / (scale_tr * 1e9)
        out[label] = dict(bandwidth_gbs=scale_bw, acos_gelem_s=scale_tr, memory_ms=mem_ms,
                          acos_ms=tr_ms, floor_ms_per_computed_pair=mem_ms + tr_ms,
                          floor_ms_per_n2_pair=(mem_ms + tr_ms) * (n + 1) / (2 * n))
    # the floor of the kernel cnngp runs: its arccos-free ReLU expectation (one thread's rate
    # times the cores: it is compute-bound) and one pass through the L3 cache per layer
    relu = get("cnngp relu expectation", "float32", 1)
    l3 = get("torch copy_ bandwidth [L3", "float32", cores)
    if relu and l3:
        relu_ms = 1e3 * entries / (cores * relu["value"] * 1e9)
        l3_ms = 1e3 * bytes_ / (l3["value"] * 1e9)
        out["polynomial_relu"] = dict(
            relu_gelem_s=cores * relu["value"], l3_bandwidth_gbs=l3["value"], relu_ms=relu_ms,
            l3_ms=l3_ms, floor_ms_per_computed_pair=relu_ms + l3_ms,
            floor_ms_per_n2_pair=(relu_ms + l3_ms) * (n + 1) / (2 * n))
    return out


# -- main ---------------------------------------------------------------------------------------


def main(argv=None):
    a = parse_args(argv)
    t_start = time.perf_counter()
    machine = machine_info()
    lavg0 = loadavg()
    machine["loadavg_start"] = lavg0
    warn = []
    if lavg0 and lavg0[0] > 1.5:
        warn.append(f"load average {lavg0[0]:.2f} > 1.5 at start: other jobs share the "
                    f"{machine.get('cpu_count')} CPUs, wall-clock timings are unreliable "
                    "(CPU-time columns are less affected)")
    for w in warn:
        log("WARNING: " + w)

    tmp = Path(tempfile.mkdtemp(prefix="cnngp_bench_"))
    with np.load(a.data) as z:
        xall = z["x_train"]
        if xall.dtype != np.uint8:
            raise SystemExit(f"{a.data}: expected uint8 x_train, got {xall.dtype}")
        nmax = max(a.n, a.gram_n)
        if nmax > len(xall):
            raise SystemExit(f"asked for {nmax} images, {a.data} has {len(xall)}")
        xs = {m: tmp / f"x{m}.npz" for m in {2, a.n, a.gram_n} if m}
        for m, path in xs.items():
            np.savez(path, x=np.ascontiguousarray(xall[:m]))
    log(f"# images: first {a.n} of {a.data}:x_train (uint8/255); tmp {tmp}")

    # fixed cost of a cnngp process: python start + `import torch, cnngp` (best of 2)
    start = [run_process([sys.executable, "-c", "import torch, cnngp.cli.main"], timeout=300)
             for _ in range(2)]
    start_s = min(r["wall_s"] for r in start)
    machine["cnngp_process_start_s"] = round(start_s, 3)

    ntpy = None
    if not a.no_nt and any(WORKLOADS[w]["nt"] for w in a.workloads):
        ntpy = nt_python(a.nt_python)

    kernels_saved = {}
    rows = {}
    for wl in a.workloads:
        spec = WORKLOADS[wl]
        row = dict(workload=wl, arch=spec["arch"], readout=spec["readout"], what=spec["what"],
                   n=a.n, pairs_computed=a.n * (a.n + 1) // 2, cnngp={}, nt=None)
        rows[wl] = row
        log(f"\n## {wl}: {spec['what']}")
        ks = {}
        for dtype in a.dtypes:
            if not a.no_warmup:
                w, _ = run_cnngp(tmp, wl, xs[2], dtype, a.timeout, f"{wl}_{dtype}_warm")
                row.setdefault("warmup_s", {})[dtype] = round(w["wall_s"], 2)
            best = None
            for rep in range(max(a.reps, 1)):
                m, k = run_cnngp(tmp, wl, xs[a.n], dtype, a.timeout, f"{wl}_{dtype}_{rep}")
                if k is not None:
                    ks[dtype] = k
                if best is None or (m.get("error") is None and
                                    (best.get("error") or m["wall_s"] < best["wall_s"])):
                    best = m
            best["ms_per_pair"] = 1e3 * best["wall_s"] / a.n**2
            best["ms_cpu_per_pair"] = 1e3 * best["cpu_s"] / a.n**2
            row["cnngp"][dtype] = best
            log(f"   cnngp {dtype}: {best['wall_s']:.2f} s = {best['ms_per_pair']:.2f} ms/pair, "
                f"peak {best['peak_rss_mib']:.0f} MiB" + (f"  ERROR {best['error']}"
                                                          if best.get("error") else ""))
        # neural-tangents + the reference kernel
        ref, ref_name = None, None
        if spec["nt"]:
            if a.no_nt:
                nt, ref = nt_cached(spec["nt"], a.n, a.nt_results, a.nt_kernels)
                if nt is None:
                    row["nt_error"] = f"no N={a.n} record in {a.nt_results}"
            else:
                log(f"   neural-tangents ({a.nt_configs}) ...")
                nt, ref, err = run_nt(tmp, ntpy, spec["nt"], a.n, a.nt_configs, a.nt_reps,
                                      a.data, a.timeout)
                if err:
                    row["nt_error"] = err
            row["nt"] = nt
            if nt:
                log(f"   NT {nt['dtype']} bs={nt['batch_size']}: {nt['ms_per_pair']:.2f} ms/pair "
                    f"({nt['source']}), peak {nt['peak_rss_mib']:.0f} MiB")
            if ref is not None:
                ref_name = "neural-tangents float64"
                kernels_saved[f"{wl}__nt_float64"] = ref
        if ref is None:
            log("   reference: cnngp float64, torch path (CNNGP_FAST=0) ...")
            m, ref = run_cnngp(tmp, wl, xs[a.n], "float64", a.timeout, f"{wl}_ref", fast=False)
            m["ms_per_pair"] = 1e3 * m["wall_s"] / a.n**2
            row["reference_run"] = m
            if ref is not None:
                ref_name = "cnngp float64, torch path (CNNGP_FAST=0)"
                kernels_saved[f"{wl}__ref_torch_float64"] = ref
                log(f"   reference: {m['ms_per_pair']:.2f} ms/pair")
            else:
                log(f"   reference FAILED: {m.get('error')}")
        row["reference"] = ref_name
        for dtype, k in ks.items():
            kernels_saved[f"{wl}__cnngp_{dtype}"] = k
            row["cnngp"][dtype]["rel_err"] = rel_err(k, ref)
        # chosen configuration: cheapest dtype meeting the tolerance
        ok = [d for d in ("float32", "float64") if d in row["cnngp"]
              and row["cnngp"][d].get("rel_err") is not None
              and row["cnngp"][d]["rel_err"] <= TOL and not row["cnngp"][d].get("error")]
        row["chosen_dtype"] = min(ok, key=lambda d: row["cnngp"][d]["ms_per_pair"]) if ok else None
        c = row["cnngp"].get(row["chosen_dtype"]) if row["chosen_dtype"] else None
        nt = row["nt"]
        row["ratio_nt_over_cnngp"] = (nt["ms_per_pair"] / c["ms_per_pair"]) if (c and nt) else None
        # supplementary: cnngp without its fixed process start (python + torch import)
        row["ratio_ex_start"] = (nt["ms_per_pair"] / (1e3 * (c["wall_s"] - start_s) / a.n**2)) \
            if (c and nt and c["wall_s"] > start_s) else None
        row["ratio_cpu"] = (nt["ms_cpu_per_pair"] / c["ms_cpu_per_pair"]) \
            if (c and nt and nt.get("ms_cpu_per_pair") and c["ms_cpu_per_pair"] > 0) else None
        for d, m in row["cnngp"].items():
            log(f"   cnngp {d}: rel. error {fmt(m.get('rel_err'))} vs {ref_name}")

    # -- Gram-matrix run: symmetric saving ------------------------------------------------------
    gram = None
    if a.gram_n:
        wl, d = a.gram_workload, a.gram_dtype
        log(f"\n## Gram matrix N={a.gram_n}: {wl} {d} (cnngp only)")
        if not a.no_warmup and not (wl in rows and d in rows[wl]["cnngp"]):
            run_cnngp(tmp, wl, xs[2], d, a.timeout, "gram_warm")
        m, k = run_cnngp(tmp, wl, xs[a.gram_n], d, a.timeout, f"gram_{a.gram_n}")
        n = a.gram_n
        m["ms_per_pair"] = 1e3 * m["wall_s"] / n**2
        m["ms_per_computed_pair"] = 1e3 * m["wall_s"] / (n * (n + 1) / 2)
        gram = dict(workload=wl, n=n, pairs_computed=n * (n + 1) // 2, **m)
        if k is not None:
            kernels_saved[f"gram{n}__{wl}__cnngp_{d}"] = k
            gram["symmetry_maxabs"] = float(np.abs(k - k.T).max())
            base = rows.get(wl)
            ref16 = kernels_saved.get(f"{wl}__nt_float64",
                                      kernels_saved.get(f"{wl}__ref_torch_float64"))
            if ref16 is not None:
                gram["rel_err_first_block"] = rel_err(k[:a.n, :a.n], ref16)
            if base and d in base["cnngp"]:
                b = base["cnngp"][d]
                gram["ms_per_pair_at_n"] = {str(a.n): b["ms_per_pair"], str(n): m["ms_per_pair"]}
                gram["ms_per_computed_pair_at_n"] = {
                    str(a.n): 1e3 * b["wall_s"] / (a.n * (a.n + 1) / 2),
                    str(n): m["ms_per_computed_pair"]}
        log(f"   {m['wall_s']:.1f} s: {m['ms_per_pair']:.2f} ms per N^2 pair, "
            f"{m['ms_per_computed_pair']:.2f} ms per computed pair"
            + (f"  ERROR {m['error']}" if m.get("error") else ""))

    # -- report ---------------------------------------------------------------------------------
    lavg1 = loadavg()
    floor = limits_floor(a.n)
    acceptance = []

    def add(name, target, value, passed, note=""):
        acceptance.append(dict(check=name, target=target, value=value, passed=bool(passed),
                               note=note))

    for wl, target in SPEEDUP_TARGETS.items():
        if wl not in rows:
            continue
        row = rows[wl]
        r = row["ratio_nt_over_cnngp"]
        note = (f"cnngp {row['chosen_dtype']}" if row["chosen_dtype"]
                else f"no cnngp dtype within {TOL:g} of the reference")
        if row["nt"] and row["nt"]["source"] != "measured in this run":
            note += "; NT " + row["nt"]["source"]
        add(f"{wl} NT/cnngp >= {target:g}x at rel.err <= {TOL:g}", f">= {target:g}", r,
            r is not None and r >= target, note)
    if "myrtle10_correlated" in rows and "myrtle10paper_gap" in rows:
        c, p = rows["myrtle10_correlated"], rows["myrtle10paper_gap"]
        d = c["chosen_dtype"]
        v = None
        if d and d in p["cnngp"] and not p["cnngp"][d].get("error"):
            v = c["cnngp"][d]["ms_per_pair"] / p["cnngp"][d]["ms_per_pair"]
        add(f"myrtle10_correlated cost <= {CORRELATED_MAX_COST:g}x myrtle10paper_gap "
            f"(cnngp, same dtype, rel.err <= {TOL:g})", f"<= {CORRELATED_MAX_COST:g}", v,
            v is not None and v <= CORRELATED_MAX_COST, f"dtype {d}")

    print()
    print(f"cnngp vs neural-tangents: N={a.n} CIFAR-10 images, time per pair = Gram time / N^2")
    print(f"machine: {machine.get('lscpu_model_name', '?')}, {machine.get('cpu_count')} CPUs, "
          f"torch {machine.get('torch')}, numba {machine.get('numba')}; load average "
          f"{lavg0} at start, {lavg1} at end; cnngp process start {machine['cnngp_process_start_s']} s")
    for w in warn:
        print("WARNING: " + w)
    if a.no_nt:
        print(f"NOTE: neural-tangents NOT run (--no-nt): its numbers are read from {a.nt_results}"
              f" and its reference kernels from {a.nt_kernels}")
    hdr = ("workload", "f32 ms/pair", "f32 rel.err", "f64 ms/pair", "f64 rel.err", "used",
           "NT ms/pair", "NT/cnngp", "(cpu)", "(ex-start)", "cnngp MiB", "NT MiB", "reference")
    table = []
    for wl, row in rows.items():
        c32, c64 = row["cnngp"].get("float32", {}), row["cnngp"].get("float64", {})
        nt = row["nt"] or {}
        ch = row["cnngp"].get(row["chosen_dtype"], {}) if row["chosen_dtype"] else {}

        def ms(m):
            if not m:
                return "-"
            return "ERR" if m.get("error") else f"{m['ms_per_pair']:.3g}"

        table.append((wl, ms(c32), fmt(c32.get("rel_err"), ".1e"), ms(c64),
                      fmt(c64.get("rel_err"), ".1e"), row["chosen_dtype"] or "none",
                      fmt(nt.get("ms_per_pair"), ".3g") + ("*" if nt and a.no_nt else ""),
                      fmt(row["ratio_nt_over_cnngp"], ".3g"), fmt(row["ratio_cpu"], ".3g"),
                      fmt(row["ratio_ex_start"], ".3g"),
                      fmt(ch.get("peak_rss_mib") or c32.get("peak_rss_mib"), ".0f"),
                      fmt(nt.get("peak_rss_mib"), ".0f"),
                      {"neural-tangents float64": "NT f64", None: "none"}.get(
                          row["reference"], "cnngp torch f64")))
    widths = [max(len(str(r[i])) for r in [hdr] + table) for i in range(len(hdr))]
    line = lambda r: "  ".join(str(v).rjust(w) if i else str(v).ljust(w)  # noqa: E731
                               for i, (v, w) in enumerate(zip(r, widths)))
    print(line(hdr))
    print(line(["-" * w for w in widths]))
    for r in table:
        print(line(r))
    if a.no_nt:
        print("  * NT numbers from an earlier run (nt_results.json), not this one")
    print(f"  (cpu) = ratio of CPU seconds (user+sys); (ex-start) = NT/cnngp with cnngp's fixed "
          f"process start ({start_s:.2f} s: python + import torch, cnngp) subtracted")
    for wl, row in rows.items():
        for d, m in row["cnngp"].items():
            if m.get("error"):
                print(f"  {wl} {d} failed: {m['error'][-300:]}")
        if row.get("nt_error"):
            print(f"  {wl} NT: {row['nt_error'][-300:]}")
    if gram:
        g = gram
        extra = ""
        if "ms_per_pair_at_n" in g:
            extra = (f" (N={a.n}: {g['ms_per_pair_at_n'][str(a.n)]:.3g} ms/pair, "
                     f"{g['ms_per_computed_pair_at_n'][str(a.n)]:.3g} per computed pair)")
        if g.get("error"):
            print(f"Gram N={g['n']} {g['workload']} {g['dtype']}: FAILED {g['error'][-300:]}")
        else:
            print(f"Gram N={g['n']} {g['workload']} {g['dtype']}: {g['wall_s']:.1f} s, "
                  f"{g['ms_per_pair']:.3g} ms/pair over N^2, {g['ms_per_computed_pair']:.3g} ms "
                  f"per computed pair ({g['pairs_computed']} of {g['n']**2}), peak "
                  f"{g['peak_rss_mib']:.0f} MiB, top-left block rel.err "
                  f"{fmt(g.get('rel_err_first_block'), '.1e')}{extra}")
    if floor:
        for key, label in (("measured", "as measured"),
                           ("idle_estimate", "idle estimate")):
            f = floor[key]
            print(f"floor cnngp14_full f32 ({floor['entries_per_pair'] / 1e6:.1f}M entries/pair; "
                  f"machine_limits.json {label}: {f['bandwidth_gbs']:.1f} GB/s, acos "
                  f"{f['acos_gelem_s']:.2f} G/s): memory {f['memory_ms']:.1f} ms + acos "
                  f"{f['acos_ms']:.1f} ms = {f['floor_ms_per_computed_pair']:.0f} ms per "
                  f"computed pair = {f['floor_ms_per_n2_pair']:.0f} ms per N^2 pair at N={a.n}")
        f = floor.get("polynomial_relu")
        if f:
            print(f"floor cnngp14_full f32, cnngp's own kernel (arccos-free ReLU "
                  f"{f['relu_gelem_s']:.2f} G/s on all cores, one L3 pass per layer "
                  f"{f['l3_bandwidth_gbs']:.0f} GB/s): {f['relu_ms']:.1f} + {f['l3_ms']:.1f} ms = "
                  f"{f['floor_ms_per_computed_pair']:.1f} ms per computed pair = "
                  f"{f['floor_ms_per_n2_pair']:.1f} ms per N^2 pair at N={a.n}")
    print("acceptance:")
    for c in acceptance:
        print(f"  {'PASS' if c['passed'] else 'FAIL'}  {c['check']}: "
              f"{fmt(c['value'], '.2f')}  ({c['note']})")

    total = time.perf_counter() - t_start
    result = dict(
        description="benchmarks/run.py: cnngp vs neural-tangents, ms per image pair = Gram "
                    "matrix wall time / N^2; cnngp = whole `cnngp kernel` process",
        command=" ".join([Path(sys.executable).name, "benchmarks/run.py"] + sys.argv[1:]),
        date=time.strftime("%Y-%m-%d %H:%M:%S"), n=a.n, images=f"{a.data}:x_train[:{a.n}]/255",
        tolerance=TOL, machine=machine, loadavg_end=lavg1, warnings=warn,
        nt_source="cached (--no-nt)" if a.no_nt else "measured in this run",
        workloads=rows, gram=gram, floor_cnngp14_full=floor, acceptance=acceptance,
        total_s=round(total, 1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(_clean(result), f, indent=1)
        log(f"# wrote {a.out} ({total:.0f} s in all)")
    if a.kernels_out:
        np.savez_compressed(a.kernels_out, **kernels_saved)
    if not a.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _clean(o):
    """Round floats for a small, readable JSON."""
    if isinstance(o, float):
        return float(f"{o:.4g}") if o == o else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


if __name__ == "__main__":
    sys.exit(main())

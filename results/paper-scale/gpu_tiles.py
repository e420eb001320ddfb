#!/usr/bin/env python
"""CNNGP-14 at N = 1,280 on a lent GPU: compute the tiles the archive lacks, ship them back.

A session lent a device machine (``device`` tool; 15 minutes, no ../shared there, no zarr)
can add tiles to ``archive-cnngp14-n1280`` that the CPU run then restores like its own (the
store's identity has no device in it; tiles computed on CUDA in float32 agree with the CPU's
to float32 rounding, which the float64 spot check covers). Three steps:

1. here: ``.venv/bin/python results/paper-scale/gpu_tiles.py prepare`` writes ``.carry/``
   (the sweep's 1,280 train images, in its class-interleaved order, and the 1,000 test
   images, as uint8, ~7 MB) and downloads zarr and its compiled needs as Python 3.12 wheels
   into ``.whl/`` (both folders are in .git/info/exclude);
2. on the device, with ``carry: [".carry", ".whl"]`` and a ``timeout_s`` of ~560:
   ``bash results/paper-scale/gpu_tiles.sh train 480`` (or ``test 480`` once the train archive
   is complete and the CPU sweep has written ``cnngp14-n1280/results.json``: the test kernels
   of the readout its cross-validation chose at N = 1,280, as ``--test best`` computes them): it
   rebuilds a store from the archive, computes on CUDA for the given seconds, and tars every
   tile archived there into $OUT;
3. here: ``.venv/bin/python results/paper-scale/gpu_tiles.py unpack /work/.device/...``
   (the files_at folder) extracts the tiles into the archive (each is checked against its
   sha256 when it is restored); commit, and ``run_cnngp14.sh`` goes on from there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "src"))

ARCHIVE = HERE / "archive-cnngp14-n1280"
INPUTS = ROOT / ".carry" / "cnngp14-n1280-inputs.npz"
DATA = ROOT.parent / "shared" / "data" / "cifar10_subset.npz"
WHEELS = ["zarr==3.1.6", "numcodecs==0.16.6", "donfig==0.8.1.post1", "google-crc32c==1.9.0"]
#: the sweep's settings (run_cnngp14.sh): N, seed, tile, dtype
N, SEED, TILE, DTYPE = 1280, 0, 128, "float32"


def prepare() -> None:
    from cnngp.io.data import balanced_subset

    z = np.load(DATA)
    order = balanced_subset(z["y_train"].astype(np.int64), N, seed=SEED, n_classes=10)  # as run_sweep does
    INPUTS.parent.mkdir(exist_ok=True)
    np.savez_compressed(INPUTS, x_train=z["x_train"][order], y_train=z["y_train"][order],
                        x_test=z["x_test"], y_test=z["y_test"], order=order)
    print(f"wrote {INPUTS} ({INPUTS.stat().st_size / 2**20:.1f} MiB)")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp",
                    *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                      for a in ("--platform", p)], "-d", str(ROOT / ".whl"), *WHEELS], check=True)


def _images(u8: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(u8, dtype=np.float64) / 255.0  # cnngp.io.data's 8-bit policy


def chosen_readout(labels) -> int:
    """Index (into the sweep's labels) of the readout the CPU sweep's CV chose at N = 1,280."""
    import json
    import math

    best = json.loads((HERE / "cnngp14-n1280" / "results.json").read_text())["best"][-1]
    assert best["n"] == N, best
    lam = math.inf if best["lengthscale"] == "inf" else float(best["lengthscale"])
    return next(j for j, (name, value) in enumerate(labels)
                if name == best["readout"] and (value == lam or math.isclose(value, lam, rel_tol=1e-12)))


def run(part: str, seconds: float, device: str, store: Path, memory_budget: int) -> int:
    """Compute into ``store`` (restored from the archive first) until ``seconds`` have passed;
    tiles finished by then are in the archive. Returns how many were computed."""
    import signal

    from cnngp.engine.distributed import store_kernel
    from cnngp.experiments.sweep import _lengthscale_json, sweep_readouts
    from cnngp.io.architectures import get, split_network
    from cnngp.kernels.correlations import PAPER_LENGTHSCALES

    z = np.load(INPUTS)
    x_train, x_test = _images(z["x_train"]), _images(z["x_test"])
    body, template, _ = split_network(get("cnngp14"))
    readouts, labels = sweep_readouts(template, PAPER_LENGTHSCALES, "matern32")
    names = [f"{name}:{_lengthscale_json(lam)}" for name, lam in labels]
    if part == "test":  # the one readout the CPU sweep's cross-validation chose (--test best)
        i = chosen_readout(labels)
        readouts, names = [readouts[i]], [names[i]]
        print(f"test kernels of {names[0]}")
        args = (x_test, x_train)
    else:
        args = (x_train,)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.time()
    try:
        report = store_kernel(body, *args, readouts=readouts, labels=names, out=store, dtype=DTYPE,
                              device=device, tile=TILE, archive=ARCHIVE / part, progress=True,
                              memory_budget=memory_budget)
        computed = report.tiles_computed
    except KeyboardInterrupt:
        computed = -1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"{part}: {time.time() - start:.0f} s on {device}; "
          + ("stopped at the time limit" if computed < 0 else f"{computed} tiles computed, store complete"))
    return computed


def ship(part: str, out: Path, since: float) -> None:
    """Tar the archive tiles written after ``since`` into ``out`` (≤ 15 MiB a file, ≤ 8 files)."""
    tiles = sorted(p for p in (ARCHIVE / part).glob("tile-*.json") if p.stat().st_mtime >= since)
    batches, size = [[]], 0
    for record in tiles:
        bytes_ = record.stat().st_size + record.with_suffix(".bin").stat().st_size
        if batches[-1] and size + bytes_ > 15 * 2**20:
            batches.append([])
            size = 0
        batches[-1].append(record)
        size += bytes_
    out.mkdir(parents=True, exist_ok=True)
    for k, batch in enumerate(b for b in batches if b):
        with tarfile.open(out / f"{part}-tiles-{k}.tar", "w") as tar:
            for record in batch:
                tar.add(record.with_suffix(".bin"), arcname=f"{part}/{record.with_suffix('.bin').name}")
                tar.add(record, arcname=f"{part}/{record.name}")  # the record after its data
    print(f"shipped {len(tiles)} {part} tiles in {sum(1 for b in batches if b)} file(s) to {out}")


def unpack(folder: Path) -> None:
    n = 0
    for path in sorted(folder.glob("*-tiles-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if member.isfile() and name.parent.name in ("train", "test") and name.name.startswith("tile-"):
                    target = ARCHIVE / name.parent.name / name.name
                    target.parent.mkdir(exist_ok=True)
                    tmp = target.with_name(f".{target.name}.unpack.tmp")  # data, then record, each whole
                    tmp.write_bytes(tar.extractfile(member).read())
                    os.replace(tmp, target)
                    n += name.suffix == ".json"
    print(f"unpacked {n} tiles into {ARCHIVE} (each is checked against its sha256 when restored)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("part", choices=["train", "test"])
    r.add_argument("seconds", type=float)
    r.add_argument("--device", default="cuda")
    r.add_argument("--store", type=Path, default=Path("/tmp/cnngp14-n1280.zarr"))
    r.add_argument("--memory-budget-gib", type=float, default=32.0,
                   help="the engine's batch memory (the H200 has ~139 GiB; default 32)")
    r.add_argument("--out", type=Path, required=True)
    u = sub.add_parser("unpack")
    u.add_argument("folder", type=Path)
    a = p.parse_args()
    if a.step == "prepare":
        prepare()
    elif a.step == "unpack":
        unpack(a.folder)
    else:
        since = time.time()
        run(a.part, a.seconds, a.device, a.store, int(a.memory_budget_gib * 2**30))
        ship(a.part, a.out, since)


if __name__ == "__main__":
    main()

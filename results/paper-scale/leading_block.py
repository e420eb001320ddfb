#!/usr/bin/env python
"""Interim CNNGP-14 results from the leading block of the unfinished N = 1,280 store.

    .venv/bin/python results/paper-scale/leading_block.py /work/stores/cnngp14-n1280.zarr 640

The store computes tiles in nested order (``tile_plan``): its leading n×n block is complete
long before the whole matrix. The sweep's class-interleaved subsets are prefixes of each other
(``balanced_subset(y, n)`` is the first n of ``balanced_subset(y, 1280)``: the same per-class
permutations, cut shorter), so that block is exactly the kernel a sweep with N_max = n would
compute: this runs the sweep's own cross-validation on it, for the N dividing n, and writes
``cnngp14-leading{n}/results.json`` (and ``summary.txt``, ``sweep.png`` with the paper's
numbers as hollow markers). Its data sets are the first
n / N_k blocks of each size; the full run adds the rest.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from cnngp.engine.store import KernelStore  # noqa: E402
from cnngp.experiments import sweep  # noqa: E402
from cnngp.io.architectures import get, split_network  # noqa: E402
from cnngp.io.data import balanced_subset, load_dataset  # noqa: E402
from cnngp.kernels.correlations import PAPER_LENGTHSCALES  # noqa: E402
from cnngp.provenance import versions  # noqa: E402

DATA = HERE.parents[2] / "shared" / "data" / "cifar10_subset.npz"
N_FULL, SEED, FOLDS = 1280, 0, 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("n", type=int, help="size of the leading block (a multiple of the tile and of 80)")
    a = p.parse_args()
    store = KernelStore.open(a.store)
    n = a.n
    needed = [t for t in store.tiles() if t.rows.start < n and t.cols.start < n]
    missing = [t.name for t in needed if store.tile_state(t) != "done"]
    if missing:
        sys.exit(f"the leading {n}×{n} block is not complete: {len(missing)} tiles missing ({missing[0]}, ...)")

    ds = load_dataset(DATA)
    order = balanced_subset(ds.y_train, N_FULL, seed=SEED, n_classes=ds.n_classes)
    assert np.array_equal(order[:n], balanced_subset(ds.y_train, n, seed=SEED, n_classes=ds.n_classes))
    y_sub = ds.y_train[order[:n]]
    stored = np.asarray(store.images("x1", slice(0, n)), dtype=np.float64)
    assert np.allclose(stored.reshape(n, -1), ds.x_train[order[:n]].reshape(n, -1), rtol=0, atol=1e-6), \
        "the store's images are not this data set's sweep subset"
    body, template, _ = split_network(get("cnngp14"))
    readouts, labels = sweep.sweep_readouts(template, PAPER_LENGTHSCALES, "matern32")
    assert store.attrs["readouts"] == [r.to_spec() for r in readouts] and store.attrs["spec"] == body.to_spec()

    ns = [m for m in (80, 160, 320, 640, 1280) if m <= n and n % m == 0]
    K = [store.readout(i, slice(0, n), slice(0, n)) for i in range(len(readouts))]
    results, best = sweep._cross_validate_all(K, y_sub, labels, ns, ds.n_classes, FOLDS, "paper", SEED,
                                              1000, progress=True)
    out = {
        "config": {"arch": "cnngp14", "data": str(DATA.name), "ns": ns, "folds": FOLDS, "seed": SEED,
                   "fold_scheme": "paper", "family": "matern32", "dtype": store.attrs["dtype"],
                   "lengthscales": [sweep._lengthscale_json(v) for _, v in labels[1:-1]],
                   "readout_grid": [32, 32], "source": f"leading {n}x{n} block of {a.store}",
                   "tiles_done": sum(store.tile_state(t) == "done" for t in store.tiles()),
                   "tiles_total": len(store.tiles())},
        "versions": versions(), "results": results, "best": best,
    }
    folder = HERE / f"cnngp14-leading{n}"
    folder.mkdir(exist_ok=True)
    (folder / "results.json").write_text(json.dumps(out, indent=1, allow_nan=False))
    table = sweep.summary_table(out)
    (folder / "summary.txt").write_text(table + "\n")
    from cnngp.experiments import paper
    from cnngp.experiments.plots import sweep_figure

    sweep_figure(out, folder / "sweep.png", reference={k: v for k, v in paper.CNNGP14.items() if k <= n},
                 title=f"CNNGP-14, leading {n}×{n} block of the N = 1,280 store (paper: hollow)")
    print(table)


if __name__ == "__main__":
    main()

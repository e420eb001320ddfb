#!/usr/bin/env python
"""Interim test accuracy of CNNGP-14 at N = 1,280 from the finished rows of the test store.

    .venv/bin/python results/paper-scale/partial_test.py /work/stores/cnngp14-n1280.zarr

`run_cnngp14.sh` step 2 (`cnngp sweep --test best`) computes the 1,000 × 1,280 test kernel of
the CV-chosen readout into ``cnngp14-n1280-test.zarr``, beside the train store. A rectangular
store is computed row of tiles by row of tiles (``tile_plan``), so every finished row of tiles
is the final kernel of those test images against all 1,280 training images: their predictions
are the ones the finished run will make. This scores them, with the model the sweep scores
(the readout and σ² that cross-validation chose at N = 1,280, read from
``cnngp14-n1280/results.json``, trained on all 1,280 images) and writes
``cnngp14-n1280-test-partial.json``. It checks the stores' images against the data set and the
test store's readout against the chosen one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "src"))

from cnngp.engine.store import KernelStore  # noqa: E402
from cnngp.experiments.sweep import test_store_path  # noqa: E402
from cnngp.inference import gp  # noqa: E402
from cnngp.io.data import balanced_subset, load_dataset  # noqa: E402
from cnngp.provenance import versions  # noqa: E402

DATA = HERE.parents[2] / "shared" / "data" / "cifar10_subset.npz"
N_FULL, SEED = 1280, 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="the train store, e.g. /work/stores/cnngp14-n1280.zarr")
    p.add_argument("--results", default=str(HERE / "cnngp14-n1280" / "results.json"))
    p.add_argument("--out", default=str(HERE / "cnngp14-n1280-test-partial.json"))
    p.add_argument("--data", default=str(DATA), help="the sweep's --data")
    p.add_argument("--n", type=int, default=N_FULL, help="the sweep's largest N")
    a = p.parse_args()
    n_full = a.n

    res = json.loads(Path(a.results).read_text())
    chosen = res["best"][-1]
    assert chosen["n"] == n_full, chosen
    noise = chosen["noise_variance"]  # the CV-chosen σ² of the one data set at N_max

    train = KernelStore.open(a.store)
    test = KernelStore.open(test_store_path(a.store))
    assert test.attrs["readouts"] is not None and len(test.attrs["readouts"]) == 1
    i = train.attrs["readouts"].index(test.attrs["readouts"][0])  # the chosen readout's index
    ds = load_dataset(a.data)
    order = balanced_subset(ds.y_train, n_full, seed=SEED, n_classes=ds.n_classes)
    _, n_test, n_cols = test.shape
    assert n_cols == n_full and train.shape[1:] == (n_full, n_full), (test.shape, train.shape)
    for store, which, expected in [(train, "x1", ds.x_train[order]), (test, "x1", ds.x_test),
                                   (test, "x2", ds.x_train[order])]:
        stored = np.asarray(store.images(which, slice(None)), np.float64)
        assert np.allclose(stored.reshape(len(expected), -1), expected.reshape(len(expected), -1),
                           rtol=0, atol=1e-6), f"{store.path}: {which} is not the sweep's images"

    # rows of test images whose every tile is done
    tiles = test.tiles()
    rows = sorted({(t.rows.start, t.rows.stop) for t in tiles})
    done_rows = [r for r in rows if all(test.tile_state(t) == "done" for t in tiles
                                        if (t.rows.start, t.rows.stop) == r)]
    if not done_rows:
        sys.exit(f"no row of tiles of {test_store_path(a.store)} is finished yet")
    index = np.concatenate([np.arange(*r) for r in done_rows])
    K_train = train.readout(i)  # float64, as GP inference wants
    K_test = np.concatenate([test.readout(0, rows=slice(*r)) for r in done_rows])
    y_train, y_test = ds.y_train[order], ds.y_test[index]
    acc = gp.test_accuracy(K_train, y_train, K_test, y_test, noise, ds.n_classes)
    se = math.sqrt(acc * (1 - acc) / len(index))
    out = {
        "what": f"test accuracy of the CV-chosen model (N = {n_full}) on the finished test rows",
        "command": " ".join(sys.argv),
        "readout": chosen["readout"], "lengthscale": chosen["lengthscale"], "noise_variance": noise,
        "cv_accuracy": chosen["cv_accuracy"],
        "n_train": n_full, "n_test_scored": int(len(index)), "n_test_total": int(n_test),
        "test_rows": [list(r) for r in done_rows],
        "test_accuracy": acc, "two_se": 2 * se,
        "versions": versions(),
    }
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(index)} of {n_test} test images: {100 * acc:.1f} ± {200 * se:.1f} % "
          f"({chosen['readout']}, λ = {chosen['lengthscale']}, σ² = {noise:.3g}; CV {100 * chosen['cv_accuracy']:.1f} %)")


if __name__ == "__main__":
    main()

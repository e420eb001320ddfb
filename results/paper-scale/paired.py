#!/usr/bin/env python
"""Figure 3 as paired comparisons: is a variant better or worse than the pooled baseline *on the
same images*?

    .venv/bin/python results/paper-scale/paired.py [--out paired.json]

The sweep's ±2 SE at the largest N is over one data set (one block), so it is the binomial
spread of one accuracy, ±3.9 points at N = 640. Every variant sees the same images and the same
folds, though, so the difference between two variants has a much smaller error: per image, the
held-out prediction of each variant is right or wrong, and the SE of the mean per-image
difference is what remains.

For each finished variant this re-fits, fold by fold (the paper's 4 contiguous folds of the
class-interleaved subset), the readout and σ² the sweep chose at that N, and records which
held-out images it gets right. It checks that these reproduce the sweep's CV accuracy exactly
(a check on this script), then reports, against the pooled baseline and between the variants:
the accuracy difference, ±2 SE over images (paired), and the discordant counts (right/wrong,
wrong/right; McNemar). For the smaller N, blocks are independent data sets and the difference
is also given ±2 SE over blocks, from the sweep's per-block accuracies.

Selection bias: each variant's readout and σ² are chosen on the same folds they are scored on;
the bias is of the same kind for every variant (one sweep of 27 readouts × 1,000 σ² each).
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path

import numpy as np

from cnngp.engine.store import KernelStore
from cnngp.inference import gp
from cnngp.io.data import balanced_subset, blocks, load_dataset
from cnngp.provenance import versions

HERE = Path(__file__).resolve().parent
STORES = Path("/work/stores")
VARIANTS = {"pooled": "myrtle10-paper-n640",
            "independent 6x6": "myrtle10-correlated-independent-n640",
            "matern32 6x6": "myrtle10-correlated-matern32-n640",
            "rbf 6x6": "myrtle10-correlated-rbf-n640"}


def _readout_index(store: KernelStore, readout: str, lengthscale) -> int:
    for i, label in enumerate(store.labels()):  # "name:λ"
        name, lam = label.split(":")
        if name == readout and (lengthscale is None or np.isclose(float(lam), float(lengthscale))):
            return i
    raise SystemExit(f"{store.path}: no readout {readout} λ={lengthscale}")


def correct_per_image(name: str, ds, ns):
    """n → (correct (N_max,) bool over the blocks of size n, the sweep's best row, the blocks).

    The data set, the store's images and each chosen readout's matrix are read once."""
    results = json.loads((HERE / name / "results.json").read_text())
    cfg = results["config"]
    store = KernelStore.open(STORES / f"{name}.zarr")
    n_max = store.shape[-1]
    order = balanced_subset(ds.y_train, n_max, seed=cfg.get("seed", 0), n_classes=ds.n_classes)
    stored = store.images("x1", slice(None))
    assert np.array_equal(stored, ds.x_train[order].astype(stored.dtype)), \
        f"{name}: the store's images are not the sweep's subset"
    y = ds.y_train[order]
    matrices = {}
    out = {}
    for n in ns:
        best = next(b for b in results["best"] if b["n"] == n)
        row = next(r for r in results["results"] if r["n"] == n and r["readout"] == best["readout"]
                   and r["lengthscale"] == best["lengthscale"])
        index = _readout_index(store, best["readout"], best["lengthscale"])
        if index not in matrices:
            matrices[index] = store.readout(index)
        K = matrices[index]
        correct = np.zeros(n_max, bool)
        block_list = blocks(n_max, n, ds.n_classes)
        for b, noise in zip(block_list, row["block_noise_variances"]):
            Kb, yb = K[np.ix_(b, b)], y[b]
            for train, val in gp.paper_folds(len(b), cfg.get("folds", 4)):
                pred = gp.fit_predict(Kb[np.ix_(train, train)], yb[train], Kb[np.ix_(val, train)], noise,
                                      ds.n_classes)
                correct[b[val]] = pred == yb[val]
        accs = [correct[b].mean() for b in block_list]
        assert np.allclose(accs, row["block_cv_accuracies"], atol=1e-12), \
            (name, n, accs, row["block_cv_accuracies"])  # the re-fit is the sweep's
        out[n] = (correct, best, row, block_list)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(HERE.parents[2] / "shared/data/cifar10_subset.npz"))
    p.add_argument("--ns", default="80,160,320,640")
    p.add_argument("--out", default=str(HERE / "paired.json"))
    args = p.parse_args(argv)
    done = {label: name for label, name in VARIANTS.items() if (HERE / name / "results.json").exists()}
    out = {"variants": done, "data": args.data, "folds": "paper (4 contiguous folds)",
           "versions": versions(), "by_n": {}}
    ns = [int(n) for n in args.ns.split(",")]
    ds = load_dataset(Path(args.data))
    by_variant = {label: correct_per_image(name, ds, ns) for label, name in done.items()}
    for n in ns:
        per = {label: v[n] for label, v in by_variant.items()}
        rows = {}
        for a, b in combinations(per, 2):
            ca, cb = per[a][0], per[b][0]
            d = ca.astype(float) - cb.astype(float)
            se_img = d.std(ddof=1) / np.sqrt(len(d))
            blk_a = np.array(per[a][2]["block_cv_accuracies"])
            blk_b = np.array(per[b][2]["block_cv_accuracies"])
            diff_blocks = blk_a - blk_b
            rows[f"{a} - {b}"] = {
                "difference": round(100 * d.mean(), 2),
                "two_se_paired_images": round(200 * se_img, 2),
                "two_se_blocks": (round(200 * diff_blocks.std(ddof=1) / np.sqrt(len(diff_blocks)), 2)
                                  if len(diff_blocks) > 1 else None),
                "right_wrong": int((ca & ~cb).sum()), "wrong_right": int((~ca & cb).sum()),
            }
        out["by_n"][str(n)] = {
            "accuracy": {label: {"cv_accuracy": round(100 * v[0].mean(), 2), "readout": v[1]["readout"],
                                 "lengthscale": v[1]["lengthscale"], "n_blocks": len(v[3])}
                         for label, v in per.items()},
            "differences": rows}
        print(f"N = {n}: " + "; ".join(f"{k} {v['difference']:+.1f} ± {v['two_se_paired_images']:.1f}"
                                        for k, v in rows.items() if k.endswith("pooled") or "pooled" in k))
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(out, Path(args.out).with_suffix(".png"))


def plot(out: dict, path: Path) -> None:
    """Each variant minus the pooled baseline against N, ±2 SE paired over images."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ns = sorted(map(int, out["by_n"]))
    others = [label for label in out["variants"] if label != "pooled"]
    for k, label in enumerate(others):
        key = f"pooled - {label}"
        rows = [out["by_n"][str(n)]["differences"].get(key) for n in ns]
        xs = [np.log2(n) + 0.05 * (k - 1) for n, r in zip(ns, rows) if r]
        ys = [-r["difference"] for r in rows if r]  # variant minus pooled
        es = [r["two_se_paired_images"] for r in rows if r]
        ax.errorbar(xs, ys, yerr=es, fmt="o-", color=f"C{k + 1}", capsize=3, label=label)
    ax.axhline(0, color="C0", lw=1.2, label="pooled baseline (myrtle10-paper)")
    ax.set_xticks(np.log2(ns))
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("training set size N")
    ax.set_ylabel("CV accuracy minus the pooled baseline's\n(points, ±2 SE paired over images)")
    ax.set_title("Figure 3 as paired differences (same images, same folds)", fontsize="medium")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

"""NTK against NNGP on the same sweep (issue 13): a table and a figure from two results.json.

    .venv/bin/python results/ntk/compare.py NNGP_RESULTS.json NTK_RESULTS.json OUT_PREFIX

Per N: CV accuracy of the independent readout (λ = 0), mean pooling (λ = ∞) and the best λ,
for each kernel, with ±2 SE: over the disjoint blocks where there are several, else binomial
over the N held-out predictions of the one block (4-fold CV predicts every image once).
Also the mean over the λ grid of NTK − NNGP, and the rise from λ = 0 to the best λ.
Writes OUT_PREFIX.json and OUT_PREFIX.png.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np


def _two_se(row):
    if row["n_datasets"] > 1:
        return row["cv_accuracy_2se"]
    p, n = row["cv_accuracy"], row["n"]
    return 2 * math.sqrt(p * (1 - p) / n)


def summary(results):
    out = {}
    for n in sorted({r["n"] for r in results["results"]}):
        rows = [r for r in results["results"] if r["n"] == n]
        ind = next(r for r in rows if r["readout"] == "independent")
        gap = next(r for r in rows if r["readout"] == "constant")
        swept = [r for r in rows if r["readout"] not in ("independent", "constant")]
        best = max(rows, key=lambda r: r["cv_accuracy"])
        out[n] = {
            "independent": [ind["cv_accuracy"], _two_se(ind)],
            "mean_pool": [gap["cv_accuracy"], _two_se(gap)],
            "best": [best["cv_accuracy"], _two_se(best), best["lengthscale"]],
            "curve": [(r["lengthscale"], r["cv_accuracy"]) for r in swept],
        }
    return out


def main(argv):
    nngp_path, ntk_path, prefix = argv
    res = {k: json.load(open(p)) for k, p in (("nngp", nngp_path), ("ntk", ntk_path))}
    s = {k: summary(v) for k, v in res.items()}
    table = {}
    for n in s["nngp"]:
        a, b = s["nngp"][n], s["ntk"][n]
        diff = [tb - ta for (la, ta), (lb, tb) in zip(a["curve"], b["curve"]) if la == lb]
        table[str(n)] = {
            "nngp": {k: a[k] for k in ("independent", "mean_pool", "best")},
            "ntk": {k: b[k] for k in ("independent", "mean_pool", "best")},
            "ntk_minus_nngp_mean_over_grid": float(np.mean(diff)),
            "rise_to_best": {"nngp": a["best"][0] - a["independent"][0], "ntk": b["best"][0] - b["independent"][0]},
        }
    out = {"nngp": nngp_path, "ntk": ntk_path, "per_n": table,
           "note": "accuracy ± 2 SE: blocks where n_datasets > 1, else binomial over the N predictions"}
    with open(prefix + ".json", "w") as f:
        json.dump(out, f, indent=2)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, style in (("nngp", "-"), ("ntk", "--")):
        for i, n in enumerate(s[k]):
            rows = [r for r in res[k]["results"] if r["n"] == n and r["readout"] not in ("independent", "constant")]
            lam = np.log10([r["lengthscale"] for r in rows])
            acc = np.array([r["cv_accuracy"] for r in rows]) * 100
            se = np.array([_two_se(r) for r in rows]) * 100
            ax.plot(lam, acc, style, color=f"C{i}", label=f"{k.upper()} N={n}")
            ax.fill_between(lam, acc - se, acc + se, color=f"C{i}", alpha=0.08)
    ax.set_xlabel("log10 λ of the Matérn-3/2 readout (grid index units)")
    ax.set_ylabel("4-fold CV accuracy (%), ±2 SE")
    ax.set_title(f"NNGP vs NTK: {res['nngp']['config']['arch']} on {res['nngp']['config']['dataset']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(prefix + ".png", dpi=120)
    for n, row in table.items():
        print(n, json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])

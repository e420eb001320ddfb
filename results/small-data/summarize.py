"""Issue 29's study table: every finished configuration of run.sh, on the same 1,000 CIFAR-10 test
images, with paired differences.

    .venv/bin/python results/small-data/summarize.py          # -> summary.json, .md, .png here
    .venv/bin/python results/small-data/summarize.py --best   # the configuration for N = 1,280

For each configuration (plain, ZCA, flips, ZCA + flips; each network) and readout (independent,
mean pool, and the λ the 4-fold CV chose on the 640 training images), the test accuracy, NLL
and ECE of the model trained on the 640 (±2 SE: binomial for accuracy, over images for NLL), the
CV accuracy and the nested CV estimate at N = 640. Paired differences use the same test images:
per image, correct(a) − correct(b) and log p_a − log p_b, their mean ± 2 SE over the images
(test_predictions.npz of each run); every configuration is compared with the plain one of its
network and readout, the CV-chosen readout with mean pooling within a configuration, and
Myrtle10-correlated (correlated intermediate layers) with Myrtle10 (pools) at the same
configuration and readout. These SEs are the test images' noise for the one training set; the
variation over training sets is not in them. Where the CV tied several readouts (the sweep keeps
the first, smallest λ), the table says so, and a row "CV-tied (mean of k)" scores the tied
readouts' mean per image, so that no conclusion rests on the tie-break alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from cnngp.experiments.compare import paired_differences
from cnngp.experiments.sweep import learning_curve_2se
from cnngp.inference.selection import TIE_ATOL

HERE = Path(__file__).resolve().parent
CONFIGS = ["plain", "zca", "flip", "zca-flip"]
NETWORKS = ["myrtle10", "cnngp14", "myrtle10-correlated"]


#: the folder suffix of the runs at N = 1,280 (the configuration chosen by :func:`best`)
N1280 = "-n1280"


def _runs():
    for suffix in ("", N1280):
        for net in NETWORKS:
            for cfg in CONFIGS:
                d = HERE / f"{net}-{cfg}{suffix}"
                if (d / "results.json").is_file() and (d / "test_predictions.npz").is_file():
                    with np.load(d / "test_predictions.npz") as z:
                        yield net, cfg + suffix, json.loads((d / "results.json").read_text()), \
                            {k: z[k] for k in z.files}


def best() -> tuple[str, str]:
    """The configuration run again at N = 1,280: of the 12 at N = 640, the one whose CV-chosen
    readout has the highest nested CV estimate at N = 640 (λ and σ² chosen inside each outer
    fold: never a test score); an exact tie goes to the first in (network, config) order of
    NETWORKS and CONFIGS. Refused until all 12 are finished."""
    done = {(net, cfg): res for net, cfg, res, _ in _runs() if not cfg.endswith(N1280)}
    missing = [f"{n}-{c}" for n in NETWORKS for c in CONFIGS if (n, c) not in done]
    if missing:
        raise SystemExit(f"summarize.py --best: {len(missing)} configuration(s) at N = 640 not finished: "
                         + ", ".join(missing))

    def nested(res):
        top = max(b["n"] for b in res["best"])
        return next(b for b in res["best"] if b["n"] == top)["nested"]["cv_accuracy"]

    scores = {key: nested(res) for key, res in done.items()}
    return max(scores, key=lambda k: (scores[k], -list(done).index(k)))


STORES = HERE.parent.parent / "stores" / "small-data"  # run.sh's, git-ignored


ARCHIVE = HERE / "archive"  # run.sh's tile archives (--archive), kept while a configuration is unfinished


def _records(name: str) -> list | None:
    """The tile records of the store ``name`` (run.sh's naming: ``cnngp14-plain-mirror-test``),
    from the store itself or, where a new machine has none, from its tile archive (each
    archived tile keeps its record's seconds and CPU seconds). None where neither is there."""
    records = STORES / f"{name}.zarr" / "records"
    if records.is_dir():
        return [json.loads(p.read_text()) for p in records.glob("tile-*.json")]
    base, part = name, "train"
    for suffix, what in (("-mirror-test", "test-mirror"), ("-mirror", "train-mirror"), ("-test", "test")):
        if name.endswith(suffix):
            base, part = name.removesuffix(suffix), what
            break
    folder = ARCHIVE / base / part
    if not folder.is_dir():
        return None
    out = []
    for path in folder.glob("tile-*.json"):
        record = json.loads(path.read_text())
        (r0, r1), (c0, c1) = record["rows"], record["cols"]
        square = part.startswith("train") and (r0, r1) == (c0, c1)  # a diagonal tile of x1 × x1: i ≤ j only
        record["pairs"] = (r1 - r0) * (r1 - r0 + 1) // 2 if square else (r1 - r0) * (c1 - c0)
        out.append(record)
    return out


#: plain stores a flip configuration's run computed again (lost with a machine after their plain
#: configuration finished, whose cost summary.json keeps): counted with the flip run's own
RECOMPUTED = {"cnngp14-flip": ["cnngp14-plain-test"]}


def _tile_seconds(net: str, cfg: str) -> dict | None:
    """What the tiles of a configuration's own stores took, summed over every attempt (each
    tile's record holds its seconds; a session's end stops a sweep before /usr/bin/time can
    report it): the plain and test stores, or for a flip configuration at N = 640 the
    mirror-term stores it computed (its plain stores are its plain configuration's); the
    N = 1,280 run computes all of its stores. Tiles another store lent (``reused_from``: the
    N = 640 stores lend the N = 1,280 run their pairs) keep their lender's time and are summed
    apart (``lent_*``), not as this run's. None without the stores or their archives."""
    n1280 = cfg.endswith(N1280)
    core = cfg.removesuffix(N1280)
    flip = "flip" in core
    base = f"{net}-{core.replace('zca-flip', 'zca').replace('flip', 'plain')}" + (N1280 if n1280 else "")
    plain = [base, f"{base}-test"]
    mirror = [f"{base}-mirror", f"{base}-mirror-test"]
    names = (plain + mirror if n1280 else mirror) if flip else plain
    names += RECOMPUTED.get(f"{net}-{cfg}", [])
    seconds, cpu, pairs, tiles, timed = 0.0, 0.0, 0, 0, 0
    lent = {"lent_tiles": 0, "lent_pairs": 0, "lent_tile_seconds": 0.0}
    for name in names:
        records = _records(name)
        if records is None:
            return None
        for record in records:
            if record.get("reused_from"):
                lent["lent_tiles"] += 1
                lent["lent_pairs"] += record.get("pairs") or 0
                lent["lent_tile_seconds"] += record.get("seconds") or 0.0
                continue
            seconds += record.get("seconds") or 0.0
            pairs += record.get("pairs") or 0
            tiles += 1
            if record.get("cpu_seconds") is not None:  # recorded since 2026-12-05 08:45 UTC
                cpu += record["cpu_seconds"]
                timed += 1
    return {"tile_seconds": seconds, "cpu_seconds": cpu, "tiles_with_cpu_seconds": timed, "pairs": pairs,
            "tiles": tiles, "stores": names, **(lent if lent["lent_tiles"] else {})}


def _mean_2se(x):
    from cnngp.inference.gp import mean_and_2se

    mean, two_se = mean_and_2se(np.asarray(x, dtype=np.float64))
    return float(mean), float(two_se)


def _binomial_2se(p: float, m: int) -> float:
    """±2 SE of an accuracy p on m test images."""
    return 2 * math.sqrt(p * (1 - p) / m)


def _tied(res, n: int) -> list:
    """The labels of the readouts the CV at N = n tied with the chosen one (the sweep's
    ``best[...]["tied"]``), the chosen one excluded."""
    b = next(b for b in res["best"] if b["n"] == n)
    return [f"{t['readout']}:{t['lengthscale']}" for t in b.get("tied") or []
            if (t["readout"], t["lengthscale"]) != (b["readout"], b["lengthscale"])]


def _per_image(pred, readout):
    names = [str(n) for n in pred["readouts"]]
    i = names.index(readout)
    correct = (pred["predicted"][i] == pred["y_test"]).astype(np.float64)
    return correct, pred["log_prob_true"][i]


def _label(r):
    return f"{r['readout']}:{r['lengthscale']}"


def main():
    table, per_image = [], {}
    for net, cfg, res, pred in _runs():
        n_max = max(b["n"] for b in res["best"])  # 640, or 1,280 for the run of best()
        best = next(b for b in res["best"] if b["n"] == n_max)
        top = {_label(r): r for r in res["results"] if r["n"] == n_max}
        chosen = f"{res['test']['readout']}:{res['test']['lengthscale']}"
        scored = [str(n) for n in pred["readouts"]]
        tied = [t for t in _tied(res, n_max) if t in scored]
        for role, label in (("independent", "independent:0.0"), ("mean pool", "constant:inf"), ("CV-chosen λ", chosen)):
            if label not in top or label not in scored:
                continue
            r = top[label]
            correct, logp = _per_image(pred, label)
            acc = float(correct.mean())
            nll, nll2 = _mean_2se(-logp)
            per_image[(net, cfg, role)] = (correct, logp)
            table.append({
                "network": net, "config": cfg, "readout": role, "lengthscale": r["lengthscale"],
                "test_accuracy": acc, "test_accuracy_2se": _binomial_2se(acc, len(correct)),
                "test_nll": nll, "test_nll_2se": nll2,
                "test_ece": r["test_ece"], "cv_accuracy": r["cv_accuracy"],
                "nested_cv_accuracy": best.get("nested", {}).get("cv_accuracy") if role == "CV-chosen λ" else None,
                "n_test": int(len(correct)), "n_train": int(n_max),
                **({"tied_with": [float(t.split(":")[1]) for t in tied]} if role == "CV-chosen λ" else {}),
            })
        if tied and chosen in scored:  # every readout the CV tied, their per-image mean
            both = [_per_image(pred, label) for label in [chosen, *tied]]
            correct = np.mean([c for c, _ in both], axis=0)
            logp = np.mean([lp for _, lp in both], axis=0)
            acc = float(correct.mean())
            nll, nll2 = _mean_2se(-logp)
            role = f"CV-tied (mean of {len(both)})"
            per_image[(net, cfg, role)] = (correct, logp)
            table.append({
                "network": net, "config": cfg, "readout": role, "lengthscale": None,
                "test_accuracy": acc, "test_accuracy_2se": _binomial_2se(acc, len(correct)),
                "test_nll": nll, "test_nll_2se": nll2, "test_ece": None, "cv_accuracy": top[chosen]["cv_accuracy"],
                "nested_cv_accuracy": None, "n_test": int(len(correct)), "n_train": int(n_max),
                "tied": [chosen, *tied],
            })
    paired = []
    for (net, cfg, role), (c, lp) in per_image.items():
        refs = []
        suffix = N1280 if cfg.endswith(N1280) else ""
        if role.startswith("CV-tied"):
            pass  # compared with mean pooling alone (below)
        elif cfg != "plain" + suffix and (net, "plain" + suffix, role) in per_image:
            refs.append(((net, "plain" + suffix, role), "vs plain"))
        if cfg.removesuffix(suffix) == "zca-flip" and not role.startswith("CV-tied"):
            # what each adds on top of the other: flips to whitened kernels, whitening to flipped ones
            for part in ("zca", "flip"):
                if (net, part + suffix, role) in per_image:
                    refs.append(((net, part + suffix, role), f"vs {part}"))
        if suffix and not role.startswith("CV-tied") and (net, cfg.removesuffix(suffix), role) in per_image:
            refs.append(((net, cfg.removesuffix(suffix), role), "vs N = 640"))
        if net == "myrtle10-correlated" and not role.startswith("CV-tied") and ("myrtle10", cfg, role) in per_image:
            refs.append((("myrtle10", cfg, role), "vs myrtle10 (pools)"))
        if (role == "CV-chosen λ" or role.startswith("CV-tied")) and (net, cfg, "mean pool") in per_image:
            refs.append(((net, cfg, "mean pool"), "vs mean pool"))
        for ref, what in refs:
            c0, lp0 = per_image[ref]
            d = paired_differences(c, c0, lp, lp0)  # cnngp compare's numbers (its library function)
            paired.append({"network": net, "config": cfg, "readout": role, "against": what,
                           **{k: d[k] for k in ("accuracy_difference", "accuracy_difference_2se",
                                                "nll_difference", "nll_difference_2se")},
                           "only_right": d["only_a_right"], "only_ref_right": d["only_b_right"],
                           "mcnemar_p": d["mcnemar_p"]})
    previous = json.loads((HERE / "summary.json").read_text()).get("cost", {}) if (HERE / "summary.json").is_file() else {}
    cost = {}
    for net, cfg, _, _ in _runs():
        key = f"{net}-{cfg}"
        # frozen once recorded: the first summary after a configuration finishes reads its complete
        # stores; later their names may hold another run's tiles (CNNGP-14 + flips recomputes the
        # plain test store that CNNGP-14 plain lost with a machine), or be gone
        cost[key] = previous.get(key) or _tile_seconds(net, cfg)
    curve = learning_curve()
    (HERE / "summary.json").write_text(json.dumps({"table": table, "paired": paired, "cost": cost,
                                                   "learning_curve": curve, "cv_test_gaps": cv_test_gaps()},
                                                  indent=1) + "\n")
    lines = overview(table, paired) + [
        "| network | config | N | readout | test acc % | NLL | ECE % | CV acc % (at N) | nested CV % |",
        "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        nested = "" if t["nested_cv_accuracy"] is None else f"{100 * t['nested_cv_accuracy']:.1f}"
        lam = ""
        if t["readout"] == "CV-chosen λ":
            lam = f" (λ = {float(t['lengthscale']):.3g}" + (
                "; CV tied with λ = " + ", ".join(f"{v:.3g}" for v in t["tied_with"]) if t.get("tied_with") else "") + ")"
        ece = "" if t["test_ece"] is None else f"{100 * t['test_ece']:.1f}"
        lines.append(f"| {t['network']} | {t['config']} | {t['n_train']} | {t['readout']}{lam} | "
                     f"{100 * t['test_accuracy']:.1f} ± {100 * t['test_accuracy_2se']:.1f} | "
                     f"{t['test_nll']:.3f} ± {t['test_nll_2se']:.3f} | {ece} | "
                     f"{100 * t['cv_accuracy']:.1f} | {nested} |")
    lines += ["", "±2 SE: binomial over the test images for accuracy, over the images for NLL; the nested CV "
              "estimate at N = 640 rests on 640 held-out predictions (±3.9 points at p = 0.5), so configurations "
              "within that of each other are not told apart by it (summarize.py --best still picks one)."]
    lines += ["", "Paired on the same 1,000 test images: Δ ± 2 SE of the per-image differences; the images only "
              "one of the two gets right (this one / the other) and the exact McNemar p-value (— for a mean over "
              "tied readouts; each p is for its own comparison, not corrected for the many in this table). "
              "`cnngp compare RUN_A RUN_B` gives any such pair.", "",
              "| network | config | readout | against | Δ accuracy (points) | Δ NLL | only right | McNemar p |",
              "|---|---|---|---|---|---|---|---|"]
    for p in paired:
        only = "—" if p["only_right"] is None else f"{p['only_right']} / {p['only_ref_right']}"
        mcnemar = "—" if p["mcnemar_p"] is None else f"{p['mcnemar_p']:.2g}"
        lines.append(f"| {p['network']} | {p['config']} | {p['readout']} | {p['against']} | "
                     f"{100 * p['accuracy_difference']:+.1f} ± {100 * p['accuracy_difference_2se']:.1f} | "
                     f"{p['nll_difference']:+.3f} ± {p['nll_difference_2se']:.3f} | {only} | {mcnemar} |")
    if curve:
        ns = sorted({int(n) for c in curve for n in c["test_accuracy"]})
        blocks = {n: max((c["blocks"].get(str(n), 1) for c in curve), default=1) for n in ns}
        lines += ["", "Test learning curve (the 1,000 test images; at each N below the largest, the mean over "
                  "the disjoint training sets of that size the CV used ("
                  + ", ".join(f"{blocks[n]} at {n:,}" for n in ns) + "), each model at its own CV's σ², "
                  "± 2·sqrt(s²/B + p(1 − p)/M): their spread and the binomial noise of the test images they "
                  "share; at the largest N the one model, ± 2 SE binomial). The CV-chosen readout is chosen "
                  "at each N by that N's CV, which pools the CV accuracies of all its blocks: each block's "
                  "λ is chosen with the other blocks' labels too; \"per-block CV\" is each block's own "
                  "pipeline instead, its readout chosen by its own CV alone (readouts its CV tied: their mean "
                  "test accuracy). Arora et al.'s CNTK-14 at the same N: "
                  + ", ".join(f"{n}: {ARORA_CNTK14[n]}" for n in ns if n in ARORA_CNTK14) + " %.", "",
                  "| network | config | readout | " + " | ".join(f"N = {n:,}" for n in ns) + " |",
                  "|---|---|---|" + "---|" * len(ns)]
        for c in curve:
            cells = [f"{100 * c['test_accuracy'][str(n)]:.1f} ± {100 * c['test_accuracy_2se'][str(n)]:.1f}"
                     if str(n) in c["test_accuracy"] else "" for n in ns]
            lines.append(f"| {c['network']} | {c['config']} | {c['readout']} | " + " | ".join(cells) + " |")
    gaps = cv_test_gaps()
    if gaps:
        lines += ["", "CV against test at the largest N (points; the CV is the estimate the readout and σ² are "
                  "chosen by). Beside the runs, the first ZCA runs (zca-in-sample/: ZCA fitted on the N_max "
                  "the CV validates on, its validation folds whitened in sample and the test images out of "
                  "sample), kept for this comparison; the ZCA runs now fit it apart (--zca-fit rest):", "",
                  "| network | config | N | CV − test, mean over the readouts | CV-chosen: CV | nested CV | test |",
                  "|---|---|---|---|---|---|---|"]
        for g in gaps:
            nested = "" if g["chosen_nested"] is None else f"{100 * g['chosen_nested']:.1f}"
            lines.append(f"| {g['network']} | {g['config']} | {g['n']} | {100 * g['mean_cv_minus_test']:+.1f} | "
                         f"{100 * g['chosen_cv']:.1f} | {nested} | {100 * g['chosen_test']:.1f} |")
    lines += ["", "Kernel time of every attempt, from the stores' tile records (wall: a tile's seconds, which "
              "include any pause of the sweep and other work on the 2 cores; CPU: its process's CPU "
              "seconds, recorded by tiles computed since 2026-12-05 08:45 UTC):", "",
              "| run | wall, Σ tiles | CPU, Σ tiles (tiles) | pairs |", "|---|---|---|---|"]
    for key, c in cost.items():
        if c:
            cpu = (f"{c['cpu_seconds']:,.0f} s ({c['tiles_with_cpu_seconds']} of {c['tiles']})"
                   if c.get("tiles_with_cpu_seconds") else "not recorded")
            lent = (f" (and {c['lent_pairs']:,} lent by the N = 640 stores, {c['lent_tiles']} tiles)"
                    if c.get("lent_tiles") else "")
            lines.append(f"| {key} | {c['tile_seconds'] / 60:.0f} min | {cpu} | {c['pairs']:,}{lent} |")
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    figure(table, HERE / "summary.png", curve)
    print("\n".join(lines))


def overview(table: list, paired: list) -> list:
    """The study at a glance (summary.md's head): per network (rows) and configuration
    (columns), the CV-chosen readout's test accuracy with mean pooling's beside it, and the
    paired difference between the two; the N = 1,280 run in a row of its own."""
    def cell(net, cfg, role):
        return next((t for t in table if (t["network"], t["config"], t["readout"]) == (net, cfg, role)), None)

    def diff(net, cfg):
        return next((p for p in paired if (p["network"], p["config"], p["readout"], p["against"])
                     == (net, cfg, "CV-chosen λ", "vs mean pool")), None)

    rows = [(net, "", net) for net in NETWORKS] + [(net, N1280, f"{net}, N = 1,280") for net in NETWORKS
                                                   if any(cell(net, c + N1280, "mean pool") for c in CONFIGS)]
    head = ["| network | " + " | ".join(CONFIGS) + " |", "|---|" + "---|" * len(CONFIGS)]
    accuracy, gain = list(head), list(head)
    for net, suffix, name in rows:
        acc, gains = [], []
        for cfg in CONFIGS:
            chosen, pool, d = cell(net, cfg + suffix, "CV-chosen λ"), cell(net, cfg + suffix, "mean pool"), \
                diff(net, cfg + suffix)
            acc.append("" if chosen is None or pool is None else
                       f"{100 * chosen['test_accuracy']:.1f} ({100 * pool['test_accuracy']:.1f})")
            gains.append("" if d is None else
                         f"{100 * d['accuracy_difference']:+.1f} ± {100 * d['accuracy_difference_2se']:.1f}"
                         + ("" if d["mcnemar_p"] is None else f" (p = {d['mcnemar_p']:.2g})"))
        accuracy.append(f"| {name} | " + " | ".join(acc) + " |")
        gain.append(f"| {name} | " + " | ".join(gains) + " |")
    return (["Test accuracy % of the CV-chosen readout (mean pooling in brackets), N = 640 unless said; "
             "an empty cell: not finished.", ""] + accuracy
            + ["", "The readout's weight correlation: CV-chosen λ minus mean pooling, points, paired on the same "
               "test images ± 2 SE (exact McNemar p, uncorrected).", ""] + gain + ["", ""])


def cv_test_gaps() -> list:
    """How far the CV accuracy at N_max is from the test accuracy, per finished run: its mean
    over every readout (CV − test, points) and the CV-chosen readout's CV, nested CV and test
    accuracy; beside the runs of zca-in-sample/ (ZCA fitted on the N_max itself, which whitens
    the CV's validation folds in sample and the test images out of sample: the first protocol,
    superseded by --zca-fit rest)."""
    out = []
    runs = [(net, cfg, res) for net, cfg, res, _ in _runs()]
    for d in sorted((HERE / "zca-in-sample").glob("*/results.json")):
        name = d.parent.name
        net = next(n for n in sorted(NETWORKS, key=len, reverse=True) if name.startswith(n + "-"))
        runs.append((net, name.removeprefix(net + "-") + " (in-sample ZCA)", json.loads(d.read_text())))
    for net, cfg, res in runs:
        n_max = max(b["n"] for b in res["best"])
        rows = [r for r in res["results"] if r["n"] == n_max and "test_accuracy" in r]
        best = next(b for b in res["best"] if b["n"] == n_max)
        chosen = next(r for r in rows if (r["readout"], r["lengthscale"]) == (best["readout"], best["lengthscale"]))
        out.append({"network": net, "config": cfg, "n": n_max,
                    "mean_cv_minus_test": float(np.mean([r["cv_accuracy"] - r["test_accuracy"] for r in rows])),
                    "chosen_cv": chosen["cv_accuracy"], "chosen_nested": (best.get("nested") or {}).get("cv_accuracy"),
                    "chosen_test": chosen["test_accuracy"]})
    return out


#: Arora et al. 2020's 14-layer CNTK on CIFAR-10 (test accuracy, %), by training set size
ARORA_CNTK14 = {10: 15.3, 40: 21.3, 160: 30.5, 320: 36.6, 640: 42.6, 1280: 48.9}


def learning_curve() -> list:
    """Per finished run and readout (independent, mean pool, the CV-chosen one at each N), test
    accuracy ± 2 SE at every N of its CV: below the largest N the sweep's ``block_test_*``
    (each disjoint block's model on the test images; runs from before cnngp scored them
    have none and are left out), at the largest the one model (binomial ±2 SE)."""
    out = []
    for net, cfg, res, _ in _runs():
        rows = res["results"]
        if not any("block_test_accuracies" in r for r in rows):
            continue
        by_role = {}
        for b in res["best"]:
            n = int(b["n"])
            at_n = [r for r in rows if r["n"] == n]
            picks = {"independent": ("independent", 0.0), "mean pool": ("constant", "inf"),
                     "CV-chosen λ": (b["readout"], b["lengthscale"])}
            for role, key in picks.items():
                r = next((r for r in at_n if (r["readout"], r["lengthscale"]) == key), None)
                if r is None or "test_accuracy" not in r:
                    continue
                m = res["test"]["n_test"]
                accs = r.get("block_test_accuracies") or [r["test_accuracy"]]  # the largest N: one model
                acc = float(np.mean(accs))
                # the spread over the blocks and the binomial noise of the m shared test images
                # (cnngp.experiments.sweep.learning_curve_2se; recomputed: runs before it stored
                # the spread alone)
                two_se = learning_curve_2se(accs, m)
                entry = by_role.setdefault(role, {"network": net, "config": cfg, "readout": role,
                                                  "test_accuracy": {}, "test_accuracy_2se": {}, "lengthscale": {},
                                                  "blocks": {}})
                entry["test_accuracy"][str(n)] = acc
                entry["test_accuracy_2se"][str(n)] = two_se
                entry["lengthscale"][str(n)] = r["lengthscale"]
                entry["blocks"][str(n)] = len(accs)
            # each block's own pipeline: its readout chosen by its own CV alone (no other block's
            # labels), the readouts its CV tied averaged; at the largest N the one set's CV
            scored = [r for r in at_n if "test_accuracy" in r]
            if not scored:
                continue
            cv = np.array([r.get("block_cv_accuracies") or [r["cv_accuracy"]] for r in scored])
            test = np.array([r.get("block_test_accuracies") or [r["test_accuracy"]] for r in scored])
            # ties as the sweep's (cnngp.inference.selection.first_best: within TIE_ATOL)
            accs = [float(test[cv[:, b] >= cv[:, b].max() - TIE_ATOL, b].mean()) for b in range(cv.shape[1])]
            acc = float(np.mean(accs))
            entry = by_role.setdefault("per-block CV", {"network": net, "config": cfg, "readout": "per-block CV",
                                                         "test_accuracy": {}, "test_accuracy_2se": {},
                                                         "lengthscale": {}, "blocks": {}})
            entry["test_accuracy"][str(n)] = acc
            entry["test_accuracy_2se"][str(n)] = learning_curve_2se(accs, res["test"]["n_test"])
            entry["blocks"][str(n)] = len(accs)
        out += list(by_role.values())
    return out


#: the issue's small-data anchors on CIFAR-10 (test accuracy, %, at the same N): {N: [(label, %)]}
#: (issue 29's figures: Arora et al. 2020's CNTK-14 and ResNet-34, FABR, cnngp's results/paper-scale)
ANCHORS = {640: [("Arora et al. CNTK-14", 42.6)],
           1280: [("Arora et al. CNTK-14", 48.9), ("Arora et al. ResNet-34", 49.1), ("FABR", 51.1),
                  ("cnngp CNNGP-14, paper-scale", 53.0)]}
ROLES = ["independent", "mean pool", "CV-chosen λ"]


def figure(table: list, path: Path, curve: list = ()) -> None:
    """Test accuracy ± 2 SE of every finished configuration and readout, one panel per N, the
    configurations grouped by network, with the small-data anchors of that N as lines; and a
    last panel, the test learning curve of each run's CV-chosen readout (:func:`learning_curve`)
    beside Arora et al.'s CNTK-14."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({t["n_train"] for t in table})
    if not ns:
        return
    chosen = [c for c in curve if c["readout"] == "CV-chosen λ"]
    # a panel of one configuration is still wide enough for its title and its anchors' legend below
    widths = [max(3, len({(t["network"], t["config"]) for t in table if t["n_train"] == n})) for n in ns]
    fig, axes = plt.subplots(1, len(ns) + bool(chosen), figsize=(6 + 5 * len(ns) + 5 * bool(chosen), 5.2),
                             squeeze=False, gridspec_kw={"width_ratios": widths + [4] * bool(chosen)})
    colours = {"independent": "#999999", "mean pool": "#4477aa", "CV-chosen λ": "#cc6677"}
    for ax, n in zip(axes[0], ns):
        rows = [t for t in table if t["n_train"] == n]
        groups = list(dict.fromkeys((t["network"], t["config"]) for t in rows))
        for g, key in enumerate(groups):
            for k, role in enumerate(ROLES):
                t = next((t for t in rows if (t["network"], t["config"]) == key and t["readout"] == role), None)
                if t is not None:
                    ax.errorbar(g + (k - 1) * 0.25, 100 * t["test_accuracy"], yerr=100 * t["test_accuracy_2se"],
                                fmt="o", color=colours[role], capsize=2, label=role if g == 0 else None)
        for (label, value), style in zip(ANCHORS.get(n, []), ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))):
            ax.axhline(value, color="k", lw=0.8, ls=style, label=f"{label}: {value}")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{net}\n{cfg.removesuffix(N1280)}" for net, cfg in groups], fontsize=7, rotation=30)
        ax.set_title(f"N = {n:,} training images, 1,000 test images", fontsize=9)
        ax.set_ylabel("test accuracy % (± 2 SE)")
        ax.grid(axis="y", alpha=0.3)
        if len(groups) >= 6:
            ax.legend(fontsize=7, loc="lower right")
        else:  # below a narrow panel, where it would hide the points and the anchors
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    if chosen:  # the learning curves
        ax = axes[0][-1]
        palette = plt.get_cmap("tab20").colors  # 13 runs: tab10's colours would repeat
        for k, c in enumerate(chosen):
            n_c = sorted(int(n) for n in c["test_accuracy"])
            ax.errorbar(n_c, [100 * c["test_accuracy"][str(n)] for n in n_c],
                        yerr=[100 * c["test_accuracy_2se"][str(n)] for n in n_c], marker="o", ms=4, capsize=2,
                        lw=2 if c["config"].endswith(N1280) else 1, color=palette[k % len(palette)],
                        label=f"{c['network']} {c['config']}")
        n_a = sorted(n for n in ARORA_CNTK14 if n >= 100)
        ax.plot(n_a, [ARORA_CNTK14[n] for n in n_a], "k--", marker="s", mfc="none", label="Arora et al. CNTK-14")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(n_a)
        ax.set_xticklabels([str(n) for n in n_a])
        ax.set_xlabel("N training images")
        ax.set_ylabel("test accuracy % (CV-chosen readout; ± 2 SE)")
        ax.set_title("test learning curve (disjoint training sets below the largest N)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside: the curves fill the panel
    fig.suptitle("CIFAR-10 subset: weight correlation with ZCA and flips (results/small-data)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--best"]:  # run.sh's choice for N = 1,280: "NETWORK CONFIG"
        print(*best())
    else:
        main()

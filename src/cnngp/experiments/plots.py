"""Figures. Matplotlib's object-oriented API on the Agg canvas (no display needed).

:func:`sweep_figure` draws the readout-lengthscale sweep of ``cnngp sweep``, and
:func:`reliability_figure` the reliability diagram of its test predictions (with ``--test``).

:func:`correlation_figure_data` computes, and :func:`plot_correlation_figure` draws, a
two-panel figure on a real image (docs/maths.md §1–2):

* left: for finite networks of growing width C, the correlation *across the C channels of one
  network* between the last hidden layer's pre-activations at two distant positions p, p'.
  It scatters around, and converges (spread ∝ 1/√C) to, the infinite-width value
  K[p, p'] / √(K[p, p] K[p', p']) read off the kernel — for independent conv weights and for
  correlated (Matérn-3/2) conv weights, whose limits differ. Pre-activations are zero-mean
  under the prior, so this channel-wise cosine is a correlation;
* right: the normalised readout kernel k(x, x') / √(k(x, x) k(x', x')) of an image and its
  translate (and of two different images) against the lengthscale λ of a Matérn-3/2 readout,
  from independent (λ → 0: flatten, positions compared one by one) to mean pooling (λ → ∞),
  with finite-network Monte Carlo estimates at a few λ.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from cnngp.errors import CNNGPError

__all__ = [
    "sweep_figure",
    "reliability_figure",
    "accuracy_2se",
    "correlation_figure_data",
    "CorrelationFigure",
    "plot_correlation_figure",
    "save_correlation_figure",
    "sidecar_path",
    "check_sidecar",
    "summary",
]


# -- readout sweep figure ----------------------------------------------------------------------


def binomial_se(row: dict) -> bool:
    """Whether :func:`accuracy_2se` of a sweep row is the binomial one: one data set (its
    spread over blocks is undefined), or several whose accuracies agree exactly (a spread of
    0 is degenerate, not a certainty: two blocks of 40 easily agree)."""
    if int(row.get("n_datasets", 1)) <= 1:
        return True
    blocks = row.get("block_cv_accuracies")
    if blocks:  # equal to rounding (a mean of fold accuracies: 0.85 and 0.8500000000000001)
        return max(float(a) for a in blocks) - min(float(a) for a in blocks) <= _AGREE_ATOL
    return float(row.get("cv_accuracy_2se", 0.0)) <= _AGREE_ATOL


#: block accuracies this close agree (accuracies are multiples of 1/N: a real difference is far larger)
_AGREE_ATOL = 1e-12


def accuracy_2se(row: dict) -> float:
    """±2 SE of a sweep row's CV accuracy: over its disjoint data sets when there are several
    that differ, else (one data set, whose spread over blocks is undefined and stored as 0, or
    blocks that all agree) the binomial 2·sqrt(p(1 − p)/M) of its M = N × sets held-out
    predictions (:func:`binomial_se` says which).

    >>> round(accuracy_2se({"n": 640, "cv_accuracy": 0.5, "cv_accuracy_2se": 0.0, "n_datasets": 1}), 6)
    0.039528
    >>> round(accuracy_2se({"n": 320, "cv_accuracy": 0.5, "cv_accuracy_2se": 0.0, "n_datasets": 2,
    ...                     "block_cv_accuracies": [0.5, 0.5]}), 6)
    0.039528
    >>> round(accuracy_2se({"n": 40, "cv_accuracy": 0.85, "cv_accuracy_2se": 1.6e-16, "n_datasets": 2,
    ...                     "block_cv_accuracies": [0.8500000000000001, 0.85]}), 6)  # agree to rounding
    0.079844
    """
    if not binomial_se(row):
        return float(row["cv_accuracy_2se"])
    p = float(row["cv_accuracy"])
    m = int(row["n"]) * max(1, int(row.get("n_datasets", 1)))
    return 2.0 * math.sqrt(p * (1.0 - p) / m)


def _save(fig, path, format: str | None) -> None:
    """``fig.savefig`` into ``path``: a file object as it is (PNG unless ``format``), a path
    atomically (a temporary file renamed into place: never a half-written figure; the format
    from its extension unless given)."""
    if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
        fig.savefig(path, dpi=120, format=format or "png")
        return
    from cnngp.engine.storage import atomic_write

    path = Path(os.fsdecode(path))
    fmt = format or path.suffix.lstrip(".").lower() or "png"
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format=fmt), what="path")


def input_words(config: dict) -> str:
    """How a sweep's kernels saw the images, for titles and headers: ``""``, or ``", flip-averaged"``
    and ``", ZCA ε=0.1 (fitted on …)"`` from its ``config`` (``flip``, ``zca``, ``zca_fit``)."""
    words = ", flip-averaged" if config.get("flip") else ""
    if config.get("zca") is not None:
        fit = config.get("zca_fit") or {}
        where = {"train": "the N_max", "rest": "outside the N_max"}.get(fit.get("fit", "train"), "")
        if "fit" not in fit and str(fit.get("fitted_on_images", "")).startswith("the "):  # cnngp ensemble's
            where = fit["fitted_on_images"]
        if fit.get("fit_outside") is not None:
            where = f"outside the balanced {fit['fit_outside']}"
        words += f", ZCA ε={config['zca']:g}" + (f" (fitted on {where})" if where.startswith("the") else
                                                   f" (fitted {where})" if where else "")
    return words


def sweep_figure(results: dict, path, title: str | None = None, format: str | None = None,
                 reference: dict | None = None, reference_label: str = "paper"):
    """Cross-validated accuracy against log10 λ, one curve per N (the paper's Figure 2).

    Parameters
    ----------
    results : dict
        The output of :func:`cnngp.experiments.sweep.run_sweep` (or a loaded ``results.json``).
    path : str, path-like or binary file object
        Where to save the figure.
    title : str, optional
        Default: ``"<arch> on <data>"`` from ``results["config"]``.
    format : str, optional
        Image format; default from the file name, ``"png"`` for file objects.
    reference : dict, optional
        Published numbers to overlay as hollow markers, N → {"independent", "mean_pool",
        "best_lengthscale", "best"} in % (e.g. :data:`cnngp.experiments.paper.CNNGP14`); only the
        N of ``results`` are drawn.

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Each N gets a line through the swept lengthscales with a ±2 SE band over its disjoint
    data sets (binomial over its predictions where there is one: :func:`accuracy_2se`); the
    independent readout (λ = 0) is a square at the left end, mean pooling (λ = ∞) a diamond at the right end (slightly offset per N so they do not hide each
    other), and the best readout for that N is a star. With ``--test all`` results (every
    readout scored on the test split) a lower panel shows each readout's test NLL (±2 SE over
    the test images) and ECE against the same λ axis: the models trained on ``N_max``.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = results["results"]
    cfg = results.get("config", {})
    ns = sorted({int(r["n"]) for r in rows})
    ends = ("independent", "constant")

    def lam(r):
        v = r["lengthscale"]
        return math.inf if v == "inf" else float(v)

    def swept(r):
        return r["readout"] not in ends and 0 < lam(r) < math.inf

    logs = [math.log10(lam(r)) for r in rows if swept(r)]
    lo, hi = (min(logs), max(logs)) if logs else (0.0, 0.0)
    gap = max(0.6, 0.08 * (hi - lo))
    x_ind, x_const = lo - gap, hi + gap

    def xpos(r):
        v = lam(r)
        if r["readout"] == "independent" or v == 0:
            return x_ind
        if r["readout"] == "constant" or math.isinf(v):
            return x_const
        return math.log10(v)

    scored = [r for r in rows if ns and int(r["n"]) == ns[-1] and r.get("test_nll") is not None]
    if len(scored) > 1:  # --test all: a lower panel of test NLL and ECE along the same λ axis
        fig = Figure(figsize=(7.5, 6.8))
        FigureCanvasAgg(fig)
        ax, low = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.35]})
    else:
        fig = Figure(figsize=(7.5, 4.8))
        FigureCanvasAgg(fig)
        ax, low = fig.add_subplot(), None
    cmap = colormaps["viridis"]
    for k, n in enumerate(ns):
        color = cmap(0.85 * k / max(1, len(ns) - 1))
        dodge = 0.12 * (k - (len(ns) - 1) / 2)  # keep the end markers of different N apart
        at_n = [r for r in rows if int(r["n"]) == n]
        curve = sorted((r for r in at_n if swept(r)), key=lam)
        sets = at_n[0]["n_datasets"] if at_n else 0
        degenerate = sets > 1 and any(binomial_se(r) for r in at_n)
        label = f"N = {n}" + (f" ({sets} sets{', binomial SE where they agree' if degenerate else ''})"
                              if sets > 1 else " (1 set: binomial SE)")
        if curve:
            x = np.array([math.log10(lam(r)) for r in curve])
            y = 100 * np.array([r["cv_accuracy"] for r in curve])
            e = 100 * np.array([accuracy_2se(r) for r in curve])
            ax.plot(x, y, "-", marker="o", ms=3, color=color, label=label)
            ax.fill_between(x, y - e, y + e, color=color, alpha=0.18, linewidth=0)
            label = None
        for name, marker in (("independent", "s"), ("constant", "D")):
            r = next((r for r in at_n if r["readout"] == name), None)
            if r is not None:
                ax.errorbar(
                    xpos(r) + dodge, 100 * r["cv_accuracy"], yerr=100 * accuracy_2se(r),
                    fmt=marker, ms=6, color=color, capsize=3, label=label,
                )
                label = None
        best = next((b for b in results.get("best", []) if int(b["n"]) == n), None)
        if best is None and at_n:
            best = max(at_n, key=lambda r: r["cv_accuracy"])
        if best is not None:
            xb = xpos(best)
            ax.plot(
                xb + (dodge if xb in (x_ind, x_const) else 0.0), 100 * best["cv_accuracy"],
                marker="*", ms=15, color=color, markeredgecolor="black", linestyle="none",
                zorder=5,
            )
        tested = [r for r in at_n if r.get("test_accuracy") is not None]
        if tested:  # --test: the models trained on this N, scored on the test split
            tx = [xpos(r) + (dodge if xpos(r) in (x_ind, x_const) else 0.0) for r in tested]
            order = np.argsort(tx)
            ax.plot(np.array(tx)[order], 100 * np.array([r["test_accuracy"] for r in tested])[order],
                    "--" if len(tested) > 1 else "", marker="^", ms=7, mfc="none", color=color,
                    label=f"N = {n}: test accuracy", zorder=4)
        ref = (reference or {}).get(n)
        if ref is not None:  # the published values: hollow markers of the same colour
            lam_best = ref.get("best_lengthscale")
            x_best = x_const if lam_best is None or math.isinf(lam_best) else math.log10(lam_best)
            for xv, yv, marker in ((x_ind, ref.get("independent"), "s"), (x_const, ref.get("mean_pool"), "D"),
                                   (x_best, ref.get("best"), "*")):
                if yv is not None:
                    ax.plot(xv + (dodge if xv in (x_ind, x_const) else 0.0) + 0.05, yv, marker=marker,
                            ms=12 if marker == "*" else 8, markerfacecolor="none", markeredgecolor=color,
                            markeredgewidth=1.5, linestyle="none", zorder=6)
    ax.plot([], [], marker="*", ms=12, color="white", markeredgecolor="black",
            linestyle="none", label="best readout")
    if reference:
        ax.plot([], [], marker="o", ms=8, markerfacecolor="none", markeredgecolor="black",
                linestyle="none", label=f"{reference_label} (hollow)")
    for xv in (x_ind + gap / 2, x_const - gap / 2):
        ax.axvline(xv, color="0.8", lw=0.8, ls=":")
    ticks = list(range(math.ceil(lo), math.floor(hi) + 1)) if logs else []
    ax.set_xticks([x_ind, *ticks, x_const])
    ax.set_xticklabels(["indep.\n(λ=0)", *[str(t) for t in ticks], "mean pool\n(λ=∞)"])
    family = cfg.get("family", "matern32")
    if low is not None:
        _probability_panel(low, scored, xpos, ns[-1], (x_ind + gap / 2, x_const - gap / 2))
    (ax if low is None else low).set_xlabel(f"log10 λ of the {family} readout (index units of its grid)")
    any_test = any(r.get("test_accuracy") is not None for r in rows)
    ax.set_ylabel(f"{cfg.get('folds', 4)}-fold CV accuracy (%), ±2 SE" + ("; test (▵)" if any_test else ""))
    if title is None:
        kind = "NTK" if cfg.get("kernel") == "ntk" else "NNGP"
        arch, data = cfg.get("arch"), cfg.get("dataset", cfg.get("data"))
        kind += input_words(cfg)
        title = f"{arch} {kind} on {data}" if arch and data else f"readout lengthscale sweep ({kind})"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    _save(fig, path, format)
    return fig


def _probability_panel(ax, scored: list, xpos, n: int, dividers) -> None:
    """The sweep figure's lower panel: test NLL (left axis, ±2 SE over the test images) and ECE
    (right axis) of every readout trained on the ``n`` images, at the upper panel's positions."""
    rows = sorted(scored, key=xpos)
    lo, hi = dividers
    # the swept λ as lines, the two ends (independent, mean pool) as markers apart, as above
    parts = [[r for r in rows if xpos(r) < lo], [r for r in rows if lo <= xpos(r) <= hi],
             [r for r in rows if xpos(r) > hi]]
    ece = ax.twinx()
    for k, part in enumerate(p for p in parts if p):
        x = np.array([xpos(r) for r in part])
        nll = np.array([r["test_nll"] for r in part])
        err = np.array([r.get("test_nll_2se", 0.0) or 0.0 for r in part])
        style = "-" if len(part) > 1 else ""
        ax.errorbar(x, nll, yerr=err if len(part) == 1 else None, fmt=style, marker="o", ms=3, color="C3",
                    capsize=3, label="test NLL" if k == 0 else None)
        if len(part) > 1:
            ax.fill_between(x, nll - err, nll + err, color="C3", alpha=0.18, linewidth=0)
        ece.plot(x, [100 * r["test_ece"] for r in part], "--" if len(part) > 1 else "", marker="s", ms=3,
                 color="C0", label="ECE" if k == 0 else None)
    ax.set_ylabel("test NLL", color="C3")
    ece.set_ylabel("ECE (%)", color="C0")
    for xv in dividers:
        ax.axvline(xv, color="0.8", lw=0.8, ls=":")
    ax.set_title(f"test split, each readout trained on N = {n}: NLL (±2 SE) and ECE", fontsize="small")
    ax.grid(True, alpha=0.3)


def reliability_figure(results: dict, path, title: str | None = None, format: str | None = None):
    """Reliability diagram of the sweep's test predictions (the CV-selected model at N_max).

    Top: for each equal-width bin of the top-label confidence, the fraction of its test images
    whose most probable class is right (bars), against the bin's mean confidence (red ticks)
    and the diagonal of perfect calibration; bottom: how many images fall in each bin. The
    title line gives test accuracy, NLL, ECE and the calibration scale τ
    (:mod:`cnngp.inference.calibration`; ``results["config"]["test_probabilities"]``).

    Parameters
    ----------
    results : dict
        The output of :func:`cnngp.experiments.sweep.run_sweep` with ``test`` (or a loaded
        ``results.json``): ``results["test"]["reliability"]``.
    path : str, path-like or binary file object
        Where to save the figure.
    title : str, optional
        Default: ``"<arch> on <data>: <readout>, test"``.
    format : str, optional
        Image format; default from the file name, ``"png"`` for file objects.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    test = results.get("test") or {}
    rel = test.get("reliability")
    if not rel:
        raise CNNGPError("results: no test reliability data (run the sweep with test, --test, in a "
                         "version that scores probabilities)")
    edges = np.asarray(rel["edges"], dtype=float)
    centres, width = 0.5 * (edges[:-1] + edges[1:]), np.diff(edges)
    full = [k > 0 for k in rel["count"]]
    acc = np.array([a if f else np.nan for a, f in zip(rel["accuracy"], full)], dtype=float)
    conf = np.array([c if f else np.nan for c, f in zip(rel["confidence"], full)], dtype=float)
    fig = Figure(figsize=(5.6, 6.2))
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(centres, np.nan_to_num(acc), width=width, color="tab:blue", alpha=0.75,
            edgecolor="white", label="accuracy in the bin")
    top.plot(conf, conf, linestyle="none", marker="_", ms=14, mew=2, color="tab:red",
             label="mean confidence in the bin")
    for x, a, c in zip(centres, acc, conf):
        if np.isfinite(a):  # the gap |accuracy - confidence| the ECE weighs by the bin's share
            top.plot([x, x], [a, c], color="tab:red", lw=1, alpha=0.6)
    top.plot([0, 1], [0, 1], color="0.4", linestyle="--", lw=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize="small")
    top.grid(True, alpha=0.3)
    bottom.bar(centres, rel["count"], width=width, color="0.5", edgecolor="white")
    bottom.set_xlabel(f"confidence: largest class probability ({rel['n_bins']} equal-width bins)")
    bottom.set_ylabel("test images")
    bottom.set_yscale("symlog", linthresh=1)  # the few images of low confidence stay visible
    bottom.grid(True, alpha=0.3)
    cfg = results.get("config", {})
    if title is None:
        arch, data = cfg.get("arch"), cfg.get("dataset", cfg.get("data"))
        readout = test.get("readout", "")
        if readout not in ("independent", "constant", ""):
            lam = test.get("lengthscale")
            readout = f"{readout} λ={lam}" if isinstance(lam, str) else f"{readout} λ={float(lam):.3g}"
        title = (f"{arch}{input_words(cfg)} on {data}: {readout}, test" if arch and data
                 else "reliability (test)")
    line = (f"accuracy {100 * test['test_accuracy']:.1f} %, NLL {test['test_nll']:.3f}, "
            f"ECE {100 * test['test_ece']:.1f} %, τ = {test['calibration_scale']:.3g} "
            f"(N={test.get('n_train')}, {rel['n']} test images)")
    top.set_title(f"{title}\n{line}", fontsize="small")
    fig.tight_layout()
    _save(fig, path, format)
    return fig


def _best_per_n(results: dict) -> dict:
    """N → the row of the readout with the best CV accuracy (the sweep's choice)."""
    out = {}
    for r in results["results"]:
        n = int(r["n"])
        if n not in out or r["cv_accuracy"] > out[n]["cv_accuracy"]:
            out[n] = r
    return out


def figure3(variants: dict, path, reference: dict | None = None, reference_n: int = 1280,
            title: str | None = None, format: str | None = None):
    """The paper's Figure 3 in our terms: Myrtle10 variants (pooled; 6×6 stride-2 convs with
    independent or correlated taps) side by side.

    Parameters
    ----------
    variants : dict
        Label → sweep results (``results.json`` of :func:`cnngp.experiments.sweep.run_sweep`).
    path : str, path-like or binary file object
    reference : dict, optional
        The paper's numbers (:data:`cnngp.experiments.paper.FIGURE3`: ``pooled``,
        ``independent_6x6``, ``correlated_6x6``, each a % or a (low, high) range), drawn as
        hollow markers at N = ``reference_n`` on the left panel.

    Left: the best readout's CV accuracy (±2 SE over disjoint blocks, binomial where there is
    one block: :func:`accuracy_2se`) against N per variant. Right: the readout λ sweep of every
    variant at its largest N, with ±2 SE bands.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4.8))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    all_n = set()
    for k, (label, res) in enumerate(variants.items()):
        color = f"C{k}"
        best = _best_per_n(res)
        ns = sorted(best)
        all_n |= set(ns)
        ax.errorbar(np.log2(ns), [100 * best[n]["cv_accuracy"] for n in ns],
                    yerr=[100 * accuracy_2se(best[n]) for n in ns], fmt="o-", color=color,
                    capsize=3, label=label)
        n_max = ns[-1]
        rows = [r for r in res["results"] if int(r["n"]) == n_max]

        def lam(r):
            v = r["lengthscale"]
            return math.inf if v == "inf" else float(v)

        curve = sorted((r for r in rows if 0 < lam(r) < math.inf), key=lam)
        if curve:
            x = np.log10([lam(r) for r in curve])
            y = 100 * np.array([r["cv_accuracy"] for r in curve])
            e = 100 * np.array([accuracy_2se(r) for r in curve])
            ax2.plot(x, y, "-", color=color, label=f"{label}, N = {n_max}")
            ax2.fill_between(x, y - e, y + e, color=color, alpha=0.15, linewidth=0)
            for r, marker, xv in ((next((r for r in rows if lam(r) == 0), None), "s", x[0] - 0.8),
                                  (next((r for r in rows if math.isinf(lam(r))), None), "D", x[-1] + 0.8)):
                if r is not None:
                    ax2.errorbar(xv, 100 * r["cv_accuracy"], yerr=100 * accuracy_2se(r), fmt=marker,
                                 color=color, capsize=3)
    if reference:
        xr = math.log2(reference_n)
        for k, (key, label) in enumerate((("pooled", "pooled"), ("independent_6x6", "6×6 independent"),
                                          ("correlated_6x6", "6×6 correlated"))):
            v = reference.get(key)
            if v is None:
                continue
            lo, hi = (v, v) if not isinstance(v, (tuple, list)) else v
            xv = xr + 0.06 * (k - 1)
            ax.errorbar(xv, (lo + hi) / 2, yerr=[[(hi - lo) / 2], [(hi - lo) / 2]], fmt="o", mfc="none",
                        color=f"C{k}", capsize=4, ms=9, mew=1.5)
        ax.plot([], [], "o", mfc="none", color="black", ms=9, label=f"paper, N = {reference_n} (hollow; ranges as bars)")
        all_n.add(reference_n)
    ticks = sorted(all_n)
    ax.set_xticks(np.log2(ticks))
    ax.set_xticklabels([str(n) for n in ticks])
    ax.set_xlabel("training set size N")
    ax.set_ylabel("4-fold CV accuracy of the best readout (%), ±2 SE\n(over blocks; binomial for one block)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title or "Myrtle10: pooling vs 6×6 stride-2 convs (independent / correlated taps)", fontsize="medium")
    ax2.set_xlabel("log10 λ of the Matérn-3/2 readout (square: independent, diamond: mean pool)")
    ax2.set_ylabel("4-fold CV accuracy (%), ±2 SE")
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="best", fontsize="small")
    ax2.set_title("readout sweep at the largest N", fontsize="medium")
    fig.tight_layout()
    _save(fig, path, format)
    return fig


# -- Monte Carlo correlation figure ------------------------------------------------------------


def _body(depth: int, correlation, relu_last: bool):
    from cnngp.kernels.layers import Conv, ReLU

    layers = [layer for _ in range(depth) for layer in (Conv(3, correlation=correlation), ReLU())]
    return layers if relu_last else layers[:-1]


def _pair_correlation_limit(body_layers, image, p, q, ex) -> float:
    """K[p, q] / √(K[p, p] K[q, q]) of the body's output for one image, from the kernel engine.

    Three unnormalised rank-one readouts e_p e_pᵀ, e_q e_qᵀ, (e_p + e_q)(e_p + e_q)ᵀ read
    K[p, p], K[q, q] and K[p, p] + K[q, q] + 2 K[p, q] in one pass.
    """
    from cnngp.kernels.correlations import UserCorrelation
    from cnngp.engine.gram import readout_sweep
    from cnngp.kernels.layers import Readout, Serial

    h, w = image.shape[1:3]
    ip, iq = p[0] * w + p[1], q[0] * w + q[1]
    e1, e2 = np.zeros(h * w), np.zeros(h * w)
    e1[ip], e2[iq] = 1.0, 1.0
    readouts = [Readout(correlation=UserCorrelation(np.outer(v, v), normalise=False)) for v in (e1, e2, e1 + e2)]
    k = readout_sweep(Serial(*body_layers), readouts, image, execution=ex)[:, 0, 0].numpy()
    kpp, kqq, ksum = k
    return float((ksum - kpp - kqq) / 2.0 / math.sqrt(kpp * kqq))


def _finite_pair_correlations(body_layers, image, p, q, width, draws, seed, device, progress) -> list:
    """Channel-wise correlation of each of ``draws`` finite networks (network k: seed k)."""
    import torch

    from cnngp.finite import FiniteNetwork, network_seed

    per_batch = max(1, min(draws, (1 << 22) // max(width * width * 9 * len(body_layers), 1)))
    values = []
    with torch.no_grad():
        for start in range(0, draws, per_batch):
            seeds = [network_seed(seed, k) for k in range(start, min(draws, start + per_batch))]
            net = FiniteNetwork(body_layers, image.shape[-1], width, seeds, device=device,
                                spatial=image.shape[1:-1])
            z = net.run(torch.as_tensor(image)).to(torch.float64)[0]  # (G, C, H, W)
            a, b = z[:, :, p[0], p[1]], z[:, :, q[0], q[1]]
            r = (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1))
            values += r.cpu().tolist()
            if progress is not None:
                progress.update(len(seeds))
    return values


def _normalised_estimate(est: np.ndarray) -> dict:
    """k12 / √(k11 k22) from per-network estimates (S, 2, 2), with a delta-method s.e.

    The ratio of the Monte Carlo means; its standard error from the per-network covariance of
    (e12, e11, e22), linearised. Common fluctuations of the three (a network's overall scale)
    cancel in the ratio, so it is much better determined than each entry.
    """
    s = est.shape[0]
    e = np.stack([est[:, 0, 1], est[:, 0, 0], est[:, 1, 1]], axis=1)
    m = e.mean(0)
    r = m[0] / math.sqrt(m[1] * m[2])
    grad = r * np.array([1.0 / m[0], -0.5 / m[1], -0.5 / m[2]])
    var = float(grad @ np.cov(e, rowvar=False) @ grad) / s
    return {"value": float(r), "se": math.sqrt(max(var, 0.0))}


@dataclass(frozen=True)
class CorrelationFigure:
    """The settings of the correlation figure (see the module docstring): ``index`` and
    ``other`` (the image used and the second image of the λ panel), ``depth`` (conv+ReLU
    layers), ``positions`` (two grid positions), ``widths`` and ``draws`` (finite networks of
    the left panel), ``conv_lengthscale`` (Matérn-3/2 λ of the correlated convs), ``shift``
    (translation of the λ panel, pixels), ``lengthscales`` (readout λ, default the paper's
    grid), ``mc_width``, ``mc_samples``, ``mc_lengthscales``, ``mc_outputs`` (the Monte Carlo
    points), ``centre`` (subtract the per-channel mean pixel first: without it, the large
    common mean of [0, 1] pixels pushes every correlation towards 1) and ``seed``."""

    index: int = 0
    other: int = 1
    depth: int = 4
    positions: tuple = ((8, 8), (24, 24))
    widths: tuple = (8, 32, 128, 512)
    draws: int = 8
    conv_lengthscale: float = 3.0
    shift: int = 4
    lengthscales: tuple | None = None
    mc_width: int = 64
    mc_samples: int = 200
    mc_lengthscales: tuple = (0.3, 1.0, 3.0, 10.0, 30.0)
    mc_outputs: int = 16
    centre: bool = True
    seed: int = 0


def correlation_figure_data(images, figure: CorrelationFigure | None = None, *, execution=None,
                            **options) -> dict:
    """Compute the numbers of the figure (see the module docstring). JSON-serialisable dict.

    Parameters
    ----------
    images : array (N, H, W, C)
        Real images in [0, 1] (uint8 is scaled); ``images[index]`` is the image used,
        ``images[other]`` the second image of the λ panel.
    centre : bool
        Subtract the per-channel mean pixel of ``images`` first (without it, the large common
        mean of [0, 1] pixels pushes every correlation towards 1).
    figure : CorrelationFigure, optional
        The figure's settings; ``options`` may also name them (``depth=2``).
    execution, **options
        The execution options (:class:`cnngp.Execution`) ``device``, ``engine`` and ``progress``.
    """
    from cnngp.engine.execution import Execution

    settings = {k: options.pop(k) for k in list(options) if k in {f.name for f in fields(CorrelationFigure)}}
    figure = dataclasses.replace(figure or CorrelationFigure(), **settings)
    ex = Execution.build(execution, options, where="correlation_figure_data",
                         accepted=("device", "engine", "progress"))
    index, other, depth, positions = figure.index, figure.other, figure.depth, figure.positions
    widths, draws, conv_lengthscale, shift = figure.widths, figure.draws, figure.conv_lengthscale, figure.shift
    lengthscales, mc_width, mc_samples = figure.lengthscales, figure.mc_width, figure.mc_samples
    mc_lengthscales, mc_outputs, centre, seed = figure.mc_lengthscales, figure.mc_outputs, figure.centre, figure.seed
    device, progress = ex.device, ex.progress
    kernel_ex = ex.replace(dtype="float64", progress=False)
    import torch

    from cnngp.kernels.correlations import Constant, Independent, Matern
    from cnngp.finite import monte_carlo_estimates
    from cnngp.engine.gram import as_images, readout_sweep
    from cnngp.kernels.layers import Readout, Serial

    x = as_images(images, "images")
    if x.ndim != 4:
        raise CNNGPError(f"images: expected (N, H, W, C), got shape {x.shape}")
    h, w = x.shape[1:3]
    for pos in positions:
        if not (0 <= pos[0] < h and 0 <= pos[1] < w):
            raise CNNGPError(f"positions: {tuple(pos)} is outside the {h}x{w} grid")
    mean = x.mean(axis=(0, 1, 2)) if centre else np.zeros(x.shape[-1])
    x = x - mean
    if not 0 <= shift < w:  # np.roll wraps: a shift of w or more would be another, unlabelled one
        raise CNNGPError(f"shift: expected 0 <= shift < {w} (the images' width), got {shift}")
    for name, i in (("index", index), ("other", other)):
        if not np.any(x[i]):  # every feature's variance would be 0: correlations 0/0
            raise CNNGPError(f"{name}: image {i} is all zeros{' after centring' if centre else ''}, so its "
                             "features have no variance to correlate; pick another image")
    image = x[index : index + 1]
    p, q = (tuple(int(v) for v in pos) for pos in positions)
    priors = {
        "independent": Independent(),
        f"Matérn-3/2, λ = {conv_lengthscale:g}": Matern(1.5, conv_lengthscale),
    }
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * draws * len(widths) + len(mc_lengthscales) * mc_samples, unit="net",
                   desc="correlation figure")
    left = {}
    for name, corr in priors.items():
        layers = _body(depth, corr, relu_last=False)
        left[name] = {
            "limit": _pair_correlation_limit(layers, image, p, q, kernel_ex),
            "finite": {
                str(c): _finite_pair_correlations(layers, image, p, q, c, draws, seed, device, bar)
                for c in widths
            },
        }

    # right panel: independent conv body, Matérn-3/2 readout over the last grid
    if lengthscales is None:
        lengthscales = np.logspace(-1.5, 4.5, 25)  # the paper's grid (docs/maths.md §5)
    lengthscales = [float(v) for v in lengthscales]
    moved = np.roll(image, shift, axis=2)  # translate right by `shift` pixels (wrapped)
    trio = np.concatenate([image, moved, x[other : other + 1]])
    body = Serial(*_body(depth, Independent(), relu_last=True))
    readouts = [Readout(correlation=Matern(1.5, lam)) for lam in lengthscales]
    readouts += [Readout(correlation=Independent()), Readout(correlation=Constant())]
    k = readout_sweep(body, readouts, trio, execution=kernel_ex).numpy()  # (L, 3, 3)

    def normalised(m, i, j):
        return float(m[i, j] / math.sqrt(m[i, i] * m[j, j]))

    right = {
        "lengthscales": lengthscales,
        "translate": [normalised(m, 0, 1) for m in k[:-2]],
        "other_image": [normalised(m, 0, 2) for m in k[:-2]],
        "independent": {"translate": normalised(k[-2], 0, 1), "other_image": normalised(k[-2], 0, 2)},
        "mean_pool": {"translate": normalised(k[-1], 0, 1), "other_image": normalised(k[-1], 0, 2)},
        "monte_carlo": [],
    }
    for lam in mc_lengthscales:
        net = Serial(*body.layers, Readout(correlation=Matern(1.5, lam)))
        est = monte_carlo_estimates(
            net, trio[:2], width=mc_width, n_samples=mc_samples, seed=seed, n_outputs=mc_outputs,
            device=device,
        ).numpy()
        right["monte_carlo"].append({"lengthscale": float(lam), **_normalised_estimate(est)})
        if bar is not None:
            bar.update(mc_samples)
    if bar is not None:
        bar.close()
    config = {
        "index": index,
        "other": other,
        "depth": depth,
        "architecture": f"{depth} x (3x3 conv, SAME, no bias, relu); left panel: pre-activations "
        "of the last conv; right panel: + Matérn-3/2 readout",
        "positions": [list(p), list(q)],
        "widths": [int(c) for c in widths],
        "draws": draws,
        "conv_lengthscale": conv_lengthscale,
        "shift": shift,
        "mc_width": mc_width,
        "mc_samples": mc_samples,
        "mc_outputs": mc_outputs,
        "centre": centre,
        "mean_pixel": [float(v) for v in mean],
        "seed": seed,
        "device": str(device),
        "execution": ex.as_dict(),
        "torch": torch.__version__,
    }
    return {"left": left, "right": right, "config": config}


def plot_correlation_figure(data: dict):
    """Draw the two panels; returns a matplotlib Figure (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.3), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    colours = ["tab:blue", "tab:orange", "tab:green"]
    cfg = data["config"]
    for (name, d), colour in zip(data["left"].items(), colours):
        widths = sorted(int(c) for c in d["finite"])
        rng = np.random.default_rng(0)  # horizontal jitter only
        for c in widths:
            vals = np.asarray(d["finite"][str(c)])
            jitter = c * np.exp(rng.uniform(-0.08, 0.08, vals.size))
            ax1.scatter(jitter, vals, s=10, color=colour, alpha=0.45, linewidths=0)
        means = [np.mean(d["finite"][str(c)]) for c in widths]
        sds = [np.std(d["finite"][str(c)], ddof=1) for c in widths]
        ax1.errorbar(widths, means, yerr=sds, color=colour, marker="o", capsize=3, lw=1.2,
                     label=f"{name}: finite (mean ± sd)")
        ax1.axhline(d["limit"], color=colour, ls="--", lw=1, label=f"{name}: kernel (C → ∞)")
    ax1.set_xscale("log", base=2)
    all_widths = sorted({int(c) for d in data["left"].values() for c in d["finite"]})
    ax1.set_xticks(all_widths, [str(c) for c in all_widths])
    ax1.minorticks_off()
    ax1.set_xlabel("width C (channels)")
    ax1.set_ylabel("correlation across channels")
    (p, q) = cfg["positions"]
    ax1.set_title(f"last-layer pre-activations at {tuple(p)} and {tuple(q)}", fontsize=10)
    ax1.legend(fontsize=7.5, loc="lower right")

    r = data["right"]
    lam = np.asarray(r["lengthscales"])
    ax2.plot(lam, r["translate"], color="tab:purple", label=f"image vs. itself shifted {cfg['shift']} px")
    ax2.plot(lam, r["other_image"], color="tab:gray", label="image vs. another image")
    for key, style in (("independent", ":"), ("mean_pool", "-.")):
        for sub, colour in (("translate", "tab:purple"), ("other_image", "tab:gray")):
            ax2.axhline(r[key][sub], color=colour, ls=style, lw=0.8, alpha=0.7)
    mc = r["monte_carlo"]
    if mc:
        ax2.errorbar([m["lengthscale"] for m in mc], [m["value"] for m in mc],
                     yerr=[2 * m["se"] for m in mc], fmt="o", ms=4, color="black", capsize=3,
                     label=f"finite nets, C = {cfg['mc_width']}, {cfg['mc_samples']} draws (±2 s.e.)")
    ax2.set_xscale("log")
    ax2.set_xlabel("readout lengthscale λ (Matérn-3/2, grid units)")
    ax2.set_ylabel("k(x, x′) / √(k(x, x) k(x′, x′))")
    ax2.set_title("readout kernel: independent (dotted) → mean pool (dash-dot)", fontsize=10)
    ax2.legend(fontsize=7.5, loc="best")
    fig.suptitle(
        f"{cfg['depth']}-layer CNN on one real image: finite networks approach the kernel; "
        "correlated readouts keep spatial structure",
        fontsize=11,
    )
    return fig


def sidecar_path(out) -> Path:
    """The JSON file written next to a figure: ``fig.png`` → ``fig.json``."""
    return Path(out).with_suffix(".json")


def check_sidecar(out, what: str = "--out") -> Path:
    """Refuse, before any work, a figure whose sidecar path holds a file that is not a cnngp
    figure's numbers (a JSON object with ``config`` and ``versions``): it is never overwritten."""
    from cnngp.engine.storage import check_output_file
    from cnngp.errors import CNNGPError

    path = check_output_file(sidecar_path(out), f"{what} (its sidecar .json)")
    if path.exists():
        try:
            ours = set(json.loads(path.read_text())) >= {"config", "versions"}
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise CNNGPError(f"{what}: its sidecar {str(path)!r} exists and is not a cnngp figure's numbers; "
                             "it is not overwritten (move it, or give another --out)")
    return path


def save_correlation_figure(data: dict, out) -> None:
    """Write the PNG (config in its metadata) and a sidecar JSON with every number, atomically
    and as a pair."""
    from cnngp.engine.storage import check_output_file, write_files

    out = Path(out)
    if out.suffix.lower() != ".png":
        from cnngp.errors import CNNGPError

        raise CNNGPError(f"--out: expected a .png file name, got {str(out)!r}")
    fig = plot_correlation_figure(data)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130,
                metadata={"Description": json.dumps(data["config"]), "Software": "cnngp"})
    text = json.dumps(data, indent=1) + "\n"
    sidecar = sidecar_path(out)
    check_output_file(sidecar, "--out")
    check_output_file(out, "--out")
    # the two as one (a failure leaves both as they were), the PNG last
    write_files(out.parent, {sidecar.name: text.encode(), out.name: buf.getvalue()})


def summary(data: dict) -> str:
    """A few printable lines with the figure's numbers."""
    lines = []
    for name, d in data["left"].items():
        widths = sorted(int(c) for c in d["finite"])
        parts = ", ".join(
            f"C={c}: {np.mean(d['finite'][str(c)]):.3f}±{np.std(d['finite'][str(c)], ddof=1):.3f}"
            for c in widths
        )
        lines.append(f"{name} convs: kernel {d['limit']:.3f}; finite {parts}")
    r = data["right"]
    lines.append(
        f"translate pair: independent readout {r['independent']['translate']:.3f}, mean pool "
        f"{r['mean_pool']['translate']:.3f}; Monte Carlo: "
        + ", ".join(f"λ={m['lengthscale']:g}: {m['value']:.3f}±{m['se']:.3f}" for m in r["monte_carlo"])
    )
    return "\n".join(lines)

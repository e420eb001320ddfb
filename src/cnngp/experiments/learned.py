"""Learned readout λ against the paper's grid search, on the same data and folds (issue
"Learn the correlation"; docs/maths.md §8).

One pass computes the offset sums S of the last hidden layer for the training images (and the
test images against them); then both model-selection routes read S only:

- **learned**: maximise the GP log marginal likelihood or the leave-one-out log predictive
  density over (λ, amplitude, σ²) by L-BFGS-B (:func:`cnngp.inference.learn.learn_readout`),
  and score the classifier at the learned values (k-fold CV on the folds of the sweep, or
  the test split with ``test``);
- **grid**: the sweep's protocol, every λ of the grid with σ² from the paper's noise grid by
  k-fold CV accuracy (:func:`cnngp.inference.gp.cross_validate`).

``kernel_evaluations`` counts image-pair kernel values formed from S by each route (the body
pass they share is counted separately in ``body_pair_evaluations``).
"""

from __future__ import annotations

import contextlib
import glob
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnngp.engine.execution import COMPUTE, STORE, Execution
from cnngp.engine.gram import flip_average, kernel, offset_sums
from cnngp.experiments.sweep import (
    _LENDERS_REFUSED, _folds_for, _in_memory, _lent_or_in_full, _store_parts, check_folds_and_seed,
    check_store_zca, check_sweep_archive, is_sweep_archive, note_store_zca, open_cluster, sweep_store_paths,
)
from cnngp.errors import CNNGPError
from cnngp.settings import Settings
from cnngp.inference import gp
from cnngp.inference.selection import first_best
from cnngp.inference.learn import (
    BOUNDS,
    OBJECTIVES,
    LearnResult,
    OffsetReadout,
    learn_network,
    learn_readout,
    learn_spectral_mixture,
    objective_value,
    with_parameters,
)
from cnngp.io.architectures import split_network
from cnngp.io.spec import correlation_from_spec as from_correlation_spec
from cnngp.io.data import Dataset, balanced_subset, load_dataset
from cnngp.io.preprocess import (
    check_zca_fit, check_zca_mirror, check_zca_strength, fit_zca, zca_fit_images, zca_fit_record, zca_fit_words, zca_held_out,
)
from cnngp.kernels.correlations import FAMILIES, PAPER_LENGTHSCALES, family as correlation_family
from cnngp.kernels.layers import Readout, Serial
from cnngp.provenance import array_sha256, versions

LEARNED_FORMAT = "cnngp-learned/1"


def _profile(readout, Y, objective, lam, start):
    """max over (amplitude, σ²) of the objective at a fixed λ (L-BFGS-B, log space)."""
    from scipy.optimize import minimize

    def f(theta):
        t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        amp, noise = torch.exp(t)
        value = objective_value(objective, readout.kernel(lam, amp), Y, noise)
        (-value).backward()
        return -float(value.detach()), t.grad.numpy().copy()

    lo, hi = np.log([1e-4, start[2]]), np.log([1e4, start[3]])
    res = minimize(f, np.log(start[:2]), jac=True, method="L-BFGS-B", bounds=list(zip(lo, hi)),
                   options={"maxiter": 60})
    return -float(res.fun), np.exp(res.x).tolist()


#: the internal λ evaluated first by ``params="internal"`` (taps of the correlated convs), then
#: refined by a bounded Brent search in log λ between the best one's neighbours
INTERNAL_GRID = (0.0, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


def internal_convs(body) -> list[int]:
    """Indices of the body's convs with a stationary (Matérn or RBF) correlation over their
    taps: the intermediate lengthscales ``params="internal"`` learns (tied to one value, as
    the paper's 6×6 convs share one internal λ)."""
    from cnngp.kernels.layers import AvgPool, Conv

    return [i for i, layer in enumerate(body.layers)
            if isinstance(layer, Conv) and not isinstance(layer, AvgPool)
            and getattr(layer.correlation, "lengthscale", None) is not None]


def with_internal(body, indices, lengthscale: float):
    """A copy of ``body`` whose convs ``indices`` have correlation lengthscale ``lengthscale``
    (0: independent taps; the family is kept)."""
    import copy

    net = copy.deepcopy(body)
    for i in indices:  # a new correlation object, not the copy's changed in place
        correlation = copy.copy(net.layers[i].correlation)
        correlation.lengthscale = float(lengthscale)
        net.layers[i].correlation = correlation
    return Serial(*net.layers)


def _internal_stores_prefix(store) -> Path:
    """``S-internal-`` beside ``S.zarr``: the name every internal-λ store begins with."""
    path = Path(store)
    stem = path.name[: -len(".zarr")] if path.name.lower().endswith(".zarr") else path.name
    return path.with_name(f"{stem}-internal-")


def internal_store_path(store, lengthscale: float) -> Path:
    """Where ``params="internal"`` keeps the offset sums at one internal λ beside the store
    ``S.zarr`` of the network as given: ``S-internal-<λ>.zarr``."""
    prefix = _internal_stores_prefix(store)
    return prefix.with_name(f"{prefix.name}{lengthscale:.10g}.zarr")


def internal_archive_path(archive, lengthscale: float) -> Path:
    """Where ``params="internal"`` archives the offset sums at one internal λ in a learn run's
    ``--archive`` folder ``DIR``: ``DIR/internal-<λ>/``, laid out as ``DIR`` itself (``train/``,
    ``test/`` and their ``-mirror`` terms)."""
    return Path(archive) / f"internal-{lengthscale:.10g}"


def _internal_execution(ex, lengthscale: float):
    """The execution of the offset sums at internal λ ``lengthscale``: its own store
    (:func:`internal_store_path`) and tile archive (:func:`internal_archive_path`), lent by
    ``ex.reuse``'s counterpart at that λ (an earlier learn run's store or ``--archive`` folder)
    where there is one."""
    lender = None
    if ex.reuse is not None:
        if is_sweep_archive(ex.reuse):
            lender = internal_archive_path(ex.reuse, lengthscale)
            lender = lender if is_sweep_archive(lender) else None
        else:
            lender = internal_store_path(ex.reuse, lengthscale)
            lender = lender if (lender / "zarr.json").is_file() else None
    return ex.replace(store=internal_store_path(ex.store, lengthscale), reuse=lender,
                      archive=None if ex.archive is None else internal_archive_path(ex.archive, lengthscale))


def _stored_internal(store, known: set, test: bool = False) -> list[float]:
    """The internal λ, other than ``known``, of the stores an earlier run left beside ``store``
    (:func:`internal_store_path`; ``test``: their test stores, ``S-internal-<λ>-test.zarr``)."""
    prefix = _internal_stores_prefix(store)
    end = "-test.zarr" if test else ".zarr"
    found = []
    for path in prefix.parent.glob(f"{glob.escape(prefix.name)}*{end}"):
        try:
            lam = float(path.name[len(prefix.name):-len(end)])
        except ValueError:  # a mirror term's or a test store's name (S-internal-3-mirror.zarr)
            continue
        if lam not in known and (path / "zarr.json").is_file():
            found.append(lam)
    return sorted(found)


def _check_resumed_stores(body, x, x_test, ex, flip) -> None:
    """Refuse, before anything is printed or computed, a store of ``ex.store``'s layout (train,
    test, mirror terms) that exists but holds another computation (other images, network,
    dtype, tile), or a ``--reuse`` that cannot lend to it: the dry run of each
    (:func:`cnngp.engine.distributed.store_dry_run`) refuses it in the words the run would use."""
    from cnngp.engine.distributed import store_dry_run

    for part, x1, x2 in (("train", x, None), ("test", x_test, x)):
        for term, e in ([] if x1 is None else _store_parts(ex, part, flip, None)):
            if (Path(e.store) / "zarr.json").is_file() or (part == "train" and not term and e.reuse is not None):
                _lent_or_in_full(lambda e, x1=x1, x2=x2, term=term: store_dry_run(
                    body, x1, x2, offsets=True, flip=term, execution=e.replace(progress=False)), e, ex)


def learn_store_paths(store, test: bool, flip: bool) -> list[Path]:
    """Every store of offset sums a learn run with ``store`` (``S.zarr``) has written or may
    write: the sweep's layout (train, test, mirror terms) and, of ``params="internal"``, the
    stores at each internal λ already there (:func:`internal_store_path`) with their mirror
    terms and, at the learned λ, test stores."""
    prefix = _internal_stores_prefix(store)
    internal = sorted(prefix.parent.glob(f"{glob.escape(prefix.name)}*.zarr"))
    return sweep_store_paths(Path(store), test, flip) + [
        p for base in internal if not base.name.endswith(("-mirror.zarr", "-test.zarr"))
        for p in sweep_store_paths(base, test, flip) if "-test" not in p.name[len(base.stem):] or p.exists()]


def _learn_internal(body, indices, x, y, S_given, own, *, grid, bias_var, k_cls, fold_list, protocol,
                    ex, progress=None):
    """Profile the objective over one tied internal λ: at each λ one fused body pass gives S,
    then (λ_readout, amplitude, σ²) are learned exactly from S (:func:`learn_readout`). The
    λ of :data:`INTERNAL_GRID` (and the network's own, whose S is ``S_given``) first, then
    ``refine`` steps of a bounded Brent search in log λ around the best. With ``store``, each
    λ's S goes into its own resumable store (:func:`internal_store_path`), so an interrupted
    run resumes without repeating a body pass (the search is deterministic given its values).
    Returns the rows (one per λ, in evaluation order) and the S of the best."""
    from scipy.optimize import minimize_scalar

    family, objective, starts, max_iter = protocol.family, protocol.objective, protocol.starts, protocol.max_iter
    lengthscales, refine, store = protocol.lengthscales, protocol.refine, ex.store

    rows, kept = [], {}
    pairs = len(x) * (len(x) + 1) // 2

    def evaluate(lam):
        key = float(f"{lam:.10g}")
        for r in rows:
            if r["internal_lengthscale"] == key:
                return r
        t = time.perf_counter()
        if key == own:
            S = S_given
        else:
            S = _offset_sums(with_internal(body, indices, key), x, None,
                             ex.replace(progress=False) if store is None else _internal_execution(ex, key),
                             protocol.flip)
        ro = OffsetReadout(S, grid, family, bias_var)
        res = learn_readout(ro, y, objective=objective, n_classes=k_cls, starts=starts, max_iter=max_iter)
        fit = res.learned
        with torch.no_grad():
            K = ro.kernel(fit["lengthscale"], fit["amplitude"]).numpy()
        cv = gp.cross_validate(K, y, folds=fold_list, noise_variances=[fit["noise_variance"]], n_classes=k_cls)
        grid_acc = []
        for lam_r in lengthscales:  # the sweep's protocol at this internal λ, for comparison
            with torch.no_grad():
                K_r = ro.kernel(float(lam_r)).numpy()
            grid_acc.append((gp.cross_validate(K_r, y, folds=fold_list, n_classes=k_cls).best_accuracy, float(lam_r)))
        best_acc, best_lam = max(grid_acc)
        row = {"step": len(rows) + 1, "internal_lengthscale": key, "objective": res.objective,
               "readout_lengthscale": fit["lengthscale"], "amplitude": fit["amplitude"],
               "noise_variance": fit["noise_variance"], "cv_accuracy": float(cv.fold_accuracies[:, 0].mean()),
               "fold_accuracies": cv.fold_accuracies[:, 0].tolist(),
               "grid_best_cv_accuracy": float(best_acc), "grid_best_readout_lengthscale": best_lam,
               "kernel_evaluations": int(res.kernel_evaluations * pairs),
               "body_pass": key != own, "seconds": time.perf_counter() - t}
        rows.append(row)
        best = max(rows, key=lambda r: r["objective"])
        if best is row:
            kept.clear()
            kept["S"] = S
        if progress is not None:
            progress({k: v for k, v in row.items() if k not in ("fold_accuracies",)})
        return row

    for lam in sorted(set(INTERNAL_GRID) | {own}):
        evaluate(lam)
    positive = sorted({r["internal_lengthscale"] for r in rows if r["internal_lengthscale"] > 0})
    best = max(rows, key=lambda r: r["objective"])["internal_lengthscale"]
    if refine and positive:
        centre = best if best > 0 else positive[0] / 10
        lower = [v for v in positive if v < centre]
        upper = [v for v in positive if v > centre]
        lo = lower[-1] if lower else centre / 10
        hi = upper[0] if upper else centre * 10
        minimize_scalar(lambda t: -evaluate(math.exp(t))["objective"], bounds=(math.log(lo), math.log(hi)),
                        method="bounded", options={"xatol": 0.05, "maxiter": int(refine)})
    return rows, kept["S"]


def _plan_learn(body, indices, x, x_test, ex, protocol, *, timed: bool) -> dict:
    """The body passes of a learn run, priced before any is made: the offset sums of the
    training images (and of the test images against them); with ``params="internal"`` one pass
    per internal λ of :data:`INTERNAL_GRID`, ``refine`` + 1 passes at λ the search chooses and,
    with a test split, the test pass at the learned λ (these last two priced in full, their λ
    not known yet, but for the stores an earlier run of the same search left beside ``ex.store``:
    it chooses those λ again). Through a store (``ex.store``) each store's dry run prices the tiles it
    lacks, less those its archive restores or ``--reuse`` lends, and refuses a store or lender
    of another computation here, before any work; in memory a few pairs are timed here (when
    ``timed``, or when the operation count prices the passes above
    :data:`~cnngp.engine.gram.MEASURE_ABOVE_SECONDS`). ``params="all"``'s autograd steps (about
    three kernel passes each) are not priced. Memory: the offset sums held in float64 for the
    inference (with ``params="internal"`` two sets: the best λ's and the current).

    Returns the plan: ``stages`` (pairs and images of one pass, and how many ``times`` it is
    made), ``kernels`` (per store, or per in-memory pass: what is left to compute in one pass,
    ``times`` over), ``seconds``, ``memory_bytes``, ``disk_bytes`` (what the stores still
    write) and ``text``, the lines printed."""
    from cnngp.engine import timing
    from cnngp.engine.distributed import describe_dry_run, store_dry_run
    from cnngp.engine.gram import MEASURE_ABOVE_SECONDS, GramPlan, gram_needs
    from cnngp.engine.resources import human_bytes, human_seconds

    flip, n, store = protocol.flip, len(x), ex.store
    n_test = 0 if x_test is None else len(x_test)
    # (name, network, x1, x2, execution of its store (None: in memory), times, known λ)
    passes = [("offset sums", body, x, None, ex, 1, True)]
    if x_test is not None:
        passes.append(("test offset sums", body, x_test, x, ex, 1, True))
    internal = protocol.params == "internal"
    if internal:
        own = float(body.layers[indices[0]].correlation.lengthscale)

        def at(lam):  # the network at internal λ, and the execution of its store
            return with_internal(body, indices, lam), None if store is None else _internal_execution(ex, lam)

        for lam in sorted(set(INTERNAL_GRID) - {own}):
            passes.append((f"offset sums at internal λ {lam:g}", at(lam)[0], x, None, at(lam)[1], 1, True))
        # the search's λ are not known before it runs; those of an earlier run of this one (its
        # stores beside ``store``) are what it chooses again, the rest are priced in full. A
        # bounded Brent search of ``refine`` iterations evaluates at most refine + 1 λ
        steps = int(protocol.refine) + 1 if protocol.refine else 0
        earlier = [] if store is None else _stored_internal(store, set(INTERNAL_GRID) | {own})[:steps]
        for lam in earlier:
            passes.append((f"offset sums at internal λ {lam:.10g} (a refine step of an earlier run)",
                           at(lam)[0], x, None, at(lam)[1], 1, True))
        if steps > len(earlier):
            passes.append(("offset sums at the internal λ the search refines to", body, x, None, None,
                           steps - len(earlier), False))
        if x_test is not None:
            tested = [] if store is None else _stored_internal(store, {own}, test=True)
            if len(tested) == 1:
                passes.append((f"test offset sums at internal λ {tested[0]:.10g} (learned by an earlier run)",
                               at(tested[0])[0], x_test, x, at(tested[0])[1], 1, True))
            else:
                passes.append(("test offset sums at the learned internal λ", body, x_test, x, None, 1, False))
    grid = body.grids(tuple(x.shape[1:-1]))[-1]
    offsets = math.prod(2 * g - 1 for g in grid)
    # held in float64: S (and with params="internal" the best λ's S beside the current), S_test
    # (and the learned internal λ's), and the largest set read in its dtype before it is made
    # float64 (from a store with flip: both terms)
    two = 2 if internal else 1
    read = max(n * n, n_test * n) * (2 if flip and store is not None else 1)
    memory = 8 * offsets * two * (n * n + n_test * n) + torch.finfo(ex.torch_dtype).bits // 8 * offsets * read

    stages, kernels, lines, reports, seconds, disk = [], [], [], [], 0.0, 0
    rates_d = None
    if store is not None:
        unknown = ex.replace(store=_internal_stores_prefix(store).with_name(
            f"{_internal_stores_prefix(store).name}plan-only.zarr"), archive=None, reuse=None)
        for name, net, x1, x2, e_base, times, known in passes:
            part = "train" if x2 is None else "test"
            for term, e in _store_parts(e_base if known else unknown, part, flip, None):
                report = _lent_or_in_full(lambda e, net=net, x1=x1, x2=x2, term=term: store_dry_run(
                    net, x1, x2, offsets=True, flip=term, execution=e.replace(progress=False)), e, ex).dry_run
                label = name + (" (mirror term)" if term else "") + ("" if times == 1 else f" (× {times})")
                lines.append(f"{label}:\n" + describe_dry_run({**report, "path": report["path"] if known
                                                                 else "(a store per λ, priced in full)"}))
                reports += [report] * times
                disk += times * report["disk_bytes"]
                rates_d = rates_d or {k: report[k] for k in ("seconds_per_pair", "seconds_per_image_self",
                                                            "load_average", "timed_pairs")}
                kernels.append({"name": label, "times": times, **{k: report.get(k) for k in (
                    "tile", "tiles", "tiles_total", "tiles_lent", "tiles_restored", "pairs", "disk_bytes",
                    "memory_per_worker_bytes", "estimated_seconds", "reuse", "archive")},
                    "path": report["path"] if known else None})
            stages.append(timing.Stage(name, len(x1), None if x2 is None else len(x2), flip=flip))
        seconds = timing.total_seconds(reports)  # the command's (and a cluster's) start once
        lines.append(f"estimate in all: about {human_seconds(seconds)}")
    else:
        in_memory = _in_memory(ex).replace(progress=False)
        priced = Serial(*body.layers, Readout())
        stages = [timing.Stage(name, len(x1), None if x2 is None else len(x2), flip=flip)
                  for name, _, x1, x2, _, _, _ in passes]
        times = [p[5] for p in passes]
        counted = sum(t * gram_needs(priced, x.shape[1:], st.n1, st.n2, dtype=ex.dtype, flip=flip)[1]
                      for st, t in zip(stages, times))
        if timed or counted > MEASURE_ABOVE_SECONDS:
            plan = GramPlan(body, x.shape[1:], offsets=True, flip=flip, execution=in_memory)
            rates = timing.measure(plan, plan.images(x[:timing.MAX_SIDE]))
            est = timing.estimate(rates, stages, tile_pairs=[[st.pairs] * t for st, t in zip(stages, times)])
            seconds, rates_d = est.seconds, rates.as_dict()
            lines.append(est.describe())
        else:
            seconds = counted
            lines.append(f"estimate: about {human_seconds(seconds)} (from the operation count; timed above "
                         f"{human_seconds(MEASURE_ABOVE_SECONDS)})")
        kernels = [{"name": st.name, "times": t, "pairs": st.pairs} for st, t in zip(stages, times)]
    head = "plan: " + "; ".join(f"{st.name}: {st.describe_pairs()}" for st in stages) + \
        f"; offset sums held for inference about {human_bytes(memory)}"
    if protocol.params == "all":
        lines.append("then about three float64 kernel passes per optimiser step (autograd, up to "
                     f"{protocol.max_iter} steps per start): not priced")
    return {"seconds": seconds, "memory_bytes": int(memory), "disk_bytes": int(disk), "kernels": kernels,
            "rates": rates_d,
            "stages": [{"name": st.name, "pairs": st.pairs, "images": st.images, "times": p[5]}
                       for st, p in zip(stages, passes)],
            "text": "\n".join([head, *lines])}


def _offset_sums(body, x1, x2, ex, flip: bool = False, test: bool = False) -> torch.Tensor:
    """S (M, N1, N2) in float64: in memory, or through the resumable tiled store ``ex.store``
    (``S.zarr``; with ``test``, its test store ``S-test.zarr``), computed or finished there
    first, then read whole. ``flip``: the flip-averaged sums ½[S_xx' + S_x,flip x']
    (:func:`cnngp.offset_sums`); through a store, the plain sums there and their mirror term
    in ``S-mirror.zarr`` (``S-mirror-test.zarr``), the sweep's layout (:func:`store_terms`),
    averaged in their dtype as the in-memory pass averages them. ``ex.archive`` (a folder laid
    out as a sweep's, :func:`check_sweep_archive`) keeps each store's tiles; ``ex.reuse`` (an
    earlier learn run's store or archive folder) lends them, its test and mirror-term
    counterparts where they hold offset sums (:func:`cnngp.experiments.sweep._store_parts`)."""
    if ex.store is None:
        return offset_sums(body, x1, x2, flip=flip, execution=ex).to(torch.float64)
    from cnngp.engine.distributed import store_kernel
    from cnngp.engine.store import KernelStore

    parts = []
    for term, e in _store_parts(ex, "test" if test else "train", flip, None):
        _lent_or_in_full(lambda e, term=term: store_kernel(body, x1, x2, offsets=True, flip=term, execution=e), e, ex)
        path = e.store
        opened = KernelStore.open(path)
        state = opened.verify()
        if state["missing"] or state["bad"]:  # store_kernel finished it: a bug if not
            raise CNNGPError(f"--store: {str(path)!r} is not complete after computing it")
        parts.append(np.asarray(opened.kernel[:]))
    values = parts[0] if len(parts) == 1 else flip_average(parts[0], parts[1])
    return torch.as_tensor(values.astype(np.float64))


def _test_scores(network, K, y, K_test, x_test, y_test, noise, folds, k_cls, flip, ex) -> dict:
    """The learned model on the test split, as the sweep scores it
    (:func:`cnngp.inference.calibration.test_scores`): accuracy, NLL and ECE, the calibration
    scale chosen on the training folds alone, the prior variances k(x*, x*) of ``network`` (the
    fitted one: its readout at the learned λ and amplitude) from the M pairs (x*, x*)."""
    from cnngp.engine.gram import kernel_diagonal
    from cnngp.inference import calibration

    prior = kernel_diagonal(network, x_test, flip=flip,
                            execution=_in_memory(ex).replace(dtype="float64", progress=False)).double().numpy()
    with gp.small_problem_threads(len(y)):
        scores = calibration.test_scores(K, y, K_test, prior, y_test, noise, folds, k_cls)
    return {"test_accuracy": gp.test_accuracy(K, y, K_test, y_test, noise, k_cls), "n_test": int(len(y_test)),
            "test_nll": float(scores["nll"]), "test_ece": float(scores["ece"]),
            "calibration_scale": float(scores["calibration_scale"])}


#: what a learn result records of where its whitening was fitted (:attr:`LearnProtocol.zca_fit`)
LEARN_ZCA_FITS = {"train": "the n training images",
                  "rest": "the training images outside the n (unlabelled)"}


@dataclass(frozen=True)
class LearnProtocol(Settings):
    """What :func:`run_learn` learns and how it scores it (validated on construction;
    :meth:`replace` makes a changed copy). How the body pass is computed is the separate
    :class:`cnngp.Execution`.

    Attributes
    ----------
    objective : "mll" (default) or "loo"
        The GP log marginal likelihood or the leave-one-out log predictive density.
    params : "readout" (default), "all" or "internal"
        ``"readout"`` — the readout's (λ, amplitude, σ²), exactly from one S; ``"all"`` — every
        lengthscale of the network and the readout amplitude by autograd (the torch path: small
        N); ``"internal"`` — one tied λ of the intermediate correlated convs
        (:func:`internal_convs`), by a profile: a fused body pass per internal λ
        (:data:`INTERNAL_GRID`, then ``refine`` Brent steps in log λ), the readout learned
        exactly at each; ``trace`` then has one row per internal λ.
    family : str, default "matern32"
        The readout's correlation family.
    folds, fold_scheme, seed, test, n_test
        The sweep's cross-validation protocol (:class:`cnngp.experiments.sweep.SweepProtocol`);
        ``test``: score on the test split instead of k-fold CV.
    starts : sequence of float, default (0.3, 3, 30)
        Starting lengthscales (the best run is kept).
    max_iter : int, default 100
        L-BFGS-B iterations per start.
    lengthscales : sequence of float
        The grid searched for comparison (default the paper's).
    refine : int, default 5
        With ``params="internal"``: Brent steps after the internal grid.
    spectral_mixture : int, default 0
        Q > 0 (with ``"readout"``): also learn a Q-component spectral-mixture readout from the
        same S (:func:`cnngp.inference.learn.learn_spectral_mixture`), reported under
        ``"spectral_mixture"``.
    zca : float, optional
        Regularised ZCA whitening (:mod:`cnngp.io.preprocess`) of strength ε (a fraction of the
        mean eigenvalue), fitted on the ``n`` training images only (shared by the folds; no
        test image enters it) and applied to them and the test images. Default: none.
    zca_fit : {"train", "rest"}, default "train"
        Which training images the whitening is fitted on: the ``n`` (``"train"``; the CV's
        held-out folds are then whitened in sample, the test images out of sample) or the data
        set's other training images, unlabelled (``"rest"``: held-out folds and test images
        alike, out of sample). As :attr:`cnngp.experiments.sweep.SweepProtocol.zca_fit`.
    zca_fit_outside : int, optional
        With ``zca_fit="rest"``: fit on the training images outside the class-balanced subset
        of this many (>= ``n``; it begins with the ``n``), so that runs at several ``n`` share
        one whitening. As :attr:`cnngp.experiments.sweep.SweepProtocol.zca_fit_outside`.
    flip : bool, default False
        The flip-averaged kernels ½[K(x, x') + K(x, flip x')] (docs/maths.md §9), train and
        test: from the flip-averaged offset sums (the readout families are mirror-symmetric),
        or with ``params="all"`` by autograd through both terms. Refused for a network whose
        last hidden layer is not flip-symmetric, and with ``spectral_mixture`` (its readouts
        need not be mirror-symmetric).
    zca_mirror : bool, optional
        Fit the whitening on the fit images and their mirror images, so that it commutes with
        flips. Default (None): as ``flip``. As :attr:`cnngp.experiments.sweep.SweepProtocol.zca_mirror`.
    """

    KIND = "learn setting"

    objective: str = "mll"
    params: str = "readout"
    family: str = "matern32"
    folds: int = 4
    fold_scheme: str = "paper"
    seed: int = 0
    test: bool = False
    n_test: int | None = None
    starts: tuple = (0.3, 3.0, 30.0)
    max_iter: int = 100
    lengthscales: tuple = PAPER_LENGTHSCALES
    refine: int = 5
    spectral_mixture: int = 0
    zca: float | None = None
    flip: bool = False
    zca_fit: str = "train"
    zca_fit_outside: int | None = None
    zca_mirror: bool | None = None

    def __post_init__(self):

        if self.zca is not None:
            object.__setattr__(self, "zca", check_zca_strength(self.zca, "zca"))
        check_zca_fit(self.zca_fit, self.zca, self.zca_fit_outside)
        check_zca_mirror(self.zca_mirror, self.zca, self.flip)
        objective, params, spectral_mixture = self.objective, self.params, self.spectral_mixture
        if objective not in OBJECTIVES:
            raise CNNGPError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
        if params not in ("readout", "all", "internal"):
            raise CNNGPError(f"params: expected 'readout', 'all' or 'internal', got {params!r}")
        if isinstance(spectral_mixture, bool) or not isinstance(spectral_mixture, (int, np.integer)) or spectral_mixture < 0:
            raise CNNGPError(f"spectral_mixture: expected a number of components >= 0, got {spectral_mixture!r}")
        if spectral_mixture:
            from cnngp.inference.learn import check_components

            check_components(spectral_mixture, "spectral_mixture")
        if spectral_mixture and params != "readout":
            raise CNNGPError(f"spectral_mixture: only with params='readout' (--params readout), got params={params!r}")
        if self.family not in FAMILIES:
            raise CNNGPError(f"family: expected one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.fold_scheme not in ("paper", "stratified"):
            raise CNNGPError(f"fold_scheme: expected 'paper' or 'stratified', got {self.fold_scheme!r}")
        check_folds_and_seed(self.folds, self.seed)
        if not isinstance(self.flip, (bool, np.bool_)):
            raise CNNGPError(f"flip: expected True or False, got {self.flip!r}")
        if self.flip and spectral_mixture:
            raise CNNGPError("flip: not with spectral_mixture (--spectral-mixture): a spectral-mixture "
                             "readout need not be mirror-symmetric, and the flip-averaged kernel needs one")
        low, high = BOUNDS["lengthscale"]
        starts = list(self.starts) if isinstance(self.starts, (list, tuple, np.ndarray)) else None
        if not starts or any(isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real)
                             or not low <= float(v) <= high for v in starts):
            # outside its bounds the optimiser would clip a start silently
            raise CNNGPError(f"starts: expected a list of starting lengthscales in [{low:g}, {high:g}] (the "
                             f"optimiser's bounds), got {self.starts!r}")



def run_learn(network, dataset="digits", n: int = 200, protocol: LearnProtocol | None = None, *,
              on_step=None, data_label: str | None = None, execution=None, yes: bool = True,
              dry_run: bool = False, **options) -> dict:
    """Learn the readout λ of ``network`` on ``n`` class-balanced training images and compare
    it with the grid search; returns the JSON-ready ``learned.json`` dictionary (see the
    module docstring and README "Learning the correlation").

    ``protocol`` (:class:`LearnProtocol`): the objective, the parameters learned, the folds and
    the optimiser's settings. ``on_step(entry)`` is called on every accepted optimiser step
    (or, with ``params="internal"``, every internal λ). ``execution`` (:class:`cnngp.Execution`,
    README "Execution options") computes the body pass; with its ``store`` (``S.zarr``) the
    offset sums go into that resumable tiled store (and ``S-test.zarr`` with ``test``) or are
    reused from it, so that another objective on the same data costs no body pass; its
    ``workers`` or ``scheduler`` compute the stores' tiles on a Dask cluster, its ``archive``
    (a folder: ``train/``, ``test/``, their ``-mirror`` terms and ``internal-<λ>/`` of the same
    layout) keeps a portable copy of every finished tile, and its ``reuse`` (an earlier learn
    run's store or archive folder, on training images that begin as these do) lends the tiles
    it holds, its test, mirror-term and internal-λ counterparts included. ``options``:
    settings of either by name (``run_learn(net, "digits", 40, params="internal", dtype="float32")``).
    ``yes=False`` (the ``learn`` command without ``--yes``) refuses body passes estimated over
    an hour (:func:`cnngp.engine.resources.check_job`) before they start; ``dry_run=True``
    makes every check, then returns ``{"dry_run": plan}`` (:func:`_plan_learn`: the passes,
    per store the tiles still to compute, memory and a time estimate) without computing or
    writing anything."""
    protocol_options = {k: options.pop(k) for k in list(options) if k in LearnProtocol.names()}
    if protocol is None:
        protocol = LearnProtocol(**protocol_options)
    elif not isinstance(protocol, LearnProtocol):
        raise CNNGPError(f"protocol: expected a LearnProtocol or None, got {type(protocol).__name__}")
    elif protocol_options:
        protocol = protocol.replace(**protocol_options)
    _LENDERS_REFUSED.set(set())  # this run's warnings about lenders (_lent_or_in_full)
    ex = Execution.build(execution, options, where="run_learn", accepted=COMPUTE + STORE)
    objective, params, family, folds = protocol.objective, protocol.params, protocol.family, protocol.folds
    fold_scheme, seed, test, n_test = protocol.fold_scheme, protocol.seed, protocol.test, protocol.n_test
    starts, max_iter, lengthscales = protocol.starts, protocol.max_iter, protocol.lengthscales
    refine, spectral_mixture, dtype, store = protocol.refine, protocol.spectral_mixture, ex.dtype, ex.store
    flip = protocol.flip
    progress = on_step
    if store is not None and params == "all":
        raise CNNGPError("store: not with params='all' (its kernels are recomputed by autograd at every "
                         "step); use --params readout or internal")
    for option in ("archive", "reuse", "workers", "scheduler", "tile", "threads"):
        if getattr(ex, option) is not None and store is None:
            raise CNNGPError(f"{option}: needs store= (--store S.zarr): it is an option of the tiled store")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise CNNGPError(f"n: expected an integer >= 2, got {n!r}")
    if store is not None:
        from cnngp.engine.store import check_output_store

        store = check_output_store(store, "--store")
        ex = ex.replace(store=store)
        for path in sweep_store_paths(store, bool(test), flip)[1:]:  # the test and mirror-term stores
            check_output_store(path, f"--store (its {path.name})")
        for path in learn_store_paths(store, bool(test), flip):  # a resume with another whitening, said so
            check_store_zca(path, protocol.zca, "zca", protocol.zca_fit, protocol.zca_fit_outside, LEARN_ZCA_FITS,
                            mirror=check_zca_mirror(protocol.zca_mirror, protocol.zca, protocol.flip))
        if ex.archive is not None:
            check_sweep_archive(ex.archive, bool(test), "archive", flip=flip, nested="internal-")
        if ex.reuse is not None:
            from cnngp.engine.lending import refuse_lending_to_itself

            refuse_lending_to_itself(ex.reuse, store, "reuse")
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    ds.check_test_classes()
    source = data_label or (ds.name if isinstance(dataset, Dataset) else os.fspath(dataset))
    k_cls = ds.n_classes
    if n % k_cls or n // k_cls < folds:
        raise CNNGPError(f"n={n}: must be a multiple of the {k_cls} classes with at least "
                         f"{folds} images per class (folds={folds})")
    order = balanced_subset(ds.y_train, n, seed=seed, n_classes=k_cls)
    x, y = ds.x_train[order], ds.y_train[order]
    x_test = y_test = None
    if test:
        if ds.x_test is None or ds.y_test is None or len(ds.y_test) == 0:
            raise CNNGPError(f"test: the data set {ds.name!r} has no test split; drop --test")
        t_order = np.arange(len(ds.y_test)) if n_test is None else balanced_subset(
            ds.y_test, int(n_test), seed=seed, n_classes=k_cls, name="n_test")
        x_test, y_test = ds.x_test[t_order], ds.y_test[t_order]
    elif n_test is not None:
        raise CNNGPError("n_test: only meaningful together with test=True (--test)")
    train_sha256, whitening = array_sha256(x), None
    if protocol.zca is not None:  # fitted on training images alone (zca_fit), applied to train and test
        what, outside = f"the n = {n} training images", protocol.zca_fit_outside
        held_out = zca_held_out(ds.y_train, order, outside, seed=seed, n_classes=k_cls, what=what)
        x_fit = zca_fit_images(ds.x_train, order, protocol.zca_fit,
                               what if outside is None else f"the balanced {outside} training images", held_out)
        whitening = fit_zca(x_fit, protocol.zca, name=zca_fit_words(protocol.zca_fit, outside, LEARN_ZCA_FITS),
                            mirror=check_zca_mirror(protocol.zca_mirror, protocol.zca, protocol.flip))
        x = whitening.transform(x, "the training images")
        x_test = None if x_test is None else whitening.transform(x_test, "the test images")

    body, template, net_name = split_network(network)
    indices = internal_convs(body) if params == "internal" else []
    if params == "internal" and not indices:
        raise CNNGPError("params='internal': the network has no intermediate conv with a Matérn or RBF "
                         "correlation whose λ could be learned (e.g. --arch myrtle10-correlated)")
    grid = body.grids(tuple(x.shape[1:-1]))[-1]
    if not grid:
        raise CNNGPError("network: its last hidden layer has no spatial grid, so the readout has no λ to learn")
    recorded_execution = ex.as_dict()  # as given (--workers 2, not the address of the cluster started)
    with contextlib.ExitStack() as cleanup:
        if ex.on_cluster and not dry_run:  # one cluster for every store of the run
            ex = open_cluster(ex, cleanup)
        plan = None
        if not yes or dry_run:  # every body pass priced (and timed when long) before the first starts
            from cnngp.engine.resources import check_job

            plan = _plan_learn(body, indices, x, x_test, ex, protocol, timed=dry_run)
            passes = sum(st["times"] for st in plan["stages"])
            what = (f"--n {n} ({n * (n + 1) // 2:,} pairs" + ("" if x_test is None else f", {len(x_test) * n:,} test pairs")
                    + (", each twice: flip-averaged" if flip else "") + (f"; {passes} body passes" if passes > 2 else "")
                    + ")")
            check_job(what, memory_bytes=plan["memory_bytes"], yes=True,
                      remedy="use a smaller --n or --n-test (the offset sums are held in float64 for the inference)")
            if plan["disk_bytes"]:  # the stores' chunks and records (a resumed store: what it lacks)
                check_job("--store", disk_bytes=plan["disk_bytes"], disk_path=store, yes=True,
                          remedy="free space there, or give a --store on a larger disk")
            resume = "or over several runs (a store resumes where it stopped)"
            remedy = (f"--store S.zarr with --workers or a --scheduler, {resume}" if store is None
                      else f"--workers or a --scheduler, {resume}" if not ex.on_cluster else f"more workers, {resume}")
            check_job(what, seconds=plan["seconds"] if str(ex.device).startswith("cpu") else None,
                      yes=yes or dry_run, remedy=remedy)
        elif store is not None:  # a store being resumed is checked before the data line (as the sweep's plan does)
            _check_resumed_stores(body, x, x_test, ex, flip)
        if ex.progress:  # every check passed: say what was read before the long part
            print(f"data: {source}: {ds.describe()}; a class-balanced training subset of n = {n:,} (seed {seed})"
                  + ("" if x_test is None else f", {len(x_test):,} test images"), file=sys.stderr)
            if plan is not None:
                print(plan["text"], file=sys.stderr)
        if dry_run:
            return {"dry_run": plan}
        t0 = time.perf_counter()
        S = _offset_sums(body, x, None, ex, flip)
        S_test = None
        if test:
            S_test = _offset_sums(body, x_test, x, ex, flip, test=True)
        body_seconds = time.perf_counter() - t0
        pairs = n * (n + 1) // 2
        test_pairs = 0 if x_test is None else len(x_test) * n

        readout = OffsetReadout(S, grid, family, template.bias_var)
        fold_list = _folds_for(fold_scheme, n, y, folds, seed)  # the sweep's folds

        # -- learned ------------------------------------------------------------------------
        t1 = time.perf_counter()
        internal_rows = None
        if params == "internal":  # one tied internal λ, profiled; the readout learned exactly at each
            own = float(body.layers[indices[0]].correlation.lengthscale)
            internal_rows, S_best = _learn_internal(
                body, indices, x, y, S, own, grid=grid, bias_var=template.bias_var, k_cls=k_cls,
                fold_list=fold_list, protocol=protocol, ex=ex, progress=progress)
            top = max(internal_rows, key=lambda r: r["objective"])
            learned = {"internal_lengthscale": top["internal_lengthscale"], "lengthscale": top["readout_lengthscale"],
                       "amplitude": top["amplitude"], "noise_variance": top["noise_variance"]}
            learn_evals = sum(r["kernel_evaluations"] for r in internal_rows)
            result = LearnResult(learned, top["objective"], internal_rows, learn_evals, [])
            best_readout = OffsetReadout(S_best, grid, family, template.bias_var)
            with torch.no_grad():
                K = best_readout.kernel(learned["lengthscale"], learned["amplitude"]).numpy()
        elif params == "readout":
            result = learn_readout(readout, y, objective=objective, n_classes=k_cls, starts=starts,
                                   max_iter=max_iter, progress=progress)
            learned = result.learned
            learn_evals = result.kernel_evaluations * pairs
            with torch.no_grad():
                K = readout.kernel(learned["lengthscale"], learned["amplitude"]).numpy()
        else:  # every lengthscale and the readout amplitude, by autograd through the network
            net = Serial(*body.layers, template.with_correlation(correlation_family(family, float(starts[0]))))
            result = learn_network(net, x, y, objective=objective, n_classes=k_cls, max_iter=max_iter,
                                   progress=progress, execution=_in_memory(ex).replace(dtype="float64"),
                                   starts=starts, flip=flip)  # every start, the best kept (as params="readout")
            learned = result.learned
            learn_evals = result.kernel_evaluations
            fitted = with_parameters(net, {k: v for k, v in learned.items() if k != "noise_variance"})
            K = kernel(fitted, x, flip=flip, execution=_in_memory(ex).replace(dtype="float64")).numpy()
            learned = {**learned, "lengthscale": learned["readout.lengthscale"]}
        cv = gp.cross_validate(K, y, folds=fold_list, noise_variances=[learned["noise_variance"]], n_classes=k_cls)
        fold_acc = cv.fold_accuracies[:, 0]
        held = {"cv_accuracy": float(fold_acc.mean()), "cv_accuracy_2se": float(gp.mean_and_2se(fold_acc)[1]),
                "fold_accuracies": fold_acc.tolist()}
        if test and params == "internal":
            fitted_lam = learned["internal_lengthscale"]
            fitted_body = with_internal(body, indices, fitted_lam)
            if fitted_lam == float(body.layers[indices[0]].correlation.lengthscale):
                S_t = S_test  # the network's own λ: its test offset sums are computed already
            else:  # through the store at that λ (resumable), or in memory
                S_t = _offset_sums(fitted_body, x_test, x, ex.replace(progress=False) if store is None
                                   else _internal_execution(ex, fitted_lam), flip, test=True)
            K_test = (learned["amplitude"] * torch.tensordot(best_readout.weights(learned["lengthscale"]), S_t, 1)
                      + template.bias_var).numpy()
        elif test and params == "all":
            K_test = kernel(fitted, x_test, x, flip=flip, execution=_in_memory(ex).replace(dtype="float64")).numpy()
        elif test:
            K_test = (learned["amplitude"] * torch.tensordot(readout.weights(learned["lengthscale"]), S_test, 1)
                      + readout.bias_var).numpy()
        if test:  # accuracy, and NLL and ECE of probabilities calibrated on the training folds alone
            final = fitted if params == "all" else Serial(
                *(fitted_body if params == "internal" else body).layers,
                Readout(learned["amplitude"], template.bias_var, correlation_family(family, learned["lengthscale"]),
                        template.parameterization))
            held.update(_test_scores(final, K, y, K_test, x_test, y_test, learned["noise_variance"], fold_list, k_cls,
                                     flip, ex))
        sm_result = None
        if spectral_mixture:
            sm = learn_spectral_mixture(S, grid, y, components=int(spectral_mixture), objective=objective,
                                        n_classes=k_cls, bias_var=template.bias_var, progress=progress,
                                        warm=learned)
            sm_corr = from_correlation_spec(sm.learned["correlation"])
            with torch.no_grad():
                K_sm = (sm.learned["amplitude"] * torch.tensordot(sm_corr.offset_weights(grid), S, 1)
                        + template.bias_var).numpy()
            cv_sm = gp.cross_validate(K_sm, y, folds=fold_list, noise_variances=[sm.learned["noise_variance"]],
                                      n_classes=k_cls)
            acc = cv_sm.fold_accuracies[:, 0]
            sm_result = {"learned": sm.learned, "objective": sm.objective, "components": int(spectral_mixture),
                         "cv_accuracy": float(acc.mean()), "cv_accuracy_2se": float(gp.mean_and_2se(acc)[1]),
                         "fold_accuracies": acc.tolist(), "kernel_evaluations": int(sm.kernel_evaluations * pairs),
                         "starts": sm.starts, "trace": sm.trace, "seconds": sm.seconds}
            if test:
                with torch.no_grad():
                    K_smt = (sm.learned["amplitude"] * torch.tensordot(sm_corr.offset_weights(grid), S_test, 1)
                             + template.bias_var).numpy()
                sm_result["test_accuracy"] = gp.test_accuracy(K_sm, y, K_smt, y_test, sm.learned["noise_variance"], k_cls)
            sm_result["heldout_accuracy"] = sm_result.get("test_accuracy", sm_result["cv_accuracy"])
        learn_seconds = time.perf_counter() - t1

        # -- grid (the sweep's protocol) and the objective profiled along it ------------------
        t2 = time.perf_counter()
        Y = torch.as_tensor(gp.centered_one_hot(y, k_cls), dtype=torch.float64)
        readout.evaluations = 0
        scale = float(torch.diagonal(readout.kernel(1.0)).mean())
        grid_rows = []
        for lam in lengthscales:
            with torch.no_grad():
                K_lam = readout.kernel(float(lam)).numpy()
            cv_l = gp.cross_validate(K_lam, y, folds=fold_list, n_classes=k_cls)
            grid_rows.append({"lengthscale": float(lam), "cv_accuracy": float(cv_l.best_accuracy),
                              "cv_accuracy_2se": float(gp.mean_and_2se(cv_l.best_fold_accuracies)[1]),
                              "noise_variance": float(cv_l.best_noise_variance)})
        grid_evals = readout.evaluations
        i_best, tied = first_best([r["cv_accuracy"] for r in grid_rows])  # ties as the sweep breaks them
        best = grid_rows[i_best]
        grid_best = {"lengthscale": best["lengthscale"], "noise_variance": best["noise_variance"],
                     "cv_accuracy": best["cv_accuracy"], "cv_accuracy_2se": best["cv_accuracy_2se"],
                     "tied_lengthscales": [grid_rows[i]["lengthscale"] for i in tied]}
        if test:
            with torch.no_grad():
                K_b = readout.kernel(best["lengthscale"]).numpy()
                K_bt = torch.tensordot(readout.weights(best["lengthscale"]), S_test, 1).numpy() + readout.bias_var
            grid_best["test_accuracy"] = gp.test_accuracy(K_b, y, K_bt, y_test, best["noise_variance"], k_cls)
        grid_best["heldout_accuracy"] = grid_best.get("test_accuracy", grid_best["cv_accuracy"])
        grid_best["kernel_evaluations"] = int(grid_evals * pairs + (test_pairs if test else 0))
        grid_seconds = time.perf_counter() - t2

        # the objective along the grid, maximised over amplitude and σ² at each λ (for the figure)
        readout.evaluations = 0
        amp0 = learned.get("amplitude", 1.0)
        start = [amp0, min(max(learned["noise_variance"], 1e-9 * scale), 1e1 * scale), 1e-9 * scale, 1e1 * scale]
        for row in grid_rows:
            value, (amp, noise) = _profile(readout, Y, objective, row["lengthscale"], start)
            row.update({"objective": value, "objective_amplitude": amp, "objective_noise_variance": noise})

        if store is not None:  # every store complete: say how its images were seen (whitened or not)
            note_store_zca(learn_store_paths(store, bool(test), flip), whitening, protocol.zca_fit,
                           protocol.zca_fit_outside, LEARN_ZCA_FITS)
        heldout = held.get("test_accuracy", held["cv_accuracy"])
        return {
            "config": {
                "format": LEARNED_FORMAT,
                "arch": net_name,
                "spec": body.to_spec(),
                "readout": {"family": family, "weight_var_learned_as": "amplitude",
                            "bias_var": template.bias_var, "grid": list(grid)},
                "data": source,
                "dataset": ds.name,
                "n": int(n),
                "n_classes": int(k_cls),
                "folds": int(folds),
                "fold_scheme": fold_scheme,
                "objective": objective,
                "params": params,
                **({"internal": {"layers": indices, "tied": True, "grid": list(INTERNAL_GRID), "refine_steps": int(refine),
                                 "given_lengthscale": float(body.layers[indices[0]].correlation.lengthscale)}}
                   if params == "internal" else {}),
                "starts": [float(s) for s in starts],
                "max_iter": int(max_iter),
                "bounds": {"lengthscale": [1e-2, 1e5], "amplitude": [1e-4, 1e4],
                           "noise_variance": "[1e-9, 10] x mean diagonal of the kernel at amplitude 1"},
                "grid_lengthscales": [float(v) for v in lengthscales],
                "dtype": dtype,
                "execution": recorded_execution,
                "seed": int(seed),
                "test": bool(test),
                "n_test": None if x_test is None else int(len(x_test)),
                "train_sha256": train_sha256,
                "zca": protocol.zca,
                "flip": bool(protocol.flip),
                "zca_fit": None if whitening is None else zca_fit_record(whitening, protocol.zca_fit,
                                                                         protocol.zca_fit_outside, LEARN_ZCA_FITS),
                "targets": "one-hot minus 1/n_classes",
            },
            "versions": versions(),
            "learned": learned,
            "objective": result.objective,
            "trace": result.trace,
            "starts": result.starts,
            "kernel_evaluations": int(learn_evals + (test_pairs if test else 0)),
            "body_pair_evaluations": int((pairs * (1 + sum(r["body_pass"] for r in internal_rows or []))
                                          + test_pairs * (1 + (params == "internal" and test and fitted_lam != float(
                                              body.layers[indices[0]].correlation.lengthscale))))
                                         * (2 if flip else 1)),  # flip: each pair and its mirror term
            "heldout_accuracy": heldout,
            "heldout": held,
            "grid_best": grid_best,
            **({"spectral_mixture": sm_result} if sm_result is not None else {}),
            "grid": grid_rows,
            "seconds": {"body_pass": body_seconds, "learn": learn_seconds, "grid": grid_seconds},
        }


def _objective_axis(ax, x, values, style: str, label: str, ylabel: str) -> None:
    """The objective on a twin y axis of ``ax`` (green), one legend for both axes."""
    ax2 = ax.twinx()
    ax2.plot(x, values, style, color="C2", label=label)
    ax2.set_ylabel(ylabel, color="C2")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower right", fontsize="small")


def _internal_panel(ax, result: dict) -> None:
    """Objective and CV accuracy against the tied internal λ (0, independent taps, drawn one
    decade left of the smallest positive λ), the learned internal λ marked."""
    rows = sorted(result["trace"], key=lambda r: r["internal_lengthscale"])
    lams = [r["internal_lengthscale"] for r in rows]
    positive = [v for v in lams if v > 0]
    zero_at = math.log10(min(positive)) - 1 if positive else 0.0
    xs = np.array([math.log10(v) if v > 0 else zero_at for v in lams])
    acc = np.array([r["cv_accuracy"] for r in rows]) * 100
    se = np.array([gp.mean_and_2se(np.asarray(r["fold_accuracies"]))[1] for r in rows]) * 100
    ax.errorbar(xs, acc, yerr=se, fmt="o-", color="C0", capsize=3, label="CV accuracy, readout learned (±2 SE)")
    ax.plot(xs, [r["grid_best_cv_accuracy"] * 100 for r in rows], "s:", color="C1", mfc="none",
            label="CV accuracy, best readout λ of the grid")
    learned = result["learned"]["internal_lengthscale"]
    lx = math.log10(learned) if learned > 0 else zero_at
    ax.axvline(lx, color="C3", ls="--", label=f"learned internal λ = {learned:.3g}")
    cfg = result["config"]
    ax.set_xlabel("log10 internal λ of the correlated convs (taps; leftmost point: λ = 0, independent)")
    ax.set_ylabel("CV accuracy (%)")
    _objective_axis(ax, xs, [r["objective"] for r in rows], "^-", f"{cfg['objective']} per point",
                    f"{cfg['objective']} per training point (readout learned)")
    ax.set_title("the internal λ, profiled", fontsize="medium")
    ax.grid(True, alpha=0.3)


def learned_figure(result: dict, path):
    """The objective (profiled over amplitude and σ²) and the held-out accuracy of the grid
    against log10 λ, the learned λ marked (a vertical line and its held-out accuracy)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["grid"]
    lam = np.log10([r["lengthscale"] for r in rows])
    internal = result["config"].get("params") == "internal"
    fig = Figure(figsize=(14, 4.8) if internal else (7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1) if internal else fig.add_subplot()
    if internal:
        _internal_panel(fig.add_subplot(1, 2, 2), result)
    acc = np.array([r["cv_accuracy"] for r in rows]) * 100
    se = np.array([r["cv_accuracy_2se"] for r in rows]) * 100
    ax.plot(lam, acc, "o-", color="C0", label="grid: CV accuracy (σ² by CV)")
    ax.fill_between(lam, acc - se, acc + se, color="C0", alpha=0.2)
    cfg = result["config"]
    learned = result["learned"]["lengthscale"]
    ax.axvline(math.log10(learned), color="C3", ls="--", label=f"learned λ = {learned:.3g} ({cfg['objective']})")
    ax.plot([math.log10(learned)], [result["heldout"]["cv_accuracy"] * 100], "*", color="C3", ms=14,
            label="learned: CV accuracy at the learned σ²")
    gb = result["grid_best"]
    ax.plot([math.log10(gb["lengthscale"])], [gb["cv_accuracy"] * 100], "s", mfc="none", color="C0", ms=10,
            label="grid best")
    ax.set_xlabel(f"log10 λ of the {cfg['readout']['family']} readout (index units of its grid)")
    ax.set_ylabel(f"{cfg['folds']}-fold CV accuracy (%), ±2 SE over folds")
    _objective_axis(ax, lam, [r["objective"] for r in rows], "-", f"{cfg['objective']} per point (profiled)",
                    f"{cfg['objective']} per training point")
    given = f" (internal λ = {cfg['internal']['given_lengthscale']:g})" if internal else ""
    ax.set_title(f"{cfg['arch']}{given} on {cfg['dataset']}, N = {cfg['n']}: learned vs grid λ", fontsize="medium")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig

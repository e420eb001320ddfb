"""The paper's experiment as a library function: a readout-lengthscale sweep (docs/maths.md §5).

One class-balanced training subset of the largest size ``N_max`` is drawn in class-interleaved
order, and **one** pass of the kernel engine computes the Gram matrices of every readout over
it (:func:`cnngp.readout_sweep`): independent weights (flatten), the chosen stationary family
at each lengthscale λ (in index units of the grid the readout sees), and fully shared weights
(global mean pooling). Every smaller ``N`` is a set of disjoint contiguous blocks of that one
matrix (:func:`cnngp.io.data.blocks`), so each reported accuracy is a mean over several data
sets, with ±2 standard errors. On each block, k-fold cross-validation picks the observation
noise σ² from the paper's grid (:func:`cnngp.inference.gp.cross_validate`, one eigendecomposition per
fold). Optionally the model trained on ``N_max`` with the cross-validated λ and σ² is scored
on the test split.

>>> from cnngp.experiments.sweep import run_sweep
>>> res = run_sweep("cnngp1", "digits", ns=(40, 80), lengthscales=[1.0],
...                 progress=False)                                 # doctest: +SKIP
>>> [(r["n"], r["readout"], r["lengthscale"]) for r in res["results"]][:3]  # doctest: +SKIP
[(40, 'independent', 0.0), (40, 'matern32', 1.0), (40, 'constant', 'inf')]
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cnngp.inference import gp, selection
from cnngp.inference import calibration
from cnngp.kernels.correlations import (
    FAMILIES, PAPER_LENGTHSCALES, Constant, Independent, parse_lengthscale,
)
from cnngp.kernels.correlations import family as correlation_family
from cnngp.io.data import Dataset, balanced_subset, blocks, load_dataset
from cnngp.io.preprocess import (
    check_zca_fit, check_zca_mirror, check_zca_strength, fit_zca, zca_fit_images, zca_fit_record, zca_fit_words, zca_held_out,
)
from cnngp.errors import CNNGPError
from cnngp.settings import Settings
from cnngp.kernels.layers import Readout
from cnngp.io.architectures import split_network
from cnngp.provenance import array_sha256, versions
from cnngp.engine.execution import COMPUTE, STORE, Execution
from cnngp.engine.storage import atomic_write, read_npz

__all__ = [
    "run_sweep",
    "SweepProtocol",
    "sweep_readouts",
    "split_network",
    "summary_table",
    "PAPER_LENGTHSCALES",
    "FAMILIES",
    "RESULTS_FORMAT",
]


#: stationary families for the swept readout: name -> Matérn ν (None: squared exponential)

#: version tag of the results.json layout
RESULTS_FORMAT = "cnngp-sweep/1"

_FOLD_SCHEMES = ("paper", "stratified")
_BEST_KEYS = (
    "n", "readout", "lengthscale", "cv_accuracy", "cv_accuracy_2se", "n_datasets", "noise_variance",
)


# --------------------------------------------------------------------------------------
# Networks and readouts
# --------------------------------------------------------------------------------------


def _plan_and_gate(body, readouts, x_sub, x_test, test_mode, kernel_cache, yes, ex, get,
                   flip=False, data_line: str | None = None) -> dict | None:
    """The sweep's plan before any kernel is computed: pairs of every stage (the train kernel of
    every readout; the test kernel of every readout, or with ``--test best`` of the one chosen
    after the cross-validation), memory, and a time estimate from timing a few pairs of this
    network here (:mod:`cnngp.engine.timing`; a store's stages from its dry run, so a resumed
    store prices only its missing tiles). Printed when ``ex.progress``; without ``yes`` a job
    estimated at over an hour is refused. Returns the plan (recorded in the results), or None
    when the kernels come from ``kernel_cache``. With ``flip`` every pair counts twice (the
    flip plan is the one timed: docs/maths.md §9). ``data_line`` (how the data were read) goes
    first."""
    from cnngp.engine import timing
    from cnngp.engine.gram import GramPlan, checkpoint_pairs_done, gram_needs
    from cnngp.engine.resources import check_job, human_bytes, human_seconds

    lines_resumed, disk_bytes = [], 0
    if kernel_cache is not None and Path(kernel_cache).is_file():
        return None  # read (or refused) from the cache: nothing to compute, or its own message
    n = len(x_sub)
    stages = [timing.Stage(f"train kernel ({len(readouts)} readouts)", n, flip=flip)]
    if test_mode is not None:
        per = f"{len(readouts)} readouts" if test_mode == "all" else "the chosen readout"
        stages.append(timing.Stage(f"test kernel ({per})", len(x_test), n, flip=flip))
    memory, _, _ = gram_needs(body, x_sub.shape[1:], n, readouts=readouts, dtype=ex.dtype,
                              memory_budget=ex.memory_budget, flip=flip)
    if test_mode == "all":
        memory += gram_needs(body, x_sub.shape[1:], len(x_test), n, readouts=readouts, dtype=ex.dtype,
                             memory_budget=ex.memory_budget, flip=flip)[0]
    if ex.store is None:
        check_job(f"--n {n} with {len(readouts)} readouts", memory_bytes=memory, yes=True,
                  remedy="use a smaller --n, fewer --lengthscales or --n-test (or --store K.zarr)")
        plan = GramPlan(body, x_sub.shape[1:], readouts=readouts, get=get, flip=flip,
                        execution=_in_memory(ex).replace(progress=False))
        rates = timing.measure(plan, plan.images(x_sub[:timing.MAX_SIDE]))
        # a resumed sweep prices only the pairs its checkpoints still lack
        cache = None if kernel_cache is None else Path(kernel_cache)
        left = []
        for st, part, x1, x2, heads in (
            (stages[0], "train", x_sub, None, readouts),
            *(((stages[1], "test", x_test, x_sub, readouts),) if test_mode == "all" else ()),
        ):
            done = checkpoint_pairs_done(_checkpoint(cache, part, ex.checkpoint), body, x1, x2,
                                         readouts=heads, get=get, flip=flip, dtype=ex.dtype)
            left.append([st.pairs - done])
            if done:
                lines_resumed.append(f"{st.name}: resuming, {done:,} of {st.pairs:,} pairs already done")
        left += [[st.pairs] for st in stages[len(left):]]
        est = timing.estimate(rates, stages, tile_pairs=left)
        seconds, text, rates_d = est.seconds, est.describe(), rates.as_dict()
        kernels = [{"name": st.name, "pairs": int(todo[0]), "pairs_total": st.pairs}  # pairs: still to compute
                   for st, todo in zip(stages, left)]
    else:
        from cnngp.engine.distributed import describe_dry_run, store_dry_run

        # one dry run per store: with flip the plain kernel's and its mirror term's (a store that
        # is already complete, e.g. the plain kernel of an earlier sweep, prices nothing)
        runs = [(f"{stages[0].name}{' (mirror term)' if term else ''}",
                 _lent_or_in_full(lambda e, term=term: store_dry_run(
                     body, x_sub, readouts=readouts, get=get, flip=term,
                     execution=e.replace(progress=False)), e, ex))
                for term, e in _store_parts(ex, "train", flip, readouts)]
        if test_mode is not None:
            heads = readouts if test_mode == "all" else _planned_best(ex, readouts, flip)
            runs += [(f"{stages[1].name}{' (mirror term)' if term else ''}",
                      _lent_or_in_full(lambda e, term=term: store_dry_run(
                          body, x_test, x_sub, readouts=heads, get=get, flip=term,
                          execution=e.replace(progress=False)), e, ex))
                     for term, e in _store_parts(ex, "test", flip, heads)]
        seconds = timing.total_seconds(r.dry_run for _, r in runs)  # the command's start once
        disk_bytes = sum(r.dry_run["disk_bytes"] for _, r in runs)  # what the stores still write
        # each store's dry run: its tiles to compute (less those it holds, its archive restores
        # or --reuse lends), disk, memory
        text = "\n".join(f"{name}:\n" + describe_dry_run(r.dry_run) for name, r in runs)
        text += f"\nestimate in all: about {human_seconds(seconds)}"
        rates_d = {k: runs[0][1].dry_run[k] for k in ("seconds_per_pair", "seconds_per_image_self",
                                                    "load_average", "timed_pairs")}
        # per store, what its dry run says: tiles to compute and where the others come from
        kernels = [{"name": name, **{k: r.dry_run.get(k) for k in (
            "path", "tile", "tiles", "tiles_total", "tiles_lent", "tiles_restored", "pairs", "disk_bytes",
            "memory_per_worker_bytes", "estimated_seconds", "reuse", "archive")}} for name, r in runs]
    if disk_bytes:  # the stores' chunks and records (a resumed store: only what it lacks)
        check_job("--store", disk_bytes=disk_bytes, disk_path=ex.store, yes=True,
                  remedy="free space there, or give a --store on a larger disk")
    lines = [*([data_line] if data_line else []),
             "plan: " + "; ".join(f"{st.name}: {st.describe_pairs()}" for st in stages)
             + f"; memory about {human_bytes(memory)}", *lines_resumed, text]
    check_job(f"--n {n} with {len(readouts)} readouts" + ("" if test_mode is None else f" and --test {test_mode}"),
              seconds=seconds if str(ex.device).startswith("cpu") else None, yes=yes,
              remedy="use a smaller --n, fewer --lengthscales or --n-test, or --store K.zarr with "
              "--workers (a finished store is reused, so the work can be spread over several runs)")
    if ex.progress:  # (a refused job says why in one line, without the plan)
        print("\n".join(lines), file=sys.stderr)
    return {"seconds": seconds, "stages": [{"name": st.name, "pairs": st.pairs, "images": st.images,
                                            "kernel_evaluations": st.evaluations} for st in stages],
            "kernels": kernels,  # what is left to compute: per store, or per in-memory kernel
            "memory_bytes": int(memory),
            "rates": rates_d, "text": "\n".join(lines)}


#: a float32 sweep's kernels are checked against float64 on this many images (k(k+1)/2 pairs)
SPOT_CHECK_IMAGES = 4
#: the float32 error (relative to each readout's largest checked entry) a sweep warns above
SPOT_CHECK_TOLERANCE = 1e-5


def _float64_spot_check(body, readouts, x_sub, K, ex, get, seed, flip=False) -> dict | None:
    """A float32 sweep's kernels against float64 on a few random training images (all their
    pairs, every readout): the largest error relative to each readout's largest checked entry.
    Float32 is the sweep's default because this stays under :data:`SPOT_CHECK_TOLERANCE` (7.5e-7
    for CNNGP-14 on CIFAR-10 over 300 entries, results/paper-scale); a larger one is warned
    about and recorded. None for a float64 sweep."""
    import warnings

    from cnngp.engine.gram import readout_sweep

    if ex.dtype != "float32":
        return None
    n = len(x_sub)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(SPOT_CHECK_IMAGES, n), replace=False))
    ref = readout_sweep(body, readouts, x_sub[idx], get=get, flip=flip,
                        execution=_in_memory(ex).replace(dtype="float64", progress=False)).numpy()
    worst = 0.0
    store = getattr(K, "store", None)  # a store's readouts: read only the checked entries
    for l in range(len(readouts)):
        if store is not None:
            got = np.stack([store.readout(l, int(i), slice(None))[idx] for i in idx])
        else:
            got = np.asarray(K[l])[np.ix_(idx, idx)]
        scale = np.abs(ref[l]).max()
        if scale > 0:
            worst = max(worst, float(np.abs(got - ref[l]).max() / scale))
    if worst > SPOT_CHECK_TOLERANCE:
        warnings.warn(f"dtype: the float32 kernels differ from float64 by {worst:.2g} (relative) on "
                      f"{len(idx)} checked images, over {SPOT_CHECK_TOLERANCE:g}; rerun with --dtype float64",
                      RuntimeWarning, stacklevel=2)
    return {"images": [int(i) for i in idx], "pairs": len(idx) * (len(idx) + 1) // 2,
            "readouts": len(readouts), "max_relative_error": worst, "tolerance": SPOT_CHECK_TOLERANCE}


def _kernels_in_memory(body, readouts, x_sub, x_test, key, kernel_cache, saved, yes, ex, get, flip=False):
    """The whole (L, N, N) stack in memory, read from or written to an ``.npz`` kernel cache."""
    import torch

    from cnngp.engine.gram import readout_sweep

    n_max = x_sub.shape[0]
    dtype, device, memory_budget = ex.dtype, ex.device, ex.memory_budget
    cache_path = None if kernel_cache is None else Path(kernel_cache)
    cached = _read_cache(cache_path, key) if cache_path is not None else None
    if cached is None:  # refuse, before any work, what this machine cannot hold or finish
        from cnngp.engine.gram import gram_needs
        from cnngp.engine.resources import check_job

        shape = x_sub.shape[1:]
        memory, seconds, _ = gram_needs(body, shape, n_max, readouts=readouts, dtype=dtype,
                                        memory_budget=memory_budget, flip=flip)
        if x_test is not None:
            m2, s2, _ = gram_needs(body, shape, len(x_test), n_max, readouts=readouts,
                                   dtype=dtype, memory_budget=memory_budget, flip=flip)
            memory, seconds = memory + m2, seconds + s2
        check_job(
            f"--n {n_max} with {len(readouts)} readouts",
            memory_bytes=memory,
            seconds=seconds if str(device).startswith("cpu") else None,
            yes=yes,
            remedy="use a smaller --n, fewer --lengthscales or --n-test (or --store K.zarr)",
        )

    def save(K, K_test=None):  # after each computation, so a later failure keeps it
        if cache_path is None:
            return
        stored_key = {**key, "test_sha256": None if K_test is None else key["test_sha256"]}
        arrays = {
            "kernels": K,
            "kernels_sha256": np.array(array_sha256(K)),
            "key": np.array(json.dumps(stored_key)),
            "train_index": saved["order"],
            "y_train": saved["y_sub"],
            "lengthscales": np.array([v for _, v in saved["labels"]], dtype=np.float64),
            "readout_names": np.array([name for name, _ in saved["labels"]]),
        }
        if K_test is not None:
            arrays["test_kernels"] = K_test
            arrays["test_kernels_sha256"] = np.array(array_sha256(K_test))
            arrays["test_index"] = saved["test_order"]
            arrays["y_test"] = saved["y_test"]
        _write_npz_atomic(cache_path, arrays)

    if cached is not None:
        K = cached["kernels"]
        if K.shape != (len(readouts), n_max, n_max):
            raise CNNGPError(f"kernel_cache: {str(cache_path)!r} holds kernels of shape {K.shape}")
    else:
        K = _resumable(lambda e: readout_sweep(body, readouts, x_sub, get=get, flip=flip, execution=e), ex,
                       cache_path, "train")
        K = K.to(torch.float64).numpy()
        save(K)
    K_test = None
    if x_test is not None:
        if cached is not None and "test_kernels" in cached:
            K_test = cached["test_kernels"]
        else:
            K_test = _resumable(lambda e: readout_sweep(body, readouts, x_test, x_sub, get=get, flip=flip,
                                                        execution=e), ex, cache_path, "test")
            K_test = K_test.to(torch.float64).numpy()
            save(K, K_test)
    if not np.all(np.isfinite(K)):
        where = f"kernel_cache: {str(cache_path)!r} holds kernels that" if cached is not None else "kernel: the kernels"
        raise CNNGPError(f"{where} have NaN or infinite entries")
    return K, K_test


def _check_diagonal(Kl: np.ndarray, name: str, lam) -> None:
    """Refuse a training kernel (N, N) no GP can learn from: a negative diagonal entry (a
    variance: no kernel has one), or zero on the whole diagonal (so, being PSD, zero
    everywhere: the network sees nothing in the images)."""
    d = np.diagonal(Kl)
    readout = name if lam is None else f"{name} (λ = {lam:g})"
    if (d < 0).any():
        raise CNNGPError(f"kernel: readout {readout} has a negative variance {float(d.min()):.3g} on its "
                         "diagonal; it is not a kernel matrix")
    if not (d > 0).any():
        raise CNNGPError(
            f"dataset: the kernel of readout {readout} is zero on the diagonal for all {d.size} training "
            "images: the network sees nothing in them (all-zero images in a network without biases, or "
            "pixels that underflow in the kernel's dtype); check --data, --zca and --arch")


def test_store_path(kernel_store) -> Path:
    """Where the sweep keeps the test × train kernels of the store ``K.zarr``: ``K-test.zarr``."""
    path = Path(kernel_store)
    return path.with_name(path.name[: -len(".zarr")] + "-test.zarr" if path.name.lower().endswith(".zarr")
                          else path.name + "-test.zarr")


def mirror_store_path(kernel_store) -> Path:
    """Where a flip sweep keeps the mirror term K(x, flip x') of the store ``K.zarr``:
    ``K-mirror.zarr`` (and its test store ``K-mirror-test.zarr``). The store ``K.zarr`` itself
    holds the plain kernel, the same as a sweep without ``--flip`` writes: a flip sweep reuses
    it, and a plain sweep reuses a flip sweep's; the flip-averaged kernel is ½[K + K_mirror]
    (docs/maths.md §9), read from the two."""
    path = Path(kernel_store)
    stem = path.name[: -len(".zarr")] if path.name.lower().endswith(".zarr") else path.name
    return path.with_name(stem + "-mirror.zarr")


def store_terms(kernel_store, flip: bool) -> list[tuple]:
    """[(flip term, train store)] of a sweep with ``--store kernel_store``: the plain kernel's
    store, and with ``flip`` its mirror term's (``flip="mirror"``, :func:`mirror_store_path`);
    each has its test store beside it (:func:`test_store_path`)."""
    from cnngp.engine.gram import MIRROR

    return [(False, Path(kernel_store))] + ([(MIRROR, mirror_store_path(kernel_store))] if flip else [])


def sweep_store_paths(kernel_store, test: bool, flip: bool) -> list[Path]:
    """Every store a sweep with ``--store kernel_store`` writes (train, test, the mirror terms)."""
    return [p for _, b in store_terms(kernel_store, flip) for p in ([b, test_store_path(b)] if test else [b])]


def check_store_zca(path, zca, flag: str = "--zca", fit: str = "train", outside: int | None = None,
                    words: dict | None = None, mirror: bool = False) -> None:
    """Refuse, before any work, to resume or reuse the store at ``path`` if it records a ZCA
    whitening (its ``preprocessing``, written once complete) other than ``zca`` (None: none)
    fitted on other images (``fit``: :data:`ZCA_FITS`, or ``words`` where another command
    names its fits otherwise; ``outside``: :attr:`SweepProtocol.zca_fit_outside`; ``mirror``:
    fitted with the mirror images, :attr:`SweepProtocol.zca_mirror`). A store of
    whitened images also hashes them, so any other mismatch is refused by the store's own
    identity check."""
    from cnngp.engine.store import KernelStore

    if path is None or not (Path(path) / "zarr.json").is_file():
        return
    try:
        attrs = KernelStore.open(path).attrs
    except CNNGPError:
        return  # a damaged store: the computation refuses it with its own message
    if "preprocessing" not in attrs:
        return
    recorded = ((attrs.get("preprocessing") or {}).get("zca") or {}).get("strength")
    if recorded != zca:
        def what(strength):
            return "unwhitened images" if strength is None else f"images whitened by ZCA of strength {strength:g}"

        raise CNNGPError(f"{flag}: {str(path)!r} holds kernels of {what(recorded)}, not of {what(zca)}; "
                         "resume only with the same whitening, or give another store (nothing was overwritten)")
    recorded = (attrs.get("preprocessing") or {}).get("zca") or {}
    recorded_fit, recorded_outside = recorded.get("fit", "train"), recorded.get("fit_outside")
    if zca is not None and (recorded_fit, recorded_outside) != (fit, outside):
        flags = f"--zca-fit {fit}" + ("" if outside is None else f" --zca-fit-outside {outside}")
        raise CNNGPError(f"{flag}: {str(path)!r} holds kernels of images whitened by ZCA fitted on "
                         f"{zca_fit_words(recorded_fit, recorded_outside, words or ZCA_FITS)}, not on "
                         f"{zca_fit_words(fit, outside, words or ZCA_FITS)} "
                         f"({flags}); resume only with the same whitening, or give another store (nothing was "
                         "overwritten)")
    if zca is not None and bool(recorded.get("mirror", False)) != bool(mirror):
        def how(m):
            return "fitted on the images and their mirror images (--zca-mirror)" if m else \
                "fitted on the images alone (--no-zca-mirror)"

        raise CNNGPError(f"{flag}: {str(path)!r} holds kernels of images whitened by ZCA {how(recorded.get('mirror'))}, "
                         f"not {how(mirror)}; resume only with the same whitening (--zca-mirror with --flip is the "
                         "default), or give another store (nothing was overwritten)")


def note_store_zca(paths, whitening, fit: str = "train", outside: int | None = None,
                   words: dict | None = None) -> None:
    """Record the whitening (fitted on ``fit``: :data:`ZCA_FITS` or ``words``, outside
    ``outside``; None: the images were not whitened) in each complete store of ``paths``
    (``preprocessing``), for :func:`check_store_zca`: a later run with another whitening, or
    none, is then refused naming it, not as a kernel of "different images"."""
    from cnngp.engine.store import KernelStore

    info = {"zca": None if whitening is None else zca_fit_record(whitening, fit, outside, words or ZCA_FITS)}
    for path in paths:
        if (Path(path) / "zarr.json").is_file():
            KernelStore.open(path).annotate(preprocessing=info)


def open_cluster(ex, cleanup):
    """``ex`` with the Dask client its ``workers`` or ``scheduler`` name, opened once for a whole
    run (its stores' tiles, and the sweep's cross-validation) and closed by ``cleanup`` (a
    :class:`contextlib.ExitStack`); a client given as ``scheduler`` is used as it is."""
    client = ex.scheduler if not (ex.scheduler is None or isinstance(ex.scheduler, str)) else None
    if client is None:
        from cnngp.engine.distributed import dask_client

        limit = None if ex.memory_budget is None else int(ex.memory_budget) + 2 * 1024**3
        client = cleanup.enter_context(dask_client(ex.workers, ex.scheduler, limit))
    return ex.replace(workers=None, scheduler=client)


def _in_memory(ex, checkpoint=None):
    """The execution of an in-memory kernel of the sweep: no store options, its own checkpoint."""
    return ex.replace(store=None, archive=None, reuse=None, workers=None, scheduler=None, tile=None, threads=None,
                      checkpoint=checkpoint)


def _refuse_long_store_job(what: str, seconds: float, ex) -> None:
    """Without --yes, refuse store work estimated (on this machine's CPU) at over an hour."""
    from cnngp.engine.resources import check_job

    check_job(what, seconds=seconds if ex.device.startswith("cpu") else None,
              yes=False, remedy="a finished store is reused, so the work can be spread over "
              "several runs, --workers or a --scheduler")


#: the tile archives of a sweep's stores, in its ``--archive`` folder
ARCHIVE_PARTS = ("train", "test", "train-mirror", "test-mirror")


def check_sweep_archive(archive, test: bool, what: str = "--archive", flip: bool = False,
                        nested: str | None = None) -> Path:
    """Refuse, before any work, a sweep archive folder cnngp must not write: it holds the
    tile archives ``train/`` (and ``test/``; with ``flip`` also ``train-mirror/`` and
    ``test-mirror/``) and nothing else but, where ``nested`` names a prefix (``cnngp learn``'s
    ``"internal-"``), folders of that name of the same layout."""
    from cnngp.engine.archive import check_archive_folder

    path = Path(archive)
    if not str(archive).strip() or not path.is_dir() or path.is_symlink():
        check_archive_folder(archive, what)  # a new folder, or refused
    else:
        inner = sorted(p for p in path.iterdir() if nested and p.name.startswith(nested) and p.is_dir())
        foreign = sorted(p.name for p in path.iterdir() if p.name not in ARCHIVE_PARTS and p not in inner)
        for folder in inner:  # each laid out as this one (check_sweep_archive), nothing else in it
            check_sweep_archive(folder, True, what, flip=flip)
        if foreign:
            raise CNNGPError(f"{what}: {str(path)!r} is a folder that is not a sweep's tile archive "
                             f"(it holds {foreign[0]!r}; a sweep's holds train/ and test/); give a new or empty folder")
    for part in ("train",) + (("test",) if test else ()):
        for suffix in ("",) + (("-mirror",) if flip else ()):
            check_archive_folder(path / (part + suffix), what)
    return path


def _stored_kernels(body, readouts, labels, x_train, x_test, yes, ex, get, flip=False):
    """Train (and test) kernels computed into the stores ``ex.store`` (and its test store);
    returned as lazy per-readout sequences. Without ``yes``, a job estimated (from timing a few
    pairs here) at over an hour is refused. ``ex.archive``: a folder whose ``train`` and
    ``test`` subfolders are the stores' tile archives. With ``flip`` the stores hold the plain
    kernels and the mirror stores (:func:`mirror_store_path`) their mirror terms; the
    sequences are the flip-averaged kernels ½[K + K_mirror]."""
    from cnngp.engine.distributed import store_dry_run, store_kernel

    names = [f"{name}:{_lengthscale_json(lam)}" for name, lam in labels]
    archive = ex.archive
    if archive is not None:
        check_sweep_archive(archive, x_test is not None, flip=flip)
    jobs = [(x_train, None, part) for part in _store_parts(ex, "train", flip, readouts)]
    if x_test is not None:
        jobs += [(x_test, x_train, part) for part in _store_parts(ex, "test", flip, readouts)]
    if not yes and not ex.on_cluster:
        from cnngp.engine.timing import total_seconds

        seconds = total_seconds(_lent_or_in_full(lambda e, x1=x1, x2=x2, term=term: store_dry_run(
            body, x1, x2, readouts=readouts, get=get, flip=term, execution=e),
            e, ex).dry_run for x1, x2, (term, e) in jobs)
        _refuse_long_store_job(f"--n {len(x_train)} with {len(readouts)} readouts", seconds, ex)
    for x1, x2, (term, e) in jobs:
        _lent_or_in_full(lambda e, x1=x1, x2=x2, term=term: store_kernel(
            body, x1, x2, readouts=readouts, labels=names, get=get, flip=term, execution=e), e, ex)
    n_parts = 2 if flip else 1
    K = _stored_readouts([e for _, _, (_, e) in jobs[:n_parts]])
    K_test = None if x_test is None else _stored_readouts([e for _, _, (_, e) in jobs[n_parts:]])
    return K, K_test


def _store_parts(ex, part: str, flip, heads) -> list:
    """[(flip term, execution)] of the stores of one part ("train" or "test") of a sweep: the
    plain kernel, and with ``flip`` its mirror term (``flip="mirror"``), each with its store,
    tile archive and the store that lends it tiles: ``ex.reuse`` itself for the train kernel
    (refused by the run if it cannot lend), and its test and mirror-term counterparts only
    where they exist and hold the readouts ``heads`` this part computes (an earlier sweep
    without ``--test`` or ``--flip``, or with ``--test best``, lends its train kernels alone;
    ``heads`` None: offset sums, ``cnngp learn``'s stores, of the same layout).
    ``ex.reuse`` may also be an earlier sweep's ``--archive`` folder: its ``train/``, ``test/``
    and ``-mirror`` tile archives lend in the stores' place."""
    from cnngp.engine.lending import holds_readouts

    out = []
    archived = ex.reuse is not None and is_sweep_archive(ex.reuse)  # lent by a sweep's tile archive
    lenders = ([None] * (2 if flip else 1) if ex.reuse is None
               else [b for _, b in store_terms(ex.reuse, flip)])
    for (term, store), lender in zip(store_terms(ex.store, flip), lenders):
        suffix = "-mirror" if term else ""
        if archived:
            lender = Path(ex.reuse) / (part + suffix)
        elif lender is not None and part == "test":
            lender = test_store_path(lender)
        if lender is not None and (term or part == "test") and not holds_readouts(lender, heads):
            if Path(lender).exists():  # there, but lends nothing to this part: said once, not silently
                held = "offset sums" if heads is None else f"{len(heads)} readout(s)"
                _warn_once((str(lender), part + suffix), f"--reuse: {str(lender)!r} is not of the {part}"
                           f"{' mirror-term' if term else ''} kernel this run computes ({held}): it holds other "
                           "contents, or is no kernel store or tile archive, so it lends nothing to it")
            lender = None
        out.append((term, ex.replace(
            store=store if part == "train" else test_store_path(store),
            archive=None if ex.archive is None else Path(ex.archive) / (part + suffix), reuse=lender)))
    return out


def _lent_or_in_full(call, e, ex):
    """``call(e)`` for one store of a sweep. Where its lender is one the sweep found beside
    ``--reuse`` (a test or mirror-term store, not ``ex.reuse`` itself) and refuses to lend (other
    test images, say), that store is computed in full instead, with a warning; a refusal by the
    store named by ``--reuse`` stops the sweep. The refusal comes before any store is made."""
    from cnngp.engine.lending import LenderRefused

    try:
        return call(e)
    except LenderRefused as refusal:
        if e.reuse is None or ex.reuse is None or Path(e.reuse) == _named_lender(ex.reuse):
            raise
        _warn_once((str(e.reuse), str(e.store)), f"{refusal} (so {str(e.store)!r} is computed in full)")
        return call(e.replace(reuse=None))


def _warn_once(key: tuple, message: str) -> None:
    """A warning about a lender, once per run_sweep (or run_learn) call (not again after the
    plan's dry run)."""
    warned = _LENDERS_REFUSED.get()
    if warned is None:  # outside run_sweep: this call's own
        warned = set()
    if key not in warned:
        warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


#: (lender, store) pairs whose refusal :func:`_lent_or_in_full` has warned of in this sweep: a
#: set per run_sweep (or run_learn) call (a context variable, so sweeps in other threads keep their own)
_LENDERS_REFUSED: contextvars.ContextVar = contextvars.ContextVar("cnngp_lenders_refused", default=None)


def is_sweep_archive(path) -> bool:
    """``path`` is a sweep's tile archive folder (``--archive DIR``: its ``train/`` at least)."""
    from cnngp.engine.archive import is_archive

    return is_archive(Path(path) / "train")


def _planned_best(ex, readouts, flip) -> list:
    """The one readout a ``--test best`` sweep's plan prices (the CV has not chosen yet): the
    readout an earlier attempt of this sweep left in its own test store or its tile archive
    (``--store``, ``--archive``: a resumed or restored run chooses it again), else the one the
    test store of ``--reuse`` holds — an earlier sweep's choice, whose tiles (and tile size) it
    would lend — when it is one of ``readouts``, else the first."""
    from cnngp.engine.lending import open_source

    sources = []
    for store in ([] if ex.store is None else [ex.store, mirror_store_path(ex.store)] if flip else [ex.store]):
        sources.append(test_store_path(store))
    if ex.archive is not None:
        sources += [Path(ex.archive) / "test", *([Path(ex.archive) / "test-mirror"] if flip else [])]
    if ex.reuse is not None:
        sources.append((Path(ex.reuse) / "test") if is_sweep_archive(ex.reuse) else test_store_path(ex.reuse))
    specs = [json.dumps(h.to_spec(), sort_keys=True) for h in readouts]
    for source in sources:
        if (source / "zarr.json").is_file() or (source / "archive.json").is_file():
            try:
                held = open_source(source).attrs.get("readouts") or []
            except CNNGPError:
                held = []
            if len(held) == 1 and json.dumps(held[0], sort_keys=True) in specs:
                return [readouts[specs.index(json.dumps(held[0], sort_keys=True))]]
    return readouts[:1]


def _named_lender(reuse) -> Path:
    """The lender ``--reuse`` names for a sweep's train kernel: the store, or a sweep archive
    folder's ``train/``. Its refusal stops the sweep; its siblings' only warn."""
    return Path(reuse) / "train" if is_sweep_archive(reuse) else Path(reuse)


def _stored_readouts(executions):
    """The complete stores of ``executions`` as one lazy sequence of readouts: the one store's,
    or two (a plain kernel and its mirror term) averaged (:class:`FlipAveragedReadouts`)."""
    from cnngp.engine.store import FlipAveragedReadouts, KernelStore, StoredReadouts

    parts = [StoredReadouts(KernelStore.open(e.store)) for e in executions]
    return parts[0] if len(parts) == 1 else FlipAveragedReadouts(*parts)


def _best_test_kernel(body, readout, name, x_train, x_test, yes, ex, get, flip=False):
    """The test × train kernel (float64) of the one readout the cross-validation chose: in
    memory, or into the test store ``K-test.zarr`` (and ``archive/test``) beside ``ex.store``
    (with ``flip`` also the mirror term's, ``K-mirror-test.zarr``)."""
    if ex.store is None:
        from cnngp.engine.gram import readout_sweep

        return _resumable(lambda e: readout_sweep(body, [readout], x_test, x_train, get=get, flip=flip,
                                                  execution=e), ex, None, "test-best")[0].double().numpy()
    from cnngp.engine.distributed import store_dry_run, store_kernel
    from cnngp.engine.timing import total_seconds

    parts = _store_parts(ex, "test", flip, [readout])
    if not yes and not ex.on_cluster:
        seconds = total_seconds(store_dry_run(body, x_test, x_train, readouts=[readout], get=get, flip=term,
                                              execution=e).dry_run for term, e in parts)
        _refuse_long_store_job(f"--test best ({len(x_test)} × {len(x_train)} images)", seconds, ex)
    for term, e in parts:
        store_kernel(body, x_test, x_train, readouts=[readout], labels=[name], get=get, flip=term, execution=e)
    return _stored_readouts([e for _, e in parts])[0]


def _test_prior_variances(body, heads, x_test, ex, get, flip=False) -> np.ndarray:
    """k(x*, x*) of every test image under each readout, (L, M) float64: the prior variances the
    GP posterior variance at the test points starts from (docs/maths.md §5.1). The pair pass on
    the M pairs (x*, x*) alone (:func:`cnngp.engine.gram.kernel_diagonal`, flip-averaged with
    ``flip``), in memory for a store sweep too: M pairs beside the M × N of the test kernel."""
    from cnngp.engine.gram import kernel_diagonal

    prior = kernel_diagonal(body, x_test, readouts=heads, get=get, flip=flip,
                            execution=_in_memory(ex).replace(progress=False))
    return prior.double().numpy()


def _score_test(row, K, y_sub, Kt, prior, y_test, folds, n_classes) -> dict:
    """Test accuracy, NLL and ECE of one readout's model at its cross-validated σ², its
    probabilities calibrated on the training folds ``folds`` alone; recorded in ``row``."""
    K = np.asarray(K, dtype=np.float64)
    Kt = np.asarray(Kt, dtype=np.float64)
    row["test_accuracy"] = gp.test_accuracy(K, y_sub, Kt, y_test, row["noise_variance"], n_classes)
    with gp.small_problem_threads(len(y_sub)):
        scores = calibration.test_scores(K, y_sub, Kt, prior, y_test, row["noise_variance"], folds, n_classes)
    row.update(test_nll=scores["nll"], test_ece=scores["ece"], calibration_scale=scores["calibration_scale"])
    losses = -np.asarray(scores["log_prob_true"], dtype=np.float64)  # ±2 SE over the test images
    row["test_nll_2se"] = float(2.0 * losses.std(ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else 0.0
    row["_per_image"] = (scores["predicted"], scores["log_prob_true"])  # moved to test_predictions
    return scores


def _score_test_below_n_max(rows, K, y_sub, Kt, prior, y_test, n_classes, protocol) -> None:
    """``--test all`` at each N below N_max: the model of every disjoint block of N images
    (the blocks the CV scores, each at the σ² its own CV chose, its probabilities calibrated on
    its own folds) scored on the test images, as at N_max (:func:`_score_test`). Recorded in
    each of one readout's ``rows`` (those with ``n`` < N_max): the blocks' scores
    (``block_test_accuracies``, ``block_test_nlls``, ``block_test_eces``) and their means
    (``test_accuracy``, ``test_nll``, ``test_ece``) with ``test_accuracy_2se``
    (:func:`learning_curve_2se`): the test learning curve, a mean over training sets of each
    size."""
    n_max = len(y_sub)
    for row in rows:
        n = int(row["n"])
        if n >= n_max:
            continue
        scores = []
        for b, noise in zip(blocks(n_max, n, n_classes), row["block_noise_variances"], strict=True):
            yb = y_sub[b]
            block_row = {"noise_variance": noise}
            folds = _folds_for(protocol.fold_scheme, n, yb, protocol.folds, protocol.seed)
            _score_test(block_row, K[np.ix_(b, b)], yb, Kt[:, b], prior, y_test, folds, n_classes)
            scores.append((block_row["test_accuracy"], block_row["test_nll"], block_row["test_ece"]))
        accs, nlls, eces = (np.array(v, dtype=np.float64) for v in zip(*scores))
        mean, two_se = float(accs.mean()), learning_curve_2se(accs, len(y_test))
        row.update(test_accuracy=mean, test_accuracy_2se=two_se, test_nll=float(nlls.mean()),
                   test_ece=float(eces.mean()), block_test_accuracies=accs.tolist(),
                   block_test_nlls=nlls.tolist(), block_test_eces=eces.tolist())


def learning_curve_2se(accuracies, n_test: int) -> float:
    """±2 SE of the mean test accuracy of B models trained on disjoint training sets and scored
    on the same ``n_test`` images: 2·sqrt(s²/B + p̄(1 − p̄)/M), the spread over the training sets
    (s², ddof 1; none for B = 1) plus the binomial noise of the M test images, which the models
    share and their mean does not average away. Conservative: a block's s² already holds part
    of the test noise. Without the second term, two blocks would give ±|a − b| alone (M = 1,000:
    the test images alone are ±3.2 points at p = 0.5).

    >>> round(learning_curve_2se([0.5, 0.5], 1000), 6)
    0.031623
    """
    a = np.asarray(accuracies, dtype=np.float64)
    p = float(a.mean())
    between = float(a.var(ddof=1)) / len(a) if len(a) > 1 else 0.0
    return float(2 * math.sqrt(between + p * (1 - p) / int(n_test)))


def _lengthscale_json(value: float):
    return "inf" if math.isinf(value) else float(value)


def sweep_readouts(
    template: Readout, lengthscales: Sequence[float], family: str = "matern32"
) -> tuple[list[Readout], list[tuple[str, float]]]:
    """The readouts of a sweep: independent, ``family`` at each λ, constant (mean pool).

    Parameters
    ----------
    template : Readout
        Supplies ``weight_var`` and ``bias_var``.
    lengthscales : sequence of float
        λ values (>= 0, ``inf`` allowed) in readout-grid index units.
    family : {"matern12", "matern32", "matern52", "rbf"}

    Returns
    -------
    readouts : list of Readout, length ``len(lengthscales) + 2``
    labels : list of (readout name, λ)
        ``("independent", 0.0)``, ``(family, λ)`` …, ``("constant", inf)``.
    """
    if family not in FAMILIES:
        raise CNNGPError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    lams = [parse_lengthscale(v, "lengthscales") for v in lengthscales]
    corrs = [Independent()] + [correlation_family(family, v) for v in lams] + [Constant()]
    labels = [("independent", 0.0)] + [(family, v) for v in lams] + [("constant", math.inf)]
    readouts = [template.with_correlation(c) for c in corrs]
    return readouts, labels


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_ns(ns, folds: int, n_classes: int, counts: np.ndarray) -> list[int]:
    try:
        values = [int(v) for v in ns]
        if any(float(v) != int(v) for v in ns):
            raise ValueError
    except (TypeError, ValueError):
        raise CNNGPError(f"n: expected a list of positive integers, got {ns!r}") from None
    if not values or min(values) <= 0:
        raise CNNGPError(f"n: expected a non-empty list of positive integers, got {ns!r}")
    values = sorted(set(values))
    n_max = values[-1]
    for n in values:
        if n % n_classes:
            raise CNNGPError(
                f"n={n} is not a multiple of the number of classes ({n_classes}); "
                f"class-balanced subsets need n = {n_classes}·m, e.g. "
                f"{n_classes * max(1, n // n_classes)}"
            )
        if n_max % n:
            raise CNNGPError(
                f"n={n} does not divide the largest n={n_max}: smaller data sets are "
                f"disjoint blocks of the largest one, so every n must divide {n_max} "
                f"(e.g. n = {n_max // 4},{n_max // 2},{n_max})"
            )
        if n // n_classes < folds:
            raise CNNGPError(
                f"n={n} gives {n // n_classes} image(s) per class, fewer than the "
                f"{folds} folds; use n >= {folds * n_classes} or fewer folds"
            )
    per_class = n_max // n_classes
    if per_class > counts.min():
        c = int(np.argmin(counts))
        raise CNNGPError(
            f"n={n_max} needs {per_class} training images per class but class {c} has "
            f"only {int(counts[c])}; the largest balanced n for these data is "
            f"{n_classes * int(counts.min())}"
        )
    return values


def _check_labels(y: np.ndarray, n_classes: int, what: str, folds: int | None) -> np.ndarray:
    counts = np.bincount(y, minlength=n_classes)
    if counts.size > n_classes:
        raise CNNGPError(f"{what}: label {int(y.max())} is out of range for {n_classes} classes")
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise CNNGPError(
            f"{what}: class(es) {missing.tolist()} have no images; every class "
            f"0..{n_classes - 1} must be present"
        )
    if folds is not None and counts.min() < folds:
        c = int(np.argmin(counts))
        raise CNNGPError(
            f"{what}: class {c} has only {int(counts[c])} image(s), fewer than the "
            f"{folds} folds"
        )
    return counts


# --------------------------------------------------------------------------------------
# Kernel cache
# --------------------------------------------------------------------------------------


def _write_npz_atomic(path: Path, arrays: dict) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays), what="kernel_cache")


def _checkpoint(cache_path, part, prefix=None):
    """Where a kernel computation of the sweep saves its progress (resumable): beside the
    kernel cache, else at ``PREFIX.part.npz`` for the execution's ``checkpoint`` prefix."""
    if cache_path is not None:
        return cache_path.with_name(f"{cache_path.name}.{part}.checkpoint.npz")
    return None if prefix is None else Path(f"{prefix}.{part}.npz")


def checkpoint_files(prefix) -> list[Path]:
    """The checkpoint files a sweep with checkpoint prefix ``prefix`` may leave (see
    :func:`run_sweep`): remove them once its results are safely written."""
    return [Path(f"{prefix}.{part}.npz") for part in ("train", "test", "test-best")]


def _resumable(compute, ex, cache_path, part):
    """``compute(execution)`` with the progress of the in-memory kernel saved to its checkpoint.

    A sweep's own checkpoint (the execution's ``checkpoint`` prefix, no kernel cache) is kept
    after the kernel is complete, so that an interruption in the cross-validation that follows
    costs no kernel pairs; one left by a different computation (another ``--n``, network or
    data) is replaced with a warning, not refused — the prefix belongs to the sweep's output."""
    import warnings

    from cnngp.engine.storage import CheckpointMismatchError

    own = cache_path is None and ex.checkpoint is not None
    path = _checkpoint(cache_path, part, ex.checkpoint if own else None)
    run = _in_memory(ex, path).replace(keep_checkpoint=own)
    try:
        return compute(run)
    except CheckpointMismatchError:
        if not own:
            raise
        warnings.warn(f"{str(path)!r} holds an earlier sweep's progress on other settings; starting over",
                      RuntimeWarning, stacklevel=2)
        path.unlink(missing_ok=True)
        return compute(run)


def _read_cache(path: Path, key: dict) -> dict | None:
    """Arrays of a matching cache file, None if absent; an error if it does not match."""
    if not path.exists():
        return None
    damaged = []
    try:
        with read_npz(path) as z:
            stored = json.loads(str(z["key"]))
            out = {}
            for name in ("kernels", "test_kernels"):
                if name not in z.files:
                    continue
                values = np.asarray(z[name])
                recorded = str(z[f"{name}_sha256"]) if f"{name}_sha256" in z.files else None
                if recorded is not None and recorded != array_sha256(values):  # older caches have none
                    damaged.append(name)
                out[name] = values.astype(np.float64)
    except Exception as e:
        raise CNNGPError(
            f"kernel_cache: {str(path)!r} is not a readable cnngp sweep kernel file ({e}); "
            "delete it or choose another path"
        ) from None
    if damaged:
        raise CNNGPError(
            f"kernel_cache: {str(path)!r}: its {' and '.join(damaged)} do not match the sha256 recorded "
            "when they were written (the file was altered or damaged); delete it or choose another path"
        )
    # zca_fit_sha256: the images a whitening fitted elsewhere than the subset was fitted on
    train_fields = ("format", "spec", "readouts", "train_sha256", "dtype", "zca", "zca_fit_sha256", "kernel", "flip")
    diff = [f for f in train_fields if stored.get(f) != key.get(f)]
    if diff:
        raise CNNGPError(
            f"kernel_cache: {str(path)!r} holds kernels of a different sweep (differs in "
            f"{', '.join(diff)}); delete it or choose another path"
        )
    if stored.get("test_sha256") != key.get("test_sha256"):
        out.pop("test_kernels", None)
    out["key"] = stored
    return out


# --------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------


def check_folds_and_seed(folds, seed) -> None:
    """A protocol's ``folds`` (an integer >= 2) and ``seed`` (an integer >= 0), checked."""
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise CNNGPError(f"folds: expected an integer >= 2, got {folds!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise CNNGPError(f"seed: expected an integer >= 0, got {seed!r}")


def _folds_for(scheme: str, n: int, y: np.ndarray, k: int, seed: int):
    if scheme == "paper":
        return gp.paper_folds(n, k)
    return gp.stratified_folds(y, k, seed)


def _cv_readout(Kl, name, lam, y_sub, ns, n_classes, protocol, bar=None):
    """One readout's CV accuracy on every block of every size: a row per n in ``ns``."""
    folds, fold_scheme, seed, n_grid = protocol.folds, protocol.fold_scheme, protocol.seed, protocol.n_grid
    _check_diagonal(Kl, name, lam)
    n_max = ns[-1]
    out = []
    for n in ns:
        block_list = blocks(n_max, n, n_classes)
        accs, noises, ties, nested, nested_reason = [], [], [], [], None
        for b in block_list:
            yb = y_sub[b]
            whole = len(b) == len(Kl) and np.array_equal(b, np.arange(len(Kl)))
            cv = gp.cross_validate(
                Kl if whole else Kl[np.ix_(b, b)],
                yb,
                folds=_folds_for(fold_scheme, n, yb, folds, seed),
                n_classes=n_classes,
                n_grid=n_grid,
            )
            accs.append(cv.best_accuracy)
            noises.append(cv.best_noise_variance)
            tied = cv.tied_noise_variances
            ties.append([float(tied[0]), float(tied[-1]), int(tied.size)])
            if protocol.nested and nested is not None:  # σ² chosen inside each outer fold
                Kb = Kl if whole else Kl[np.ix_(b, b)]
                try:
                    nested.append(selection.nested_fold_scores(
                        Kb, yb, _folds_for(fold_scheme, n, yb, folds, seed),
                        lambda tr, y_tr: _folds_for(fold_scheme, len(tr), y_tr, folds, seed),
                        n_classes, n_grid))
                except CNNGPError as e:  # too few images per class for folds inside folds
                    nested = None
                    nested_reason = f"not possible at N={n}: {e}"
            if bar is not None:
                bar.update(1)
        mean, two_se = gp.mean_and_2se(accs)
        out.append({
            "n": int(n),
            "readout": name,
            "lengthscale": _lengthscale_json(lam),
            "cv_accuracy": float(mean),
            "cv_accuracy_2se": float(two_se),
            "n_datasets": len(block_list),
            "noise_variance": float(np.median(noises)),
            "block_cv_accuracies": [float(a) for a in accs],
            "block_noise_variances": [float(s) for s in noises],
            "block_noise_variance_ties": ties,  # per block: [smallest, largest, count] of the tied σ²
            # combined over readouts, then dropped (None: not possible at this N, and why)
            **({"_nested": nested if nested is not None else nested_reason} if protocol.nested else {}),
        })
    return out


def cv_stored_readout(path, index, name, lam, y_sub, ns, n_classes, protocol):
    """A Dask task: read readout ``index`` of the store at ``path`` and cross-validate it
    (``protocol``: the sweep's :class:`SweepProtocol`)."""
    from cnngp.engine.store import KernelStore

    Kl = KernelStore.open(path).readout(index)
    with gp.small_problem_threads(ns[-1]):
        return _cv_readout(Kl, name, lam, y_sub, ns, n_classes, protocol)


def _cross_validate_all(K, y_sub, labels, ns, n_classes, protocol, progress, client=None):
    """CV accuracy of every readout on every block of every size: (results, best).

    ``K`` is any sequence of (N, N) matrices, read once each in order (a kernel store's
    readouts come from disk one at a time), so one readout is in memory at once. With a Dask
    ``client`` and a store, each readout is a task that reads its own matrix."""
    n_max = ns[-1]
    args = (y_sub, ns, n_classes, protocol)
    if client is not None and hasattr(K, "store"):
        from distributed import as_completed

        futures = {client.submit(cv_stored_readout, str(K.store.path), i, name, lam, *args, pure=False): i
                   for i, (name, lam) in enumerate(labels)}
        per_readout = [None] * len(labels)
        for future in as_completed(futures):
            per_readout[futures[future]] = future.result()
    else:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(labels) * sum(n_max // n for n in ns), desc="cross-validation", unit="fit")
        per_readout = []
        with gp.small_problem_threads(n_max):
            for (name, lam), Kl in zip(labels, K):
                per_readout.append(_cv_readout(Kl, name, lam, *args, bar=bar))
                del Kl
        if bar is not None:
            bar.close()
    results, best = [], []
    for k, n in enumerate(ns):
        rows = [r[k] for r in per_readout]
        # exact ties (accuracies are counts): the first in the sweep's order — independent, λ
        # ascending, mean pool — and every tied readout named (cnngp.inference.selection)
        i_best, tied = selection.first_best([r["cv_accuracy"] for r in rows])
        entry = {key: rows[i_best][key] for key in _BEST_KEYS}
        entry["tied"] = [{"readout": rows[i]["readout"], "lengthscale": rows[i]["lengthscale"]} for i in tied]
        if "_nested" in rows[0]:
            unavailable = [r["_nested"] for r in rows if isinstance(r["_nested"], str)]
            entry["nested"] = {"unavailable": unavailable[0]} if unavailable else _nested_entry(rows, n)
        best.append(entry)
        for r in rows:
            r.pop("_nested", None)
        results.extend(rows)
    return results, best


def _nested_entry(rows, n: int) -> dict:
    """The nested CV estimate at one N (cnngp.inference.selection): in each outer fold of each
    block, the readout and σ² chosen by an inner CV on that fold's training images alone."""
    accs, chosen = [], []
    for j in range(len(rows[0]["_nested"])):
        res = selection.nested_choice([r["_nested"][j] for r in rows])
        accs.append(res.accuracy)
        chosen.append([{"readout": rows[i]["readout"], "lengthscale": rows[i]["lengthscale"],
                        "noise_variance": s, "tied": len(t)}
                       for i, s, t in zip(res.chosen, res.noise_variances, res.tied)])
    from cnngp.experiments.plots import accuracy_2se

    mean, two_se = gp.mean_and_2se(accs)
    # one data set, or blocks that agree (a spread of 0 is degenerate): binomial over the
    # n × blocks held-out predictions, as the plain CV's rows
    two_se = accuracy_2se({"n": n, "cv_accuracy": float(mean), "cv_accuracy_2se": float(two_se),
                           "n_datasets": len(accs), "block_cv_accuracies": accs})
    return {"cv_accuracy": float(mean), "cv_accuracy_2se": float(two_se),
            "block_accuracies": [float(a) for a in accs], "chosen": chosen}


#: where a sweep's ZCA whitening is fitted (:attr:`SweepProtocol.zca_fit`,
#: :data:`cnngp.io.preprocess.ZCA_FITS`): what each records
ZCA_FITS = {
    "train": "the N_max training subset",
    "rest": "the training images outside the N_max subset (unlabelled)",
}


@dataclass(frozen=True)
class SweepProtocol(Settings):
    """What a sweep measures: sizes, readouts and the cross-validation (validated on
    construction; :meth:`replace` makes a changed copy). How the kernels are computed is the
    separate :class:`cnngp.Execution`.

    Attributes
    ----------
    ns : sequence of int, default (40, 80, 160)
        Training-set sizes. Each must be a multiple of the number of classes, give at
        least ``folds`` images per class, and divide the largest, ``N_max``.
    folds : int, default 4
        Number of cross-validation folds.
    lengthscales : sequence of float, default :data:`PAPER_LENGTHSCALES`
        λ of the swept readout in index units of the readout's grid. ``0`` and ``inf``
        are allowed (exactly independent / constant); the independent and constant
        readouts are always included as separate entries.
    family : {"matern32", "matern12", "matern52", "rbf"}, default "matern32"
    test : bool or {"all", "best"}, default False
        Also score, on the test split, the models trained on the whole ``N_max`` subset
        (each readout at its cross-validated σ²; the top-level ``"test"`` entry is the
        one with the best cross-validated λ). ``True`` is ``"all"``. ``"best"`` scores only
        the cross-validation's choice: the test kernels are computed after the
        cross-validation, for that one readout (the same kernel computation per pair, 1/L
        of the memory and storage; with a store, the test store holds one readout).
    n_test : int, optional
        Use a class-balanced subset of this many test images (default: all).
    seed : int, default 0
        Seed of the class-balanced subsets (and of stratified folds).
    fold_scheme : {"paper", "stratified"}, default "paper"
        ``"paper"``: contiguous folds of the class-interleaved order
        (:func:`cnngp.inference.gp.paper_folds`); ``"stratified"``: shuffled stratified folds.
    n_grid : int, default 1000
        Number of σ² values (the paper's log-spaced grid).
    flip : bool, default False
        Flip-averaged kernels ½[K(x, x') + K(x, flip x')] (docs/maths.md §9) for the training
        and the test kernels alike: horizontal-flip invariance at about twice the pair work.
        Refused, before any kernel, for a network that is not flip-symmetric.
    zca : float, optional
        Regularised ZCA whitening of the images (:mod:`cnngp.io.preprocess`) with this
        strength ε (a fraction of the mean eigenvalue). It is fitted on the ``N_max`` training
        subset only — the union of the blocks, so every block and fold shares one whitening
        (unlabelled statistics of training images; no test image enters it) — and applied to
        the training and test images before any kernel. Default: no whitening.
    zca_fit : {"train", "rest"}, default "train"
        Which training images the whitening is fitted on. ``"train"``: the ``N_max`` subset
        (as above; the cross-validation's validation folds are then whitened in sample,
        while the test images are not). ``"rest"``: the data's other training images, those
        outside the ``N_max`` subset, unlabelled — never an image the cross-validation
        validates on nor a test image, so that validation and test images are whitened
        alike, out of sample, and the whitening does not change with the blocks.
    zca_fit_outside : int, optional
        With ``zca_fit="rest"``: fit on the training images outside the class-balanced subset
        of this many (>= ``N_max``, drawn with the same ``seed``, so it begins with the
        ``N_max`` subset) instead of outside the ``N_max`` subset. Sweeps of one learning curve
        at several ``N_max`` (640, then 1,280) then share one whitening: the larger sweep's
        kernels begin with the smaller one's, and a store of the smaller lends its tiles to
        the larger (``reuse``).
    zca_mirror : bool, optional
        Fit the whitening on the fit images and their mirror images, so that it commutes with
        horizontal flips (:mod:`cnngp.io.preprocess`; docs/maths.md §9). Default (None): as
        ``flip``, so that a flip-averaged sweep's predictions are invariant to mirroring the
        images themselves; ``False`` with ``flip`` mirrors the whitened images instead (what
        sweeps before 2026-12-06 did).
    """

    KIND = "sweep protocol setting"

    ns: Sequence[int] = (40, 80, 160)
    folds: int = 4
    lengthscales: Sequence[float] = PAPER_LENGTHSCALES
    family: str = "matern32"
    test: bool | str = False
    n_test: int | None = None
    seed: int = 0
    fold_scheme: str = "paper"
    n_grid: int = 1000
    zca: float | None = None
    flip: bool = False
    nested: bool = True
    zca_fit: str = "train"
    zca_fit_outside: int | None = None
    zca_mirror: bool | None = None

    def __post_init__(self):
        if self.zca is not None:
            object.__setattr__(self, "zca", check_zca_strength(self.zca, "zca"))
        check_zca_fit(self.zca_fit, self.zca, self.zca_fit_outside)
        check_zca_mirror(self.zca_mirror, self.zca, self.flip)
        if self.family not in FAMILIES:
            raise CNNGPError(f"family: expected one of {sorted(FAMILIES)}, got {self.family!r}")
        if self.fold_scheme not in _FOLD_SCHEMES:
            raise CNNGPError(f"fold_scheme: expected one of {list(_FOLD_SCHEMES)}, got {self.fold_scheme!r}")
        check_folds_and_seed(self.folds, self.seed)
        if self.test not in (False, True, "all", "best"):
            raise CNNGPError(f"test: expected False, True ('all') or 'best', got {self.test!r}")
        if isinstance(self.n_grid, bool) or not isinstance(self.n_grid, (int, np.integer)) or self.n_grid < 1:
            raise CNNGPError(f"n_grid: expected an integer >= 1, got {self.n_grid!r}")
        if not isinstance(self.flip, (bool, np.bool_)):
            raise CNNGPError(f"flip: expected True or False, got {self.flip!r}")
        if not isinstance(self.nested, (bool, np.bool_)):
            raise CNNGPError(f"nested: expected True or False, got {self.nested!r}")
        object.__setattr__(self, "nested", bool(self.nested))
        object.__setattr__(self, "flip", bool(self.flip))
        object.__setattr__(self, "folds", int(self.folds))
        object.__setattr__(self, "seed", int(self.seed))



def run_sweep(network, dataset, protocol: SweepProtocol | None = None, *, kernel: str = "nngp",
              kernel_cache: str | os.PathLike | None = None, data_label: str | None = None,
              yes: bool = True, execution=None, dry_run: bool = False, **options) -> dict:
    """Run the paper's readout sweep and return a results dictionary.

    Parameters
    ----------
    network : str, path-like or Serial
        Named architecture, JSON spec file, or network (see :func:`split_network`).
    dataset : Dataset or str
        A :class:`cnngp.io.data.Dataset` or a source for :func:`cnngp.io.data.load_dataset`
        (``"digits"``, a ``.npz`` file, a folder).
    protocol : SweepProtocol, optional
        Sizes, readouts and cross-validation (``ns``, ``folds``, ``lengthscales``, ``family``,
        ``test``, ``n_test``, ``seed``, ``fold_scheme``, ``n_grid``; see :class:`SweepProtocol`).
    kernel : {"nngp", "ntk"}, default "nngp"
        Classify with the NNGP (GP posterior mean) or with the neural tangent kernel (the
        mean prediction of an infinite ensemble of infinitely wide networks trained by gradient
        descent on squared loss, σ² acting as a ridge), with the same CV protocol.
    kernel_cache : path, optional
        ``.npz`` file for the kernel stack. If it exists and was made by the same network,
        readouts, images and dtype, the kernels are read from it instead of computed;
        otherwise they are computed and written there (atomically). A file from a
        different sweep is an error, never overwritten.
    data_label : str, optional
        How to name the data in ``config["data"]`` (default: the source string, or the
        data set's name).
    yes : bool, default True
        Start a job estimated to take longer than ``cnngp.engine.resources.LONG_JOB_SECONDS``
        (the command line passes ``--yes``, default off). A job that cannot fit in memory
        is refused either way, before any kernel is computed.
    execution : Execution, optional
        How the kernels are computed (:class:`cnngp.Execution`, README "Execution options";
        ``progress`` defaults to on here). With ``store`` (``K.zarr``) the train kernels go
        tile by tile into that resumable store (a rerun computes only what it lacks) and the
        test kernels into ``K-test.zarr`` beside it, then one readout at a time is
        cross-validated: at most one N×N float64 matrix (and its eigendecomposition) is in
        memory; ``archive`` then keeps ``archive/train`` and ``archive/test``, and
        ``workers``/``scheduler`` also run the cross-validation.
    dry_run : bool, default False
        Check everything and plan the kernels (their pairs, memory, disk, and a time estimate
        from timing a few pairs here; a store's from its dry run: only the tiles it still
        lacks, less those its archive restores and ``reuse`` lends), then return
        ``{"dry_run": plan}`` without computing a kernel or writing anything (no store, no
        cluster started). The plan's ``stages`` give each kernel's pairs in all, its
        ``kernels`` what is left to compute: per store (its tiles to compute, lent, restored,
        in all, and the pairs to compute) or per in-memory kernel (the pairs its checkpoint
        lacks). The plan of kernels read from ``kernel_cache`` says so. A job too long for
        ``yes`` is planned, not refused.
    **options
        Settings of :class:`SweepProtocol` and execution options by name, overriding
        ``protocol`` and ``execution``: ``run_sweep("cnngp1", "digits", ns=(40, 80), progress=False)``.

    Returns
    -------
    dict
        JSON-serialisable, ``RESULTS_FORMAT`` layout:

        ``config``
            the sweep's settings (network spec, data, sizes, folds, lengthscales, seed, …);
        ``versions``
            package versions;
        ``results``
            one entry per (n, readout): ``n``, ``readout`` (``"independent"``, the family
            name, ``"constant"``), ``lengthscale`` (number, ``0`` or ``"inf"``),
            ``cv_accuracy`` (mean over blocks of each block's best CV accuracy),
            ``cv_accuracy_2se``, ``n_datasets`` (blocks), ``noise_variance`` (median of
            the blocks' CV-chosen σ²), ``block_cv_accuracies``, ``block_noise_variances``,
            ``block_noise_variance_ties`` (per block, [smallest, largest, count] of the σ² tied
            with the best: the smallest is chosen)
            and, with ``test``, on the scored ``N_max`` entries: ``test_accuracy``,
            ``test_nll`` (mean negative log likelihood of the test labels), ``test_ece``
            (expected calibration error, 15 top-label bins) and ``calibration_scale`` (τ of
            :mod:`cnngp.inference.calibration`, fitted on the training folds alone); with
            ``test="all"`` also on every smaller N's entries, each block's model scored on the
            test images: ``block_test_accuracies`` (``_nlls``, ``_eces``) and their means
            ``test_accuracy`` (± ``test_accuracy_2se`` over the blocks), ``test_nll``,
            ``test_ece`` (the test learning curve);
        ``best``
            per n, the entry with the highest ``cv_accuracy`` (first among ties);
        ``test``
            (with ``test``) the CV-selected model at ``N_max``: ``readout``,
            ``lengthscale``, ``noise_variance`` (and ``noise_variance_ties``: the smallest, largest
            and count of the σ² whose CV accuracy ties it), ``test_accuracy``, ``test_nll``, ``test_ece``,
            ``calibration_scale``, ``calibration_nll`` (held-out, training folds),
            ``calibration_separable`` (True: every held-out prediction was right, so τ is 1, the
            GP's own variance), ``mean_posterior_variance``, ``reliability`` (the reliability diagram's bins,
            :func:`cnngp.inference.calibration.reliability`), ``n_train``, ``n_test``;
            ``config["test_probabilities"]`` says how the probabilities were made.
        ``test_predictions`` (with ``test``; numpy arrays, which ``cnngp sweep`` writes to
        ``DIR/test_predictions.npz``)
            per test point and scored readout, for paired comparisons of configurations on the
            same images: ``test_index``, ``y_test`` (M,), ``readouts`` (L names), ``predicted``
            (L, M) and ``log_prob_true`` (L, M).

    Raises
    ------
    CNNGPError
        For bad sizes (not a multiple of the classes, not dividing ``N_max``, larger than
        the data allows, fewer than ``folds`` per class), a class missing from the labels,
        ``test`` without a test split, unknown family or fold scheme, and any error of the
        kernel engine (shapes, channels, dtype, device).
    ValueError, FileNotFoundError
        From :func:`cnngp.io.data.load_dataset` for unreadable or missing data.
    """
    _LENDERS_REFUSED.set(set())  # this sweep's warnings (_lent_or_in_full)
    protocol_options = {k: options.pop(k) for k in list(options) if k in SweepProtocol.names()}
    if protocol is None:
        protocol = SweepProtocol(**protocol_options)
    elif not isinstance(protocol, SweepProtocol):
        raise CNNGPError(f"protocol: expected a SweepProtocol or None, got {type(protocol).__name__}")
    elif protocol_options:
        protocol = protocol.replace(**protocol_options)
    try:
        ex = Execution.build(execution, options, where="run_sweep", accepted=COMPUTE + STORE,
                             defaults={"progress": True, "dtype": "float32"})
    except CNNGPError as e:
        if options and not set(options) <= set(Execution.names()):
            raise CNNGPError(f"{e}; and the SweepProtocol settings: {', '.join(SweepProtocol.names())}") from None
        raise
    if kernel not in ("nngp", "ntk"):
        raise CNNGPError(f"kernel: expected 'nngp' or 'ntk', got {kernel!r}")
    # as given (--workers 2, not the address of the cluster they are started as: open_cluster)
    recorded_execution = {k: v for k, v in ex.as_dict().items() if k not in ("checkpoint", "keep_checkpoint")}
    ns, folds, lengthscales, family = protocol.ns, protocol.folds, protocol.lengthscales, protocol.family
    test, n_test, seed, fold_scheme = protocol.test, protocol.n_test, protocol.seed, protocol.fold_scheme
    n_grid, progress, kernel_store, archive, dtype = protocol.n_grid, ex.progress, ex.store, ex.archive, ex.dtype
    test_mode = None if test is False else ("best" if test == "best" else "all")

    # -- data ----------------------------------------------------------------------
    if isinstance(dataset, Dataset):
        ds = dataset
        source = data_label or ds.name
    else:
        source = data_label or os.fspath(dataset)
        ds = load_dataset(dataset)
    ds.check_test_classes()
    n_classes = ds.n_classes
    if n_classes < 2:  # refused before any kernel is computed (the GP classifier needs two)
        raise CNNGPError(f"dataset {source}: the training labels hold only {n_classes} class; "
                         "classification needs at least 2 classes")
    counts = _check_labels(ds.y_train, n_classes, "training labels", folds)
    ns = _check_ns(ns, folds, n_classes, counts)
    n_max = ns[-1]
    order = balanced_subset(ds.y_train, n_max, seed=seed, n_classes=n_classes)
    x_sub, y_sub = ds.x_train[order], ds.y_train[order]

    test_order = None
    if test:
        if ds.x_test is None or ds.y_test is None or len(ds.y_test) == 0:
            raise CNNGPError(
                f"test: the data set {ds.name!r} has no test split; give a .npz with "
                "x_test and y_test, a CIFAR-10/MNIST folder, or drop --test"
            )
        test_counts = np.bincount(ds.y_test, minlength=n_classes)
        if n_test is None:
            test_order = np.arange(len(ds.y_test), dtype=np.int64)
        else:
            n_test = int(n_test)
            if n_test <= 0 or n_test % n_classes:
                raise CNNGPError(
                    f"n_test={n_test} must be a positive multiple of the number of "
                    f"classes ({n_classes})"
                )
            if n_test // n_classes > test_counts.min():
                raise CNNGPError(
                    f"n_test={n_test} needs {n_test // n_classes} test images per class "
                    f"but class {int(np.argmin(test_counts))} has only "
                    f"{int(test_counts.min())}"
                )
            test_order = balanced_subset(ds.y_test, n_test, seed=seed, n_classes=n_classes)
    elif n_test is not None:
        raise CNNGPError("n_test: only meaningful together with test=True (--test)")

    data_line = (f"data: {source}: {ds.describe()}; class-balanced training subsets of N = "
                 f"{', '.join(f'{n:,}' for n in ns)} (seed {seed})"
                 + ("" if test_order is None else f", {len(test_order):,} test images"))

    # -- network and readouts --------------------------------------------------------
    body, template, net_name = split_network(network)
    readouts, labels = sweep_readouts(template, lengthscales, family)
    grid = body.grids(tuple(x_sub.shape[1:-1]))[-1]
    if not grid:
        raise CNNGPError("network: its last hidden layer has no spatial grid, so every readout the sweep "
                         "compares is the same kernel (λ correlates positions); end the body on a grid, or "
                         "compute the one kernel with `cnngp kernel` / cnngp.CNNGPClassifier")

    with contextlib.ExitStack() as cleanup:  # a Dask cluster, when one is started
        # -- kernels (one pass for every readout) -----------------------------------------
        x_test = None if test_order is None else ds.x_test[test_order]
        x_test_now = x_test if test_mode == "all" else None  # "best": after the cross-validation
        key = {
            "format": RESULTS_FORMAT,
            "spec": body.to_spec(),
            "readouts": [r.to_spec() for r in readouts],
            "train_sha256": array_sha256(x_sub),
            "dtype": str(dtype),
            "test_sha256": None if x_test_now is None else array_sha256(x_test_now),
        }
        whitening = None
        if protocol.zca is not None:
            # regularised ZCA fitted on training images alone (the N_max subset, or the others:
            # zca_fit), applied to train and test; the cache key keeps the raw images' hashes
            # and adds the strength (and the images it was fitted on, when not the subset)
            key["zca"] = protocol.zca
            what, outside = f"the N_max = {n_max} subset", protocol.zca_fit_outside
            held_out = zca_held_out(ds.y_train, order, outside, seed=seed, n_classes=n_classes, what=what)
            x_fit = zca_fit_images(ds.x_train, order, protocol.zca_fit,
                                   what if outside is None else f"the balanced N = {outside} subset", held_out)
            if protocol.zca_fit != "train":
                key["zca_fit_sha256"] = array_sha256(x_fit)
            mirror = check_zca_mirror(protocol.zca_mirror, protocol.zca, protocol.flip)
            if mirror:  # (a whitening fitted on the images alone keeps the key it always had)
                key["zca_mirror"] = True
            whitening = fit_zca(x_fit, protocol.zca, name=zca_fit_words(protocol.zca_fit, outside, ZCA_FITS),
                                mirror=mirror)
            x_sub = whitening.transform(x_sub, "the training subset")
            if x_test is not None:
                x_test = whitening.transform(x_test, "the test images")
                x_test_now = x_test if test_mode == "all" else None
        if kernel != "nngp":  # NNGP caches keep the key they always had
            key["kernel"] = kernel
        flip = protocol.flip
        if flip:  # as do caches of kernels that are not flip-averaged
            key["flip"] = True
        client = None
        if kernel_store is not None:
            if kernel_cache is not None:
                raise CNNGPError("store: cannot be combined with kernel_cache (choose one)")
            if ex.on_cluster and not dry_run:  # one cluster for the kernels and the cross-validation
                ex = open_cluster(ex, cleanup)
                client = ex.scheduler
            for path in sweep_store_paths(kernel_store, test_mode is not None, flip):
                check_store_zca(path, protocol.zca, "zca", protocol.zca_fit, protocol.zca_fit_outside,
                                mirror=check_zca_mirror(protocol.zca_mirror, protocol.zca, protocol.flip))
            job_plan = _plan_and_gate(body, readouts, x_sub, x_test, test_mode, None, yes or dry_run, ex, kernel,
                                      flip, data_line)
            if dry_run:
                return {"dry_run": job_plan}
            kernels_start = time.perf_counter()
            K, K_test = _stored_kernels(body, readouts, labels, x_sub, x_test_now, True, ex, kernel, flip)
        else:
            job_plan = _plan_and_gate(body, readouts, x_sub, x_test, test_mode, kernel_cache, yes or dry_run, ex,
                                      kernel, flip, data_line)
            if dry_run:
                if job_plan is None:  # the cache's checks come with reading it: do them now
                    _read_cache(Path(kernel_cache), key)
                    job_plan = {"seconds": 0.0, "stages": [], "kernels": [],
                                "text": f"{data_line}\nplan: the kernels are read from {kernel_cache}; nothing "
                                        "to compute"}
                    if progress:
                        print(job_plan["text"], file=sys.stderr)
                return {"dry_run": job_plan}
            kernels_start = time.perf_counter()
            saved = dict(order=order, y_sub=y_sub, labels=labels, test_order=test_order,
                         y_test=None if x_test_now is None else ds.y_test[test_order])
            K, K_test = _kernels_in_memory(body, readouts, x_sub, x_test_now, key, kernel_cache, saved, True,
                                           ex, kernel, flip)
            if job_plan is None and progress:  # read from the cache: its checks passed, say what was read
                print(data_line, file=sys.stderr)
        kernel_seconds = time.perf_counter() - kernels_start
        if kernel_store is not None:  # how its images were seen, whitened or not
            note_store_zca(sweep_store_paths(kernel_store, False, flip), whitening, protocol.zca_fit,
                           protocol.zca_fit_outside)
        # kernels read from a cache were checked when they were computed
        float64_check = None if job_plan is None else _float64_spot_check(body, readouts, x_sub, K, ex, kernel,
                                                                          seed, flip)

        # -- cross-validation on every block of every size ----------------------------------
        results, best = _cross_validate_all(
            K, y_sub, labels, ns, n_classes, protocol, progress, client=client
        )

        # -- test accuracy of the models trained on N_max -----------------------------------
        test_summary = None
        if test_mode is not None:
            y_test = ds.y_test[test_order]
            top = [r for r in results if r["n"] == n_max]
            chosen = best[-1]
            i = next(j for j, r in enumerate(top) if r["readout"] == chosen["readout"]
                     and r["lengthscale"] == chosen["lengthscale"])
            # probabilities calibrated on the folds that chose σ² on the N_max block (never
            # on the test labels); the test points' prior variances k(x*, x*) from the engine
            cal_folds = _folds_for(fold_scheme, n_max, y_sub, folds, seed)
            test_start = time.perf_counter()
            if test_mode == "all":
                prior = _test_prior_variances(body, readouts, x_test, ex, kernel, flip)
                kernel_seconds += time.perf_counter() - test_start
                for l, (r, Kl, Kt) in enumerate(zip(top, K, K_test)):
                    scores = _score_test(r, Kl, y_sub, Kt, prior[l], y_test, cal_folds, n_classes)
                    if l == i:
                        chosen_scores = scores
                    # and the same readout at every smaller N: its blocks' models, on the test set
                    same = [x for x in results if (x["readout"], x["lengthscale"]) == (r["readout"], r["lengthscale"])]
                    _score_test_below_n_max(same, np.asarray(Kl, dtype=np.float64), y_sub,
                                            np.asarray(Kt, dtype=np.float64), prior[l], y_test, n_classes, protocol)
            else:
                Kt = _best_test_kernel(body, readouts[i], f"{labels[i][0]}:{_lengthscale_json(labels[i][1])}",
                                       x_sub, x_test, True, ex, kernel, flip)
                prior = _test_prior_variances(body, [readouts[i]], x_test, ex, kernel, flip)
                kernel_seconds += time.perf_counter() - test_start
                chosen_scores = _score_test(top[i], K[i], y_sub, Kt, prior[0], y_test, cal_folds, n_classes)
            if kernel_store is not None:
                note_store_zca([p for p in sweep_store_paths(kernel_store, True, flip)
                                if p.name.endswith("-test.zarr")], whitening, protocol.zca_fit,
                               protocol.zca_fit_outside)
            scored = [r for r in top if "_per_image" in r]
            test_predictions = {  # per test point and scored readout: paired comparisons
                "test_index": np.asarray(test_order), "y_test": np.asarray(y_test),
                # the test images as read (before any whitening): runs paired on the same images
                "test_sha256": array_sha256(ds.x_test[test_order]),
                "readouts": [f"{r['readout']}:{r['lengthscale']}" for r in scored],
                "predicted": np.stack([r["_per_image"][0] for r in scored]).astype(np.int16),
                "log_prob_true": np.stack([r.pop("_per_image")[1] for r in scored]),
            }
            test_summary = {
                "n_train": int(n_max),
                "n_test": int(len(y_test)),
                "readout": top[i]["readout"],
                "lengthscale": top[i]["lengthscale"],
                "noise_variance": top[i]["noise_variance"],
                # [smallest, largest, count] of the σ² tied with it (the smallest is chosen)
                "noise_variance_ties": (top[i].get("block_noise_variance_ties") or [None])[0],
                "cv_accuracy": top[i]["cv_accuracy"],
                "test_accuracy": top[i]["test_accuracy"],
                "test_nll": chosen_scores["nll"],
                "test_ece": chosen_scores["ece"],
                "calibration_scale": chosen_scores["calibration_scale"],
                "calibration_nll": chosen_scores["calibration_nll"],
                "calibration_separable": chosen_scores["calibration_separable"],
                "mean_posterior_variance": chosen_scores["mean_posterior_variance"],
                "reliability": chosen_scores["reliability"],
            }

        config = {
            "format": RESULTS_FORMAT,
            "arch": net_name,
            "spec": body.to_spec(),
            "readout_weight_var": template.weight_var,
            "readout_bias_var": template.bias_var,
            "readout_grid": list(grid),
            "data": str(source),
            "dataset": ds.name,
            "image_shape": list(ds.image_shape),
            "n_classes": int(n_classes),
            "class_names": list(ds.class_names),
            "ns": [int(n) for n in ns],
            "folds": folds,
            "fold_scheme": fold_scheme,
            "family": family,
            "lengthscales": [_lengthscale_json(v) for _, v in labels[1:-1]],
            "lengthscale_units": "index units of the readout's input grid",
            "noise_grid": {
                "n": int(n_grid),
                "log_min": gp.NOISE_LOG_MIN,
                "log_max": gp.NOISE_LOG_MAX,
                "lower_end": "raised to make every fold kernel positive definite",
            },
            "targets": "one-hot minus 1/n_classes",
            "seed": seed,
            "dtype": str(dtype),
            "test": test_mode is not None,
            "test_readouts": test_mode,
            "n_test": None if test_order is None else int(len(test_order)),
            "train_sha256": key["train_sha256"],
            "zca": protocol.zca,
            "zca_fit": None if whitening is None else zca_fit_record(whitening, protocol.zca_fit,
                                                                     protocol.zca_fit_outside, ZCA_FITS),
            "kernel": kernel,
            "flip": flip,
            "kernel_store": None if kernel_store is None else str(kernel_store),
            "archive": None if archive is None else str(archive),
            "execution": recorded_execution,
            "test_probabilities": None if test_mode is None else {
                "method": calibration.PROBABILITY_METHOD,
                "kernel": "the NNGP" if kernel == "nngp" else "the NTK taken as the GP's covariance",
                "calibration_folds": f"the {folds} cross-validation folds of the N_max block ({fold_scheme})",
                "quadrature_nodes": calibration.QUADRATURE_NODES,
                "ece_bins": calibration.ECE_BINS,
                "ece_binning": "top-label confidence, equal-width bins (b/B, (b+1)/B]",
                "nll_floor": calibration.LOG_FLOOR,
                "prior_variances": "k(x*, x*) by cnngp.engine.gram.kernel_diagonal",
                "below_n_max": None if test_mode != "all" else (
                    "at each smaller N, every disjoint block's model (its own CV's σ², calibrated on its "
                    "own folds) scored on the test images; mean and ±2 SE over the blocks"),
            },
        }
        out = {
            "config": config,
            "versions": versions(),
            "results": results,
            "best": best,
            # the plan printed before the kernels (None: read from the cache), and what the
            # kernels took (train + test), to hold the estimate to account
            "timing": {"estimate": job_plan, "kernel_seconds": kernel_seconds},
            "float64_check": float64_check,
        }
        if test_summary is not None:
            out["test"] = test_summary
            out["test_predictions"] = test_predictions  # arrays: the CLI writes them to an .npz
        return out


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def _fmt_lam(lam) -> str:
    if lam == "inf":
        return "inf"
    lam = float(lam)
    return "0" if lam == 0 else f"{lam:.3g}"


def _ties_words(ties) -> str:
    """``", the smallest of 12 tied σ² up to 0.07"`` for a [smallest, largest, count] with count > 1."""
    if not ties or int(ties[2]) <= 1:
        return ""
    return f", the smallest of {int(ties[2])} tied σ² up to {float(ties[1]):.3g}"


def summary_table(results: dict) -> str:
    """A plain-text table like the paper's results table: per N, independent, mean pool, best λ, best.

    Accuracies in percent, ``± 2 SE`` over the disjoint blocks; where an N has one block
    (its spread over blocks is undefined), or whose blocks all agree (a degenerate spread), the
    binomial ±2 SE of its predictions, marked ``b`` (:func:`cnngp.experiments.plots.accuracy_2se`).
    The header names the kernel (NNGP or NTK).
    """
    from cnngp.experiments.plots import accuracy_2se, binomial_se, input_words

    rows, config = results["results"], results.get("config", {})
    kind = ("NTK" if config.get("kernel") == "ntk" else "NNGP") + input_words(config)
    nested = any("cv_accuracy" in b.get("nested", {}) for b in results["best"])
    head = (
        f"{'N':>6} {'sets':>4}  {'independent':>13}  {'mean pool':>13}  "
        f"{'best readout':>24}  {'best':>13}" + (f"  {'nested':>13}" if nested else "")
        + f"  ({kind}: CV accuracy %)"
    )
    lines = [head, "-" * len(head)]
    marked = []

    def pct(r):
        mark = "b" if binomial_se(r) else " "
        if mark == "b":
            marked.append(r)
        return f"{100 * r['cv_accuracy']:5.1f} ± {100 * accuracy_2se(r):4.1f}{mark}"

    for b in results["best"]:
        n = b["n"]
        at_n = [r for r in rows if r["n"] == n]
        ind = next(r for r in at_n if r["readout"] == "independent")
        const = next(r for r in at_n if r["readout"] == "constant")
        if b["readout"] in ("independent", "constant"):
            which = "mean pool" if b["readout"] == "constant" else "independent"
        else:
            which = f"{b['readout']} λ={_fmt_lam(b['lengthscale'])}"
        if len(b.get("tied", ())) > 1:  # the first in the sweep's order, and how many tie
            which += f" (+{len(b['tied']) - 1} tied)"
        nest = f"  {'—':>13}" if nested else ""  # an N without one: said below
        if nested and "cv_accuracy" in b.get("nested", {}):
            nb = b["nested"]
            blocks = nb.get("block_accuracies")
            as_row = {"n_datasets": len(blocks) if blocks else b["n_datasets"], "block_cv_accuracies": blocks,
                      "cv_accuracy_2se": nb["cv_accuracy_2se"]}
            mark = "b" if binomial_se(as_row) else " "
            if mark == "b":
                marked.append(as_row)
            nest = f"  {100 * nb['cv_accuracy']:5.1f} ± {100 * nb['cv_accuracy_2se']:4.1f}{mark}"
        lines.append(
            f"{n:>6} {b['n_datasets']:>4}  {pct(ind):>13}  {pct(const):>13}  "
            f"{which:>24}  {pct(b):>13}{nest}"
        )
    if any(int(r.get("n_datasets", 1)) == 1 for r in marked):
        lines.append("b: one data set at this N, binomial ±2 SE over its held-out predictions"
                     + ("; or data sets that all agree" if any(int(r.get("n_datasets", 1)) > 1 for r in marked) else ""))
    elif marked:
        lines.append("b: the data sets at this N all agree (no spread), binomial ±2 SE over their held-out predictions")
    if nested:
        lines.append("nested: λ and σ² chosen by an inner CV inside each outer fold, scored on that fold "
                     "(the best column chooses and scores on the same folds: optimistic)")
    without = [b for b in results["best"] if "unavailable" in b.get("nested", {})]
    if without:  # the optimistic best alone at these N: say so, and why
        lines.append("no nested estimate (the best column alone, optimistic): "
                     + "; ".join(str(b["nested"]["unavailable"]) for b in without))
    fit = (config.get("zca_fit") or {}).get("fit", "train")  # results before zca_fit: fitted on the N_max
    if config.get("zca") is not None and fit == "train":
        lines.append("zca: fitted on the N_max images the CV validates on, so its held-out folds are whitened in "
                     "sample and the test images out of sample; --zca-fit rest fits it on other training images")
    if "test" in results:
        t = results["test"]
        lam = _fmt_lam(t["lengthscale"])
        lines.append(
            f"test: {100 * t['test_accuracy']:.1f} % on {t['n_test']} images "
            f"(trained on N={t['n_train']}, {t['readout']} λ={lam}, "
            f"σ²={t['noise_variance']:.3g}{_ties_words(t.get('noise_variance_ties'))})"
        )
        if "test_nll" in t:  # results written before the probabilities have no NLL/ECE
            how = ("1, the GP's own: every held-out prediction of the training folds was right, which sets "
                   "no scale" if t.get("calibration_separable") else
                   f"{t['calibration_scale']:.3g}, chosen on the training folds")
            lines.append(f"      NLL {t['test_nll']:.3f}, ECE {100 * t['test_ece']:.1f} % (calibration scale τ = {how})")
        curve = []  # --test all: the CV-chosen readout of each smaller N, its blocks' models on the test set
        for b in results["best"]:
            row = next((r for r in rows if r["n"] == b["n"] and r["readout"] == b["readout"]
                        and r["lengthscale"] == b["lengthscale"] and "block_test_accuracies" in r), None)
            if row is not None:
                curve.append(f"N={b['n']} {100 * row['test_accuracy']:.1f} ± {100 * row['test_accuracy_2se']:.1f} "
                             f"({len(row['block_test_accuracies'])} sets)")
        if curve:
            lines.append("      at smaller N (the CV-chosen readout; mean over the disjoint training sets ± 2 SE "
                         "of their spread and the test images'): " + ", ".join(curve))
    return "\n".join(lines)

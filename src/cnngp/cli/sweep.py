"""``cnngp sweep``: the paper's readout-lengthscale experiment from the command line.

``cnngp sweep`` with no arguments runs a small network on scikit-learn's bundled digits
(the README's "main job"); ``cnngp sweep --arch cnngp14 --data cifar10_subset.npz --n
80,160,320`` is the paper's experiment. Writes ``DIR/results.json`` and ``DIR/sweep.png`` (and
with ``--test`` ``DIR/reliability.png``, the reliability diagram of the test predictions)
only once everything has been computed, through temporary files renamed into place, so an
error or Ctrl-C leaves nothing half-written in ``DIR``.
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

from cnngp.engine.storage import write_files
from cnngp.cli.main import (
    add_engine_argument, add_layout_argument, add_zca_argument, add_zca_fit_argument, comma_items, command_line,
    int_at_least, load_data,
    parse_zca, parse_zca_fit_outside,
)
from cnngp.errors import CNNGPError

__all__ = ["register", "cmd_sweep", "DEFAULT_ARCH", "DEFAULT_NS", "DEFAULT_OUT"]

#: network of a bare ``cnngp sweep``: two conv+ReLU layers, readout over the 8×8 grid
DEFAULT_ARCH = "cnngp2"
DEFAULT_NS = "40,80,160"
DEFAULT_OUT = "cnngp-sweep"


def _int(flag: str, text: str, minimum: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise CNNGPError(f"{flag}: expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise CNNGPError(f"{flag}: expected an integer >= {minimum}, got {text!r}")
    return value


def _int_list(flag: str, text: str) -> list[int]:
    return [_int(flag, t, 1) for t in comma_items(text, flag, "40,80,160")]


def cmd_sweep(args) -> int:
    import numpy as np

    from cnngp.cli.main import parse_lengthscales
    from cnngp.experiments.plots import reliability_figure, sweep_figure
    from cnngp.experiments.sweep import PAPER_LENGTHSCALES, run_sweep, summary_table

    start = time.perf_counter()
    out = Path(args.out)
    ns = _int_list("--n", args.n)
    folds = _int("--folds", args.folds, 2)
    seed = _int("--seed", args.seed, 0)
    n_test = None if args.n_test is None else _int("--n-test", args.n_test, 1)
    args.zca = parse_zca(args.zca)
    if n_test is not None and not args.test:
        raise CNNGPError("--n-test: only meaningful together with --test")
    batch_size = None if args.batch_size is None else _int("--batch-size", args.batch_size, 1)
    lengthscales = (
        list(PAPER_LENGTHSCALES)
        if args.lengthscales is None
        else parse_lengthscales(args.lengthscales)
    )
    if args.kernel_cache is not None:
        from cnngp.engine.storage import check_output_file

        check_output_file(args.kernel_cache, "--kernel-cache")
    if args.store is not None and args.kernel_cache is not None:
        raise CNNGPError("--store: cannot be combined with --kernel-cache (choose one)")
    check_store_options(args)

    dataset = load_data(args)

    from cnngp.cli.main import execution_from_args
    from cnngp.experiments.sweep import SweepProtocol, checkpoint_files

    # without a store or a kernel cache the in-memory kernels save their progress beside --out
    # (OUT.checkpoint.train.npz, ...): Ctrl-C, then the same command resumes
    prefix = None
    if args.store is None and args.kernel_cache is None and not args.no_checkpoint:
        from cnngp.engine.storage import check_output_file

        prefix = f"{out}.checkpoint"
        if not args.dry_run:  # (a dry run makes nothing; it reads the checkpoints, to price what they lack)
            out.parent.mkdir(parents=True, exist_ok=True)  # --out's folder is made anyway, at the end
        if out.parent.is_dir():
            for path in checkpoint_files(prefix):
                check_output_file(path, "--out (its checkpoint)")
        if not args.dry_run:
            args.checkpoint_path = str(checkpoint_files(prefix)[0])

    protocol = SweepProtocol(ns=ns, folds=folds, lengthscales=lengthscales, family=args.family,
                             test=args.test or False, n_test=n_test, seed=seed, fold_scheme=args.fold_scheme,
                             zca=args.zca, zca_fit=args.zca_fit, zca_fit_outside=parse_zca_fit_outside(args),
                             zca_mirror=args.zca_mirror, flip=args.flip, nested=not args.no_nested)
    results = run_sweep(args.arch, dataset, protocol, kernel=args.kernel, kernel_cache=args.kernel_cache,
                        data_label=str(args.data), yes=args.yes, dry_run=args.dry_run,
                        execution=execution_from_args(args, batch_size=batch_size, checkpoint=prefix,
                                                      keep_checkpoint=prefix is not None))
    if args.dry_run:  # the plan's lines for a person went to stderr; its JSON alone to stdout
        print(json.dumps(results["dry_run"], indent=2, allow_nan=False))
        return 0
    results["config"]["command"] = command_line(args)

    figure = io.BytesIO()
    sweep_figure(results, figure, format="png")
    files = {"sweep.png": figure.getvalue()}
    if "test" in results:  # the reliability diagram of the test predictions
        reliability = io.BytesIO()
        reliability_figure(results, reliability, format="png")
        files["reliability.png"] = reliability.getvalue()
    predictions = results.pop("test_predictions", None)
    if predictions is not None:  # per test point: paired comparisons between runs
        buf = io.BytesIO()
        # with the configuration and versions of the run that made them (results.json's), so a
        # file compared with another says what it is on its own
        provenance = json.dumps({"config": results["config"], "versions": results.get("versions")},
                                allow_nan=False)
        np.savez(buf, **{k: np.asarray(v) for k, v in predictions.items()}, provenance=np.asarray(provenance))
        files["test_predictions.npz"] = buf.getvalue()
    text = json.dumps(results, indent=2, allow_nan=False) + "\n"
    write_files(out, {**files, "results.json": text.encode()})  # results.json last
    stale = out / "reliability.png"
    if "test" not in results and stale.is_file() and not stale.is_symlink():
        stale.unlink()  # an earlier --test run's figure, which these results do not back
    stale = out / "test_predictions.npz"
    if predictions is None and stale.is_file() and not stale.is_symlink():
        stale.unlink()
    if prefix is not None:  # only now that the results are in place
        for path in checkpoint_files(prefix):
            path.unlink(missing_ok=True)

    seconds = time.perf_counter() - start
    print(summary_table(results))
    print(
        f"wrote {out / 'results.json'}, {' and '.join(str(out / f) for f in files)} in {seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


def check_store_options(args, nested: str | None = None, store_words: str = "K.zarr (a kernel store)") -> None:
    """The store flags of ``sweep`` and ``learn`` before any work: ``--store`` (a new store or
    one of this computation, with its test and mirror-term stores), ``--archive`` (a sweep's
    archive folder; ``nested``: :func:`check_sweep_archive`'s), ``--reuse`` (a store or archive
    that opens, not the store itself), ``--workers`` or ``--scheduler``; without ``--store``
    the flags that need one are refused, naming it as ``store_words``."""
    if args.store is None:
        for flag in ("workers", "scheduler", "tile", "threads_per_worker", "archive", "reuse"):
            if getattr(args, flag) is not None:
                raise CNNGPError(f"--{flag.replace('_', '-')}: needs --store {store_words}")
        return
    from cnngp.engine.store import check_output_store, is_store_path
    from cnngp.experiments.sweep import check_sweep_archive, sweep_store_paths

    if not is_store_path(args.store):
        raise CNNGPError(f"--store {args.store}: a store is a Zarr folder and its name must end in .zarr, "
                         f"e.g. {store_words}")
    for path in sweep_store_paths(args.store, bool(args.test), bool(args.flip)):
        check_output_store(path, "--store" + ("" if path == Path(args.store) else
                                              f" (its {'test ' if path.name.endswith('-test.zarr') else ''}"
                                              f"{'mirror-term ' if '-mirror' in path.name else ''}store)"))
    if args.archive is not None:
        check_sweep_archive(args.archive, bool(args.test), flip=bool(args.flip), nested=nested)
    if args.reuse is not None:
        from cnngp.cli.main import check_reuse_store

        check_reuse_store(args.reuse, args.store, "--store", sweep=True)
    if args.workers is not None and args.scheduler is not None:
        raise CNNGPError("--workers: cannot be combined with --scheduler (that cluster has its own workers)")


def add_store_options(p, what: str) -> None:
    """``--workers``, ``--scheduler``, ``--tile``, ``--threads-per-worker``, ``--archive`` and
    ``--reuse`` of a command whose ``--store`` holds ``what`` ("kernels", "offset sums")."""
    p.add_argument("--workers", type=int_at_least(1), help="with --store: a local Dask cluster of N worker processes")
    p.add_argument("--scheduler", help="with --store: an existing Dask scheduler address")
    p.add_argument("--tile", type=int_at_least(1), help="with --store: tile side (default: from the memory budget)")
    p.add_argument("--threads-per-worker", type=int_at_least(1), help="with --store: torch/numba threads per task")
    p.add_argument("--archive", metavar="DIR",
                   help="with --store: keep a compressed, portable copy of every finished tile in "
                        "DIR/train (and DIR/test, the -mirror terms"
                        + (", DIR/internal-<λ>/ of --params internal" if what == "offset sums" else "")
                        + ") and restore from it what the stores lack (copy or commit DIR to finish a "
                        "run on another machine)")
    p.add_argument("--reuse", metavar="OLD.zarr",
                   help=f"with --store: copy the finished tiles of an earlier run's store OLD.zarr of {what} "
                        "(and of its -test, -mirror"
                        + (" and -internal-<λ>" if what == "offset sums" else "")
                        + " stores, where they exist), or of its --archive folder, of the same network and "
                        "dtype (any tile size) on training images that begin as these do (a smaller or, "
                        "from a store, larger --n, same seed); compute only the pairs it lacks")


def register(subparsers) -> None:
    """Add the ``sweep`` command to the ``cnngp`` parser."""
    from cnngp.kernels.correlations import FAMILIES

    p = subparsers.add_parser(
        "sweep",
        help="readout-lengthscale sweep with GP classification (the paper's experiment)",
        description=(
            "Compute one kernel stack (independent readout, a Matérn/RBF readout at every "
            "lengthscale, mean pooling) over a class-balanced subset of the largest N, "
            "cross-validate GP classification on disjoint blocks for every N, and write "
            "DIR/results.json and DIR/sweep.png (with --test also DIR/reliability.png, and test "
            "NLL and ECE of probabilities from the GP posterior variance). With no arguments: a small network on the "
            "bundled 8x8 digits, about half a minute on 2 CPU cores."
        ),
    )
    p.add_argument("--arch", default=DEFAULT_ARCH,
                   help=f"cnngp<depth>, myrtle10-paper, ... or SPEC.json (default {DEFAULT_ARCH})")
    p.add_argument("--data", default="digits",
                   help="digits (default, bundled), FILE.npz (x_train, y_train[, x_test, y_test]) "
                   "or a folder with CIFAR-10 (binary/python) or MNIST IDX files")
    p.add_argument("--n", default=DEFAULT_NS,
                   help=f"training-set sizes, each dividing the largest (default {DEFAULT_NS})")
    p.add_argument("--folds", default="4", help="cross-validation folds (default 4)")
    p.add_argument("--fold-scheme", choices=["paper", "stratified"], default="paper",
                   help="paper: contiguous folds of the class-interleaved order (default); "
                   "stratified: shuffled stratified folds")
    p.add_argument("--test", nargs="?", const="all", choices=["all", "best"],
                   help="also report test accuracy, NLL and ECE of the models trained on the largest N: "
                        "every readout (--test, --test all; also each disjoint training set of every "
                        "smaller N: the test learning curve), or only the one cross-validation chose "
                        "(--test best: its test kernels are computed after the cross-validation, "
                        "for that readout alone)")
    p.add_argument("--n-test", help="use a class-balanced subset of this many test images")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--lengthscales",
                   help="comma-separated λ in readout-grid units (default: the paper's "
                   "10^linspace(-1.5, 4.5, 25)); 0 and inf allowed, though they repeat the independent and mean-pool "
                   "readouts the sweep always has (so tie with them)")
    p.add_argument("--family", choices=sorted(FAMILIES), default="matern32",
                   help="correlation family of the swept readout (default matern32)")
    p.add_argument("--seed", default="0", help="seed of the class-balanced subsets (default 0)")
    add_zca_argument(p, "the training subset of the largest --n, or with --zca-fit rest the other training "
                        "images (never the test images)")
    add_zca_fit_argument(p, "the training subset of the largest --n", reuse=True)
    add_layout_argument(p)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float32",
                   help="kernel precision (default float32: each sweep checks a few kernel entries "
                   "against float64 and warns above 1e-5 relative; GP inference is always float64)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    add_engine_argument(p)
    p.add_argument("--batch-size", help="image pairs per kernel batch (default: from the budget)")
    p.add_argument("--memory-budget", help="kernel working memory per batch, e.g. 2G")
    p.add_argument("--kernel-cache",
                   help="FILE.npz: reuse the kernel stack stored there by an identical "
                   "sweep, or store it there")
    p.add_argument("--no-checkpoint", action="store_true",
                   help="do not save the kernels' progress to OUT.checkpoint.*.npz (by default an "
                   "interrupted sweep resumes from there when the same command is run again)")
    p.add_argument("--kernel", choices=["nngp", "ntk"], default="nngp",
                   help="classify with the NNGP (default) or the neural tangent kernel")
    p.add_argument("--no-nested", action="store_true",
                   help="skip the nested CV estimate (λ and σ² chosen by an inner CV inside each outer "
                        "fold; by default reported beside the best CV accuracy, which is optimistic)")
    p.add_argument("--flip", action="store_true",
                   help="flip-averaged train and test kernels ½[K(x, x') + K(x, mirrored x')] (horizontal "
                        "flips; refused for a network that is not flip-symmetric; about twice the pair work)")
    p.add_argument("--store",
                   help="K.zarr: compute the kernels tile by tile into this resumable store (and "
                   "K-test.zarr with --test), or finish/reuse it; one readout in memory at a time")
    add_store_options(p, "kernels")
    p.add_argument("--yes", action="store_true",
                   help="start even if the estimate says the kernels take over an hour")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the plan: pairs, memory, disk and a time estimate "
                        "(with --store: only the tiles the stores lack, less those --reuse lends), as "
                        "JSON on stdout; compute nothing, write nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars (with --dry-run: the JSON alone)")
    p.set_defaults(func=cmd_sweep, out_kind="dir", out_files=("sweep.png", "reliability.png", "test_predictions.npz", "results.json"))

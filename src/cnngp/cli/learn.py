"""``cnngp learn``: the readout λ by gradients of a model-selection objective, against the grid.

Writes ``DIR/learned.json`` (:func:`cnngp.experiments.learned.run_learn`) and
``DIR/learned.png`` only when everything is computed, through temporary files renamed into
place (as ``cnngp sweep``).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from cnngp.cli.main import (
    add_engine_argument, add_layout_argument, add_zca_argument, add_zca_fit_argument, comma_items, command_line,
    int_at_least, load_data,
    parse_zca, parse_zca_fit_outside,
)
from cnngp.errors import CNNGPError

__all__ = ["register", "cmd_learn"]


def _starts(text: str) -> list[float]:
    try:
        values = [float(t) for t in comma_items(text, "--starts", "0.3,3,30")]
    except ValueError:  # CNNGPError (an empty item) included
        values = []
    if not values or not all(v > 0 and v == v and v != float("inf") for v in values):
        raise CNNGPError(f"--starts: expected positive lengthscales like 0.3,3,30, got {text!r}")
    return values


def cmd_learn(args) -> int:
    from cnngp.cli.sweep import check_store_options
    from cnngp.engine.storage import write_files
    from cnngp.experiments.learned import learned_figure, run_learn

    args.zca = parse_zca(args.zca)
    if args.refine is not None and args.params != "internal":
        raise CNNGPError("--refine: only meaningful with --params internal (the Brent steps after "
                         "the internal λ grid)")
    if args.store is not None and args.params == "all":
        raise CNNGPError("--store: not with --params all (its kernels are recomputed by autograd at every "
                         "step); use --params readout or internal")
    check_store_options(args, nested="internal-", store_words="S.zarr (a store of offset sums)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CNNGPError(f"--out: {str(out)!r} exists and is not a directory")

    def progress(entry):
        if "internal_lengthscale" in entry:  # one row per internal λ (--params internal)
            print(f"internal λ {entry['internal_lengthscale']:.4g}: {args.objective} {entry['objective']:.6g}  "
                  f"readout λ {entry['readout_lengthscale']:.4g}  CV accuracy {100 * entry['cv_accuracy']:.1f}% "
                  f"(grid best {100 * entry['grid_best_cv_accuracy']:.1f}%)", file=sys.stderr, flush=True)
            return
        values = "  ".join(f"{k} {v:.4g}" for k, v in entry.items()
                           if k not in ("start", "step", "objective") and isinstance(v, float))
        objective = entry.get("objective")
        shown = "…" if objective is None else f"{objective:.6g}"
        print(f"start {entry.get('start', 0)} step {entry['step']:3d}: {args.objective} {shown}  {values}",
              file=sys.stderr, flush=True)

    from cnngp.cli.main import execution_from_args
    from cnngp.experiments.learned import LearnProtocol

    protocol = LearnProtocol(
        objective=args.objective, params=args.params, family=args.family, folds=args.folds,
        fold_scheme=args.fold_scheme, seed=args.seed, test=args.test, n_test=args.n_test,
        starts=_starts(args.starts), max_iter=args.max_iter, refine=5 if args.refine is None else args.refine,
        spectral_mixture=args.spectral_mixture, zca=args.zca, zca_fit=args.zca_fit,
        zca_fit_outside=parse_zca_fit_outside(args), zca_mirror=args.zca_mirror, flip=args.flip,
    )
    result = run_learn(args.arch, load_data(args), args.n, protocol, on_step=None if args.quiet else progress,
                       data_label=str(args.data), execution=execution_from_args(args), yes=args.yes,
                       dry_run=args.dry_run)
    if args.dry_run:  # the plan's lines for a person went to stderr; its JSON alone to stdout
        print(json.dumps(result["dry_run"], indent=2, allow_nan=False))
        return 0
    result["config"]["command"] = command_line(args)
    png = io.BytesIO()
    learned_figure(result, png)
    write_files(out, {"learned.json": json.dumps(result, indent=2).encode(), "learned.png": png.getvalue()})
    gb = result["grid_best"]
    what = "test" if args.test else f"{args.folds}-fold CV"
    if "internal_lengthscale" in result["learned"]:
        print(f"learned internal λ = {result['learned']['internal_lengthscale']:.4g}")
    held = result["heldout"]
    probabilities = (f" (NLL {held['test_nll']:.3f}, ECE {100 * held['test_ece']:.1f}%, calibrated on the training "
                     "folds)" if "test_nll" in held else "")
    print(f"learned λ = {result['learned']['lengthscale']:.4g} ({args.objective}): {what} accuracy "
          f"{100 * result['heldout_accuracy']:.1f}%{probabilities}, {result['kernel_evaluations']:,} kernel evaluations")
    print(f"grid best λ = {gb['lengthscale']:.4g}: {what} accuracy {100 * gb['heldout_accuracy']:.1f}%, "
          f"{gb['kernel_evaluations']:,} kernel evaluations")
    if "spectral_mixture" in result:
        sm = result["spectral_mixture"]
        print(f"spectral mixture (Q = {sm['components']}): {args.objective} {sm['objective']:.6g} (Matérn λ: "
              f"{result['objective']:.6g}), {what} accuracy {100 * sm['heldout_accuracy']:.1f}%, "
              f"{sm['kernel_evaluations']:,} kernel evaluations")
    print(f"wrote {out / 'learned.json'} and {out / 'learned.png'}")
    return 0


def register(subparsers) -> None:
    from cnngp.cli.sweep import add_store_options
    from cnngp.kernels.correlations import FAMILIES

    p = subparsers.add_parser(
        "learn",
        help="learn the readout lengthscale by gradients (marginal likelihood or LOO) and compare with the grid",
        description=(
            "Compute the offset sums of the last hidden layer once, maximise the GP log marginal "
            "likelihood (mll) or the leave-one-out log predictive density (loo) over the readout "
            "λ, its amplitude and σ² by L-BFGS-B, score the result (k-fold CV or --test) and the "
            "sweep's grid search on the same folds; write DIR/learned.json and DIR/learned.png."
        ),
    )
    p.add_argument("--arch", default="cnngp2", help="named architecture or SPEC.json (default cnngp2)")
    p.add_argument("--data", default="digits", help="digits (default), FILE.npz or a CIFAR-10/MNIST folder")
    p.add_argument("--n", type=int_at_least(2), default=200, help="training images, class-balanced (default 200)")
    p.add_argument("--objective", choices=["mll", "loo"], default="mll", help="what to maximise (default mll)")
    p.add_argument("--params", choices=["readout", "all", "internal"], default="readout",
                   help="readout (default): the readout's λ, amplitude and σ², exactly from the offset "
                        "sums; all: every lengthscale in the network (intermediate correlated convs too), "
                        "the readout amplitude and σ², by autograd (about three kernel passes per step: small N); "
                        "internal: one tied λ of the intermediate correlated convs, profiled (one fast "
                        "body pass per value) with the readout learned exactly at each")
    p.add_argument("--refine", type=int_at_least(0), default=None,
                   help="with --params internal: Brent steps in log λ after the internal grid (default 5)")
    p.add_argument("--spectral-mixture", type=int_at_least(0), default=0, metavar="Q",
                   help="with --params readout: also learn a Q-component spectral-mixture readout "
                        "(any stationary PSD correlation, not one family's λ) from the same offset sums")
    p.add_argument("--store", help="S.zarr: compute the offset sums into this resumable tiled store (and "
                                   "S-test.zarr with --test), or reuse it; with --params internal also "
                                   "S-internal-<λ>.zarr per internal λ, so an interrupted run resumes")
    add_store_options(p, "offset sums")
    p.add_argument("--family", choices=sorted(FAMILIES), default="matern32", help="readout family (default matern32)")
    p.add_argument("--folds", type=int_at_least(2), default=4, help="CV folds (default 4)")
    p.add_argument("--fold-scheme", choices=["paper", "stratified"], default="paper")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the class-balanced subset (default 0)")
    add_zca_argument(p, "the --n training images, or with --zca-fit rest the other training images (never the "
                        "test images)")
    add_zca_fit_argument(p, "the --n training images")
    add_layout_argument(p)
    p.add_argument("--flip", action="store_true",
                   help="flip-averaged kernels ½[K(x, x') + K(x, mirrored x')] (horizontal flips), train "
                        "and test; with --store the mirror terms go in S-mirror.zarr (and S-mirror-test.zarr)")
    p.add_argument("--test", action="store_true", help="score on the test split instead of k-fold CV")
    p.add_argument("--n-test", type=int_at_least(1), help="with --test: a class-balanced test subset of this size")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="precision of the body pass (inference is float64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    add_engine_argument(p)
    p.add_argument("--starts", default="0.3,3,30", help="starting lengthscales, best kept (default 0.3,3,30)")
    p.add_argument("--max-iter", type=int_at_least(1), default=100, help="L-BFGS-B iterations per start (default 100)")
    p.add_argument("--out", default="cnngp-learn", help="output directory (default cnngp-learn)")
    p.add_argument("--quiet", action="store_true", help="no progress lines (with --dry-run: the JSON alone)")
    p.add_argument("--yes", action="store_true", help="start even if the estimate says it takes over an hour")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and print the plan: every body pass (with --params internal one per "
                        "internal λ), memory and a time estimate (with --store: only the tiles the stores lack, "
                        "less those --archive restores or --reuse lends), as JSON on stdout; compute nothing, "
                        "write nothing")
    p.set_defaults(func=cmd_learn, out_kind="dir", out_files=("learned.json", "learned.png"))

"""``cnngp ensemble``: test accuracy, NLL and ECE of the infinite ensembles of networks trained by
gradient descent, NTK and NNGP dynamics, at several training times
(:mod:`cnngp.experiments.ensemble`). Registers through :func:`register` (see ``cnngp.cli.main``)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from cnngp.cli.main import (
    add_engine_argument, add_layout_argument, add_zca_argument, command_line, comma_items, int_at_least, load_data,
    parse_zca, real_at_least,
)
from cnngp.errors import CNNGPError

__all__ = ["register", "cmd_ensemble"]


def _times(text: str) -> list[float]:
    values = []
    for item in comma_items(text, "--times", "0,10,100,inf"):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not value >= 0:  # NaN and negatives
            raise CNNGPError(f"--times: expected training times >= 0 (inf: converged) like 0,10,100,inf, got {text!r}")
        values.append(value)
    return values


def _strict(value):
    """``value`` with every infinite float written ``"inf"`` / ``"-inf"``: strict JSON."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def cmd_ensemble(args) -> int:
    from cnngp.cli.main import execution_from_args
    from cnngp.engine.storage import write_files
    from cnngp.experiments.ensemble import run_ensemble

    times = _times(args.times)
    zca = parse_zca(args.zca)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CNNGPError(f"--out: {str(out)!r} exists and is not a directory")
    res = run_ensemble(args.arch, load_data(args), args.n, n_test=args.n_test, times=times, learning_rate=args.learning_rate,
                       noise_variance=args.noise_variance, seed=args.seed, zca=zca, flip=args.flip, zca_mirror=args.zca_mirror,
                       execution=execution_from_args(args), data_label=str(args.data))
    res["config"]["command"] = command_line(args)
    c = res["config"]
    if not args.quiet:
        from cnngp.experiments.plots import input_words

        print(f"{c['network']}: {c['n']} training and {c['n_test']} test images of {c['data']}{input_words(c)}, "
              f"learning rate "
              f"{c['learning_rate']:g}, σ² {c['noise_variance']:g}; kernels in {res['timing']['kernel_seconds']:.1f} s")
        print(f"{'time':>8}  {'NTK (every layer trained)':^27}  {'NNGP (readout trained)':^27}")
        print(f"{'':>8}  {'acc %':>7} {'NLL':>7} {'ECE %':>7}    {'acc %':>7} {'NLL':>7} {'ECE %':>7}")
        by = {(r["mode"], r["time"]): r for r in res["rows"]}
        for t in c["times"]:
            cells = [f"{100 * by[m, t]['accuracy']:7.1f} {by[m, t]['nll']:7.3f} {100 * by[m, t]['ece']:7.1f}"
                     for m in ("ntk", "nngp")]
            print(f"{t:>8g}  {cells[0]}    {cells[1]}")
    text = json.dumps(_strict(res), indent=2, allow_nan=False) + "\n"  # strict JSON: t = ∞ as "inf"
    write_files(out, {"ensemble.json": text.encode()})
    if not args.quiet:
        print(f"wrote {out / 'ensemble.json'}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ensemble",
        help="test accuracy, NLL and ECE of infinite ensembles of networks trained by gradient descent, over time",
        description=(
            "Compute the NNGP and NTK of --n class-balanced training images and the test images in one pass, "
            "then score, at each of --times (steps of --learning-rate; inf: converged), the infinite ensemble "
            "of infinitely wide networks trained by gradient descent on squared loss: every layer trained (NTK "
            "dynamics) and the readout alone (NNGP dynamics, whose converged ensemble is the GP posterior), "
            "with the ensemble's own Gaussian class scores as probabilities (docs/maths.md §11). Writes "
            "DIR/ensemble.json."
        ),
    )
    p.add_argument("--arch", default="cnngp2", help="named architecture or SPEC.json (default cnngp2)")
    p.add_argument("--data", default="digits", help="digits (default), FILE.npz or a CIFAR-10/MNIST folder "
                                                    "(with a test split)")
    p.add_argument("--n", type=int_at_least(2), default=200, help="training images, class-balanced (default 200)")
    p.add_argument("--n-test", type=int_at_least(1), help="a class-balanced test subset of this size (default: all)")
    p.add_argument("--times", default="0,10,100,1000,10000,inf",
                   help="training times in steps of the learning rate, comma-separated; inf: converged "
                        "(default 0,10,100,1000,10000,inf)")
    p.add_argument("--learning-rate", type=real_at_least(0, strict=True), default=1.0, help="gradient-descent rate η > 0 on ½ mean (f − y)² (default 1)")
    p.add_argument("--noise-variance", type=real_at_least(0), default=0.0,
                   help="σ² >= 0, the ridge on the training kernel (neural-tangents' diag_reg, absolute; default 0)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the class-balanced subsets (default 0)")
    add_zca_argument(p, "the --n training images")
    p.add_argument("--flip", action="store_true", help="flip-averaged kernels ½[K(x, x') + K(x, mirrored x')]")
    add_layout_argument(p)
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64",
                   help="precision of the kernels (the ensembles are float64)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    add_engine_argument(p)
    p.add_argument("--out", default="cnngp-ensemble", help="output directory (default cnngp-ensemble)")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=cmd_ensemble, out_kind="dir", out_files=("ensemble.json",))

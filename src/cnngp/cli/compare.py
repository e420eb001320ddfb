"""``cnngp compare``: two sweeps' models compared image by image on the same test images
(:mod:`cnngp.experiments.compare`). Registers through :func:`register` (see ``cnngp.cli.main``)."""

from __future__ import annotations

import json
from pathlib import Path

from cnngp.errors import CNNGPError

__all__ = ["register", "cmd_compare"]


def _label(label: str) -> str:
    family, _, lam = label.partition(":")
    if family == "independent":
        return "independent"
    if family == "constant":
        return "mean pool"
    try:
        return f"{family} λ={float(lam):.3g}"
    except ValueError:
        return label


def cmd_compare(args) -> int:
    import shlex

    from cnngp.engine.storage import atomic_write, check_output_file
    from cnngp.experiments.compare import load_predictions, paired_comparison
    from cnngp.provenance import versions

    if args.json is not None:
        check_output_file(args.json, "--json")
    a = load_predictions(args.run_a)
    b = a if args.run_b is None else load_predictions(args.run_b)
    res = paired_comparison(a, args.readout_a or args.readout, b, args.readout_b or args.readout)
    same_run = b is a or Path(args.run_a).resolve() == Path(args.run_b).resolve()
    if same_run and res["a"]["readout"] == res["b"]["readout"]:
        raise CNNGPError("--readout-b: the same readout of the same run as A; name another readout (--readout-b) "
                         "or another run (RUN_B)")
    pa, pb = res["a"], res["b"]
    width = max(len(pa["path"]), len(pb["path"]))
    print(f"{res['n_test']:,} test images, the same in both")
    for name, p in (("A", pa), ("B", pb)):
        print(f"{name}: {p['path']:<{width}}  {_label(p['readout']):<20} accuracy {100 * p['accuracy']:5.1f} %, "
              f"NLL {p['nll']:.3f}")
    if res["accuracy_difference_2se"] is None:  # one test image: no spread
        print(f"A − B: accuracy {100 * res['accuracy_difference']:+.1f} points, NLL {res['nll_difference']:+.3f} "
              "(one test image: no standard error)")
    else:
        print(f"A − B: accuracy {100 * res['accuracy_difference']:+.1f} ± {100 * res['accuracy_difference_2se']:.1f} "
              f"points, NLL {res['nll_difference']:+.3f} ± {res['nll_difference_2se']:.3f} (±2 SE of the per-image "
              "differences)")
    print(f"       images only A gets right: {res['only_a_right']}, only B: {res['only_b_right']} "
          f"(exact McNemar p = {res['mcnemar_p']:.3g})")
    if args.json is not None:
        words = ["cnngp", "compare", args.run_a, *([] if args.run_b is None else [args.run_b]),
                 "--readout-a", pa["readout"], "--readout-b", pb["readout"]]
        report = {**res, "command": " ".join(shlex.quote(str(w)) for w in words), "versions": versions()}
        text = (json.dumps(report, indent=2, allow_nan=False) + "\n").encode()
        atomic_write(Path(args.json), lambda f: f.write(text), "--json")
        print(f"wrote {args.json}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="compare two sweeps' models image by image on the same test images (paired differences)",
        description=(
            "Paired comparison of two models scored by `cnngp sweep --test` on the same test images: the "
            "difference of their accuracies and NLLs with the ±2 SE of the per-image differences, and the exact "
            "McNemar test on the images only one of them gets right. RUN_A and RUN_B are sweep output folders "
            "(results.json and test_predictions.npz); without RUN_B, two readouts of RUN_A are compared. A "
            "readout is chosen (the CV's choice at N_max, the default), independent, mean-pool, or FAMILY:λ "
            "(e.g. matern32:56.2)."
        ),
    )
    p.add_argument("run_a", metavar="RUN_A", help="a `cnngp sweep --test` output folder")
    p.add_argument("run_b", metavar="RUN_B", nargs="?", help="another one (default: RUN_A, with --readout-b)")
    p.add_argument("--readout", default="chosen",
                   help="the readout of both models (default chosen: each run's CV-chosen readout at N_max)")
    p.add_argument("--readout-a", help="A's readout (default --readout)")
    p.add_argument("--readout-b", help="B's readout (default --readout)")
    p.add_argument("--json", metavar="FILE", help="also write the comparison, the command and versions, as JSON")
    p.set_defaults(func=cmd_compare)

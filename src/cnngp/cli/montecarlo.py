"""``cnngp montecarlo`` and ``cnngp correlation-figure``: finite networks against the kernel.

``cnngp montecarlo`` samples finite networks of a given width from an architecture's prior,
estimates their kernel (the NNGP, or with ``--get ntk`` their empirical neural tangent kernel)
by Monte Carlo and compares it with the analytic (infinite-width) kernel, writing one JSON
report. ``cnngp correlation-figure`` draws the figure of
:mod:`cnngp.experiments.plots`. Both register through :func:`register` (see ``cnngp.cli.main``).
"""

from __future__ import annotations

import json
import math
import sys
import time

import numpy as np

from cnngp.cli.main import (
    add_engine_argument, add_layout_argument, comma_items, execution_from_args, finite_float, int_at_least, load_network, parameterized,
)
from cnngp.provenance import versions
from cnngp.engine.storage import atomic_write
from cnngp.errors import CNNGPError

__all__ = ["register", "cmd_montecarlo", "cmd_correlation_figure", "montecarlo_report"]


def _load_images(spec: str, flag: str, limit: int | None, args=None):
    from cnngp.cli.main import load_images

    x = load_images(flag, spec, getattr(args, "layout", None))
    if limit is not None and limit > x.shape[0]:
        n_flag = {"--x1": "--n1", "--x2": "--n2"}.get(flag, flag)
        raise CNNGPError(f"{n_flag} {limit}: more than the {x.shape[0]} images in {flag} {spec}; "
                         f"give {n_flag} <= {x.shape[0]}")
    return x if limit is None else x[:limit]


def _say_how_read(args, **images) -> None:
    """How the images were read (``--x1: 100 images of 32×32, 3 channels (N, H, W, C)``), on
    stderr unless ``--quiet``: once the command's checks have passed, so a refusal stays one line."""
    from cnngp.validation import describe_images

    if not getattr(args, "quiet", False):
        lines = [describe_images(x, "--" + name) for name, x in images.items() if x is not None]
        print("\n".join(lines), file=sys.stderr)


def _frobenius(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(a))))


def montecarlo_report(analytic: np.ndarray, empirical: np.ndarray, standard_error: np.ndarray) -> dict:
    """The comparison numbers of the JSON report.

    ``relative_error`` = ‖emp − analytic‖_F / ‖analytic‖_F; ``relative_standard_error`` =
    ‖SE‖_F / ‖analytic‖_F, the Monte Carlo standard error of that difference on the same scale
    (E‖emp − analytic‖²_F = ‖SE‖²_F when the networks are wide enough to have no bias).
    ``max_abs_z`` = max over entries of |emp − analytic| / SE.
    """
    diff = empirical - analytic
    norm = _frobenius(analytic)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(standard_error > 0, np.abs(diff) / standard_error, np.where(diff == 0, 0.0, np.inf))
    max_z = float(z.max())
    return {
        "relative_error": _frobenius(diff) / norm if norm > 0 else None,
        "relative_standard_error": _frobenius(standard_error) / norm if norm > 0 else None,
        "max_abs_z": max_z if math.isfinite(max_z) else None,
    }


def cmd_montecarlo(args) -> int:
    import torch

    from cnngp.finite import monte_carlo_kernel
    from cnngp.engine.gram import kernel
    from cnngp.kernels.layers import Readout

    # integer ranges are checked by the parser's types (int_at_least)
    width, samples, outputs = args.width, args.samples, args.outputs
    get = args.get
    if outputs is None:  # the NTK's per-network estimate hardly depends on the readout draw
        outputs = 1 if get == "ntk" else 16
    if args.n2 is not None and args.x2 is None:
        raise CNNGPError("--n2: only meaningful together with --x2")
    net = parameterized(load_network(args.arch, args.readout), args.parameterization, width)
    last = net.layers[-1] if len(net.layers) else None
    if not isinstance(last, Readout):
        raise CNNGPError(
            f"--arch: the network must end with a readout layer (the finite networks' output), "
            f"but its last layer is {type(last).__name__}; add {{\"type\": \"readout\"}} to the spec"
        )
    x1 = _load_images(args.x1, "--x1", args.n1, args)
    x2 = None if args.x2 is None else _load_images(args.x2, "--x2", args.n2, args)
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise CNNGPError(
            f"--x2: images of shape {x2.shape[1:]} do not match --x1's {x1.shape[1:]}; both must "
            "be (N, *spatial, C) with the same spatial size and channels"
        )
    from cnngp.finite import network_memory
    from cnngp.engine.gram import check_gram
    from cnngp.engine.resources import check_job

    check_job(
        f"--width {width}",
        memory_bytes=network_memory(net, x1.shape[1:], width, outputs, args.dtype, get=get),
        remedy="one finite network of this width on one image does not fit; use a smaller --width",
    )
    from cnngp.finite import network_seconds

    n_images = x1.shape[0] + (0 if x2 is None else x2.shape[0])
    check_job(
        f"--samples {samples} networks of --width {width} on {n_images} images",
        seconds=network_seconds(net, x1.shape[1:], width, n_images, samples, outputs, get=get),
        yes=args.yes,
        remedy="use fewer --samples, a smaller --width or fewer images (--n1)",
    )
    ex = execution_from_args(args)  # the finite networks' (--dtype, --memory-budget per batch of networks)
    analytic_ex = ex.replace(dtype="float64", memory_budget=None, progress=False)  # the kernel's
    check_gram("--x1", net, x1.shape[1:], x1.shape[0], None if x2 is None else x2.shape[0],
               yes=args.yes, execution=analytic_ex)
    _say_how_read(args, x1=x1, x2=x2)

    start = time.perf_counter()
    analytic = kernel(net, x1, x2, get=get, execution=analytic_ex).numpy()
    empirical, se = monte_carlo_kernel(
        net, x1, x2, width=width, n_samples=samples, seed=args.seed, n_outputs=outputs,
        batch=args.batch, get=get, execution=ex,
    )
    seconds = time.perf_counter() - start
    empirical = empirical.to(torch.float64).numpy()
    se = se.to(torch.float64).numpy()
    if not (np.isfinite(empirical).all() and np.isfinite(se).all()):
        raise CNNGPError(
            f"--dtype {args.dtype}: the finite networks' outputs overflowed to NaN or infinity "
            "(large weight variances over many layers); use --dtype float64 or images scaled "
            "to about [0, 1]"
        )
    numbers = montecarlo_report(analytic, empirical, se)
    config = {
        "command": "montecarlo",
        "get": get,
        "arch": args.arch,
        "readout": args.readout,
        "spec": net.to_spec(),
        "x1": str(args.x1),
        "x2": None if args.x2 is None else str(args.x2),
        "n1": int(x1.shape[0]),
        "n2": int(x1.shape[0] if x2 is None else x2.shape[0]),
        "image_shape": list(x1.shape[1:]),
        "width": width,
        "samples": samples,
        "outputs": outputs,
        "dtype": args.dtype,
        "analytic_dtype": "float64",
        "device": args.device,
        "engine": analytic_ex.resolved_engine,
        "execution": ex.as_dict(),
        "seconds": seconds,
    }
    report = {
        "analytic": analytic.tolist(),
        "empirical": empirical.tolist(),
        "standard_error": se.tolist(),
        **numbers,
        "config": config,
        "seed": args.seed,
        "versions": versions(),
    }
    text = json.dumps(report, indent=1) + "\n"
    atomic_write(args.out, lambda f: f.write(text.encode()))
    rel, rse, z = numbers["relative_error"], numbers["relative_standard_error"], numbers["max_abs_z"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(
        f"{args.arch}: {analytic.shape[0]}x{analytic.shape[1]} {get.upper()} kernel, images "
        f"{'x'.join(map(str, x1.shape[1:]))}, width {width}, {samples} networks x {outputs} outputs"
    )
    print(f"relative error {fmt(rel)}  (Monte Carlo standard error {fmt(rse)})")
    print(f"largest |empirical - analytic| / standard error: {'n/a' if z is None else f'{z:.2f}'}")
    if not args.quiet:
        print(f"wrote {args.out} in {seconds:.1f} s", file=sys.stderr)
    return 0


def _int_list(text: str, flag: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(t) for t in comma_items(text, flag, "1,2")]
    except ValueError:  # CNNGPError (an empty item) included
        values = []
    if not values or any(v < minimum for v in values):
        raise CNNGPError(f"{flag}: expected a comma-separated list of integers >= {minimum}, got {text!r}")
    return values


def cmd_correlation_figure(args) -> int:
    from cnngp.experiments import plots
    from cnngp.cli.main import parse_lengthscales

    widths = _int_list(args.widths, "--widths")
    draws, depth, samples, mc_width = args.draws, args.depth, args.samples, args.mc_width
    pos = _int_list(args.positions, "--positions", 0)
    if len(pos) != 4:
        raise CNNGPError(f"--positions: expected four integers r1,c1,r2,c2, got {args.positions!r}")
    mc_lengthscales = parse_lengthscales(args.mc_lengthscales, "--mc-lengthscales")
    from cnngp.kernels.correlations import parse_lengthscale

    parse_lengthscale(args.conv_lengthscale, "--conv-lengthscale")
    x = _load_images(args.x, "--x", None, args)
    if not 0 <= args.index < x.shape[0] or not 0 <= args.other < x.shape[0]:
        raise CNNGPError(f"--index/--other: expected image indices in 0..{x.shape[0] - 1}")
    if x.ndim != 4:
        raise CNNGPError(f"--x: expected 2-D images (N, H, W, C), got shape {x.shape}")
    h, w = x.shape[1:3]
    if not (pos[0] < h and pos[2] < h and pos[1] < w and pos[3] < w):
        raise CNNGPError(f"--positions: {args.positions!r} lies outside the {h}x{w} images")
    _say_how_read(args, x=x)
    start = time.perf_counter()
    figure = plots.CorrelationFigure(
        index=args.index, other=args.other, depth=depth, positions=((pos[0], pos[1]), (pos[2], pos[3])),
        widths=tuple(widths), draws=draws, conv_lengthscale=args.conv_lengthscale, shift=args.shift,
        mc_width=mc_width, mc_samples=samples, mc_lengthscales=tuple(mc_lengthscales),
        centre=not args.no_centre, seed=args.seed,
    )
    data = plots.correlation_figure_data(x, figure, execution=execution_from_args(args))
    data["config"].update({"x": str(args.x), "seconds": time.perf_counter() - start})
    data["versions"] = versions()
    plots.save_correlation_figure(data, args.out)
    print(plots.summary(data))
    if not args.quiet:
        print(f"wrote {args.out} and {plots.sidecar_path(args.out)}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    m = subparsers.add_parser(
        "montecarlo",
        help="check the kernel against finite networks sampled from the prior",
        description=(
            "Sample finite networks of the given width from the architecture's prior, estimate "
            "their kernel (NNGP, or empirical NTK with --get ntk) by Monte Carlo, compare with "
            "the analytic kernel; write a JSON report."
        ),
    )
    m.add_argument("--arch", required=True, help="cnngp14, myrtle10, ... or SPEC.json (must end with a readout)")
    m.add_argument("--x1", required=True, help="FILE.npz or FILE.npz:ARRAY (default array x, then x_train)")
    m.add_argument("--x2", help="second set of images (default: x1)")
    m.add_argument("--n1", type=int_at_least(1), help="use only the first N1 images of --x1")
    m.add_argument("--n2", type=int_at_least(1), help="use only the first N2 images of --x2")
    m.add_argument("--width", type=int_at_least(1), required=True, help="channels of every hidden layer (>= 1)")
    m.add_argument("--samples", type=int_at_least(2), required=True, help="networks drawn (>= 2)")
    m.add_argument("--parameterization", choices=["ntk", "standard"], default="ntk",
                   help="the finite networks' (and the kernel's) parameterisation; standard uses "
                        "--width as every hidden layer's channels (only the NTK depends on it)")
    m.add_argument("--get", choices=["nngp", "ntk"], default="nngp",
                   help="the NNGP (default) or the neural tangent kernel (docs/maths.md §7)")
    m.add_argument("--outputs", type=int_at_least(1),
                   help="outputs of the readout per network (default 16; 1 with --get ntk, whose "
                        "estimate more outputs barely improve)")
    m.add_argument("--out", required=True, help="output .json report")
    m.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (default 0)")
    m.add_argument("--readout", help="readout correlation: independent, constant, matern32:λ, rbf:λ, ...")
    m.add_argument(
        "--dtype", choices=["float32", "float64"], default="float32",
        help="precision of the finite networks (default float32; the analytic kernel is float64)",
    )
    m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_engine_argument(m)
    add_layout_argument(m)
    m.add_argument("--batch", type=int_at_least(1), help="networks evaluated together (default: from the memory budget)")
    m.add_argument("--memory-budget", help="memory for one batch of networks, e.g. 512M (default 256M)")
    m.add_argument("--yes", action="store_true", help="start even if the estimate says it takes over an hour")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_montecarlo)

    f = subparsers.add_parser(
        "correlation-figure",
        help="figure: feature correlation of finite networks vs width, readout kernel vs λ",
        description=(
            "Left: correlation, across the channels of one finite network, of the last hidden "
            "layer's pre-activations at two distant positions of a real image, against width, "
            "for independent and correlated conv weights, with the infinite-width (kernel) value. "
            "Right: the normalised readout kernel of an image and its translate against the "
            "Matérn-3/2 readout lengthscale λ, analytic curve and finite-network estimates."
        ),
    )
    f.add_argument("--x", required=True, help="images, e.g. cifar10_subset.npz:x_test")
    f.add_argument("--out", required=True, help="output .png (a sidecar .json holds the numbers)")
    f.add_argument("--index", type=int_at_least(0), default=0, help="image used (default 0)")
    f.add_argument("--other", type=int_at_least(0), default=1, help="a second image for the λ panel (default 1)")
    f.add_argument("--depth", type=int_at_least(1), default=4, help="conv+relu layers (default 4)")
    f.add_argument("--positions", default="8,8,24,24", help="two positions r1,c1,r2,c2 (default 8,8,24,24)")
    f.add_argument("--widths", default="8,32,128,512", help="widths for the left panel (default 8,32,128,512)")
    f.add_argument("--draws", type=int_at_least(2), default=8, help="networks per width (default 8)")
    f.add_argument("--conv-lengthscale", type=finite_float, default=3.0, help="Matérn-3/2 λ of the correlated convs (default 3)")
    f.add_argument("--shift", type=int_at_least(0), default=4, help="translation in pixels for the λ panel (default 4)")
    f.add_argument("--mc-width", type=int_at_least(1), default=64, help="width of the finite networks in the λ panel (default 64)")
    f.add_argument("--samples", type=int_at_least(2), default=200, help="networks per λ in the λ panel (default 200)")
    f.add_argument("--mc-lengthscales", default="0.3,1,3,10,30", help="λ values estimated by Monte Carlo")
    f.add_argument("--no-centre", action="store_true", help="do not subtract the per-channel mean pixel")
    f.add_argument("--seed", type=int_at_least(0), default=0)
    f.add_argument("--device", default="cpu")
    add_engine_argument(f)
    add_layout_argument(f)
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_correlation_figure, sidecar=True)

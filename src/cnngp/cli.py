"""The ``cnngp`` command line: a thin layer over the library.

Every command exits 0 on success and, on bad input, prints one line ``cnngp: error: …`` to
stderr and exits 2 without writing any output file. Output files are written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import CNNGPError
from .provenance import array_sha256, versions
from .storage import atomic_write

__all__ = ["main", "atomic_write", "versions", "array_sha256"]


# -- shared helpers (also used by the other commands) -----------------------------------------


def parse_lengthscales(text: str) -> list[float]:
    from .correlations import parse_lengthscale

    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise CNNGPError("--lengthscales: expected a comma-separated list like 0,0.5,2,inf")
    return [parse_lengthscale(t, "--lengthscales") for t in items]


_FAMILIES = {"matern12": 0.5, "matern32": 1.5, "matern52": 2.5, "rbf": None}


def correlation_from_text(text: str, lengthscale=None):
    """``independent``, ``constant``, ``matern32:2.0``, ``rbf:4`` → a Correlation."""
    from .correlations import RBF, Constant, Independent, Matern, parse_lengthscale

    kind, _, arg = text.partition(":")
    kind = kind.strip().lower()
    if kind in ("independent", "flatten"):
        return Independent()
    if kind in ("constant", "mean", "gap"):
        return Constant()
    if kind not in _FAMILIES:
        raise CNNGPError(
            f"--readout: unknown correlation {text!r}; expected independent, constant, "
            "matern12:λ, matern32:λ, matern52:λ or rbf:λ"
        )
    if lengthscale is None:
        if not arg:
            raise CNNGPError(f"--readout: {kind} needs a lengthscale, e.g. {kind}:2.0")
        lengthscale = parse_lengthscale(arg, "--readout lengthscale")
    nu = _FAMILIES[kind]
    return RBF(lengthscale) if nu is None else Matern(nu, lengthscale)


def load_network(arch: str, readout: str | None = None):
    """A named architecture or a JSON spec file; ``readout`` overrides the readout correlation."""
    from . import architectures
    from .layers import Readout
    from .spec import load_spec

    if arch.endswith(".json") or os.sep in arch or Path(arch).is_file():
        net = load_spec(arch)
        if readout is not None:
            last = net.layers[-1]
            if not isinstance(last, Readout):
                raise CNNGPError("--readout: the spec file does not end with a readout layer")
            net.layers[-1] = Readout(last.weight_var, last.bias_var, correlation_from_text(readout))
        return net
    corr = None if readout is None else correlation_from_text(readout)
    return architectures.get(arch, readout=corr)


def load_images(flag: str, path_spec: str) -> np.ndarray:
    """Images from ``FILE.npz`` or ``FILE.npz:ARRAY``, errors naming the command-line flag."""
    from .data import load_array, load_digits
    from .gram import as_images

    name, _, count = str(path_spec).partition(":")
    if name == "digits" and not Path(name).exists():  # the embedded default data set
        images = load_digits()[0]
        if count:
            if not count.isdigit() or not 1 <= int(count) <= len(images):
                raise CNNGPError(f"{flag}: digits:N needs 1 <= N <= {len(images)}, got {count!r}")
            images = images[: int(count)]
        return as_images(images, flag)
    try:
        arr = load_array(path_spec, name=flag)
    except (ValueError, OSError) as e:
        raise CNNGPError(str(e)) from None
    return as_images(arr, flag)


def parse_bytes(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    t = text.strip().lower().rstrip("b").rstrip("i")
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        value = -1
    if not value > 0:
        raise CNNGPError(f"--memory-budget: expected a size like 2G or 500M, got {text!r}")
    return int(value)


# -- commands ---------------------------------------------------------------------------------


def cmd_kernel(args) -> int:
    import torch

    from .gram import kernel, readout_sweep
    from .layers import Readout

    net = load_network(args.arch, args.readout)
    x1 = load_images("--x1", args.x1)
    x2 = None if args.x2 is None else load_images("--x2", args.x2)
    common = dict(
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        memory_budget=None if args.memory_budget is None else parse_bytes(args.memory_budget),
        progress=not args.quiet,
        checkpoint=None if args.no_checkpoint else f"{args.out}.checkpoint.npz",
    )
    lengthscales = None
    start = time.perf_counter()
    if args.lengthscales is not None:
        lengthscales = parse_lengthscales(args.lengthscales)
        last = net.layers[-1]
        if not isinstance(last, Readout):
            raise CNNGPError("--lengthscales: the network must end with a readout layer")
        readouts = [
            Readout(last.weight_var, last.bias_var, correlation_from_text(args.family, lam))
            for lam in lengthscales
        ]
        body = net[:-1]
        body.input_channels = getattr(net, "input_channels", None)
        k = readout_sweep(body, readouts, x1, x2, **common)
    else:
        k = kernel(net, x1, x2, **common)
    seconds = time.perf_counter() - start
    k = k.to(torch.float64).numpy()
    config = {
        "command": "kernel",
        "arch": args.arch,
        "readout": args.readout,
        "family": args.family if lengthscales is not None else None,
        "dtype": args.dtype,
        "device": args.device,
        "x1": str(args.x1),
        "x2": None if args.x2 is None else str(args.x2),
        "seconds": seconds,
    }
    arrays = {
        "kernel": k,
        "spec": np.array(json.dumps(net.to_spec())),
        "config": np.array(json.dumps(config)),
        "versions": np.array(json.dumps(versions())),
        "x1_sha256": np.array(array_sha256(x1)),
    }
    if x2 is not None:
        arrays["x2_sha256"] = np.array(array_sha256(x2))
    if lengthscales is not None:
        arrays["lengthscales"] = np.array(lengthscales, dtype=np.float64)
    atomic_write(args.out, lambda f: np.savez(f, **arrays))
    if not args.quiet:
        print(f"wrote {args.out}: kernel {k.shape} in {seconds:.2f} s", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import torch

    from . import architectures

    info = {"versions": versions(), "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    if args.arch:
        net = load_network(args.arch, args.readout)
        spatial = tuple(int(s) for s in args.shape.split("x")) if args.shape else (32, 32)
        grids = net.grids(spatial)
        info["arch"] = args.arch
        info["spec"] = net.to_spec()
        info["grids"] = [list(g) for g in grids]
        from .state import describe

        # what each layer's input is carried as: full, diagonal or band (radii per axis)
        info["representation"] = [describe(r) for r in net.representation(spatial)]
    else:
        info["architectures"] = list(architectures.NAMES)
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cnngp",
        description="NNGP kernels of infinitely wide CNNs with spatially correlated weight priors.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kernel", help="compute a kernel (Gram) matrix")
    k.add_argument("--arch", required=True, help="cnngp14, myrtle10, ... or SPEC.json")
    k.add_argument("--x1", required=True, help="FILE.npz or FILE.npz:ARRAY (default array x, then x_train), or digits[:N]")
    k.add_argument("--x2", help="second set of images (default: x1, symmetric Gram matrix)")
    k.add_argument("--out", required=True, help="output .npz")
    k.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    k.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    k.add_argument("--readout", help="readout correlation: independent, constant, matern32:λ, rbf:λ, ...")
    k.add_argument("--lengthscales", help="readout sweep, e.g. 0,0.5,2,inf: output (L, N1, N2)")
    k.add_argument("--family", default="matern32", choices=sorted(_FAMILIES), help="sweep family")
    k.add_argument("--batch-size", type=int, help="image pairs per batch (default: from the memory budget)")
    k.add_argument("--memory-budget", help="working memory for a batch, e.g. 2G (default 2G)")
    k.add_argument("--quiet", action="store_true", help="no progress bar")
    k.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="do not save progress to OUT.checkpoint.npz (by default an interrupted run "
        "resumes from there when the same command is run again)",
    )
    k.set_defaults(func=cmd_kernel)

    i = sub.add_parser("info", help="versions, devices, architectures and their grids")
    i.add_argument("--arch", help="show the layers and grids of this architecture")
    i.add_argument("--shape", help="input spatial shape, e.g. 32x32 (default)")
    i.add_argument("--readout", help="readout correlation, as for `cnngp kernel`")
    i.set_defaults(func=cmd_info)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


#: other modules add commands here: functions taking the subparsers object
_EXTRA_COMMANDS: list = []


def _register_optional_commands():
    import importlib

    for mod in ("cnngp.cli_sweep", "cnngp.cli_montecarlo"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        if m.register not in _EXTRA_COMMANDS:
            _EXTRA_COMMANDS.append(m.register)


def main(argv=None) -> int:
    _register_optional_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("cnngp: interrupted; no output written", file=sys.stderr)
        return 130
    except (CNNGPError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        msg = " ".join(str(e).split())
        print(f"cnngp: error: {msg}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # torch errors such as out of memory
        msg = " ".join(str(e).split())[:300]
        print(f"cnngp: error: {msg}", file=sys.stderr)
        return 1


def entry() -> None:  # pragma: no cover - exercised by the subprocess tests
    """The ``cnngp`` console script: :func:`main`, then a fast exit.

    Every output file is complete and closed when :func:`main` returns (atomic writes), so the
    interpreter's teardown — about 0.7 s of freeing torch's and numba's module state on this
    machine — has nothing left to do for us and is skipped with ``os._exit``.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("CNNGP_SLOW_EXIT"):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()

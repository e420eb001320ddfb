"""The ``cnngp`` command line: a thin layer over the library.

The contract every command keeps, enforced here in :func:`main` and :func:`preflight`
rather than option by option (README, "Command-line contract"):

* exit 0 on success; on a user error (bad flag or value, bad input file, an output path
  cnngp must not write, a job the machine cannot hold) one line ``cnngp: error: …`` naming
  the argument, exit 2, *before* any work and with nothing written. Exit 1 only for a bug.
* Ctrl-C (exit 130) and SIGTERM (exit 143) stop cleanly; a kernel in progress saves its
  checkpoint, and rerunning the same command resumes from it.
* Output files are written to a temporary name and renamed into place; only regular files
  are ever replaced; a checkpoint is removed only once the output is in place.

Only the standard library is imported at module level, so that an interrupt during
start-up (importing torch takes seconds) is handled like any other.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
import time
from pathlib import Path

from cnngp.cli import signals as received
from cnngp.errors import CNNGPError

__all__ = ["main", "entry", "build_parser", "preflight", "execution_from_args", "add_engine_argument",
           "add_layout_argument", "add_zca_argument", "add_zca_fit_argument", "parse_zca_fit_outside", "load_data", "comma_items", "parse_zca", "load_images", "command_line",
           "Terminated"]


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, schedulers), handled like Ctrl-C."""


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error contract: errors raise instead of printing usage."""

    def error(self, message):  # noqa: D401 - argparse API
        where = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        raise CNNGPError(where + message)


def int_at_least(minimum: int):
    """argparse ``type=`` for integers >= ``minimum`` (messages name the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(str(text).strip())
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def real_at_least(minimum: float, strict: bool = False):
    """argparse ``type=`` for finite numbers >= ``minimum`` (> with ``strict``; messages name the flag)."""
    import math

    bound = f"{'>' if strict else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}")
        return value + 0.0  # (-0.0 is 0)

    parse.__name__ = f"number {bound}"
    return parse


def finite_float(text: str) -> float:
    """argparse ``type=`` for a finite number."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# -- shared helpers (also used by the other commands) -----------------------------------------


def comma_items(text, flag: str, example: str) -> list[str]:
    """The items of a comma-separated flag value, stripped; an empty value or an empty item
    (``1,,2``, ``1,2,``: a typo, never dropped silently) is refused naming ``flag``."""
    items = [t.strip() for t in str(text).split(",")]
    if not any(items) or not all(items):
        what = "nothing" if not any(items) else "an empty item"
        raise CNNGPError(f"{flag}: expected a comma-separated list like {example}, got {str(text)!r} ({what})")
    return items


def parse_lengthscales(text: str, flag: str = "--lengthscales") -> list[float]:
    from cnngp.kernels.correlations import parse_lengthscale

    return [parse_lengthscale(t, flag) for t in comma_items(text, flag, "0,0.5,2,inf")]


def correlation_from_text(text: str, lengthscale=None, what: str = "--readout"):
    """``independent``, ``constant``, ``matern32:2.0``, ``rbf:4`` → a Correlation
    (:func:`cnngp.kernels.correlations.by_name`, errors naming ``what``)."""
    from cnngp.kernels.correlations import by_name

    return by_name(text, lengthscale, what)


def load_network(arch: str, readout: str | None = None):
    """A named architecture or a JSON spec file; ``readout`` overrides the readout correlation.
    Errors name ``--arch`` (or ``--readout``)."""
    try:
        return _load_network(arch, readout)
    except CNNGPError as e:
        text = str(e)
        if text.startswith("--"):
            raise
        raise CNNGPError(f"--arch: {text.removeprefix('arch: ')}") from None


def parameterized(net, parameterization: str, width, flag: str = "--width"):
    """``net`` in the parameterisation asked for (docs/maths.md §7): ``standard`` needs the
    hidden layers' width (their channels; only the NTK depends on them)."""
    if parameterization == "ntk":
        return net
    if width is None:
        raise CNNGPError(f"--parameterization standard: needs {flag} W (the channels of every hidden "
                         "layer: the standard parameterisation's NTK depends on them)")
    from cnngp.kernels.layers import standard_parameterization

    return standard_parameterization(net, width)


def _load_network(arch: str, readout: str | None):
    from cnngp.io import architectures

    corr = None if readout is None else correlation_from_text(readout)
    try:
        net, _ = architectures.resolve(arch, readout=corr)
    except CNNGPError as e:
        text = str(e)
        if text.startswith("readout: "):
            raise CNNGPError(f"--readout: {text.removeprefix('readout: ')}") from None
        raise CNNGPError(text.removeprefix("network: ")) from None
    return net


def load_images(flag: str, path_spec: str, layout: str | None = None):
    """Images from ``FILE.npz``, ``FILE.npz:ARRAY`` or ``digits[:N]``, under the package's
    image-array policy (:func:`cnngp.validation.as_images`: the one place that decides an
    array's layout; ``layout`` is ``--layout`` when given), errors naming ``flag``. How the
    array was read, for a person (``--x1: 100 images of 32×32, 3 channels (N, H, W, C)``):
    :func:`cnngp.validation.describe_images`, said once the command's checks have passed."""
    from cnngp.io.data import load_array, load_digits
    from cnngp.validation import as_images

    name, _, count = str(path_spec).partition(":")
    if name == "digits" and not Path(name).exists():  # the embedded default data set
        images = load_digits()[0]
        if count:
            if not count.isdigit() or not 1 <= int(count) <= len(images):
                raise CNNGPError(f"{flag}: digits:N needs 1 <= N <= {len(images)}, got {count!r}")
            images = images[: int(count)]
        # the bundled digits are channels-last by construction; a --layout is for files
        x = as_images(images, flag)
    else:
        try:
            arr = load_array(path_spec, name=flag)
        except OSError as e:
            raise CNNGPError(f"{flag}: cannot read {str(path_spec)!r} ({e.strerror or e})") from None
        except CNNGPError as e:
            if str(e).startswith(flag):
                raise
            raise CNNGPError(f"{flag}: {e}") from None
        x = as_images(arr, flag, layout=None if layout is None else _layout_of(layout))
    return x


def _layout_of(text: str) -> str:
    from cnngp.validation import LAYOUTS

    key = str(text).upper()
    if key not in LAYOUTS:
        raise CNNGPError(f"--layout: expected one of {', '.join(k.lower() for k in LAYOUTS)}, got {text!r}")
    return key


def load_data(args):
    """The data set of ``--data`` (with ``--layout``, for a .npz's arrays), every error naming
    the flag: :func:`cnngp.io.data.load_dataset` for ``sweep`` and ``learn``."""
    from cnngp.io.data import load_dataset

    layout = getattr(args, "layout", None)
    try:
        return load_dataset(args.data, layout=None if layout is None else _layout_of(layout))
    except (ValueError, OSError) as e:  # CNNGPError included
        text = " ".join(str(e).split())
        raise CNNGPError(_name_flag(text) if text.startswith("layout:") else f"--data: {text}") from None


def add_layout_argument(parser) -> None:
    """``--layout``, the same on every command that reads image arrays."""
    parser.add_argument(
        "--layout", type=str.lower,
        choices=["nhwc", "nlc", "ndhwc", "nchw", "ncl", "ncdhw", "nhw", "nl", "ndhw"],
        help="the layout of the image arrays, when it is not channels-last (N, *spatial, C): nchw "
             "(channels first, converted), nhw (grey images, a channel axis added), ...; also nhwc/nlc "
             "to accept a channels-last array whose shape looks channels-first or grey "
             "(README, \"Image arrays\")")


def add_zca_argument(parser, fitted_on: str) -> None:
    """``--zca EPS``: regularised ZCA whitening (:mod:`cnngp.io.preprocess`), fitted on
    ``fitted_on`` only."""
    parser.add_argument("--zca", metavar="EPS",
                        help="whiten the images by regularised ZCA of strength EPS >= 0 (a fraction of the "
                        f"mean eigenvalue of the training covariance, e.g. 0.1), fitted on {fitted_on} only "
                        "and applied to every image the kernel sees (default: no whitening)")
    parser.add_argument("--zca-mirror", action=argparse.BooleanOptionalAction, default=None,
                        help="with --zca: fit the whitening on those images and their mirror images, so that it "
                             "commutes with horizontal flips (default: with --flip, so that predictions are invariant "
                             "to mirroring the images; --no-zca-mirror with --flip mirrors the whitened images)")


def add_zca_fit_argument(parser, subset: str, reuse: bool = False) -> None:
    """``--zca-fit train|rest`` and ``--zca-fit-outside N``: where ``--zca`` is fitted
    (:data:`cnngp.io.preprocess.ZCA_FITS`, :func:`cnngp.io.preprocess.zca_held_out`)."""
    parser.add_argument("--zca-fit", choices=["train", "rest"], default="train",
                        help=f"with --zca: fit the whitening on {subset} (train, default; the CV's held-out "
                             "folds are then whitened in sample, the test images out of sample) or on the data's "
                             "other training images, unlabelled (rest: held-out folds and test images alike, out "
                             "of sample)")
    parser.add_argument("--zca-fit-outside", metavar="N",
                        help="with --zca-fit rest: fit on the training images outside the class-balanced N "
                             f"(at least {subset.removeprefix('the ')}; the same seed, so they begin with it) "
                             "instead: runs of one learning curve share one whitening"
                             + (", and a larger run's --reuse lends the smaller one's tiles" if reuse else ""))


def parse_zca_fit_outside(args) -> int | None:
    """``--zca-fit-outside`` as an int (None when not given), refused without ``--zca-fit rest``."""
    text = args.zca_fit_outside
    if text is None:
        return None
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise CNNGPError(f"--zca-fit-outside: expected a positive integer (a number of training images), "
                         f"got {text!r}")
    if args.zca_fit != "rest":
        raise CNNGPError("--zca-fit-outside: says which training images a --zca-fit rest whitening leaves out; "
                         "add --zca-fit rest")
    return value


def parse_zca(text, flag: str = "--zca"):
    """The value of ``--zca`` as a float (None when not given); messages name ``flag``."""
    if text is None:
        return None
    import math

    from cnngp.io.preprocess import check_zca_strength

    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):  # the text as typed, not its float
        raise CNNGPError(f"{flag}: expected a number >= 0, the regulariser as a fraction of the mean "
                         f"eigenvalue (e.g. 0.1), got {text!r}")
    return check_zca_strength(value, flag)  # and within its range


def parse_bytes(text: str, flag: str = "--memory-budget") -> int:
    """``2G``, ``500M``, ``1.5GiB``, ``123456`` → bytes (:func:`cnngp.validation.parse_bytes`)."""
    from cnngp.validation import parse_bytes as parse

    return parse(text, flag)


#: ``--engine`` choices (cnngp.engine.execution.ENGINES, without importing torch here)
ENGINE_CHOICES = ("auto", "fused", "torch", "triton")


def add_engine_argument(parser) -> None:
    """``--engine``, the same on every command that computes kernels."""
    parser.add_argument("--engine", choices=ENGINE_CHOICES, default="auto",
                        help="what runs the layers: fused (numba CPU kernels), torch (every layer's own "
                             "torch code, the reference) or triton (fused GPU kernels); auto (default): "
                             "fused on a CPU, torch elsewhere (README, \"Execution options\")")


def execution_from_args(args, **changes):
    """The command's :class:`cnngp.Execution`, built once from its parsed flags (after
    :func:`preflight`): ``--dtype``, ``--device``, ``--engine``, ``--batch-size``,
    ``--memory-budget``, ``--quiet`` (progress), the checkpoint beside ``--out``, and the store
    flags ``--store`` (or ``--out K.zarr``), ``--archive``, ``--reuse``, ``--workers``, ``--scheduler``,
    ``--tile``, ``--threads-per-worker``. ``changes`` override them."""
    from cnngp.engine.execution import Execution

    store = getattr(args, "store", None)
    out = getattr(args, "out", None)
    if store is None and out is not None and getattr(args, "store_ok", False):
        from cnngp.engine.store import is_store_path

        store = out if is_store_path(out) else None
    checkpoint = getattr(args, "checkpoint_path", None)
    values = dict(
        dtype=getattr(args, "dtype", None), device=getattr(args, "device", None),
        engine=getattr(args, "engine", None), batch_size=getattr(args, "batch_size", None),
        memory_budget=getattr(args, "memory_budget", None), progress=not getattr(args, "quiet", False),
        checkpoint=checkpoint, keep_checkpoint=checkpoint is not None, store=store,
        archive=getattr(args, "archive", None), reuse=getattr(args, "reuse", None),
        workers=getattr(args, "workers", None),
        scheduler=getattr(args, "scheduler", None), tile=getattr(args, "tile", None),
        threads=getattr(args, "threads_per_worker", None),
    )
    values = {k: v for k, v in values.items() if v is not None}
    values.update(changes)
    return Execution(**values)


#: parsed options that do not change a command's numbers (where and how fast it runs, what it
#: prints, where it writes): left out of the recorded command; every other option is recorded
NOT_RECORDED = frozenset({
    "out", "quiet", "device", "engine", "batch_size", "memory_budget", "yes", "no_checkpoint",
    "workers", "scheduler", "tile", "threads_per_worker", "archive", "reuse", "dry_run", "store", "kernel_cache",
})
#: argparse bookkeeping set by set_defaults or preflight, not options
#: options whose default is None and whose False is given as --no-OPTION (BooleanOptionalAction)
_NEGATABLE = frozenset({"zca_mirror"})
_INTERNAL = frozenset({"command", "func", "out_kind", "out_files", "checkpointed", "store_ok", "checkpoint_path"})


def command_line(args) -> str:
    """The command as recorded in an output's provenance (``config["command"]``), written from
    the *parsed* arguments in one place: ``cnngp <command>`` and every option that changes the
    numbers, defaults included and normalised (``--kernel ntk``, ``--dtype float32``), so that
    replaying it recomputes the same numbers; options in :data:`NOT_RECORDED` are left out. A
    new option is recorded without anyone remembering to."""
    import shlex

    parts = ["cnngp", str(getattr(args, "command", "") or "")]
    for key, value in vars(args).items():
        if key in NOT_RECORDED or key in _INTERNAL or key.startswith("_") or value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if value is False:  # recorded only where False differs from the default (None)
            if key in _NEGATABLE:
                parts.append("--no-" + key.replace("_", "-"))
            continue
        if value is True:
            parts.append(flag)
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(p for p in parts if p)


def _check_store_flags(args, out_kind: str) -> None:
    """--workers, --scheduler, --tile, --threads-per-worker, --archive, --reuse and --dry-run
    need a store."""
    given = [f for f in ("workers", "scheduler", "tile", "threads_per_worker", "archive", "reuse", "dry_run")
             if getattr(args, f, None) not in (None, False)]
    if given and out_kind != "store":
        flag = "--" + given[0].replace("_", "-")
        raise CNNGPError(f"{flag}: needs --out K.zarr (a kernel store); an .npz is computed in this process")
    if getattr(args, "reuse", None) is not None:
        check_reuse_store(args.reuse, args.out, "--out")
    if getattr(args, "workers", None) is not None and getattr(args, "scheduler", None) is not None:
        raise CNNGPError("--workers: cannot be combined with --scheduler (that cluster has its own workers)")


def check_reuse_store(reuse, out, out_flag: str, sweep: bool = False) -> None:
    """``--reuse`` before any work: a kernel store or tile archive that opens (for a sweep also
    a sweep's archive folder, ``--archive DIR``), and not the store being computed (``out``,
    named ``out_flag``); what it lends is decided by the run."""
    from cnngp.engine.lending import open_source

    if not str(reuse).strip():
        raise CNNGPError("--reuse: is empty; give the kernel store K.zarr (or its tile archive) of the same "
                         "computation to copy tiles from")
    if Path(reuse).resolve() == Path(out).resolve():
        raise CNNGPError(f"--reuse: {str(reuse)!r} is the store of {out_flag}; give another store of the same "
                         "computation (the same store is resumed without --reuse)")
    if sweep:
        from cnngp.experiments.sweep import is_sweep_archive

        if is_sweep_archive(reuse):
            reuse = Path(reuse) / "train"
    open_source(reuse, what="--reuse")


def preflight(args) -> None:
    """The checks every command shares, made before any work, by flag name.

    ``--out`` (a file, or a folder for ``sweep``), ``--device``, ``--memory-budget`` and
    ``--x1/--x2/--x`` paths; values are replaced by their parsed form (``args.memory_budget``
    in bytes, ``args.device`` a ``torch.device``).
    """
    out_kind = getattr(args, "out_kind", "file")
    if out_kind == "file" and getattr(args, "store_ok", False):
        from cnngp.engine.store import is_store_path

        if is_store_path(args.out):
            out_kind = "store"
    if getattr(args, "store_ok", False):
        _check_store_flags(args, out_kind)
    if hasattr(args, "out"):
        if out_kind == "store":
            from cnngp.engine.store import check_output_store

            check_output_store(args.out, "--out")
            if getattr(args, "archive", None) is not None:
                from cnngp.engine.archive import check_archive_folder

                check_archive_folder(args.archive, "--archive")
        elif out_kind == "file":
            from cnngp.engine.storage import check_output_file

            check_output_file(args.out, "--out")
            if getattr(args, "checkpointed", False) and not args.no_checkpoint:
                args.checkpoint_path = f"{args.out}.checkpoint.npz"
                check_output_file(args.checkpoint_path, "--out (its checkpoint)")
        else:
            from cnngp.engine.storage import check_output_dir

            check_output_dir(args.out, getattr(args, "out_files", ()))
    if getattr(args, "memory_budget", None) is not None:
        args.memory_budget = parse_bytes(args.memory_budget)
    if getattr(args, "device", None) is not None:
        from cnngp.validation import resolve_device

        args.device = str(resolve_device(args.device, "--device"))
    inputs = {}
    for flag in ("x1", "x2", "x"):
        spec = getattr(args, flag, None)
        if spec is not None and not str(spec).startswith("digits"):
            inputs[f"--{flag}"] = _check_input_path(f"--{flag}", str(spec))
    if out_kind == "file" and hasattr(args, "out"):
        _check_out_apart(args, inputs)


def _check_out_apart(args, inputs: dict) -> None:
    """Refuse a file output (``--out``, its checkpoint, a figure's sidecar) that is one of
    the input files: writing it would destroy the images before (or while) they are read."""
    outputs = {"--out": Path(args.out)}
    if getattr(args, "checkpoint_path", None):
        outputs["--out (its checkpoint)"] = Path(args.checkpoint_path)
    if getattr(args, "sidecar", False):
        from cnngp.experiments.plots import check_sidecar

        outputs["--out (its sidecar .json)"] = check_sidecar(args.out)
    for out_flag, out in outputs.items():
        for in_flag, name in inputs.items():
            if out.exists() and os.path.samefile(out, name) or out.resolve() == name.resolve():
                raise CNNGPError(f"{out_flag}: {str(out)!r} is the input file of {in_flag}; "
                                 "writing it would destroy the images, give another --out")


def _check_input_path(flag: str, spec: str) -> Path:
    from cnngp.io.data import split_array_path

    try:
        name, _ = split_array_path(spec)
    except CNNGPError as e:
        raise CNNGPError(f"{flag}: {e}") from None
    p = Path(name)
    if not name.strip():
        raise CNNGPError(f"{flag}: is empty; give FILE.npz or FILE.npz:ARRAY")
    if not p.exists():
        raise CNNGPError(f"{flag}: file not found: {name}")
    if not p.is_file():
        raise CNNGPError(f"{flag}: {name!r} is not a regular file; give FILE.npz or FILE.npz:ARRAY")
    return p


# -- commands ---------------------------------------------------------------------------------


def cmd_kernel(args) -> int:
    import numpy as np
    import torch

    from cnngp.engine.gram import kernel, readout_sweep
    from cnngp.kernels.layers import Readout
    from cnngp.provenance import array_sha256, versions
    from cnngp.engine.gram import check_gram
    from cnngp.engine.storage import atomic_write

    if args.family is not None and args.lengthscales is None:
        raise CNNGPError("--family: only meaningful together with --lengthscales (a readout sweep)")
    args.family = args.family or "matern32"
    if args.lengthscales is not None and args.readout is not None:
        raise CNNGPError(
            "--lengthscales: cannot be combined with --readout (the sweep sets the readout "
            "correlation itself: choose its family with --family)"
        )
    if args.width is not None and args.parameterization != "standard":
        raise CNNGPError("--width: only meaningful with --parameterization standard (the NTK "
                         "parameterisation's kernels do not depend on the width)")
    args.zca = parse_zca(args.zca)
    net = load_network(args.arch, args.readout)
    net = parameterized(net, args.parameterization, args.width)
    from cnngp.validation import describe_images

    x1 = load_images("--x1", args.x1, args.layout)
    x2 = None if args.x2 is None else load_images("--x2", args.x2, args.layout)
    # how the images were read: said once every check has passed, so that a refusal stays one line
    data_lines = [] if args.quiet else [describe_images(x, flag) for flag, x in (("--x1", x1), ("--x2", x2))
                                        if x is not None]
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise CNNGPError(
            f"--x2: images of shape {x2.shape[1:]} do not match --x1's {x1.shape[1:]}; both "
            "must be (N, *spatial, C) with the same spatial size and channels"
        )
    channels = getattr(net, "input_channels", None)
    if channels is not None and x1.shape[-1] != channels:
        raise CNNGPError(
            f"--x1: has {x1.shape[-1]} channels (last axis) but --arch expects {channels}"
        )
    def hashes():  # of the images as read (before any whitening)
        return {"x1_sha256": array_sha256(x1), **({} if x2 is None else {"x2_sha256": array_sha256(x2)})}

    whitening, read = None, None
    from cnngp.io.preprocess import check_zca_mirror

    mirror = check_zca_mirror(args.zca_mirror, args.zca, args.flip)
    args.zca_mirror = mirror if args.zca is not None else None  # recorded as resolved
    if args.zca is None and args.zca_fit != "x1":
        raise CNNGPError(f"--zca-fit: {args.zca_fit} says where to fit a ZCA whitening, but no --zca strength is given")
    if args.zca is not None:  # regularised ZCA fitted on --x1 (or --x2) alone, applied to --x1 and --x2
        from cnngp.io.preprocess import fit_zca

        read = hashes()
        if args.zca_fit == "x2" and x2 is None:
            raise CNNGPError("--zca-fit: x2 fits the whitening on --x2, but no --x2 is given")
        fit_flag = "--" + args.zca_fit
        whitening = fit_zca(x1 if args.zca_fit == "x1" else x2, args.zca, name=fit_flag, mirror=mirror)
        x1 = whitening.transform(x1, "--x1")
        x2 = None if x2 is None else whitening.transform(x2, "--x2")
    lengthscales, readouts, body = None, None, net
    get = {"nngp": "nngp", "ntk": "ntk", "both": ("nngp", "ntk")}[args.get]
    if args.lengthscales is not None:
        lengthscales = parse_lengthscales(args.lengthscales)
        last = net.layers[-1]
        if not isinstance(last, Readout):
            raise CNNGPError("--lengthscales: the network must end with a readout layer")
        readouts = [
            last.with_correlation(correlation_from_text(args.family, lam, "--family"))
            for lam in lengthscales
        ]
        body, _ = net.split_readout()
    from cnngp.engine.store import is_store_path

    ex = execution_from_args(args)
    if is_store_path(args.out):
        return _kernel_to_store(args, net, body, readouts, lengthscales, x1, x2, get, ex, whitening, data_lines)
    priced = body  # with --flip, the flip plan: refused here if not flip-symmetric, priced twice per pair
    if args.flip:
        from cnngp.engine.gram import GramPlan

        priced = GramPlan(body, x1.shape[1:], readouts=readouts, flip=True, execution=ex.replace(progress=False))
    from cnngp.engine.gram import gram_needs
    from cnngp.engine.resources import check_job

    n2 = None if x2 is None else x2.shape[0]
    _, _, result = gram_needs(body, x1.shape[1:], x1.shape[0], n2, readouts=readouts, dtype=ex.dtype,
                              memory_budget=ex.memory_budget, flip=bool(args.flip))
    # the disk is --out's: the result and its checkpoint (float64) beside it
    check_job("--out", disk_bytes=2 * result, disk_path=args.out, yes=True, remedy=_DISK_REMEDY)
    checkpoint = ex.checkpoint
    # a rerun after an interruption resumes from the checkpoint: it says so, and is gated on
    # what is left, not the whole job
    from cnngp.engine.gram import checkpoint_pairs_done

    done = checkpoint_pairs_done(checkpoint, body if readouts is not None else net, x1, x2, readouts=readouts,
                                 get=get, flip=args.flip, dtype=ex.dtype)
    est = check_gram("--x1", priced, x1.shape[1:], x1.shape[0], n2, readouts=None if args.flip else readouts,
                     yes=args.yes or bool(done), images=x1, execution=ex)
    lines = data_lines
    if done:
        pairs = x1.shape[0] * (x1.shape[0] + 1) // 2 if n2 is None else x1.shape[0] * n2
        lines = lines + [f"--out: resuming from {checkpoint}: {done:,} of {pairs:,} pairs already done"]
        if est is not None:
            left = est.seconds * (pairs - done) / pairs
            check_job(f"--x1 (the {pairs - done:,} pairs left of {pairs:,})", seconds=left, yes=args.yes,
                      remedy="use fewer images or readouts, or split the work (--x2 takes row blocks)")
            from cnngp.engine.resources import human_seconds

            lines.append(f"estimate: about {human_seconds(left)} for the pairs left")
    elif est is not None:  # a long job: its timed estimate before it starts
        lines = lines + [est.describe()]
    if ex.progress and lines:
        print("\n".join(lines), file=sys.stderr)
    start = time.perf_counter()
    if readouts is not None:
        k = readout_sweep(body, readouts, x1, x2, get=get, flip=args.flip, execution=ex)
    else:
        k = kernel(net, x1, x2, get=get, flip=args.flip, execution=ex)
    seconds = time.perf_counter() - start
    names = ("nngp", "ntk") if args.get == "both" else (args.get,)
    # saved in the dtype computed (float32 stays float32), recorded as "saved_dtype"
    kernels = {name: v.cpu().numpy() for name, v in zip(names, k if isinstance(k, tuple) else (k,))}
    k = kernels[names[0]]
    config = {
        "command": "kernel",
        "arch": args.arch,
        "readout": args.readout,
        "family": args.family if lengthscales is not None else None,
        "dtype": args.dtype,
        "device": args.device,
        "x1": str(args.x1),
        "x2": None if args.x2 is None else str(args.x2),
        "get": args.get,
        "flip": args.flip,
        "zca": args.zca,
        "zca_fit": None if whitening is None else {**whitening.provenance(), "fitted_on_images": "--" + args.zca_fit},
        "saved_dtype": str(k.dtype),
        "command_line": command_line(args),
        "engine": ex.resolved_engine,
        "execution": {k: v for k, v in ex.as_dict().items() if k not in ("checkpoint", "keep_checkpoint")},
        "seconds": seconds,
    }
    # --get nngp / ntk: the one kernel as `kernel` (config "get" says which); --get both: `nngp`
    # and `ntk`, and `kernel` = the NNGP (what a reader of `kernel` expects)
    arrays = {
        "kernel": k,
        **(kernels if args.get == "both" else {}),
        "spec": np.array(json.dumps(net.to_spec())),
        "config": np.array(json.dumps(config)),
        "versions": np.array(json.dumps(versions())),
        **{name: np.array(value) for name, value in (read or hashes()).items()},  # of the images as read
    }
    if lengthscales is not None:
        arrays["lengthscales"] = np.array(lengthscales, dtype=np.float64)
    atomic_write(args.out, lambda f: np.savez(f, **arrays))
    if checkpoint is not None:  # only now that the output is safely in place
        Path(checkpoint).unlink(missing_ok=True)
    if not args.quiet:
        print(f"wrote {args.out}: kernel {k.shape} in {seconds:.2f} s", file=sys.stderr)
    return 0


#: what a disk without room for --out asks of the user
_DISK_REMEDY = "free space there, or give an --out on a larger disk"


def _kernel_to_store(args, net, body, readouts, lengthscales, x1, x2, get, ex, whitening=None,
                     data_lines=()) -> int:
    """``cnngp kernel --out K.zarr``: tiles into a resumable store, here or on Dask. With
    ``--zca`` the store holds the whitened images (its identity hashes them); once complete it
    records the whitening, or that there was none, as ``preprocessing``. ``data_lines`` (how the images were
    read) are printed once the store, its lender and the job have passed their checks."""
    from cnngp.engine.distributed import describe_dry_run, store_dry_run, store_kernel
    from cnngp.engine.resources import check_job

    labels = ["kernel"] if lengthscales is None else [
        f"{args.family}:{'inf' if lam == float('inf') else lam}" for lam in lengthscales]
    kinds = ("nngp", "ntk") if args.get == "both" else (args.get,)
    labels = [f"{kind} {label}" for kind in kinds for label in labels]  # the leading axis, in order
    options = dict(out=args.out, readouts=readouts, get=get, flip=args.flip, execution=ex)
    model = body if readouts is not None else net
    from cnngp.experiments.sweep import check_store_zca

    check_store_zca(args.out, args.zca, mirror=bool(getattr(args, "zca_mirror", False)))  # first: a whitening that differs is the reason to say
    plan = store_dry_run(model, x1, x2, **options).dry_run
    if args.dry_run:  # the lines for a person on stderr, the JSON alone on stdout (`> plan.json`)
        if not args.quiet:
            print("\n".join([*data_lines, describe_dry_run(plan)]), file=sys.stderr)
        print(json.dumps(plan, indent=2))
        return 0
    here = args.scheduler is None  # a remote cluster's memory and speed are not this machine's
    check_job("--out", disk_bytes=plan["disk_bytes"], disk_path=args.out, yes=True, remedy=_DISK_REMEDY)
    check_job(
        f"--x1 ({x1.shape[0]} images)",
        memory_bytes=plan["memory_per_worker_bytes"] * (args.workers or 1) if here else 0,
        seconds=plan["estimated_seconds"] if here and str(args.device).startswith("cpu") else None,
        yes=args.yes,
        remedy="use more --workers, a --scheduler, or fewer images (--x2 takes row blocks)",
    )
    if data_lines:
        print("\n".join(data_lines), file=sys.stderr)
    # how its images were seen, whitened or not (check_store_zca refuses another whitening by name)
    preprocessing = {"zca": None if whitening is None else
                     {**whitening.provenance(), "fitted_on_images": "--" + args.zca_fit}}
    report = store_kernel(model, x1, x2, labels=labels, **options)
    from cnngp.engine.store import KernelStore

    KernelStore.open(args.out, what="--out").annotate(preprocessing=preprocessing)
    if not args.quiet:
        print(f"wrote {args.out}: kernel {tuple(report.shape)}, {report.tiles_computed} tile(s) computed, "
              f"{report.tiles_done_before} already done ({report.tiles_bad} bad, recomputed"
              + (f"; {report.tiles_restored} restored from {args.archive}" if report.tiles_restored else "")
              + (f"; {report.tiles_reused} reused from {args.reuse}" if report.tiles_reused else "")
              + "), "
              f"{report.pairs_computed:,} pairs in {report.seconds:.1f} s", file=sys.stderr)
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = str(text).lower().split("x")
    try:
        shape = tuple(int(t) for t in parts)
    except ValueError:
        shape = ()
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise CNNGPError(
            f"--shape: expected 1 to 3 positive sizes such as 32x32 or 28 or 8x8x8, got {text!r}"
        )
    return shape


def cmd_info(args) -> int:
    if args.store is not None:
        if args.arch is not None:
            raise CNNGPError("--arch: give either a kernel store or --arch, not both")
        if not str(args.store).strip():  # Path("") would be the current folder
            raise CNNGPError("info STORE: is empty; give a kernel store K.zarr or a tile archive folder")
        from cnngp.engine.archive import archive_info, is_archive
        from cnngp.engine.store import KernelStore

        from cnngp.experiments.sweep import ARCHIVE_PARTS

        # a tile archive, or a sweep's --archive DIR: one archive per part (train/, test/, …)
        parts = [Path(args.store)] if is_archive(args.store) else [
            Path(args.store) / part for part in ARCHIVE_PARTS if is_archive(Path(args.store) / part)]
        if parts:
            infos = [archive_info(p) for p in parts]
            lines = [f"{p}: {i['tiles_archived']}/{i['tiles_total']} tiles archived ({i['bytes'] / 2**20:.1f} MiB)"
                     + "".join(f", {k} of them copied from {src} (--reuse)" for src, k in i["tiles_reused_from"].items())
                     + "".join(f"; accepted for images of another sha256 at {v.get('at')} on {v.get('host')}: "
                               f"{v.get('pairs_checked')} pairs computed again agreed (largest difference "
                               f"{v.get('largest_relative_difference', 0):.2g} relative, tolerance "
                               f"{v.get('tolerance', 0):g})" for v in i["images_verified"])
                     + (f", {len(i['tiles_damaged'])} damaged: {', '.join(i['tiles_damaged'])}"
                        if i["tiles_damaged"] else "") for p, i in zip(parts, infos)]
            if args.json:
                print(json.dumps(infos[0] if is_archive(args.store) else
                                 {p.name: i for p, i in zip(parts, infos)}, indent=2))
                print("\n".join(lines), file=sys.stderr)
            else:
                for line, i in zip(lines, infos):
                    shape = "×".join(str(v) for v in i.get("shape") or [])
                    print(f"{line}\n  shape {shape} {i.get('dtype')}")
                print("  (full record: --json)")
            return 0

        store = KernelStore.open(args.store, what="store")
        info = store.info()
        info["readout_specs"] = _stored_readouts(store.attrs, info.get("spec"))
        tail = f", {len(info['tiles_bad'])} bad: {', '.join(info['tiles_bad'])}" if info["tiles_bad"] else ""
        if args.json:
            print(json.dumps(info, indent=2))
            print(f"{args.store}: {info['tiles_done']}/{info['tiles_total']} tiles done{tail}", file=sys.stderr)
        else:
            print(store_summary(args.store, info))
        return 0
    import torch

    from cnngp.io import architectures
    from cnngp.provenance import versions

    info = {"versions": versions(), "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    if args.arch:
        spatial = _parse_shape(args.shape) if args.shape else (32, 32)
        net = load_network(args.arch, args.readout)
        grids = net.grids(spatial)
        info["arch"] = args.arch
        info["spec"] = net.to_spec()
        info["grids"] = [list(g) for g in grids]
        from cnngp.kernels.state import describe

        # what each layer's input is carried as: full, diagonal or band (radii per axis)
        info["representation"] = [describe(r) for r in net.representation(spatial)]
    else:
        if args.shape or args.readout:
            raise CNNGPError("--shape/--readout: only meaningful together with --arch")
        info["architectures"] = list(architectures.NAMES)
    if args.json:
        print(json.dumps(info, indent=2))
    elif args.arch:
        print(arch_summary(info))
    else:
        print(_machine_text(info) + "\narchitectures: " + ", ".join(info["architectures"])
              + "\n(cnngp info --arch NAME: its layers; --json: the full record)")
    return 0


def _stored_readouts(attrs, spec) -> list:
    """The readout layer specs a store records: one per readout of a sweep (attrs
    ``readouts``), else the network's own readout when its spec ends with one."""
    readouts = attrs.get("readouts")
    if readouts:
        return list(readouts)
    layers = (spec or {}).get("layers") or []
    if layers and isinstance(layers[-1], dict) and layers[-1].get("type") == "readout":
        return [layers[-1]]
    return []


def _correlation_text(corr) -> str:
    """A correlation spec in a few characters: ``independent``, ``constant``, ``matern ν=1.5 λ=2``."""
    if not isinstance(corr, dict):
        return "independent" if corr is None else str(corr)
    kind = str(corr.get("type", "?"))
    extra = []
    if "nu" in corr:
        extra.append(f"ν={corr['nu']:g}" if isinstance(corr["nu"], (int, float)) else f"ν={corr['nu']}")
    if "lengthscale" in corr:
        lam = corr["lengthscale"]
        extra.append(f"λ={lam:g}" if isinstance(lam, (int, float)) else f"λ={lam}")
    return " ".join([kind, *extra])


def _layer_text(layer, stride: bool = False) -> str:
    """One layer spec in a few characters: ``conv 3``, ``conv 6 stride 2 (matern ν=1.5 λ=3)``,
    ``relu``, ``readout (constant)``; a serial one as its layers joined by arrows."""
    if not isinstance(layer, dict):
        return str(layer)
    kind = str(layer.get("type", "?"))
    if kind == "serial":
        return " → ".join(_layer_text(v, stride) for v in layer.get("layers") or [])
    size = layer.get("filter", layer.get("window"))
    if isinstance(size, (list, tuple)):
        size = "×".join(str(v) for v in size)
    corr = layer.get("correlation")
    text = kind if size is None else f"{kind} {size}"
    steps = layer.get("stride")
    if stride and steps is not None and any(int(v) != 1 for v in (steps if isinstance(steps, list) else [steps])):
        text += " stride " + "×".join(str(v) for v in (steps if isinstance(steps, list) else [steps]))
    if isinstance(corr, dict) and corr.get("type") not in (None, "independent"):
        text += f" ({_correlation_text(corr)})"
    return text


def _network_text(spec) -> str:
    """The layers of a spec in one line: ``conv 3×3 → relu → … → readout``."""
    return _layer_text(spec) if spec else "(not recorded)"


def _machine_text(info: dict) -> str:
    """The versions and threads ``cnngp info`` reports, in one line."""
    v = info.get("versions") or {}
    return (f"cnngp {v.get('cnngp')}, torch {v.get('torch')}, python {v.get('python')}; "
            f"{info.get('threads')} threads; CUDA: {'yes' if info.get('cuda') else 'no'}")


def arch_summary(info: dict) -> str:
    """What ``cnngp info --arch NAME`` prints (the full record is ``--json``): per layer, its
    output grid and how its input is carried (full, band, diagonal: README "Representations")."""
    layers = (info.get("spec") or {}).get("layers") or []
    grids, reps = info.get("grids") or [], info.get("representation") or []
    grid = lambda g: "×".join(str(v) for v in g) if g else "—"  # noqa: E731
    texts = [_layer_text(layer, stride=True) for layer in layers]
    width = max([len("layer")] + [len(t) for t in texts])
    lines = [f"{info.get('arch')} on a {grid(grids[0] if grids else [])} input:",
             f"  {'#':>3}  {'layer':<{width}}  {'output':<7}  its input carried as"]
    for i, text in enumerate(texts):
        out = grid(grids[i + 1]) if i + 1 < len(grids) else "?"
        lines.append(f"  {i + 1:>3}  {text:<{width}}  {out:<7}  {reps[i] if i < len(reps) else '?'}")
    if len(reps) > len(texts) and grids and grids[-1]:  # a network without a readout: its output
        lines.append(f"  its output is carried as: {reps[len(texts)]}")
    lines.append(_machine_text(info) + "  (full record: --json)")
    return "\n".join(lines)


def store_summary(path, info: dict) -> str:
    """What ``cnngp info K.zarr`` prints: a few lines a person reads (the full record is
    ``--json``): shape and dtype, tiles done/total, every readout with its correlation, the
    network."""
    shape = info.get("shape") or []
    state = "complete" if info.get("complete") else "incomplete"
    if info.get("being_written_by"):
        state += f"; being written now by process {info['being_written_by']} on this machine"
    bad = info.get("tiles_bad") or []
    lines = [
        f"{path}: {info.get('tiles_done')}/{info.get('tiles_total')} tiles done ({state}"
        + (f"; {len(bad)} bad: {', '.join(bad)}" if bad else "") + ")",
        f"  shape    {' × '.join(str(v) for v in shape)} ({'readouts × ' if len(shape) == 3 else ''}N1 × N2), "
        f"{info.get('dtype')}, {'symmetric' if info.get('symmetric') else 'rectangular'}, tile {info.get('tile')}"
        + {True: ", flip-averaged", "mirror": ", the mirror term K(x1, mirrored x2) of a flip average (half of "
                 "it: average with the plain store)"}.get(info.get("flip"), ""),
        f"  pairs    {info.get('pairs_done', 0):,}/{info.get('pairs_total', 0):,} done"
        + "".join(f"; {k} tile(s) copied from {src} (--reuse)" for src, k in (info.get("tiles_reused_from") or {}).items())
        + _workers_words(info.get("tiles_by_workers") or {})
        + "".join(f"; resumed {v.get('at')} on {v.get('host')} with the same images rounded otherwise (their "
                  "last bits; its kept images rewritten)" for v in info.get("images_rounded_otherwise") or []),
        f"  time     {info.get('seconds_recorded') or 0:,.1f} s wall, {info.get('cpu_seconds_recorded') or 0:,.1f} s CPU "
        "(the finished tiles, every attempt"
        + (f"; {info['seconds_recorded_reused']:,.1f} s wall of it spent in the store the copied tiles came from"
           if info.get("seconds_recorded_reused") else "") + ")",
    ]
    damaged = info.get("images_damaged") or []
    if damaged:  # the tiles may be intact, but no resume or sweep trusts this store
        lines.insert(1, f"  DAMAGED  stored images {', '.join('images/' + w for w in damaged)} do not match the "
                        "sha256 recorded of them: a resume refuses this store (delete it and run again)")
    labels = info.get("labels") or []
    specs = info.get("readout_specs") or []
    if info.get("offsets"):  # the last hidden layer's offset sums, what `cnngp learn` reads out
        grid = "×".join(str(v) for v in info.get("offset_shape") or []) or "?"
        lines[1] = lines[1].replace("(readouts × ", "(offsets × ")
        lines.append(f"  contents offset sums S[δ] of the last hidden layer over {grid} offsets "
                     "(docs/maths.md §9; read out by cnngp learn)")
        specs = []
    else:
        count = max(len(labels), len(specs), int(info.get("readouts") or 0))
        lines.append(f"  readouts {count}:")
        for i in range(count):
            label = labels[i] if i < len(labels) else f"readout {i}"
            corr = _correlation_text(specs[i].get("correlation")) if i < len(specs) and isinstance(specs[i], dict) else None
            lines.append(f"    {i:>3}  {label}" + (f"  (correlation: {corr})" if corr else ""))
    net = _network_text(info.get("spec"))
    if specs and not net.endswith("readout"):
        net += " → readout (above)"
    lines.append(f"  network  {net}")
    if info.get("created"):
        lines.append(f"  created  {info['created']}")
    lines.append("  (full record: --json)")
    return "\n".join(lines)


def _print_version() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("cnngp")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        text = "unknown (not installed)"
    print(f"cnngp {text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cnngp.kernels.correlations import FAMILIES

    p = _Parser(
        prog="cnngp",
        description="NNGP kernels of infinitely wide CNNs with spatially correlated weight priors.",
    )
    p.add_argument("--version", action="store_true", help="print the package version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    k = sub.add_parser("kernel", help="compute a kernel (Gram) matrix")
    k.add_argument("--arch", required=True, help="cnngp14, myrtle10, ... or SPEC.json")
    k.add_argument("--x1", required=True, help="FILE.npz or FILE.npz:ARRAY (default array x, then x_train), or digits[:N]")
    k.add_argument("--x2", help="second set of images (default: x1, symmetric Gram matrix)")
    k.add_argument("--out", required=True, help="output .npz, or K.zarr: a resumable tiled kernel store")
    add_layout_argument(k)
    k.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    k.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_engine_argument(k)
    k.add_argument("--readout", help="readout correlation: independent, constant, matern32:λ, rbf:λ, ...")
    k.add_argument("--get", choices=["nngp", "ntk", "both"], default="nngp",
                   help="the NNGP (default), the neural tangent kernel, or both from one pass")
    k.add_argument("--flip", action="store_true",
                   help="the flip-averaged kernel ½[K(x1, x2) + K(x1, mirrored x2)] (horizontal flips; "
                        "refused for a network that is not flip-symmetric; about twice the pair work)")
    k.add_argument("--parameterization", choices=["ntk", "standard"], default="ntk",
                   help="where σ_w/√fan_in sits (neural-tangents' parameterization; only the NTK "
                        "depends on it): ntk (default) or standard (needs --width)")
    k.add_argument("--width", type=int_at_least(1),
                   help="with --parameterization standard: channels of every hidden layer")
    k.add_argument("--lengthscales", help="readout sweep, e.g. 0,0.5,2,inf: output (L, N1, N2)")
    add_zca_argument(k, "--x1 (or --x2, --zca-fit x2)")
    k.add_argument("--zca-fit", choices=["x1", "x2"], default="x1",
                   help="with --zca: fit the whitening on --x1 (default) or --x2: the training images, whichever "
                        "they are (a test × train kernel is --x1 TEST --x2 TRAIN --zca-fit x2); never test images")
    k.add_argument("--family", choices=sorted(FAMILIES), help="family of a --lengthscales sweep (default matern32)")
    k.add_argument("--batch-size", type=int_at_least(1), help="image pairs per batch (default: from the memory budget)")
    k.add_argument("--memory-budget", help="working memory for a batch, e.g. 2G (default 2G)")
    k.add_argument("--yes", action="store_true", help="start even if the estimate says it takes over an hour")
    k.add_argument("--quiet", action="store_true", help="no progress bar (with --dry-run: the JSON alone)")
    k.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="do not save progress to OUT.checkpoint.npz (by default an interrupted run "
        "resumes from there when the same command is run again)",
    )
    k.add_argument("--workers", type=int_at_least(1),
                   help="with --out K.zarr: run on a local Dask cluster of N worker processes (127.0.0.1)")
    k.add_argument("--scheduler", help="with --out K.zarr: an existing Dask scheduler, e.g. tcp://host:8786")
    k.add_argument("--tile", type=int_at_least(1), help="with --out K.zarr: tile side T (default: from the memory budget)")
    k.add_argument("--threads-per-worker", type=int_at_least(1),
                   help="with --out K.zarr: torch/numba threads per task (default: cores / workers)")
    k.add_argument("--archive", metavar="DIR",
                   help="with --out K.zarr: keep a compressed, portable copy of every finished tile in "
                        "DIR and restore from it what the store lacks (copy or commit DIR to finish "
                        "a run on another machine)")
    k.add_argument("--reuse", metavar="OLD.zarr",
                   help="with --out K.zarr: copy from OLD.zarr, a store (or tile archive DIR) of the same "
                        "network and dtype holding these readouts (any tile size) on images that begin as "
                        "--x1 (and --x2) do (fewer: the first of these; more, a store only: these first), "
                        "the finished part of the pairs both have; compute only the rest")
    k.add_argument("--dry-run", action="store_true",
                   help="with --out K.zarr: print the plan, sizes and a time estimate; compute nothing")
    k.set_defaults(func=cmd_kernel, checkpointed=True, store_ok=True)

    i = sub.add_parser("info", help="versions, devices, architectures and their grids")
    i.add_argument("store", nargs="?", help="a kernel store K.zarr (shape, dtype, tiles done/total, bad tiles, provenance) "
                        "or a tile archive folder (tiles archived/total)")
    i.add_argument("--arch", help="show the layers and grids of this architecture")
    i.add_argument("--shape", help="input spatial shape, e.g. 32x32 (default)")
    i.add_argument("--readout", help="readout correlation, as for `cnngp kernel`")
    i.add_argument("--json", action="store_true",
                   help="the full record as JSON (of a store, an archive, --arch, or the machine; "
                        "default: a short summary)")
    i.set_defaults(func=cmd_info)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return p


#: other modules add commands here: functions taking the subparsers object
_EXTRA_COMMANDS: list = []


def _register_optional_commands():
    import importlib

    for mod in ("cnngp.cli.sweep", "cnngp.cli.montecarlo", "cnngp.cli.learn", "cnngp.cli.compare",
                "cnngp.cli.ensemble"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        if m.register not in _EXTRA_COMMANDS:
            _EXTRA_COMMANDS.append(m.register)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


#: library argument names -> the flag a command-line user typed
_FLAGS = {
    "arch": "--arch", "model": "--arch", "body": "--arch", "network": "--arch",
    "spec": "--arch", "layer": "--arch", "x1": "--x1", "x2": "--x2", "n": "--n", "ns": "--n",
    "folds": "--folds", "n_test": "--n-test", "test": "--test", "seed": "--seed",
    "family": "--family", "dtype": "--dtype", "device": "--device", "width": "--width",
    "n_samples": "--samples", "n_outputs": "--outputs", "batch": "--batch",
    "batch_size": "--batch-size", "memory_budget": "--memory-budget",
    "kernel_cache": "--kernel-cache", "lengthscales": "--lengthscales", "kernel_store": "--store",
    "engine": "--engine", "threads": "--threads-per-worker", "workers": "--workers", "tile": "--tile",
    "spectral_mixture": "--spectral-mixture", "dataset": "--data", "zca": "--zca", "zca_fit": "--zca-fit",
    "zca_fit_outside": "--zca-fit-outside", "zca_mirror": "--zca-mirror",
    "times": "--times", "learning_rate": "--learning-rate", "noise_variance": "--noise-variance",
    "flip": "--flip", "index": "--index", "other": "--other", "layout": "--layout", "params": "--params", "shift": "--shift", "starts": "--starts",
    "store": "--store", "scheduler": "--scheduler",
}


def _name_flag(text: str) -> str:
    """A library message ``"n=4 does not divide ..."`` or ``"layer 0: ..."`` becomes
    ``"--n: n=4 does not divide ..."``: every message names the flag, mapped in one place."""
    import re

    if text.startswith("--"):
        return text
    m = re.match(r"(\w+)(?=[:= ]|$)", text)
    if m and m.group(1) in _FLAGS:
        flag = _FLAGS[m.group(1)]
        if text[m.end():].startswith(":"):  # "zca: ..." → "--zca: ...", not "--zca: zca: ..."
            return flag + text[m.end():]
        return f"{flag}: {text}"
    return text


def _interrupt_behind(e: BaseException):
    """The KeyboardInterrupt (or Terminated) an exception was raised from, if any: found in its
    chain or, where something replaced it with no link to it (numpy, interrupted while it
    initialises its extension, raises ImportError), the signal :mod:`cnngp.cli.signals` recorded."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, KeyboardInterrupt):
            return e
        e = e.__cause__ or e.__context__
    last = received.interrupted()
    if last is None:
        return None
    return Terminated() if last == signal.SIGTERM else KeyboardInterrupt()


def _on_sigterm(signum, frame):
    received.SIGNALS_SEEN.append(signum)
    raise Terminated()


def _store_of(args) -> str | None:
    """The kernel store this command writes (``--out K.zarr`` or ``--store``), if it exists."""
    if args is None:
        return None
    for flag in ("store", "out"):
        path = getattr(args, flag, None)
        if path is not None and str(path).rstrip("/").lower().endswith(".zarr") and (Path(path) / "zarr.json").is_file():
            return str(path)
    return None


def _store_laid_out(path) -> bool:
    """Whether the kernel store at ``path`` was created to the end (``complete_layout``, written
    last): one stopped while its arrays were being made cannot resume."""
    import json

    try:
        with open(Path(path) / "zarr.json") as f:
            attrs = json.load(f).get("attributes", {})
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(attrs, dict) and bool(attrs.get("complete_layout"))


def _workers_words(by_workers: dict) -> str:
    """"; 12 tile(s) computed by cluster workers (3 not yet checked ...)" for ``cnngp info``."""
    checked, unchecked = by_workers.get("checked", 0), by_workers.get("unchecked", 0)
    if not checked and not unchecked:
        return ""
    return (f"; {checked + unchecked} tile(s) computed by cluster workers"
            + (f" ({unchecked} not yet checked against this machine: the next run on the store checks them)"
               if unchecked else ", each worker checked"))


def _interrupted(args, code: int, what: str, stop: BaseException) -> int:
    ckpt = getattr(args, "checkpoint_path", None) if args is not None else None
    failed = getattr(stop, "checkpoint_error", None)
    store = _store_of(args)
    if store is not None and not _store_laid_out(store):
        text = f"{what}; {store} was stopped while it was being created (before any tile): delete it and run again"
    elif store is not None:
        beside = " and the stores beside it" if getattr(args, "command", None) in ("sweep", "learn") else ""
        text = f"{what}; the finished tiles are in {store}{beside}: rerun the same command to resume"
    elif ckpt and Path(ckpt).is_file() and failed:
        text = f"{what}; saving progress failed ({failed}); the previous checkpoint {ckpt} still resumes"
    elif ckpt and Path(ckpt).is_file():
        text = f"{what}; progress saved to {ckpt}: rerun the same command to resume"
    elif failed:
        text = f"{what}; saving progress failed ({failed}); no output written"
    else:
        text = f"{what}; no output written"
    print(f"cnngp: {' '.join(text.split())}", file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning during a command is one line on stderr, as errors are."""
    print(f"cnngp: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    """Run one command; returns the exit status (0, 2 for user errors, 130/143 when
    interrupted, 1 for a bug). Never raises, never prints a traceback (set CNNGP_DEBUG=1
    to see one for a bug). Warnings are printed as one line each."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


def _main(argv=None) -> int:
    args = None
    previous = None
    del received.SIGNALS_SEEN[:]  # signals of an earlier in-process call are not this one's
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        # the commands' modules import torch, which initialises in C++ and calls back into
        # Python, where a KeyboardInterrupt would abort the process: a Ctrl-C waits for it
        with received.deferred_interrupts():
            import torch  # noqa: F401

            _register_optional_commands()
        if list(sys.argv[1:] if argv is None else argv)[:1] == ["--version"]:
            return _print_version()
        args = build_parser().parse_args(argv)
        preflight(args)
        return int(args.func(args) or 0)
    except Terminated as e:
        return _interrupted(args, 143, "terminated (SIGTERM)", e)
    except KeyboardInterrupt as e:
        return _interrupted(args, 130, "interrupted", e)
    except CNNGPError as e:
        print(f"cnngp: error: {_name_flag(_one_line(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cnngp info | head`: the reader left; end quietly, as shells do
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except MemoryError:
        print("cnngp: error: out of memory (the job's size: images, grid, readouts, --memory-budget); "
              "use fewer images, a smaller grid, fewer readouts, a smaller --memory-budget or "
              "--batch-size", file=sys.stderr)
        return 2
    except OSError as e:  # the file system or the machine, not cnngp: name what failed
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"cnngp: error: {where}{e.strerror or _one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        stop = _interrupt_behind(e)
        if stop is not None:  # e.g. numpy turns a Ctrl-C during its import into ImportError
            code = 143 if isinstance(stop, Terminated) else 130
            return _interrupted(args, code, "terminated (SIGTERM)" if code == 143 else "interrupted", stop)
        text = _one_line(e)
        if isinstance(e, RuntimeError) and ("allocate" in text or "out of memory" in text):
            print(f"cnngp: error: out of memory (the job's size: images, grid, readouts, --memory-budget: "
                  f"{text[:200]}); use fewer images, a smaller grid, fewer readouts, a smaller "
                  "--memory-budget or --batch-size", file=sys.stderr)
            return 2
        if os.environ.get("CNNGP_DEBUG"):
            raise
        print(f"cnngp: internal error (a bug; rerun with CNNGP_DEBUG=1 for the traceback and "
              f"please report it): {type(e).__name__}: {text[:300]}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry() -> None:  # pragma: no cover - exercised by the subprocess tests
    """The ``cnngp`` console script: :func:`main`, then a fast exit.

    Every output file is complete and closed when :func:`main` returns (atomic writes), so the
    interpreter's teardown — about 0.7 s of freeing torch's and numba's module state on this
    machine — has nothing left to do for us and is skipped with ``os._exit``.
    """
    try:
        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
        code = 130
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get("CNNGP_SLOW_EXIT"):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()

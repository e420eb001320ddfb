"""The command line's bad-input contract, as one table.

For every user error, every command (``kernel``, ``sweep``, ``montecarlo``, ``info``,
``correlation-figure``) must:

1. exit with status 2;
2. print exactly one line on stderr, starting ``cnngp: error: `` (argparse's own errors
   included: no multi-line usage block);
3. name the offending argument (the flag, e.g. ``--x1``) in that line;
4. leave the working folder exactly as it was: no output, no checkpoint, no ``*.partial``
   temporary file, inputs (and a symlink's target) unchanged;
5. print nothing on stdout.

:func:`test_bad_input` runs every case of :data:`CASES` in-process through
:func:`cnngp.cli.main.main` (fast); :func:`test_bad_input_console_script` runs a few of them through
the real console script, which also checks that no Python traceback appears.

Each case's regex requires the flag plus one key word, not an exact wording. The inputs are
tiny (3 images of 4x4) and the networks small (``cnngp1``), so a case that wrongly succeeds
still finishes quickly; each in-process case also runs under a guard (a wall-clock alarm and
an address-space cap) so that one which starts real work fails instead of hanging the suite.
Cases marked ``quick`` (absurd sizes) must be refused within :data:`QUICK_S` seconds.

``python tests/test_bad_input_table.py`` runs every case and prints a Markdown table
(case id | command line | exit status | message).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from cnngp.cli.main import main
from cnngp.engine.distributed import store_kernel

#: seconds after which an in-process case is interrupted (it started real work)
GUARD_S = 60.0
#: seconds within which a ``quick`` case (an absurd size) must be refused
QUICK_S = 5.0
#: extra address space a case may take on top of what the process already has
GUARD_BYTES = 8 * 1024**3

PREFIX = "cnngp: error: "


# -- the regexes: the flag plus one key word ---------------------------------------------------


def need(flag: str, *words: str) -> str:
    """A regex matching a line that names ``flag`` (as a whole flag) and any of ``words``.

    ``need("--n", "integer")`` matches ``--n: expected an integer`` but not ``--n-test: …``.
    """
    flag_re = rf"(?<![\w-]){re.escape(flag)}(?![\w-])"
    pattern = rf"(?=.*{flag_re})"
    if words:
        pattern += rf"(?=.*(?:{'|'.join(words)}))"
    return pattern


REQUIRED = ("required", "missing")
UNKNOWN = ("unknown", "unrecognized", "invalid", "not recognised", "not recognized")
NOT_FOUND = ("not found", "does not exist", "no such", "missing")
FOLDER = ("folder", "directory", "not a file", "not a regular file")
INTEGER = ("integer", r"\bint\b", ">= ?1", ">= ?2", "positive")
SIZE = ("size", "bytes", ">= ?1", "positive", "finite")
LENGTHSCALE = ("number", ">= ?0", "lengthscale", "inf")
NOT_A_FOLDER = ("folder", "directory", "not a", "cannot write")
OUT_FOLDER = FOLDER + ("file name", "expected a .*file")
REGULAR = ("regular file", "not a file", "device", "fifo", "pipe", "symlink", "symbolic link", "special")


# -- the cases ---------------------------------------------------------------------------------


class Case(NamedTuple):
    id: str
    argv: list[str]
    regex: str
    quick: bool = False  # absurd size: must be refused within QUICK_S


def _edit(base: list[str], *extra: str, **changes: str | None) -> list[str]:
    """``base`` with flags replaced (``x1="y.npz"``), dropped (``out=None``), or added (extra)."""
    argv = list(base)
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        i = argv.index(flag)
        if value is None:
            del argv[i : i + 2]
        else:
            argv[i + 1] = value
    return argv + list(extra)


K = ["kernel", "--arch", "cnngp1", "--x1", "x.npz", "--out", "k.npz", "--quiet"]
S = ["sweep", "--arch", "cnngp1", "--data", "data.npz", "--n", "4", "--folds", "2",
     "--lengthscales", "1", "--out", "sw", "--quiet"]
M = ["montecarlo", "--arch", "cnngp1", "--x1", "x.npz", "--width", "4", "--samples", "2",
     "--out", "mc.json", "--quiet"]
I = ["info", "--arch", "cnngp1", "--shape", "4x4"]
F = ["correlation-figure", "--x", "x.npz", "--out", "fig.png", "--depth", "1", "--widths", "2",
     "--draws", "2", "--samples", "2", "--mc-width", "2", "--mc-lengthscales", "1",
     "--positions", "0,0,3,3", "--shift", "1", "--quiet"]


def k(*extra, **changes):
    return _edit(K, *extra, **changes)


def s(*extra, **changes):
    return _edit(S, *extra, **changes)


def m(*extra, **changes):
    return _edit(M, *extra, **changes)


def i(*extra, **changes):
    return _edit(I, *extra, **changes)


def f(*extra, **changes):
    return _edit(F, *extra, **changes)


CASES: list[Case] = [
    # -- the parser itself
    Case("no-command", [], need("command", *REQUIRED, "choose")),
    Case("unknown-command", ["frobnicate"], need("frobnicate", *UNKNOWN, "choice")),
    Case("top-level-unknown-flag", ["--frob", "info"], need("--frob", *UNKNOWN)),
    # -- kernel: flags
    Case("kernel-missing-arch", k(arch=None), need("--arch", *REQUIRED)),
    Case("kernel-missing-x1", k(x1=None), need("--x1", *REQUIRED)),
    Case("kernel-missing-out", k(out=None), need("--out", *REQUIRED)),
    Case("kernel-unknown-flag", k("--frob", "1"), need("--frob", *UNKNOWN)),
    Case("kernel-arch-missing-value", ["kernel", "--x1", "x.npz", "--out", "k.npz", "--arch"],
         need("--arch", "argument", "expected")),
    # -- kernel: --arch names
    Case("kernel-arch-unknown", k(arch="resnet50"), need("--arch", "unknown")),
    Case("kernel-arch-cnngp0", k(arch="cnngp0"), need("--arch", "depth", ">= ?1")),
    Case("kernel-arch-cnngp-1", k(arch="cnngp-1"), need("--arch", "unknown", "depth")),
    Case("kernel-arch-absurd-depth", k(arch="cnngp100000000"),
         need("--arch", "depth", "too deep", "too many", "large", "at most"), quick=True),
    # -- kernel: --arch spec files
    Case("kernel-spec-missing", k(arch="missing.json"), need("--arch", *NOT_FOUND)),
    Case("kernel-spec-weight-var-string", k(arch="string_weight_var.json"),
         need("--arch", "weight_var.*must be a number.*layer 0|layer 0.*weight_var.*must be a number")),
    Case("kernel-width-without-standard", k("--width", "8"), need("--width", "--parameterization standard")),
    Case("kernel-spec-folder", k(arch="specdir.json"), need("--arch", *FOLDER)),
    Case("kernel-spec-invalid-json", k(arch="invalid.json"), need("--arch", "JSON")),
    Case("kernel-spec-json-list", k(arch="list.json"), need("--arch", "object", "list")),
    Case("kernel-spec-unknown-key", k(arch="unknown_key.json"), need("--arch", "unknown key")),
    Case("kernel-spec-deeply-nested", k(arch="deep.json"), need("--arch", "nest", "deep", "JSON")),
    Case("kernel-spec-user-without-matrix", k(arch="user_no_matrix.json"), need("--arch", "missing key")),
    Case("kernel-spec-mixture-strings", k(arch="mixture_strings.json"), need("--arch", "expected numbers")),
    Case("kernel-spec-erf-huge", k(arch="erf_huge.json"), need("--arch", "magnitude at most")),
    Case("kernel-spec-sin-huge", k(arch="sin_huge.json"), need("--arch", "magnitude at most")),
    Case("sweep-spec-no-grid", s(arch="no_grid.json"), need("--arch", "no spatial grid")),
    Case("sweep-out-empty", s(out=""), need("--out", "is empty")),
    Case("sweep-data-empty", s(data=""), need("--data", "is empty")),
    Case("kernel-x1-colon-without-array", k(x1="x.npz:"), need("--x1", "no array after the colon")),
    Case("info-store-empty", ["info", ""], "info STORE: is empty"),
    Case("sweep-lengthscales-empty-item", s(lengthscales="1,,2"), need("--lengthscales", "an empty item")),
    Case("sweep-n-trailing-comma", s(n="4,"), need("--n", "an empty item")),
    Case("figure-widths-empty-item", f(widths="2,,4"), need("--widths", "integers")),
    Case("figure-shift-beyond-width", f(shift="4"), need("--shift", "width")),
    Case("figure-conv-lengthscale-negative", f("--conv-lengthscale", "-1"), need("--conv-lengthscale", "number >= 0")),
    Case("figure-sidecar-is-someone-elses", f(out="notes.png"), need("--out", "not a cnngp figure")),
    Case("sweep-out-is-a-store", s(out="made.zarr"), need("--out", "Zarr folder")),
    Case("sweep-all-zero-images", s(data="zeros.npz"), need("--data", "zero on the diagonal")),
    Case("kernel-spec-negative-lengthscale", k(arch="neg_lengthscale.json"),
         need("--arch", "lengthscale")),
    # -- kernel: --x1 / --x2 images
    Case("kernel-x1-missing", k(x1="missing.npz"), need("--x1", *NOT_FOUND)),
    Case("kernel-x1-folder", k(x1="adir"), need("--x1", *FOLDER)),
    Case("kernel-x1-not-npz", k(x1="not_npz.npz"), need("--x1", "npz", "archive")),
    Case("kernel-x1-npz-no-default-array", k(x1="two.npz"), need("--x1", "array")),
    Case("kernel-x1-npz-array-missing", k(x1="x.npz:nope"), need("--x1", "nope")),
    Case("kernel-x1-object-array", k(x1="object.npz"), need("--x1", "object", "pickle", "dtype")),
    Case("kernel-x1-complex", k(x1="complex.npz"), need("--x1", "complex", "dtype")),
    Case("kernel-x1-member-cut-short", k(x1="member_cut.npz"), need("--x1", "truncated or damaged")),
    Case("kernel-x1-member-without-header", k(x1="member_headless.npz"), need("--x1", "truncated or damaged")),
    Case("sweep-data-member-cut-short", s(data="data_cut.npz"), need("--data", "truncated or damaged")),
    # int16 is not bad input: integers other than uint8 are taken as the numbers they hold,
    # the same in the CLI, API, sweep and estimators (tests/test_data.py checks that)
    Case("kernel-x1-beyond-pixel-bound", k(x1="above-bound.npz"), need("--x1", "pixel values", "1e\\+08")),
    Case("kernel-x1-strings", k(x1="strings.npz"), need("--x1", "numeric", "dtype", "string")),
    Case("kernel-x1-nan", k(x1="nan.npz"), need("--x1", "NaN")),
    Case("kernel-x1-inf", k(x1="inf.npz"), need("--x1", "inf")),
    Case("kernel-x1-huge-values", k(x1="huge.npz"),
         need("--x1", "large", "overflow", "huge", "range", "magnitude", "finite")),
    Case("kernel-x1-empty", k(x1="empty.npz"), need("--x1", "empty")),
    Case("kernel-x1-2d", k(x1="two_d.npz"), need("--x1", "shape", "axes", "dimension")),
    Case("kernel-x1-6d", k(x1="six_d.npz"), need("--x1", "shape", "axes", "dimension")),
    Case("kernel-x2-channel-mismatch", k("--x2", "x3.npz"), need("--x2", "channel", "shape", "match")),
    Case("kernel-x2-missing", k("--x2", "missing.npz"), need("--x2", *NOT_FOUND)),
    Case("kernel-x1-digits-0", k(x1="digits:0"), need("--x1", "digits")),
    Case("kernel-x1-digits-abc", k(x1="digits:abc"), need("--x1", "digits")),
    Case("kernel-x1-digits-99999", k(x1="digits:99999"), need("--x1", "digits")),
    # -- kernel: --out
    Case("kernel-out-empty", k(out=""), need("--out", "empty", "path")),
    Case("kernel-out-existing-folder", k(out="adir"), need("--out", *OUT_FOLDER)),
    Case("kernel-out-missing-parent", k(out="nope/k.npz"), need("--out", "folder", *NOT_FOUND)),
    Case("kernel-out-inside-regular-file", k(out="x.npz/k.npz"), need("--out", *NOT_A_FOLDER)),
    Case("kernel-out-dev-null", k(out="/dev/null"), need("--out", *REGULAR)),
    Case("kernel-out-fifo", k(out="fifo"), need("--out", *REGULAR)),
    Case("kernel-out-symlink", k(out="link.npz"), need("--out", *REGULAR)),
    # -- kernel: precision, device, memory, batches
    Case("kernel-dtype-float16", k("--dtype", "float16"), need("--dtype", "float16", "choice")),
    Case("kernel-device-meta", k("--device", "meta"), need("--device", "meta")),
    Case("kernel-device-nonsense", k("--device", "nonsense"), need("--device", "device", "nonsense")),
    Case("kernel-device-cpu-index", k("--device", "cpu:5"), need("--device", "cpu:5", "one device", "give 'cpu'")),
    Case("kernel-device-cuda-absent", k("--device", "cuda"), need("--device", "CUDA", "cuda")),
    Case("kernel-memory-budget-inf", k("--memory-budget", "inf"), need("--memory-budget", *SIZE)),
    Case("kernel-memory-budget-negative", k("--memory-budget=-1"), need("--memory-budget", *SIZE)),
    Case("kernel-memory-budget-0", k("--memory-budget", "0"), need("--memory-budget", *SIZE)),
    Case("kernel-memory-budget-abc", k("--memory-budget", "abc"), need("--memory-budget", *SIZE)),
    Case("kernel-memory-budget-nan", k("--memory-budget", "nan"), need("--memory-budget", *SIZE)),
    Case("kernel-zca-negative", k("--zca=-0.1"), need("--zca", "number >= 0")),
    Case("kernel-zca-nan", k("--zca", "nan"), need("--zca", "number >= 0")),
    Case("kernel-zca-abc", k("--zca", "abc"), need("--zca", "number >= 0")),
    Case("kernel-zca-0-rank-deficient", k("--zca", "0"), need("--zca", "full-rank")),
    Case("sweep-zca-inf", s("--zca", "inf"), need("--zca", "number >= 0")),
    Case("kernel-zca-huge", k("--zca", "1e50"), need("--zca", "above 1e\\+06")),
    Case("kernel-zca-tiny", k("--zca", "1e-300"), need("--zca", "below 1e-12")),
    Case("sweep-zca-huge", s("--zca", "1e300"), need("--zca", "above 1e\\+06")),
    # -- an output that is an input file: refused before it is overwritten
    Case("kernel-out-is-x1", k(out="x.npz"), need("--out", "input file of --x1")),
    Case("kernel-out-is-x2", k("--x2", "two.npz:a", out="./two.npz"), need("--out", "input file of --x2")),
    Case("montecarlo-out-is-x1", m(out="x.npz"), need("--out", "input file of --x1")),
    Case("figure-out-is-x", f(out="x.npz"), need("--out", "input file of --x")),
    Case("sweep-zca-0-rank-deficient", s("--zca", "0"), need("--zca", "full-rank")),
    Case("kernel-flip-asymmetric-net", k("--flip", arch="even_filter.json"), need("--flip", "not flip-symmetric")),
    Case("kernel-flip-asymmetric-store", k("--flip", arch="even_filter.json", out="k.zarr"),
         need("--flip", "not flip-symmetric")),
    Case("sweep-flip-asymmetric-net", s("--flip", arch="even_filter.json"), need("--flip", "not flip-symmetric")),
    Case("kernel-batch-size-0", k("--batch-size", "0"), need("--batch-size", *INTEGER)),
    Case("kernel-batch-size-negative", k("--batch-size=-3"), need("--batch-size", *INTEGER)),
    Case("kernel-batch-size-x", k("--batch-size", "x"), need("--batch-size", *INTEGER)),
    # -- kernel: readout and lengthscales
    Case("kernel-lengthscales-empty", k("--lengthscales", ""), need("--lengthscales", "list", "empty")),
    Case("kernel-lengthscales-a-b", k("--lengthscales", "a,b"), need("--lengthscales", *LENGTHSCALE)),
    Case("kernel-lengthscales-negative", k("--lengthscales=-1"), need("--lengthscales", *LENGTHSCALE)),
    Case("kernel-lengthscales-nan", k("--lengthscales", "nan"), need("--lengthscales", *LENGTHSCALE)),
    Case("kernel-lengthscales-with-readout", k("--lengthscales", "1,2", "--readout", "constant"),
         need("--lengthscales", "--readout") + need("--readout", "conflict", "together", "both",
                                                     "either", "not with", "cannot", "exclusive")),
    Case("kernel-family-unknown", k("--lengthscales", "1", "--family", "cauchy"),
         need("--family", "cauchy", "choice")),
    Case("kernel-family-without-lengthscales", k("--family", "rbf"),
         need("--family", "only meaningful", "--lengthscales")),
    Case("kernel-readout-unknown", k("--readout", "cauchy:2"), need("--readout", "unknown")),
    Case("kernel-readout-matern32-no-lengthscale", k("--readout", "matern32"), need("--readout", "lengthscale")),
    Case("kernel-readout-matern32-negative", k("--readout", "matern32:-2"), need("--readout", *LENGTHSCALE)),
    Case("kernel-workers-1000", k("--workers", "1000", "--memory-budget", "1M", "--dry-run", out="k.zarr"),
         need("--workers", "memory", "per worker"), quick=True),
    Case("kernel-threads-per-worker-1000", k("--threads-per-worker", "1000", "--dry-run", out="k.zarr"),
         need("--threads-per-worker", "cores"), quick=True),
    Case("kernel-archive-without-store", k("--archive", "arch"), need("--archive", "needs --out K.zarr")),
    Case("kernel-archive-foreign-folder", k("--archive", "adir", out="k.zarr"), need("--archive", "not a tile archive")),
    Case("kernel-archive-is-a-file", k("--archive", "x.npz", out="k.zarr"), need("--archive", "not a folder")),
    # -- sweep
    Case("sweep-n-0", s(n="0"), need("--n", *INTEGER)),
    Case("sweep-n-7-abc", s(n="7,abc"), need("--n", *INTEGER)),
    Case("sweep-n-not-dividing", s(n="4,6"), need("--n", "divid")),
    Case("sweep-folds-1", s(folds="1"), need("--folds", *INTEGER)),
    Case("sweep-seed-negative", s("--seed=-1"), need("--seed", *INTEGER, ">= ?0")),
    Case("sweep-n-test-without-test", s("--n-test", "2"), need("--n-test", "--test")),
    Case("sweep-data-missing", s(data="missing.npz"), need("--data", *NOT_FOUND)),
    Case("sweep-data-one-class", s(data="one_class.npz"), need("--data", "only 1 class", "at least 2 classes")),
    Case("sweep-data-without-y-train", s(data="no_labels.npz"), need("--data", "y_train")),
    Case("sweep-data-labels-not-class-indices", s(data="sparse_labels.npz"),
         need("--data", "class indices"), quick=True),
    Case("sweep-kernel-cache-folder", s("--kernel-cache", "adir"), need("--kernel-cache", *FOLDER)),
    Case("sweep-arch-unknown", s(arch="resnet50"), need("--arch", "unknown")),
    Case("sweep-out-inside-regular-file", s(out="x.npz/sw"), need("--out", *NOT_A_FOLDER)),
    Case("sweep-lengthscales-negative", s(lengthscales="-1"), need("--lengthscales", *LENGTHSCALE)),
    Case("sweep-memory-budget-nan", s("--memory-budget", "nan"), need("--memory-budget", *SIZE)),
    Case("sweep-unknown-flag", s("--frob"), need("--frob", *UNKNOWN)),
    Case("sweep-archive-without-store", s("--archive", "arch"), need("--archive", "needs --store K.zarr")),
    Case("sweep-archive-foreign-folder", s("--store", "k.zarr", "--archive", "adir"),
         need("--archive", "not a sweep.s tile archive")),
    # -- montecarlo
    Case("montecarlo-missing-width", m(width=None), need("--width", *REQUIRED)),
    Case("montecarlo-width-0", m(width="0"), need("--width", *INTEGER)),
    Case("montecarlo-width-abc", m(width="abc"), need("--width", *INTEGER)),
    Case("montecarlo-width-absurd", m(width="100000000"),
         need("--width", "memory", "bytes", "GB", "GiB", "TB", "TiB"), quick=True),
    Case("montecarlo-samples-1", m(samples="1"), need("--samples", *INTEGER)),
    Case("montecarlo-samples-days-without-yes", m(samples="1000000000"),
         need("--samples", "pass --yes"), quick=True),
    Case("montecarlo-n2-without-x2", m("--n2", "1"), need("--n2", "only meaningful", "--x2")),
    Case("montecarlo-outputs-0", m("--outputs", "0"), need("--outputs", *INTEGER)),
    Case("montecarlo-seed-negative", m("--seed=-1"), need("--seed", *INTEGER, ">= ?0")),
    Case("montecarlo-arch-without-readout", m(arch="no_readout.json"), need("--arch", "readout")),
    Case("montecarlo-x1-nan", m(x1="nan.npz"), need("--x1", "NaN")),
    Case("montecarlo-x2-channel-mismatch", m("--x2", "x3.npz"), need("--x2", "channel", "shape", "match")),
    Case("montecarlo-out-existing-folder", m(out="adir"), need("--out", *OUT_FOLDER)),
    Case("montecarlo-device-nonsense", m("--device", "nonsense"), need("--device", "device", "nonsense")),
    Case("montecarlo-memory-budget-0", m("--memory-budget", "0"), need("--memory-budget", *SIZE)),
    Case("montecarlo-n1-beyond-images", m("--n1", "5"), need("--n1", "more than", "images")),
    Case("montecarlo-n2-beyond-images", m("--x2", "x.npz", "--n2", "9"), need("--n2", "more than", "images")),
    # -- info
    Case("info-arch-unknown", i(arch="resnet50"), need("--arch", "unknown")),
    Case("info-arch-absurd-depth", i(arch="cnngp100000000"),
         need("--arch", "depth", "too deep", "too many", "large", "at most"), quick=True),
    Case("info-shape-0x0", i(shape="0x0"), need("--shape", "shape", ">= ?1", "positive")),
    Case("info-shape-abc", i(shape="abc"), need("--shape", "shape", "expected")),
    Case("info-shape-3x", i(shape="3x"), need("--shape", "shape", "expected")),
    Case("info-readout-unknown", i("--readout", "cauchy:2"), need("--readout", "unknown")),
    Case("info-unknown-flag", i("--frob"), need("--frob", *UNKNOWN)),
    # -- correlation-figure
    Case("figure-missing-x", f(x=None), need("--x", *REQUIRED)),
    Case("figure-missing-out", f(out=None), need("--out", *REQUIRED)),
    Case("figure-x-missing", f(x="missing.npz"), need("--x", *NOT_FOUND)),
    Case("figure-x-nan", f(x="nan.npz"), need("--x", "NaN")),
    Case("figure-widths-0", f(widths="0"), need("--widths", *INTEGER)),
    Case("figure-widths-abc", f(widths="abc"), need("--widths", *INTEGER)),
    Case("figure-positions-outside", f(positions="0,0,9,9"), need("--positions", "outside")),
    Case("figure-positions-three", f(positions="0,0,3"), need("--positions", "four")),
    Case("figure-draws-1", f(draws="1"), need("--draws", *INTEGER)),
    Case("figure-depth-0", f(depth="0"), need("--depth", *INTEGER)),
    Case("figure-index-out-of-range", f("--index", "99"), need("--index", "0\\.\\.", "range", "index")),
    Case("figure-mc-lengthscales-negative", f("--mc-lengthscales=-1"), need("--mc-lengthscales", *LENGTHSCALE)),
    Case("figure-out-existing-folder", f(out="adir"), need("--out", *OUT_FOLDER)),
    Case("figure-out-missing-parent", f(out="nope/fig.png"), need("--out", "folder", *NOT_FOUND)),
]

#: cases also run through the real console script (end to end)
CONSOLE_CASES = [
    "no-command",
    "kernel-missing-out",
    "kernel-spec-deeply-nested",
    "kernel-x1-huge-values",
    "montecarlo-width-0",
    "sweep-folds-1",
]

_BY_ID = {c.id: c for c in CASES}
assert len(_BY_ID) == len(CASES), "duplicate case ids"
assert all(c in _BY_ID for c in CONSOLE_CASES)


# -- the inputs --------------------------------------------------------------------------------


def make_inputs(folder: Path) -> None:
    """The small files the cases name, written into ``folder``."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(3, 4, 4, 1))
    np.savez(folder / "x.npz", x=x)
    np.savez(folder / "x3.npz", x=rng.uniform(size=(2, 4, 4, 3)))
    np.savez(folder / "two.npz", a=x, b=x)
    np.savez(folder / "object.npz", x=np.array([x[0], "pixels"], dtype=object))
    np.savez(folder / "complex.npz", x=x.astype(np.complex128) * (1 + 1j))
    np.savez(folder / "above-bound.npz", x=np.full(x.shape, 1e9))  # finite, above |x| <= 1e8
    np.savez(folder / "strings.npz", x=np.full((3, 4, 4, 1), "a"))
    bad = x.copy()
    bad[0, 0, 0, 0] = np.nan
    np.savez(folder / "nan.npz", x=bad)
    bad = x.copy()
    bad[1, 2, 2, 0] = np.inf
    np.savez(folder / "inf.npz", x=bad)
    np.savez(folder / "huge.npz", x=np.full((3, 4, 4, 1), 1e300))
    np.savez(folder / "empty.npz", x=np.zeros((0, 4, 4, 1)))
    np.savez(folder / "two_d.npz", x=np.zeros((4, 4)))
    np.savez(folder / "six_d.npz", x=np.zeros((1, 2, 2, 2, 2, 1)))
    (folder / "not_npz.npz").write_text("this is not a zip archive\n")
    # a zip whose .npy member was cut short (an interrupted copy): numpy says "pickled" or EOF
    member = io.BytesIO()
    np.save(member, x)
    member = member.getvalue()
    with zipfile.ZipFile(folder / "member_cut.npz", "w") as z:
        z.writestr("x.npy", member[: len(member) // 2])
    with zipfile.ZipFile(folder / "member_headless.npz", "w") as z:
        z.writestr("x.npy", member[:4])
    with zipfile.ZipFile(folder / "data_cut.npz", "w") as z:
        z.writestr("x_train.npy", member[: len(member) // 2])
        z.writestr("y_train.npy", member[:4])
    (folder / "adir").mkdir()
    (folder / "adir" / "keep.txt").write_text("a file in a folder\n")
    # a tiny classification data set: 2 classes, 12 training and 4 test images
    np.savez(folder / "data.npz", x_train=rng.uniform(size=(12, 4, 4, 1)), y_train=np.arange(12) % 2,
             x_test=rng.uniform(size=(4, 4, 4, 1)), y_test=np.arange(4) % 2)
    # labels that are not class indices: 0, 1e15, ..., 9e15 (once: 9e15 + 1 classes)
    np.savez(folder / "sparse_labels.npz", x_train=rng.uniform(size=(20, 4, 4, 1)),
             y_train=np.tile(np.arange(10, dtype=np.int64) * 10**15, 2))
    np.savez(folder / "one_class.npz", x_train=rng.uniform(size=(12, 4, 4, 1)), y_train=np.zeros(12, dtype=np.int64),
             x_test=rng.uniform(size=(4, 4, 4, 1)), y_test=np.zeros(4, dtype=np.int64))
    np.savez(folder / "no_labels.npz", x_train=rng.uniform(size=(12, 4, 4, 1)))
    # architecture files
    (folder / "specdir.json").mkdir()
    (folder / "invalid.json").write_text("{not json")
    (folder / "list.json").write_text(json.dumps([{"type": "conv"}, {"type": "relu"}]))
    (folder / "unknown_key.json").write_text(json.dumps(
        {"layers": [{"type": "conv"}, {"type": "relu"}, {"type": "readout"}], "bogus": 1}))
    (folder / "deep.json").write_text("[" * 100_000)
    (folder / "neg_lengthscale.json").write_text(json.dumps({"layers": [
        {"type": "conv", "correlation": {"type": "matern", "nu": 1.5, "lengthscale": -1}},
        {"type": "relu"}, {"type": "readout"}]}))
    (folder / "string_weight_var.json").write_text(json.dumps({"layers": [
        {"type": "conv", "weight_var": "1"}, {"type": "relu"}, {"type": "readout"}]}))
    layers = lambda *middle: json.dumps({"layers": [{"type": "conv"}, *middle, {"type": "readout"}]})  # noqa: E731
    (folder / "user_no_matrix.json").write_text(json.dumps({"layers": [
        {"type": "conv"}, {"type": "relu"}, {"type": "readout", "correlation": {"type": "user"}}]}))
    (folder / "mixture_strings.json").write_text(json.dumps({"layers": [
        {"type": "conv"}, {"type": "relu"}, {"type": "readout", "correlation": {
            "type": "spectral_mixture", "weights": "a", "means": [[0, 0]], "lengthscales": [[1, 1]]}}]}))
    (folder / "erf_huge.json").write_text(layers({"type": "erf", "a": 1e200}))
    (folder / "sin_huge.json").write_text(layers({"type": "sin", "b": 1e200}))
    (folder / "no_grid.json").write_text(layers({"type": "relu"}, {"type": "flatten"}))
    np.savez(folder / "zeros.npz", x_train=np.zeros((12, 4, 4, 1)), y_train=np.arange(12) % 2)
    (folder / "notes.json").write_text('{"mine": "not a figure sidecar"}')
    (folder / "made.zarr").mkdir()  # a Zarr folder's marker: results must not go in it
    (folder / "made.zarr" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    (folder / "no_readout.json").write_text(json.dumps({"layers": [{"type": "conv"}, {"type": "relu"}]}))
    (folder / "even_filter.json").write_text(json.dumps({"layers": [  # same padding, one pixel after
        {"type": "conv", "filter": 2}, {"type": "relu"}, {"type": "readout"}]}))
    # outputs that are not regular files
    os.mkfifo(folder / "fifo")
    (folder / "target.txt").write_text("the symlink's target: must stay as it is\n")
    os.symlink("target.txt", folder / "link.npz")


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder``: kind and content hash (files), target (links). Never
    opens anything but regular files (a FIFO would block)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            rel = str(p.relative_to(folder))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("special", stat.S_IFMT(st.st_mode))
    return out


def _describe_change(before: dict, after: dict) -> str:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(p for p in set(before) & set(after) if before[p] != after[p])
    parts = [f"{what}: {names}" for what, names in
             (("new", added), ("removed", removed), ("changed", changed)) if names]
    return "; ".join(parts)


# -- the guard ---------------------------------------------------------------------------------


class CaseTimeout(BaseException):
    """Raised by the guard's alarm: a BaseException so that ``except Exception`` (and the CLI's
    ``except KeyboardInterrupt``) do not swallow it."""


class EscapedWrite(BaseException):
    """A rename onto a device file (e.g. replacing /dev/null, which root may do)."""


def _vm_size() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@contextlib.contextmanager
def guard(seconds: float):
    """Interrupt after ``seconds``; cap the address space; forbid renames onto device files.

    The rename guard protects the machine: running as root, a CLI that wrongly accepts
    ``--out /dev/null`` would atomically replace /dev/null with a regular file.
    """
    import resource

    real_replace, real_rename = os.replace, os.rename

    def _forbidden(dst) -> bool:  # an existing device file, or anything under /dev
        try:
            real = os.path.realpath(dst)
            mode = os.stat(real).st_mode
        except OSError:
            return os.path.realpath(os.path.dirname(os.path.abspath(dst))).startswith("/dev")
        return real.startswith("/dev/") or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)

    def safe_replace(src, dst, *a, **kw):
        if _forbidden(dst):
            raise EscapedWrite(f"tried to rename a file onto {os.fspath(dst)!r} (refused by the test's guard)")
        return real_replace(src, dst, *a, **kw)

    def safe_rename(src, dst, *a, **kw):
        if _forbidden(dst):
            raise EscapedWrite(f"tried to rename a file onto {os.fspath(dst)!r} (refused by the test's guard)")
        return real_rename(src, dst, *a, **kw)

    def on_alarm(signum, frame):
        raise CaseTimeout(f"still running after {seconds:g} s (it started real work)")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_size() + GUARD_BYTES
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    os.replace, os.rename = safe_replace, safe_rename
    try:
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        os.replace, os.rename = real_replace, real_rename
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class Outcome(NamedTuple):
    status: int | None  # exit status; None when main raised
    stdout: str
    stderr: str
    seconds: float
    raised: BaseException | None


def run_in_process(argv: list[str], read_output, timeout: float = GUARD_S) -> Outcome:
    """``cnngp.cli.main.main(argv)`` under :func:`guard`; ``read_output()`` → (stdout, stderr)."""
    status, raised = None, None
    start = time.perf_counter()
    try:
        with guard(timeout):
            try:
                status = main(list(argv))
            except SystemExit as e:  # argparse exits; the contract is about the status
                status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except (CaseTimeout, EscapedWrite, Exception) as e:  # noqa: BLE001 - reported per case
        raised = e
    seconds = time.perf_counter() - start
    out, err = read_output()
    return Outcome(status, out, err, seconds, raised)


def _skip_reason(case: Case) -> str | None:
    if case.id == "kernel-device-cuda-absent":
        import torch

        if torch.cuda.is_available():
            return "a CUDA device is present"
    return None


def check_contract(case: Case, outcome: Outcome, before: dict, after: dict) -> list[str]:
    """The broken clauses of the contract, as short reasons (empty: the case passes)."""
    problems = []
    if outcome.raised is not None:
        e = outcome.raised
        problems.append(f"uncaught {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    elif outcome.status != 2:
        problems.append(f"exit status {outcome.status}, expected 2")
    lines = outcome.stderr.splitlines()
    if len(lines) != 1:
        problems.append(f"stderr has {len(lines)} lines, expected 1")
    line = next((ln for ln in lines if PREFIX in ln), lines[-1] if lines else "")
    if lines and not lines[0].startswith(PREFIX):
        problems.append(f"stderr does not start with {PREFIX!r}: {lines[0][:120]!r}")
    if lines and not re.search(case.regex, line, re.IGNORECASE):
        problems.append(f"message does not match {case.regex!r}: {line[:200]!r}")
    if outcome.stdout:
        problems.append(f"stdout not empty: {outcome.stdout[:80]!r}")
    if before != after:
        problems.append("working folder changed: " + _describe_change(before, after))
    if case.quick and outcome.seconds > QUICK_S:
        problems.append(f"took {outcome.seconds:.1f} s, expected a refusal within {QUICK_S:g} s")
    if "/dev/null" in case.argv and not stat.S_ISCHR(os.stat("/dev/null").st_mode):
        problems.append("/dev/null is no longer a character device")
    return problems


# -- the tests ---------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, workdir, capsys):
    reason = _skip_reason(case)
    if reason:
        pytest.skip(reason)
    before = snapshot(workdir)
    capsys.readouterr()
    outcome = run_in_process(case.argv, lambda: tuple(capsys.readouterr()),
                             timeout=QUICK_S + 1 if case.quick else GUARD_S)
    problems = check_contract(case, outcome, before, snapshot(workdir))
    assert not problems, f"cnngp {shlex.join(case.argv)}:\n  " + "\n  ".join(problems)


def _console_script() -> str | None:
    script = Path(sys.executable).parent / "cnngp"
    return str(script) if script.exists() else None


@pytest.mark.parametrize("case_id", CONSOLE_CASES)
def test_bad_input_console_script(case_id, workdir):
    """The same contract through the installed ``cnngp`` script, and no traceback."""
    script = _console_script()
    if script is None:
        pytest.skip("no cnngp console script beside the interpreter")
    case = _BY_ID[case_id]
    before = snapshot(workdir)
    start = time.perf_counter()
    try:
        proc = subprocess.run([script, *case.argv], cwd=workdir, capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"cnngp {shlex.join(case.argv)} still running after 120 s")
    outcome = Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start, None)
    problems = check_contract(case, outcome, before, snapshot(workdir))
    if "Traceback" in proc.stderr:
        problems.append("a Python traceback on stderr")
    assert not problems, f"cnngp {shlex.join(case.argv)}:\n  " + "\n  ".join(problems)


# -- the Markdown table for the issue note -----------------------------------------------------


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table() -> int:
    """Run every case in-process and print a Markdown table; returns the number failing."""
    import io

    print("| case id | command line | exit status | message |")
    print("|---|---|---|---|")
    failing = []
    start = time.perf_counter()
    for case in CASES:
        reason = _skip_reason(case)
        cmd = "cnngp " + shlex.join(case.argv)
        if reason:
            print(f"| {case.id} | `{_markdown_cell(cmd)}` | skipped | {reason} |")
            continue
        with tempfile.TemporaryDirectory(prefix="cnngp-bad-input-") as tmp:
            folder = Path(tmp)
            make_inputs(folder)
            before = snapshot(folder)
            out, err = io.StringIO(), io.StringIO()
            cwd = os.getcwd()
            os.chdir(folder)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    outcome = run_in_process(case.argv, lambda: ("", ""),
                                             timeout=QUICK_S + 1 if case.quick else GUARD_S)
            finally:
                os.chdir(cwd)
            outcome = outcome._replace(stdout=out.getvalue(), stderr=err.getvalue())
            problems = check_contract(case, outcome, before, snapshot(folder))
        if outcome.raised is not None:
            status = f"uncaught {type(outcome.raised).__name__}"
        else:
            status = str(outcome.status)
        lines = outcome.stderr.splitlines()
        message = next((ln for ln in lines if "error" in ln), lines[-1] if lines else "")
        if len(lines) > 1:
            message = f"({len(lines)} lines) {message}"
        if outcome.raised is not None:
            message = (message + " " if message else "") + " ".join(str(outcome.raised).split())[:160]
        print(f"| {case.id} | `{_markdown_cell(cmd)}` | {status} | {_markdown_cell(message)} |", flush=True)
        if problems:
            failing.append((case.id, problems))
    seconds = time.perf_counter() - start
    print(f"\n{len(CASES)} cases in {seconds:.1f} s; {len(failing)} break the contract:\n")
    for cid, problems in failing:
        print(f"- {cid}: {'; '.join(problems)}")
    return len(failing)


# -- the library: the same contract as an exception --------------------------------------------
#
# Every user error of the Python API raises cnngp.CNNGPError (a ValueError) whose message is one
# line naming the argument; nothing else escapes (no torch RuntimeError, no TypeError).


def _api_cases():
    import math

    import cnngp
    from cnngp.inference import gp
    from cnngp.inference.estimator import CNNGPClassifier

    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    x = np.random.default_rng(0).uniform(size=(3, 4, 4, 2))
    K = np.eye(4)
    y = np.array([0, 1, 0, 1])
    call = lambda f, *a, **kw: (lambda: f(*a, **kw))  # noqa: E731
    return [
        ("api-x1-2d", call(cnngp.kernel, net, np.zeros((3, 4))), r"x1: expected images of shape"),
        ("api-x1-complex", call(cnngp.kernel, net, x.astype(complex)), r"x1: got a complex"),
        ("api-x1-strings", call(cnngp.kernel, net, np.full((1, 2, 2, 1), "a")), r"x1: got a string"),
        ("api-x1-object", call(cnngp.kernel, net, np.array([[[[None]]]])), r"x1: got a object|x1: .*object"),
        ("api-x1-nan", call(cnngp.kernel, net, np.full((1, 4, 4, 2), np.nan)), r"x1: contains 32 NaN"),
        ("api-x1-huge", call(cnngp.kernel, net, np.full((1, 4, 4, 2), 1e300)), r"x1: pixel values reach"),
        ("api-x1-empty", call(cnngp.kernel, net, np.zeros((0, 4, 4, 2))), r"x1: is empty"),
        ("api-x1-ragged", call(cnngp.kernel, net, [[1.0], [1.0, 2.0]]), r"x1: could not be read"),
        ("api-x2-shape", call(cnngp.kernel, net, x, np.zeros((1, 5, 5, 2))), r"x2: images of shape"),
        ("api-dtype", call(cnngp.kernel, net, x, dtype="float16"), r"dtype: expected 'float64' or 'float32'"),
        ("api-device-meta", call(cnngp.kernel, net, x, device="meta"), r"device: expected 'cpu'"),
        ("api-device-cuda", call(cnngp.kernel, net, x, device="cuda:7"), r"device: 'cuda:7' was requested"),
        ("api-batch-size", call(cnngp.kernel, net, x, batch_size=0), r"batch_size: expected an int >= 1"),
        ("api-model", call(cnngp.kernel, "cnngp2", x), r"model: expected a cnngp layer"),
        ("api-filter-larger", call(cnngp.kernel, cnngp.Serial(cnngp.Conv(7, padding="valid"), cnngp.Readout()), x),
         r"layer 0 .*larger than its input grid"),
        ("api-no-readout", call(cnngp.kernel, cnngp.Serial(cnngp.Conv(3)), x), r"model: ends on a spatial grid"),
        ("api-lengthscale-negative", call(cnngp.Matern, 1.5, -1.0), r"lengthscale: expected a number >= 0"),
        ("api-lengthscale-nan", call(cnngp.RBF, math.nan), r"lengthscale: expected a number >= 0"),
        ("api-matern-nu", call(cnngp.Matern, 1.0, 2.0), r"nu: expected one of 0.5, 1.5, 2.5"),
        ("api-weight-var", call(cnngp.Conv, 3, weight_var=-1.0), r"weight_var: expected a finite number >= 0"),
        ("api-non-psd", call(cnngp.UserCorrelation, np.array([[1.0, 2.0], [2.0, 1.0]])), r"positive semi-definite"),
        ("api-spec-unknown-key", call(cnngp.from_spec, {"layers": [{"type": "conv", "size": 3}]}), r"unknown key"),
        ("api-arch-depth", call(cnngp.io.architectures.get, "cnngp100000000"), r"arch: cnngp<depth> needs 1 <= depth"),
        ("api-readouts-empty", call(cnngp.readout_sweep, net[:-1], [], x), r"readouts: expected a non-empty list"),
        ("api-flip-not-bool", call(cnngp.kernel, net, x, flip="yes"), r"flip: expected True, False or 'mirror'"),
        ("api-flip-asymmetric", call(cnngp.kernel, cnngp.Serial(cnngp.Conv(2), cnngp.ReLU(), cnngp.Readout()), x,
                                     flip=True), r"flip: the network is not flip-symmetric on 4×4 images"),
        ("api-flip-offsets-asymmetric", call(cnngp.offset_sums, cnngp.Serial(cnngp.Conv(2), cnngp.ReLU()), x,
                                             flip=True), r"flip: the network is not flip-symmetric on 4×4 images"),
        ("api-flip-offsets-store", call(store_kernel, net[:-1], x, out="never-made.zarr", offsets=True, flip=True),
         r"flip: flip-averaged offset sums are not stored as one"),
        ("api-gp-not-square", call(gp.cross_validate, np.ones((3, 4)), y), r"K must be a square"),
        ("api-gp-not-symmetric", call(gp.cross_validate, np.triu(np.ones((4, 4))), y), r"K is not symmetric"),
        ("api-gp-labels", call(gp.cross_validate, K, np.array([0, 1, 2])), r"y has 3 labels but the kernel has 4"),
        ("api-gp-noise", call(gp.posterior_mean, K, y, K, -1.0), r"noise_variance must be finite and >= 0"),
        ("api-gp-indefinite", call(gp.noise_grid, -200.0 * np.eye(3)), r"not a valid covariance"),
        ("api-width", call(cnngp.monte_carlo_kernel, net, x, width=10**8, n_samples=2),
         r"width=100000000: needs about .* of memory"),
        ("api-estimator-noise", call(CNNGPClassifier("cnngp1", noise_variance=-1.0).fit, x, np.array([0, 1, 0])),
         r"noise_variance: expected a finite number >= 0"),
        ("api-load-missing", call(__import__("cnngp.io.data").io.data.load_dataset, "/nonexistent.npz"), r"does not exist"),
    ]


@pytest.mark.parametrize("case", _api_cases(), ids=lambda c: c[0])
def test_bad_input_api(case):
    import cnngp

    _, fn, match = case
    with pytest.raises(cnngp.CNNGPError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message.strip(), message
    assert re.search(match, message), message


def _api_table() -> int:
    import cnngp

    print("\n| case id | raises | message |")
    print("|---|---|---|")
    bad = 0
    for cid, fn, match in _api_cases():
        error = None
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported
            error = e
        raised = "nothing" if error is None else type(error).__name__
        message = "" if error is None else " ".join(str(error).split())
        ok = isinstance(error, cnngp.CNNGPError) and re.search(match, message)
        bad += not ok
        print(f"| {cid} | {raised} | {_markdown_cell(message)} |")
    return bad


if __name__ == "__main__":
    sys.exit(1 if (_table() + _api_table()) else 0)

"""Every ``cnngp`` command in README.md runs, from a fresh clone, as written (on small inputs).

The commands are extracted from README.md:

* fenced code blocks, except those tagged ``text`` (usage synopses), ``python`` and ``json``:
  each line (``&&``-chains split, trailing ``# comments`` dropped, ``VAR=value`` lines
  expanded into later ``$VAR``), and in ``console`` blocks only the ``$ `` lines;
* inline code spans that are complete commands: they start with ``cnngp ``, name an input
  (``--data``, ``--x``, ``--x1``, ``--x2``) and hold no synopsis syntax (``[``, ``|``, ``...``).

``VARIANTS`` maps each of them to what this test runs: the same command with small sizes
(fewer images, networks, widths; ``--quiet``). The test fails when README.md gains a command
the table does not cover, or loses one it does. Commands run in a scratch folder that, like a
user's clone, holds ``examples/`` (the committed CIFAR-10 slice) and, for the commands that
need the official download, a ``cifar-10-batches-py/`` folder in the official python format
made from that slice.
"""

from __future__ import annotations

import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CIFAR_SMALL = ROOT / "examples" / "cifar10-small.npz"

SKIP_LANGS = {"text", "python", "json"}
INPUT_FLAG = re.compile(r"--(data|x|x1|x2)\b")
SYNOPSIS = re.compile(r"\[|\||\.\.\.|…")


def readme_commands(text: str) -> list[str]:
    """The cnngp commands of README.md, in order, without duplicates."""
    found: list[str] = []
    fence = re.compile(r"^( *)```(\w*)\n(.*?)^\1```", re.M | re.S)
    for m in fence.finditer(text):
        lang, body = m.group(2), m.group(3)
        if lang in SKIP_LANGS:
            continue
        variables: dict[str, str] = {}
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            assignment = re.fullmatch(r"([A-Za-z_]\w*)=(\S+)", line)
            if assignment:
                variables[assignment.group(1)] = assignment.group(2)
                continue
            for name, value in variables.items():
                line = re.sub(rf"\${name}\b|\$\{{{name}\}}", value, line)
            for part in line.split("&&"):
                part = " ".join(part.split())
                if part == "cnngp" or part.startswith("cnngp "):
                    found.append(part)
    prose = fence.sub("", text)
    for m in re.finditer(r"`([^`]+)`", prose):
        span = " ".join(m.group(1).split())
        if span.startswith("cnngp ") and INPUT_FLAG.search(span) and not SYNOPSIS.search(span):
            found.append(span)
    return list(dict.fromkeys(found))


X = "examples/cifar10-small.npz:x_test"
TINY = "--x1 x4.npz"  # 4 real 32x32 CIFAR-10 images (written by the fixture)

# README command -> (commands run instead, in order; the last one's exit status is checked
# against `expect`), marks. "{scheduler}" is the address of a Dask cluster the test starts.
VARIANTS: dict[str, tuple[list[str], int, tuple]] = {
    "cnngp sweep": (
        ["cnngp sweep --n 20 --folds 2 --lengthscales 0,2,inf --out digits-sweep --quiet"], 0, ()),
    "cnngp sweep --arch cnngp14 --data examples/cifar10-small.npz --n 80,160,320": (
        ["cnngp sweep --arch cnngp14 --data examples/cifar10-small.npz --n 20 --folds 2 "
         "--lengthscales 0,inf --out cifar-sweep --quiet"], 0, ()),
    "cnngp sweep --arch cnngp14 --data cifar-10-batches-py --n 160 --test --n-test 100": (
        ["cnngp sweep --arch cnngp14 --data cifar-10-batches-py --n 20 --folds 2 --test "
         "--n-test 10 --lengthscales 0,inf --out official-sweep --quiet"], 0, ()),
    f"cnngp montecarlo --arch cnngp3 --readout matern32:3 --x1 {X} --n1 4 --width 64 "
    "--samples 1000 --out mc.json": (
        [f"cnngp montecarlo --arch cnngp3 --readout matern32:3 --x1 {X} --n1 2 --width 8 "
         "--samples 20 --out mc.json"], 0, ()),
    f"cnngp correlation-figure --x {X} --out fig.png": (
        [f"cnngp correlation-figure --x {X} --out fig.png --widths 4,8 --draws 2 --samples 4 "
         "--mc-width 8 --quiet"], 0, ()),
    f"cnngp kernel --arch myrtle10 --x1 {X} --out K.zarr --dry-run --workers 8": (
        # (a budget of 1 GiB a worker: 8 at the default 2 GiB need 18 GiB free, which a busy
        # machine may not have; the memory gate itself is tests/test_resources.py's)
        [f"cnngp kernel --arch myrtle10 {TINY} --out K.zarr --dry-run --workers 8 --memory-budget 1G"], 0, ()),
    f"cnngp kernel --arch myrtle10 --x1 {X} --out K.zarr --workers 8": (
        [f"cnngp kernel --arch myrtle10 {TINY} --out K.zarr --workers 2 --quiet"], 0,
        (pytest.mark.slow,)),
    f"cnngp kernel --arch myrtle10 --x1 {X} --out K.zarr --scheduler tcp://head:8786": (
        [f"cnngp kernel --arch myrtle10 {TINY} --out K.zarr --scheduler {{scheduler}} --quiet"], 0,
        # the workers of the cluster run in another folder: a relative --out reaches them
        # as an absolute path (it once failed there with MissingFileError)
        (pytest.mark.slow,)),
    f"cnngp kernel --arch myrtle10 --x1 {X} --out K.zarr": (
        [f"cnngp kernel --arch myrtle10 {TINY} --out K.zarr --quiet"], 0, ()),
    "cnngp kernel --arch myrtle10 --x1 big.npz --out K2.zarr --reuse K1.zarr": (  # growing a Gram matrix
        ["cnngp kernel --arch myrtle10 --x1 x4.npz --out K1.zarr --tile 2 --quiet",
         "cnngp kernel --arch myrtle10 --x1 x6.npz --out K2.zarr --tile 2 --reuse K1.zarr --quiet",
         "cnngp info K2.zarr"], 0, ()),
    "cnngp info K.zarr": (
        [f"cnngp kernel --arch myrtle10 {TINY} --out K.zarr --quiet", "cnngp info K.zarr"], 0, ()),
    "cnngp learn --arch myrtle10-correlated --data examples/cifar10-small.npz --n 40 --params internal "
    "--store S.zarr --dry-run --quiet": (  # as written: a plan only, seconds
        ["cnngp learn --arch myrtle10-correlated --data examples/cifar10-small.npz --n 40 --params internal "
         "--store S.zarr --dry-run --quiet"], 0, ()),
    "cnngp ensemble --arch myrtle10 --data examples/cifar10-small.npz --n 160 --times 0,100,1000,inf": (
        ["cnngp ensemble --arch myrtle10 --data examples/cifar10-small.npz --n 20 --n-test 10 --times 0,inf "
         "--quiet"], 0, ()),
    "cnngp sweep --arch myrtle10 --data examples/cifar10-small.npz --n 80,160,320 --store S.zarr --dry-run": (
        ["cnngp sweep --arch myrtle10 --data examples/cifar10-small.npz --n 40 --store S.zarr --dry-run "
         "--quiet"], 0, ()),
}


def test_every_readme_command_has_a_variant():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    missing = [c for c in commands if c not in VARIANTS]
    stale = [c for c in VARIANTS if c not in commands]
    assert not missing, f"README.md commands with no entry in VARIANTS: {missing}"
    assert not stale, f"VARIANTS entries no longer in README.md: {stale}"


def test_extraction_rules():
    text = "\n".join([
        "```bash", "A=in.npz   # a comment", "python -m pip x && cnngp sweep", "cnngp info $A  # c",
        "```", "```text", "cnngp kernel --arch NAME|SPEC.json", "```", "```console",
        "$ cnngp montecarlo --x1 a.npz --out r.json", "output line cnngp", "```",
        "Inline `cnngp sweep --data d.npz\n  --n 40`, `cnngp kernel --x1 FILE.npz[:ARRAY]`, "
        "`cnngp info K.zarr`.",
    ])
    assert readme_commands(text) == [
        "cnngp sweep", "cnngp info in.npz", "cnngp montecarlo --x1 a.npz --out r.json",
        "cnngp sweep --data d.npz --n 40",
    ]


def _cnngp() -> list[str]:
    exe = Path(sys.executable).parent / "cnngp"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("cnngp")
    return [found] if found else [sys.executable, "-c", "from cnngp.cli.console import entry; entry()"]


def _write_cifar_python(folder: Path, d) -> None:
    """The official python version's layout (data_batch_1..5, test_batch) from the slice."""
    folder.mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(d["y_train"])), 5), start=1):
        batch = {b"labels": [int(v) for v in d["y_train"][part]],
                 b"data": d["x_train"][part].transpose(0, 3, 1, 2).reshape(len(part), 3072)}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    batch = {b"labels": [int(v) for v in d["y_test"]],
             b"data": d["x_test"].transpose(0, 3, 1, 2).reshape(len(d["y_test"]), 3072)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))


@pytest.fixture
def clone(tmp_path):
    """A scratch folder with what a user's clone has (examples/) and what a download gives."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    d = np.load(CIFAR_SMALL)
    _write_cifar_python(tmp_path / "cifar-10-batches-py", d)
    np.savez(tmp_path / "x4.npz", x=d["x_test"][:4])
    np.savez(tmp_path / "x6.npz", x=d["x_test"][:6])  # the same 4 first: a store of x4 lends to it
    return tmp_path


def _params():
    return [pytest.param(command, id=f"{i}-{command[:60]}", marks=marks)
            for i, (command, (_, _, marks)) in enumerate(VARIANTS.items())]


@pytest.mark.parametrize("command", _params())
def test_readme_command_runs(command, clone, request):
    runs, expect, _ = VARIANTS[command]
    env = dict(os.environ, CNNGP_DEBUG="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    scheduler = None
    if any("{scheduler}" in r for r in runs):
        distributed = pytest.importorskip("distributed")
        cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                           dashboard_address=None, host="127.0.0.1")
        request.addfinalizer(cluster.close)
        scheduler = cluster.scheduler_address
    for i, run in enumerate(runs):
        argv = shlex.split(run.format(scheduler=scheduler) if scheduler else run)
        assert argv[0] == "cnngp"
        proc = subprocess.run(_cnngp() + argv[1:], cwd=clone, env=env, capture_output=True,
                              text=True, timeout=300)
        want = expect if i == len(runs) - 1 else 0
        assert proc.returncode == want, f"{run}: exit {proc.returncode}\n{proc.stderr[-3000:]}"

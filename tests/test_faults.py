"""Fault injection against the command-line contract of ``cnngp kernel``.

The contract (``cnngp.cli.main`` module docstring, ``cnngp.engine.storage``, ``cnngp.engine.gram._compute``):

* a user error or a failure of the machine (full disk, bad checkpoint, overflow) is one line
  ``cnngp: error: ...``, exit 2, and nothing is written;
* Ctrl-C exits 130 and SIGTERM 143, saving a checkpoint of the pairs done; rerunning the same
  command resumes from it and gives the same matrix, bit for bit;
* every file is written to a temporary name and renamed into place, so even SIGKILL never
  leaves a torn checkpoint or output; only regular files are ever replaced;
* ``OUT.checkpoint.npz`` is removed only once ``OUT`` is in place.

The in-process tests run :func:`cnngp.cli.main.main` on tiny inputs and break it from inside
(a full disk under the real ``np.savez``, a Ctrl-C at a chosen batch, rewritten checkpoint
arrays); the subprocess tests run the real console script (or ``main`` in a child Python) and
send it real signals, waiting for conditions (progress, a saved checkpoint) rather than for
fixed times, so that they hold on a loaded machine.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import cnngp
from cnngp.engine import gram
from cnngp.engine import storage
from cnngp.cli.main import load_images, load_network, main

SCRIPT = Path(sys.executable).with_name("cnngp")
PYTHON = sys.executable
PREFIX = "cnngp: error: "

#: the small in-process job: 6 images of 8x8x3 through cnngp2, 21 upper-triangle pairs
SMALL_N = 6
SMALL_PAIRS = SMALL_N * (SMALL_N + 1) // 2

#: the subprocess job: long enough (a few seconds at --batch-size 1) to be signalled mid-run
LONG_ARCH = ["--arch", "cnngp14", "--readout", "matern32:2.0"]
LONG_N = 6
LONG_PAIRS = LONG_N * (LONG_N + 1) // 2

#: generous limits for a loaded machine (the jobs themselves take seconds)
START_TIMEOUT = 180.0
RUN_TIMEOUT = 300.0


# -- helpers ----------------------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    """Non-empty lines, splitting on \\r too (progress bars redraw with \\r)."""
    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]


def _run(argv, capsys) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, _lines(err)


def _snapshot(folder: Path) -> dict:
    """name -> (kind, bytes or link target) for everything in ``folder`` (not recursive)."""
    snap = {}
    for p in sorted(folder.iterdir()):
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            snap[p.name] = ("link", os.readlink(p))
        elif stat.S_ISREG(st.st_mode):
            snap[p.name] = ("file", p.read_bytes(), st.st_ino)
        else:
            snap[p.name] = (stat.S_IFMT(st.st_mode), st.st_ino)
    return snap


def _partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


def _force_checkpoints(monkeypatch, every: float = 0.0) -> None:
    """Make every Checkpoint save each ``every`` seconds (it sets ``self.every`` in
    ``__init__``, so patching the class attribute alone would not do)."""
    real = storage.Checkpoint.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.every = every

    monkeypatch.setattr(storage.Checkpoint, "__init__", init)
    monkeypatch.setattr(storage.Checkpoint, "every", every, raising=False)


def _interrupt_at(monkeypatch, call: int) -> dict:
    """Ctrl-C at the ``call``-th batch of the pair pass (1-based), before it is computed."""
    real = gram._pair_values
    count = {"n": 0}

    def flaky(*args, **kwargs):
        count["n"] += 1
        if count["n"] >= call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gram, "_pair_values", flaky)
    return count


def _pairs_order(n: int):
    """The engine's enumeration of a symmetric Gram matrix: the upper triangle, row-major."""
    return np.triu_indices(n)


def _load_checkpoint(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _check_done_values(ckpt: dict, reference: np.ndarray, n: int) -> int:
    """The pairs a checkpoint says are done hold exactly the reference's values; returns the
    number done."""
    done = int(ckpt["pairs_done"])
    assert ckpt["pairs_done"].dtype.kind in "iu" and ckpt["pairs_done"].shape == ()
    assert ckpt["values"].shape == (1, n, n) and ckpt["values"].dtype == np.float64
    r, c = _pairs_order(n)
    np.testing.assert_array_equal(ckpt["values"][0, r[:done], c[:done]], reference[r[:done], c[:done]])
    return done


@pytest.fixture(scope="module")
def small_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    x = np.random.default_rng(7).uniform(size=(SMALL_N, 8, 8, 3))
    other = x.copy()
    other[0, 0, 0, 0] += 0.25  # other inputs: another checkpoint key
    np.savez(folder / "x.npz", x=x)
    np.savez(folder / "other.npz", x=other)
    return folder / "x.npz", folder / "other.npz"


def _small_argv(x1: Path, out: Path, *extra) -> list[str]:
    return ["kernel", "--arch", "cnngp2", "--x1", str(x1), "--out", str(out), "--batch-size", "1",
            "--quiet", *extra]


@pytest.fixture(scope="module")
def small_reference(small_inputs, tmp_path_factory):
    """The kernel of an uninterrupted ``cnngp kernel`` run of the small job (in-process)."""
    x1, _ = small_inputs
    out = tmp_path_factory.mktemp("reference") / "k.npz"
    assert main(_small_argv(x1, out)) == 0
    with np.load(out) as z:
        k = z["kernel"]
    lib = cnngp.kernel(load_network("cnngp2"), load_images("--x1", str(x1)), dtype="float64")
    np.testing.assert_array_equal(k, lib.numpy())
    assert k.shape == (SMALL_N, SMALL_N) and np.isfinite(k).all()
    return k


def _interrupted_checkpoint(monkeypatch, capsys, x1: Path, out: Path, at_batch: int = 3) -> Path:
    """Run the small job until a Ctrl-C at batch ``at_batch`` with a checkpoint after every
    batch; returns the checkpoint path (asserting the interrupted run's contract)."""
    ckpt = Path(f"{out}.checkpoint.npz")
    with monkeypatch.context() as m:
        _force_checkpoints(m, 0.0)
        _interrupt_at(m, at_batch)
        code, stdout, err = _run(_small_argv(x1, out), capsys)
    assert code == 130, err
    assert stdout == ""
    assert err == [f"cnngp: interrupted; progress saved to {ckpt}: rerun the same command to resume"]
    assert ckpt.is_file() and not out.exists()
    assert _partials(out.parent) == []
    assert int(_load_checkpoint(ckpt)["pairs_done"]) == at_batch - 1
    return ckpt


# -- 1. a full disk on the final write ---------------------------------------------------------


class _FullDisk:
    """A real file object that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room
        self.failed = False

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self._room:
            if self._room:
                self._f.write(bytes(memoryview(data).cast("B")[: self._room]))
            self._room = 0
            self.failed = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def _fd_name(fd: int) -> str:
    return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))


def _output_temp(name: str, out: Path) -> bool:
    """Is ``name`` atomic_write's temporary file for ``out`` itself (not its checkpoint)?"""
    return re.fullmatch(rf"\.{re.escape(out.name)}\.[^.]+\.partial", name) is not None


def _fill_disk(monkeypatch, out: Path, where: str) -> list:
    """Make writing ``out`` (only) fail with ENOSPC: ``write0`` at the first byte,
    ``write1k`` after 1 KiB of the real np.savez output, ``fsync`` when it is flushed."""
    hits = []
    if where.startswith("write"):
        real = os.fdopen
        room = {"write0": 0, "write1k": 1024}[where]

        def fdopen(fd, *args, **kwargs):
            f = real(fd, *args, **kwargs)
            if _output_temp(_fd_name(fd), out):
                hits.append(fd)
                return _FullDisk(f, room)
            return f

        monkeypatch.setattr(storage.os, "fdopen", fdopen)
    else:
        real_fsync = os.fsync

        def fsync(fd):
            if _output_temp(_fd_name(fd), out):
                hits.append(fd)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)

        monkeypatch.setattr(storage.os, "fsync", fsync)
    return hits


@pytest.mark.parametrize("where", ["write0", "write1k", "fsync"])
def test_disk_full_on_the_output_keeps_the_checkpoint_and_a_rerun_finishes(
    where, small_inputs, small_reference, tmp_path, monkeypatch, capsys
):
    x1, _ = small_inputs
    out = tmp_path / "k.npz"
    ckpt = _interrupted_checkpoint(monkeypatch, capsys, x1, out)
    saved = ckpt.read_bytes()

    with monkeypatch.context() as m:
        hits = _fill_disk(m, out, where)
        code, stdout, err = _run(_small_argv(x1, out), capsys)
    assert hits, "the injected fault was never reached"
    assert code == 2, err
    assert stdout == ""
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith(f"{PREFIX}--out: "), line
    assert str(out) in line and re.search(r"no space left", line, re.I), line
    assert line == (f"{PREFIX}--out: writing {str(out)!r} failed (No space left on device); "
                    "nothing was written")
    # the work is not lost: before the final write the checkpoint was brought up to date
    # with every pair, so the rerun only writes; nothing else was written
    assert ckpt.read_bytes() != saved
    state = _load_checkpoint(ckpt)
    n = small_reference.shape[0]
    assert int(state["pairs_done"]) == n * (n + 1) // 2
    assert np.array_equal(state["values"][0], small_reference)
    assert not out.exists()
    assert _partials(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]

    code, stdout, err = _run(_small_argv(x1, out), capsys)
    assert code == 0 and err == [] and stdout == ""
    with np.load(out) as z:
        assert np.array_equal(z["kernel"], small_reference)
        assert z["kernel"].dtype == np.float64
    assert not ckpt.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_disk_full_on_an_existing_output_leaves_it_as_it_was(
    small_inputs, small_reference, tmp_path, monkeypatch, capsys
):
    """A failed write never truncates the previous OUT (it is replaced only by rename)."""
    x1, _ = small_inputs
    out = tmp_path / "k.npz"
    out.write_bytes(b"an earlier result\n")
    with monkeypatch.context() as m:
        hits = _fill_disk(m, out, "write1k")
        code, _, err = _run(_small_argv(x1, out), capsys)
    assert hits and code == 2 and len(err) == 1 and "No space left" in err[0]
    assert out.read_bytes() == b"an earlier result\n"
    assert _partials(tmp_path) == []
    assert main(_small_argv(x1, out)) == 0
    with np.load(out) as z:
        assert np.array_equal(z["kernel"], small_reference)


def test_disk_full_while_saving_the_checkpoint_on_ctrl_c_keeps_the_previous_one(
    small_inputs, small_reference, tmp_path, monkeypatch, capsys
):
    """Ctrl-C whose checkpoint cannot be written: the last good checkpoint survives whole,
    no temporary file is left, and a rerun still resumes to the exact matrix."""
    x1, _ = small_inputs
    out = tmp_path / "k.npz"
    ckpt = Path(f"{out}.checkpoint.npz")
    with monkeypatch.context() as m:
        _force_checkpoints(m, 0.0)
        _interrupt_at(m, 4)  # checkpoints after batches 1, 2, 3, then Ctrl-C at batch 4
        real = storage.Checkpoint.save
        saves = {"n": 0}

        def save(self, values, pairs_done):
            saves["n"] += 1
            if saves["n"] > 3:  # the save on Ctrl-C finds the disk full
                hits = _fill_disk(m, self.path, "write1k")
                try:
                    return real(self, values, pairs_done)
                finally:
                    assert hits
            return real(self, values, pairs_done)

        m.setattr(storage.Checkpoint, "save", save)
        code, _, err = _run(_small_argv(x1, out), capsys)
    assert saves["n"] == 4
    assert code == 130, err
    assert len(err) == 1 and err[0].startswith("cnngp: interrupted; saving progress failed ("), err
    assert "No space left" in err[0] and err[0].endswith(f"the previous checkpoint {ckpt} still resumes"), err
    assert int(_load_checkpoint(ckpt)["pairs_done"]) == 3
    assert _partials(tmp_path) == [] and not out.exists()
    assert main(_small_argv(x1, out)) == 0
    with np.load(out) as z:
        assert np.array_equal(z["kernel"], small_reference)
    assert not ckpt.exists()


@pytest.mark.parametrize("then", ["finish", "ctrl-c"])
def test_a_periodic_checkpoint_save_that_fails_keeps_the_previous_checkpoint(
    then, small_inputs, small_reference, tmp_path, monkeypatch, capsys
):
    """A full disk during a periodic save (not on Ctrl-C) once deleted the previous checkpoint
    and ended the run. Now the run warns in one line and goes on; the last good checkpoint
    stays whole until the output is in place, and a rerun after Ctrl-C resumes from it."""
    x1, _ = small_inputs
    out = tmp_path / "k.npz"
    ckpt = Path(f"{out}.checkpoint.npz")
    with monkeypatch.context() as m:
        _force_checkpoints(m, 0.0)
        if then == "ctrl-c":
            _interrupt_at(m, 7)
        real = storage.Checkpoint.save
        saves = {"n": 0, "failed": 0}

        def save(self, values, pairs_done):
            saves["n"] += 1
            if saves["n"] > 3:  # the disk is full from the 4th save on
                saves["failed"] += 1
                assert int(_load_checkpoint(self.path)["pairs_done"]) == 3  # still the 3rd
                raise storage.CNNGPError(f"checkpoint: writing {str(self.path)!r} failed (No space left on device); nothing was written")
            return real(self, values, pairs_done)

        m.setattr(storage.Checkpoint, "save", save)
        code, _, err = _run(_small_argv(x1, out), capsys)
    assert saves["failed"] >= 2, saves  # later saves were tried (and failed) too
    warnings_printed = [e for e in err if e.startswith("cnngp: warning: checkpoint: saving progress failed")]
    assert len(warnings_printed) == 1 and "previous checkpoint" in warnings_printed[0], err
    if then == "finish":
        assert code == 0, err
        with np.load(out) as z:
            assert np.array_equal(z["kernel"], small_reference)
        assert not ckpt.exists()
        return
    assert code == 130, err
    assert err[-1].endswith(f"the previous checkpoint {ckpt} still resumes"), err
    assert int(_load_checkpoint(ckpt)["pairs_done"]) == 3
    assert _partials(tmp_path) == [] and not out.exists()
    assert main(_small_argv(x1, out)) == 0
    with np.load(out) as z:
        assert np.array_equal(z["kernel"], small_reference)
    assert not ckpt.exists()


# -- 2./3. real signals to a real process ------------------------------------------------------


@pytest.fixture(scope="module")
def long_job(tmp_path_factory):
    """Inputs of the subprocess job and its kernel from an uninterrupted in-process run."""
    folder = tmp_path_factory.mktemp("long")
    x = np.random.default_rng(3).uniform(size=(LONG_N, 32, 32, 3))  # CIFAR-like
    np.savez(folder / "x.npz", x=x)
    net = load_network("cnngp14", "matern32:2.0")
    ref = cnngp.kernel(net, load_images("--x1", str(folder / "x.npz")), dtype="float64").numpy()
    assert ref.dtype == np.float64 and np.isfinite(ref).all()
    return folder / "x.npz", ref


def _long_argv(x1: Path, out: Path, *extra) -> list[str]:
    return ["kernel", *LONG_ARCH, "--x1", str(x1), "--out", str(out), "--batch-size", "1", *extra]


class _Proc:
    """A child process whose stderr is collected by a thread (progress parsed as it comes)."""

    def __init__(self, cmd, cwd):
        self.p = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        self.err = bytearray()
        self.out = b""
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()

    def _read(self):
        while chunk := self.p.stderr.read1(4096):
            self.err += chunk

    def progress(self) -> int:
        """Items done according to the last progress-bar redraw (self pass + pairs)."""
        found = re.findall(rb"(\d+)/(\d+) \[", bytes(self.err))
        return int(found[-1][0]) if found else 0

    def wait_for(self, condition, what: str, timeout: float = START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while not condition():
            if self.p.poll() is not None:
                pytest.fail(f"the process exited ({self.p.returncode}) before {what}: "
                            f"{self.stderr()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out waiting for {what}: {self.stderr()[-2000:]}")
            time.sleep(0.02)

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        try:
            self.p.wait(timeout)  # stdout stays far below a pipe's buffer: nothing blocks
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the process did not exit: {self.stderr()[-2000:]}")
        self.out = self.p.stdout.read()
        self._t.join(10)
        return self.p.returncode

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)

    def stderr(self) -> str:
        return bytes(self.err).decode(errors="replace")

    def close(self):
        """Kill the process if it still runs, then close both pipes."""
        self.kill()
        self._t.join(10)
        self.p.stdout.close()
        self.p.stderr.close()


@pytest.fixture
def procs():
    started = []
    yield lambda cmd, cwd: started.append(_Proc(cmd, cwd)) or started[-1]
    for p in started:
        p.close()


def _finish_normally(x1: Path, out: Path, reference: np.ndarray, resumed: bool):
    ckpt = Path(f"{out}.checkpoint.npz")
    proc = subprocess.run([str(SCRIPT), *_long_argv(x1, out)], cwd=out.parent, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert ("resumed" in proc.stderr) == resumed, proc.stderr[-2000:]
    assert _lines(proc.stderr)[-1].startswith(f"wrote {out}: kernel ({LONG_N}, {LONG_N})")
    with np.load(out) as z:
        k = z["kernel"]
    assert k.dtype == np.float64 and np.array_equal(k, reference)
    assert not ckpt.exists()


def test_sigterm_saves_progress_and_a_rerun_is_bit_identical(long_job, tmp_path, procs):
    x1, reference = long_job
    out = tmp_path / "k.npz"
    ckpt = Path(f"{out}.checkpoint.npz")
    proc = procs([str(SCRIPT), *_long_argv(x1, out)], tmp_path)
    # the progress bar counts the self pass (LONG_N images) and then the pairs
    proc.wait_for(lambda: proc.progress() >= LONG_N + 2, "some pairs were done")
    proc.p.send_signal(signal.SIGTERM)
    code = proc.finish()
    err = proc.stderr()
    assert code == 143, err[-2000:]
    assert "Traceback" not in err
    message = (f"cnngp: terminated (SIGTERM); progress saved to {ckpt}: rerun the same command "
               "to resume")
    assert message in err
    assert proc.out == b""
    assert not out.exists()
    assert _partials(tmp_path) == []
    done = _check_done_values(_load_checkpoint(ckpt), reference, LONG_N)
    assert 2 <= done < LONG_PAIRS
    _finish_normally(x1, out, reference, resumed=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    # last, so that a failure here does not hide the checks above: the message is a line of
    # its own and the last one (the progress bar is closed first, not redrawn after it)
    assert _lines(err)[-1] == message, err[-600:]
    assert re.search(rf"(^|\n){re.escape(message)}\n", err), err[-600:]


_FREQUENT = """\
import sys
import cnngp.engine.storage as s
real = s.Checkpoint.__init__
def init(self, *a, **k):
    real(self, *a, **k)
    self.every = 0.0
s.Checkpoint.__init__ = init
from cnngp.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_never_leaves_a_torn_checkpoint(long_job, tmp_path, procs):
    """SIGKILL (twice, while checkpoints are written after every pair) leaves the last
    complete checkpoint under its name; reruns resume from it to the exact matrix."""
    x1, reference = long_job
    out = tmp_path / "k.npz"
    ckpt = Path(f"{out}.checkpoint.npz")
    pattern = re.compile(rf"\.{re.escape(ckpt.name)}\.[^.]+\.partial")

    def pairs_saved() -> int:
        try:  # a reader racing the writer must never see a torn file under the real name
            return int(_load_checkpoint(ckpt)["pairs_done"])
        except FileNotFoundError:
            return 0

    before = 0
    for round_ in range(2):
        proc = procs([PYTHON, "-c", _FREQUENT, *_long_argv(x1, out, "--quiet")], tmp_path)
        proc.wait_for(lambda: pairs_saved() >= before + 3, f"a checkpoint beyond {before + 3} pairs")
        proc.p.send_signal(signal.SIGKILL)
        assert proc.finish() == -signal.SIGKILL
        assert not out.exists()
        ck = _load_checkpoint(ckpt)
        assert sorted(ck) == ["key", "pairs_done", "values", "values_sha256"]
        assert str(ck["values_sha256"]) == storage.Checkpoint.checksum(ck["values"])
        done = _check_done_values(ck, reference, LONG_N)
        assert before + 3 <= done < LONG_PAIRS, (round_, before, done)
        # a save cut short by the kill may leave its temporary file, never a file under a
        # name cnngp would read
        leftovers = {p.name for p in tmp_path.iterdir()} - {ckpt.name}
        assert all(pattern.fullmatch(n) for n in leftovers), leftovers
        assert len(leftovers) <= 1, leftovers
        before = done
    _finish_normally(x1, out, reference, resumed=True)


# -- 4. corrupt checkpoints --------------------------------------------------------------------


def _rewrite(ckpt: Path, **changes):
    arrays = _load_checkpoint(ckpt)
    for name, value in changes.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value(arrays) if callable(value) else value
    if "values" in changes and "values" in arrays and arrays["values"].dtype != object:
        # a writer that checksummed what it wrote: these cases test the checks after the checksum
        arrays["values_sha256"] = np.array(storage.Checkpoint.checksum(arrays["values"]))
    ckpt.unlink()
    with open(ckpt, "wb") as f:
        np.savez(f, **arrays)


def _with_nan_done(arrays, value=np.nan):
    v = arrays["values"].copy()
    r, c = _pairs_order(SMALL_N)
    v[0, r[1], c[1]] = value  # the second pair, which the checkpoint says is done
    return v


CORRUPT = {
    "pairs-done-negative": (dict(pairs_done=np.array(-1)), r"pairs done"),
    "pairs-done-too-many": (dict(pairs_done=np.array(SMALL_PAIRS + 1)), r"pairs done"),
    "pairs-done-float": (dict(pairs_done=np.array(2.0)), r"pairs done"),
    "pairs-done-fraction": (dict(pairs_done=np.array(1.5)), r"pairs done"),
    "pairs-done-bool": (dict(pairs_done=np.array(True)), r"pairs done"),
    "pairs-done-text": (dict(pairs_done=np.array("2")), r"pairs done"),
    "pairs-done-vector": (dict(pairs_done=np.array([2])), r"pairs done"),
    "values-wrong-shape": (dict(values=lambda a: a["values"][:, :, :-1]), r"values"),
    "values-no-head-axis": (dict(values=lambda a: a["values"][0]), r"values"),
    "values-integer": (dict(values=lambda a: np.zeros(a["values"].shape, np.int64)), r"values"),
    "values-complex": (dict(values=lambda a: a["values"].astype(np.complex128)), r"values"),
    "values-nan-in-done": (dict(values=_with_nan_done), r"non-finite"),
    "values-inf-in-done": (dict(values=lambda a: _with_nan_done(a, np.inf)), r"non-finite"),
    "values-missing": (dict(values=None), r"unreadable"),
    "key-missing": (dict(key=None), r"unreadable"),
    "key-bytes": (dict(key=lambda a: np.array(str(a["key"]).encode())), r"different computation"),
    "key-other": (dict(key=np.array("0" * 64)), r"different computation"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT) + ["truncated", "other-inputs", "pickled"])
def test_corrupt_checkpoint_is_refused_and_left_alone(
    case, small_inputs, small_reference, tmp_path, monkeypatch, capsys
):
    x1, other = small_inputs
    out = tmp_path / "k.npz"
    if case == "other-inputs":  # a genuine checkpoint, of another computation
        ckpt = _interrupted_checkpoint(monkeypatch, capsys, other, out)
        pattern = r"different computation"
    else:
        ckpt = _interrupted_checkpoint(monkeypatch, capsys, x1, out)
        if case == "truncated":
            ckpt.write_bytes(ckpt.read_bytes()[:100])
            pattern = r"unreadable"
        elif case == "pickled":  # an object array: np.load must not unpickle it
            arrays = _load_checkpoint(ckpt)
            arrays["values"] = np.array([object()] * 2, dtype=object)
            with open(ckpt, "wb") as f:
                np.savez(f, **arrays)
            pattern = r"unreadable"
        else:
            changes, pattern = CORRUPT[case]
            _rewrite(ckpt, **changes)
    before = _snapshot(tmp_path)
    code, stdout, err = _run(_small_argv(x1, out), capsys)
    assert code == 2, err
    assert stdout == ""
    assert len(err) == 1, err
    assert err[0].startswith(f"{PREFIX}checkpoint: {str(ckpt)!r} "), err[0]
    assert re.search(pattern, err[0]), err[0]
    assert re.search(r"delete it|choose another", err[0]), err[0]
    # nothing written, and the bad checkpoint is left as it was for the user to inspect
    assert _snapshot(tmp_path) == before
    assert not out.exists() and _partials(tmp_path) == []
    # deleting it, as the message says, starts over and gives the right matrix
    ckpt.unlink()
    assert main(_small_argv(x1, out)) == 0
    with np.load(out) as z:
        assert np.array_equal(z["kernel"], small_reference)
    assert not ckpt.exists()


def _altered_done_value(ckpt: Path, change) -> None:
    """Alter one done value in the file as it is, its checksum left as it was written."""
    arrays = _load_checkpoint(ckpt)
    r, c = _pairs_order(SMALL_N)
    arrays["values"][0, r[1], c[1]] = change(arrays["values"][0, r[1], c[1]])
    ckpt.unlink()
    with open(ckpt, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("case", ["plus-1e300", "minus-5", "no-checksum"])
def test_finite_altered_checkpoint_values_are_refused_by_their_checksum(
    case, small_inputs, small_reference, tmp_path, monkeypatch, capsys
):
    """Issue 28: finite values altered in a checkpoint (+1e300, -5) passed every check and went
    into the kernel with exit 0; a checkpoint without a checksum of its values is refused too."""
    x1, _ = small_inputs
    out = tmp_path / "k.npz"
    ckpt = _interrupted_checkpoint(monkeypatch, capsys, x1, out)
    if case == "no-checksum":
        _rewrite(ckpt, values_sha256=None)
        pattern = r"no checksum of its values"
    else:
        _altered_done_value(ckpt, (lambda v: v + 1e300) if case == "plus-1e300" else (lambda v: -5.0))
        pattern = r"do not match their checksum"
    before = _snapshot(tmp_path)
    code, stdout, err = _run(_small_argv(x1, out), capsys)
    assert code == 2 and stdout == "" and len(err) == 1, err
    assert err[0].startswith(f"{PREFIX}checkpoint: {str(ckpt)!r} "), err[0]
    assert re.search(pattern, err[0]) and "delete it to start over" in err[0], err[0]
    assert _snapshot(tmp_path) == before and not out.exists()
    ckpt.unlink()
    assert main(_small_argv(x1, out)) == 0
    with np.load(out) as z:
        assert np.array_equal(z["kernel"], small_reference)


def test_checkpoint_claiming_every_pair_done_is_used_as_is(
    small_inputs, small_reference, tmp_path, monkeypatch, capsys
):
    """The upper bound is inclusive: pairs_done == n_pairs with the right values computes no
    pair at all (and the result is still exact)."""
    x1, _ = small_inputs
    out = tmp_path / "k.npz"
    ckpt = _interrupted_checkpoint(monkeypatch, capsys, x1, out)
    _rewrite(ckpt, pairs_done=np.array(SMALL_PAIRS), values=small_reference[None].copy())
    calls = _interrupt_at(monkeypatch, 1)  # any pair computed would be a Ctrl-C
    code, _, err = _run(_small_argv(x1, out), capsys)
    assert code == 0 and err == [] and calls["n"] == 0
    with np.load(out) as z:
        assert np.array_equal(z["kernel"], small_reference)
    assert not ckpt.exists()


def test_a_rerun_says_it_resumes_and_how_much_is_left(small_inputs, small_reference, tmp_path, monkeypatch,
                                                       capsys):
    """The rerun of an interrupted `cnngp kernel` says it resumes and from how many pairs (its
    time gate prices the pairs left), and finishes exactly."""
    x1, _ = small_inputs
    out = tmp_path / "k.npz"
    ckpt = _interrupted_checkpoint(monkeypatch, capsys, x1, out)
    argv = [a for a in _small_argv(x1, out) if a != "--quiet"]
    code, _, err = _run(argv, capsys)
    assert code == 0, err
    assert f"--out: resuming from {ckpt}: 2 of {SMALL_PAIRS:,} pairs already done" in err, err
    with np.load(out) as z:
        assert np.array_equal(z["kernel"], small_reference)


# -- 5. Ctrl-C during start-up -----------------------------------------------------------------


def _mapped(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return name in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3, 0.6])
def test_ctrl_c_during_start_up_is_one_line_and_130(delay, long_job, tmp_path):
    """SIGINT while the command imports numpy/torch (or, at the longer delays, computes):
    exit 130, one line, no traceback, nothing written.

    The delay runs from the moment ``main`` is known to be running (numpy's extension is
    mapped: ``cnngp.cli.main`` imports only the standard library, and the first numpy import is
    made by ``main``), so that a loaded machine still signals it at the stage intended."""
    x1, _ = long_job
    out = tmp_path / "k.npz"
    p = subprocess.Popen([str(SCRIPT), *_long_argv(x1, out, "--quiet")], cwd=tmp_path,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _mapped(p.pid, "_multiarray_umath"):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "main never started"
            time.sleep(0.002)
        time.sleep(delay)
        importing = not _mapped(p.pid, "libtorch_python")
        p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=RUN_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    text = stderr.decode(errors="replace")
    assert p.returncode == 130, (importing, p.returncode, text)
    assert "Traceback" not in text
    lines = _lines(text)
    assert len(lines) == 1 and lines[0].startswith("cnngp: interrupted"), lines
    assert stdout == b""
    assert not out.exists() and _partials(tmp_path) == []
    ckpt = Path(f"{out}.checkpoint.npz")
    if ckpt.exists():  # interrupted after some pairs: the line says so
        assert lines[0].endswith(f"progress saved to {ckpt}: rerun the same command to resume")
    else:
        assert lines[0] == "cnngp: interrupted; no output written"


_INTERRUPT_AT_IMPORT = """\
import builtins
real = builtins.__import__
def hook(name, *args, **kwargs):
    if name == {module!r}:
        builtins.__import__ = real
        raise KeyboardInterrupt
    return real(name, *args, **kwargs)
builtins.__import__ = hook
"""


@pytest.mark.parametrize("module", ["argparse", "pathlib"])
def test_ctrl_c_while_the_command_module_is_imported_is_one_line_and_130(module, tmp_path):
    """Ctrl-C in the ~20 ms in which the console script imports ``cnngp.cli.main`` (argparse,
    json, pathlib), made deterministic by raising KeyboardInterrupt from that import: the
    contract asks for exit 130 and one line there too, not a traceback."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_INTERRUPT_AT_IMPORT.format(module=module))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = tmp_path / "k.npz"
    proc = subprocess.run([str(SCRIPT), "kernel", "--arch", "cnngp1", "--x1", "digits:3", "--out",
                           str(out), "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert proc.returncode == 130, proc.stderr[-1500:]
    assert _lines(proc.stderr) == ["cnngp: interrupted; no output written"]
    assert not out.exists()


_INTERRUPT_SWALLOWED_AT_IMPORT = """\
import builtins, os, signal
real = builtins.__import__
def hook(name, *args, **kwargs):
    if name == "torch" and builtins.__import__ is hook:
        builtins.__import__ = real
        try:  # what numpy's extension did when a Ctrl-C arrived while it initialised
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        except KeyboardInterrupt:
            pass
        raise ImportError('PyCapsule_Import could not import module "datetime"') from None
    return real(name, *args, **kwargs)
builtins.__import__ = hook
"""


def test_ctrl_c_turned_into_an_unrelated_import_error_is_still_one_line_and_130(tmp_path):
    """A Ctrl-C that arrives while an extension initialises can surface as an ImportError with
    no link to the KeyboardInterrupt (seen on CI from numpy: "PyCapsule_Import could not import
    module 'datetime'"). Made deterministic here, at the first import ``main`` makes (torch's,
    inside ``deferred_interrupts``, which records the signal and raises nothing there, so the
    ImportError is all that comes out): the signal is real, the failure simulated. The signal
    was recorded, so it is still an interrupt, not a bug."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_INTERRUPT_SWALLOWED_AT_IMPORT)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = tmp_path / "k.npz"
    proc = subprocess.run([str(SCRIPT), "kernel", "--arch", "cnngp1", "--x1", "digits:3", "--out",
                           str(out), "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr[-1500:]
    assert proc.returncode == 130, proc.stderr[-1500:]
    assert _lines(proc.stderr) == ["cnngp: interrupted; no output written"]
    assert not out.exists()


def test_a_real_import_error_without_a_signal_is_still_a_bug(tmp_path):
    """The other side: the same ImportError with no signal received is reported as a bug
    (exit 1), not passed off as an interrupt."""
    (tmp_path / "site").mkdir()
    hook = _INTERRUPT_SWALLOWED_AT_IMPORT.replace("os.kill(os.getpid(), signal.SIGINT)", "pass")
    (tmp_path / "site" / "sitecustomize.py").write_text(hook)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    proc = subprocess.run([str(SCRIPT), "kernel", "--arch", "cnngp1", "--x1", "digits:3", "--out",
                           str(tmp_path / "k.npz"), "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr[-1500:]
    assert _lines(proc.stderr)[0].startswith("cnngp: internal error"), proc.stderr[-1500:]


def test_a_ctrl_c_while_torch_initialises_waits_for_it_then_interrupts():
    """torch's start-up calls back into Python from C++, where a KeyboardInterrupt aborts the
    process (SIGABRT, "terminate called after throwing ... pybind11::error_already_set"; seen
    once in the start-up test above). ``main`` imports torch inside
    ``deferred_interrupts``: a real SIGINT there runs no Python exception inside the block,
    is recorded, and is raised as KeyboardInterrupt when the block ends."""
    from cnngp.cli import signals as received

    before = signal.getsignal(signal.SIGINT)
    del received.SIGNALS_SEEN[:]
    reached_the_end = False
    with pytest.raises(KeyboardInterrupt):
        with received.deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes, here
                sum(range(100))
            reached_the_end = True
    assert reached_the_end and received.interrupted() == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # restored
    with received.deferred_interrupts():  # no signal: nothing raised
        pass
    del received.SIGNALS_SEEN[:]


def test_a_sigterm_while_torch_initialises_waits_for_it_then_terminates():
    """SIGTERM raises ``Terminated`` (a KeyboardInterrupt) from ``main``'s handler: inside
    ``deferred_interrupts`` it is recorded too, and delivered to that handler at the end."""
    from cnngp.cli import signals as received
    from cnngp.cli.main import Terminated, _on_sigterm

    before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        del received.SIGNALS_SEEN[:]
        reached_the_end = False
        with pytest.raises(Terminated):
            with received.deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    sum(range(100))
                reached_the_end = True
        assert reached_the_end and received.interrupted() == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is _on_sigterm
    finally:
        signal.signal(signal.SIGTERM, before)
        del received.SIGNALS_SEEN[:]


def test_an_ignored_ctrl_c_stays_ignored_while_torch_initialises():
    """A background job of a shell script starts with SIGINT ignored (SIG_IGN); the deferral
    must not turn that Ctrl-C into an interrupt."""
    from cnngp.cli import signals as received

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        del received.SIGNALS_SEEN[:]
        with received.deferred_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                sum(range(100))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and received.interrupted() is None
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_background_cnngp_ignores_ctrl_c_during_start_up(tmp_path):
    """The real command, started with SIGINT ignored (``cmd &`` in a script) and sent one
    while it starts: it finishes, exit 0."""
    script = ("import signal, subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-m', 'cnngp.cli', 'info', '--arch', 'cnngp1'],\n"
              "                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),\n"
              "                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
              "time.sleep(0.3); p.send_signal(signal.SIGINT)\n"
              "_, err = p.communicate(timeout=120); print(p.returncode); sys.stderr.write(err.decode())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(Path(cnngp.__file__).parents[1])})
    assert done.stdout.strip() == "0", done.stdout + done.stderr


# -- 6. the output never harms other files -----------------------------------------------------


def _refused(capsys, argv, flag="--out") -> str:
    code, stdout, err = _run(argv, capsys)
    assert code == 2, err
    assert stdout == "" and len(err) == 1, err
    assert err[0].startswith(f"{PREFIX}{flag}: "), err[0]
    return err[0]


def test_out_symlink_to_a_file_leaves_link_and_target_alone(small_inputs, tmp_path, capsys):
    x1, _ = small_inputs
    target = tmp_path / "precious.txt"
    target.write_bytes(b"the symlink's target: must stay as it is\n")
    os.chmod(target, 0o640)
    st = os.stat(target)
    link = tmp_path / "link.npz"
    os.symlink("precious.txt", link)
    before = _snapshot(tmp_path)
    line = _refused(capsys, _small_argv(x1, link))
    assert "symbolic link" in line and str(link) in line
    assert _snapshot(tmp_path) == before
    assert os.readlink(link) == "precious.txt" and link.is_symlink()
    after = os.stat(target)
    assert (after.st_ino, after.st_mode, after.st_size, after.st_mtime_ns) == (
        st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    assert target.read_bytes() == b"the symlink's target: must stay as it is\n"


def test_out_dangling_symlink_creates_nothing(small_inputs, tmp_path, capsys):
    x1, _ = small_inputs
    link = tmp_path / "link.npz"
    os.symlink("missing.npz", link)
    _refused(capsys, _small_argv(x1, link))
    assert not (tmp_path / "missing.npz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["link.npz"] and os.readlink(link) == "missing.npz"


def test_checkpoint_path_symlink_leaves_its_target_alone(small_inputs, tmp_path, capsys):
    x1, _ = small_inputs
    target = tmp_path / "precious.txt"
    target.write_bytes(b"not a checkpoint\n")
    out = tmp_path / "k.npz"
    os.symlink("precious.txt", f"{out}.checkpoint.npz")
    before = _snapshot(tmp_path)
    line = _refused(capsys, _small_argv(x1, out), flag="--out (its checkpoint)")
    assert "symbolic link" in line and f"{out}.checkpoint.npz" in line
    assert _snapshot(tmp_path) == before


def test_out_fifo_is_never_opened(small_inputs, tmp_path, capsys):
    x1, _ = small_inputs
    fifo = tmp_path / "k.npz"
    os.mkfifo(fifo)
    ino = os.lstat(fifo).st_ino
    # hold the read end open (non-blocking), so that a wrongful writer neither blocks the test
    # nor goes unnoticed
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        line = _refused(capsys, _small_argv(x1, fifo))
        assert "FIFO" in line
        try:
            data = os.read(reader, 1 << 16)
        except BlockingIOError:  # a writer has it open but wrote nothing
            data = b"<opened by a writer>"
        assert data == b""
    finally:
        os.close(reader)
    st = os.lstat(fifo)
    assert stat.S_ISFIFO(st.st_mode) and st.st_ino == ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.npz"]


def test_out_dev_null_is_refused_and_stays_a_device(small_inputs, capsys, monkeypatch):
    x1, _ = small_inputs
    before = os.stat("/dev/null")
    real_replace = os.replace

    def guarded(src, dst, *a, **k):  # broken code must not take the machine's /dev/null
        if os.path.realpath(dst).startswith("/dev/"):
            os.unlink(src)
            raise AssertionError(f"tried to rename a file onto {dst!r}")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", guarded)
    monkeypatch.setattr(os, "rename", guarded)
    line = _refused(capsys, _small_argv(x1, "/dev/null"))
    assert "character device" in line
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_ino, after.st_rdev, after.st_mode) == (before.st_ino, before.st_rdev, before.st_mode)
    assert not [p for p in os.listdir("/dev") if p.startswith(".null.")]  # no temp file beside it


def test_out_folder_is_refused_and_its_contents_kept(small_inputs, tmp_path, capsys):
    x1, _ = small_inputs
    folder = tmp_path / "k.npz"
    folder.mkdir()
    (folder / "inside.txt").write_text("keep\n")
    _refused(capsys, _small_argv(x1, folder))
    assert [p.name for p in folder.iterdir()] == ["inside.txt"]
    assert (folder / "inside.txt").read_text() == "keep\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.npz"]


def test_out_hard_link_other_name_keeps_the_old_bytes(small_inputs, small_reference, tmp_path, capsys):
    """OUT is replaced by a rename: another hard link to the old file keeps the old bytes."""
    x1, _ = small_inputs
    out = tmp_path / "k.npz"
    out.write_bytes(b"old result\n")
    os.link(out, tmp_path / "other-name.npz")
    code, _, err = _run(_small_argv(x1, out), capsys)
    assert code == 0 and err == []
    assert (tmp_path / "other-name.npz").read_bytes() == b"old result\n"
    assert os.stat(tmp_path / "other-name.npz").st_nlink == 1
    with np.load(out) as z:
        assert np.array_equal(z["kernel"], small_reference)


# -- 7. a non-finite kernel is never written ---------------------------------------------------


@pytest.fixture
def overflowing(tmp_path):
    """10 conv/ReLU layers of weight variance 1e5: the kernel reaches ~1e49, beyond float32."""
    spec = {"input_channels": 3,
            "layers": [{"type": "conv", "filter": 3, "weight_var": 1e5}, {"type": "relu"}] * 10
            + [{"type": "readout"}]}
    (tmp_path / "huge.json").write_text(json.dumps(spec))
    x = np.random.default_rng(1).uniform(size=(4, 6, 6, 3))
    np.savez(tmp_path / "x.npz", x=x)
    return tmp_path / "huge.json", tmp_path / "x.npz", cnngp.from_spec(spec), x


def test_overflowing_kernel_is_refused_by_the_library(overflowing):
    _, _, net, x = overflowing
    k64 = cnngp.kernel(net, x, dtype="float64").numpy()
    assert np.isfinite(k64).all() and k64.min() > np.finfo(np.float32).max  # float64 holds it
    with pytest.raises(cnngp.CNNGPError, match="overflowed"):
        cnngp.kernel(net, x, dtype="float32")


@pytest.mark.parametrize("every", [None, 0.0])
def test_overflowing_kernel_is_never_written(every, overflowing, tmp_path, monkeypatch, capsys):
    """Exit 2, one line saying 'overflowed', and nothing written: neither OUT nor a checkpoint
    of non-finite values (which the next run would refuse as 'corrupt', with advice to delete
    it, only to overflow again), also when checkpoints were saved along the way."""
    spec, xfile, _, _ = overflowing
    out = tmp_path / "k.npz"
    argv = ["kernel", "--arch", str(spec), "--x1", str(xfile), "--out", str(out), "--dtype",
            "float32", "--batch-size", "1", "--quiet"]
    before = _snapshot(tmp_path)
    for attempt in range(2):  # and a rerun says the same
        with monkeypatch.context() as m:
            if every is not None:
                _force_checkpoints(m, every)
            code, stdout, err = _run(argv, capsys)
        assert code == 2, (attempt, err)
        assert stdout == "" and len(err) == 1, (attempt, err)
        assert err[0].startswith(PREFIX) and "overflowed" in err[0], (attempt, err)
        assert _snapshot(tmp_path) == before, (attempt, sorted(_snapshot(tmp_path)))


def _after_checkpoint_opens(monkeypatch, interrupt_at=None) -> dict:
    """Count the pairs of the kernel's own pass (after its checkpoint is opened; the sweep's
    timing beforehand computes pairs too) and Ctrl-C at its ``interrupt_at``-th batch."""
    state = {"on": False, "calls": 0, "pairs": 0}
    real_init, real_values = storage.Checkpoint.__init__, gram._pair_values

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        state["on"] = True

    def values(plan, x1b, *args, **kwargs):
        if state["on"]:
            state["calls"] += 1
            if interrupt_at is not None and state["calls"] >= interrupt_at:
                raise KeyboardInterrupt
            state["pairs"] += x1b.shape[0]
        return real_values(plan, x1b, *args, **kwargs)

    monkeypatch.setattr(storage.Checkpoint, "__init__", init)
    monkeypatch.setattr(gram, "_pair_values", values)
    return state


def test_a_sweep_without_store_resumes_after_ctrl_c(tmp_path, monkeypatch, capsys):
    """``cnngp sweep`` without --store or --kernel-cache saves its kernels' progress beside
    --out; Ctrl-C exits 130 naming the checkpoint, the same command resumes from it (no pair is
    computed twice), the results equal an uninterrupted sweep's, and the checkpoint is gone."""
    argv = ["sweep", "--arch", "cnngp2", "--n", "40", "--lengthscales", "1", "--batch-size", "50",
            "--quiet"]
    whole = tmp_path / "whole"
    assert main(argv + ["--out", str(whole)]) == 0
    capsys.readouterr()
    out = tmp_path / "sw"
    ckpt = Path(f"{out}.checkpoint.train.npz")
    with monkeypatch.context() as m:
        _force_checkpoints(m, 0.0)
        _after_checkpoint_opens(m, interrupt_at=10)  # 820 pairs in batches of 50: the 10th
        code, _, err = _run(argv + ["--out", str(out)], capsys)
    assert code == 130, err
    assert err[-1] == f"cnngp: interrupted; progress saved to {ckpt}: rerun the same command to resume", err
    assert int(_load_checkpoint(ckpt)["pairs_done"]) == 9 * 50 and not out.exists()
    with monkeypatch.context() as m:
        state = _after_checkpoint_opens(m)
        assert main(argv + ["--out", str(out)]) == 0
    assert state["pairs"] == 820 - 450 + 10  # the rest, not all 820 (+ the float64 spot check's 10)
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, out))
    a.pop("timing"), b.pop("timing")
    assert a == b
    assert not ckpt.exists()


def test_a_sweep_replaces_a_checkpoint_of_other_settings(tmp_path, monkeypatch, capsys):
    """A checkpoint left beside --out by a sweep on other settings is replaced (one warning
    line), not refused: the prefix belongs to the sweep's output."""
    out = tmp_path / "sw"
    argv = ["sweep", "--arch", "cnngp2", "--n", "40", "--lengthscales", "1", "--batch-size", "50",
            "--quiet", "--out", str(out)]
    with monkeypatch.context() as m:
        _force_checkpoints(m, 0.0)
        _after_checkpoint_opens(m, interrupt_at=3)
        assert _run(argv, capsys)[0] == 130
    assert Path(f"{out}.checkpoint.train.npz").exists()
    code, _, err = _run([a if a != "cnngp2" else "cnngp1" for a in argv], capsys)
    assert code == 0, err
    assert any(e.startswith("cnngp: warning: ") and "starting over" in e for e in err), err
    assert not Path(f"{out}.checkpoint.train.npz").exists()


# -- a full disk under a kernel store (issue 28) -------------------------------------------------


def _full_disk_after(monkeypatch, chunks: int, prefix: str = "kernel/") -> list:
    """Zarr's local store accepts ``chunks`` chunk writes under ``prefix``, then fails each
    like a full disk (``Store.set`` is zarr's public store interface)."""
    import zarr.storage

    real = zarr.storage.LocalStore.set
    seen = []

    async def set(self, key, value):
        if key.startswith(prefix) and "/c/" in key:  # chunks, not metadata
            seen.append(key)
            if len(seen) > chunks:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set)
    return seen


@pytest.mark.parametrize("where", ["tile", "self"])
def test_disk_full_under_a_store_names_the_flag_keeps_the_tiles_and_a_rerun_finishes(
    where, small_inputs, small_reference, tmp_path, monkeypatch, capsys
):
    """A full disk while a tile (or an image block's self records) is written: one line naming
    --out, the store, the item and the finished tiles kept; no torn record or temporary file;
    the same command, rerun with room, finishes the kernel bit for bit."""
    x1, _ = small_inputs
    out = tmp_path / "K.zarr"
    argv = ["kernel", "--arch", "cnngp2", "--x1", str(x1), "--out", str(out), "--tile", "2", "--quiet"]
    with monkeypatch.context() as m:
        _full_disk_after(m, 2 if where == "tile" else 1, "kernel/" if where == "tile" else "self/")
        code, stdout, err = _run(argv, capsys)
    assert code == 2 and stdout == "" and len(err) == 1, err
    item = r"tile tile-\d+-\d+" if where == "tile" else r"the self records of x1 block \d+"
    assert re.fullmatch(
        rf"cnngp: error: --out: writing {item} of {re.escape(repr(str(out)))} failed \(No space left on "
        r"device\); its \d+ finished tile\(s\) are kept: free space \(or fix the folder\) and rerun "
        r"the same command to resume", err[0]), err[0]
    records = sorted(p.name for p in (out / "records").iterdir())
    assert all(name.endswith(".json") and not name.startswith(".") for name in records), records
    kept = len([n for n in records if n.startswith("tile-")])
    assert f"its {kept} finished tile(s)" in err[0]
    assert (kept >= 1) == (where == "tile")  # the 2 chunks written are the first tile and its mirror
    code, stdout, err = _run(argv, capsys)
    assert code == 0, err
    k = cnngp.engine.store.KernelStore.open(out).readout(0)
    np.testing.assert_array_equal(k, small_reference)


def test_a_store_write_error_crosses_process_boundaries_and_takes_the_callers_flag():
    """Tasks on Dask workers raise it with the store's path only; it pickles whole, and the
    driver names its own flag (--out for `kernel`, --store for a sweep)."""
    import pickle

    from cnngp.engine.store import StoreWriteError

    e = StoreWriteError("store", "tile tile-0-1", "/x/K.zarr", "No space left on device", 3)
    back = pickle.loads(pickle.dumps(e))
    assert str(back) == str(e) and isinstance(back, cnngp.CNNGPError)
    assert str(back.named("--store")).startswith(
        "--store: writing tile tile-0-1 of '/x/K.zarr' failed (No space left on device); its 3 finished")


def test_a_store_stopped_while_being_created_says_so_and_is_refused_with_the_remedy(tmp_path, capsys, monkeypatch):
    """Ctrl-C while a kernel store's arrays are being made (its images written, say): the
    interrupt line used to promise a resume, and the rerun said "not a cnngp-kernel-store/1
    store (format None)", with no remedy. Now the interrupt says the store was stopped while
    being created, a rerun is refused in one line naming the remedy, and after deleting it the
    same command gives the kernel."""
    import shutil

    import zarr

    x = tmp_path / "x.npz"
    np.savez(x, x=np.random.default_rng(0).random((12, 6, 6, 1)))
    out = tmp_path / "K.zarr"
    command = ["kernel", "--arch", "cnngp1", "--x1", str(x), "--out", str(out), "--quiet"]
    real = zarr.Group.create_array

    def stopped(self, name, *args, **kwargs):
        if name == "x1":
            raise KeyboardInterrupt
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", stopped)
    capsys.readouterr()
    assert main(command) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was stopped while it was being created" in err[0] and "resume" not in err[0], err
    monkeypatch.setattr(zarr.Group, "create_array", real)
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was left half-created" in err[0] and "delete it and run again" in err[0], err
    shutil.rmtree(out)
    assert main(command) == 0
    from cnngp.engine.store import KernelStore

    stored = KernelStore.open(out).readout(0)
    direct = cnngp.kernel(load_network("cnngp1"), np.load(x)["x"], dtype="float64").numpy()
    np.testing.assert_allclose(stored, direct, rtol=1e-12)


def test_a_second_run_on_a_store_being_written_is_refused_naming_the_process(tmp_path, capsys):
    """Two runs on one store (two shells, two batch jobs) used to compute the same tiles side
    by side, each verifying the other's half-written chunks (and forgetting their records). The
    run that fills a store now holds a lock on its folder: a second, from another process, is
    refused in one line naming that process, writes nothing, and once the first has ended (the
    operating system releases its lock however it ends) the same command runs and gives the
    kernel."""
    from cnngp.engine.store import KernelStore

    x = tmp_path / "x.npz"
    np.savez(x, x=np.random.default_rng(1).random((5, 6, 6, 1)))
    out = tmp_path / "K.zarr"
    command = ["kernel", "--arch", "cnngp1", "--x1", str(x), "--out", str(out), "--quiet"]
    holder = subprocess.Popen(  # another process, in the middle of filling the store
        [PYTHON, "-c", "import sys\nfrom cnngp.engine.store import writer_lock\n"
                       f"with writer_lock({str(out)!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is being written by another run right now" in err[0], err
        if Path("/proc/locks").exists():
            assert f"(process {holder.pid} on this machine)" in err[0], err
        assert list(out.iterdir()) == []  # nothing written
    finally:
        holder.stdin.close()  # the holder ends: its lock goes with it
        holder.wait(timeout=60)
    assert main(command) == 0
    direct = cnngp.kernel(load_network("cnngp1"), np.load(x)["x"], dtype="float64").numpy()
    np.testing.assert_allclose(KernelStore.open(out).readout(0), direct, rtol=1e-12)
    assert main(command) == 0  # the finished run let go of it too: a rerun (nothing to do) is let in
    # `cnngp info` names a run filling the store (it only looks: the run is not disturbed)
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("tiles done (complete)")
    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys\nfrom cnngp.engine.store import writer_lock\n"
                       f"with writer_lock({str(out)!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["info", str(out)]) == 0
        first = capsys.readouterr().out.splitlines()[0]
        if Path("/proc/locks").exists():
            assert first.endswith(f"(complete; being written now by process {holder.pid} on this machine)"), first
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_without_flock_a_store_is_written_unlocked(tmp_path, monkeypatch):
    """Where the platform has no ``fcntl`` (Windows) cnngp imports and writes stores as before,
    unlocked: the lock is a guard, never a requirement."""
    from cnngp.engine import store

    monkeypatch.setattr(store, "fcntl", None)
    out = tmp_path / "K.zarr"
    with store.writer_lock(out), store.writer_lock(out):  # a second run is not told apart here
        assert out.is_dir()
    x = tmp_path / "x.npz"
    np.savez(x, x=np.random.default_rng(2).random((3, 6, 6, 1)))
    assert main(["kernel", "--arch", "cnngp1", "--x1", str(x), "--out", str(tmp_path / "L.zarr"), "--quiet"]) == 0

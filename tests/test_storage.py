"""Interrupted Gram computations resume from their checkpoint and give the same matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cnngp
from cnngp import CNNGPError, Matern, Readout
from cnngp.engine import gram
from cnngp.engine.storage import Checkpoint, read_npz
from conftest import needs_proc, open_handles


@pytest.fixture
def setup():
    x = np.random.default_rng(0).uniform(size=(7, 6, 6, 2))
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), Readout(correlation=Matern(1.5, 2.0)))
    return net, x


def _interrupt_after(monkeypatch, calls):
    real = gram._pair_values
    count = {"n": 0}

    def flaky(*args):
        count["n"] += 1
        if count["n"] > calls:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(gram, "_pair_values", flaky)


def test_interrupted_kernel_resumes_to_the_same_matrix(setup, tmp_path, monkeypatch):
    net, x = setup
    expected = cnngp.kernel(net, x, batch_size=5)
    path = tmp_path / "k.checkpoint.npz"
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        cnngp.kernel(net, x, batch_size=5, checkpoint=path)
    with np.load(path) as z:
        assert int(z["pairs_done"]) == 10  # two batches of 5 of the 28 upper-triangle pairs
    monkeypatch.undo()
    calls = []
    real = gram._pair_values
    monkeypatch.setattr(gram, "_pair_values", lambda *a: calls.append(1) or real(*a))
    resumed = cnngp.kernel(net, x, batch_size=3, checkpoint=path)  # another batch size is fine
    assert len(calls) == 6  # only the 18 remaining pairs were computed
    assert torch.equal(resumed, expected)
    assert not path.exists()


def test_checkpoint_of_another_computation_is_refused(setup, tmp_path, monkeypatch):
    net, x = setup
    path = tmp_path / "k.checkpoint.npz"
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        cnngp.kernel(net, x, batch_size=5, checkpoint=path)
    monkeypatch.undo()
    with pytest.raises(CNNGPError, match=r"belongs to a different computation"):
        cnngp.kernel(net, x[:6], checkpoint=path)
    path.write_bytes(b"garbage")
    with pytest.raises(CNNGPError, match=r"is unreadable .* delete it to start over"):
        cnngp.kernel(net, x, checkpoint=path)


def test_cli_kernel_resumes(setup, tmp_path, monkeypatch, capsys):
    from cnngp.cli.main import main

    _, x = setup
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "k.npz"
    args = ["kernel", "--arch", "cnngp1", "--x1", str(tmp_path / "x.npz"), "--out", str(out),
            "--batch-size", "4", "--quiet"]
    _interrupt_after(monkeypatch, 3)
    assert main(args) == 130
    assert not out.exists() and (tmp_path / "k.npz.checkpoint.npz").exists()
    assert "interrupted" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args) == 0
    assert not (tmp_path / "k.npz.checkpoint.npz").exists()
    expected = cnngp.kernel(cnngp.io.architectures.get("cnngp1"), x)
    np.testing.assert_array_equal(np.load(out)["kernel"], expected.numpy())


def test_checkpoint_save_is_atomic(tmp_path):
    ck = Checkpoint(tmp_path / "c.npz", "key")
    ck.save(torch.ones(1, 2, 2), 3)
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]
    values, done = ck.load((1, 2, 2), torch.float64, 3)
    assert done == 3 and torch.equal(values, torch.ones(1, 2, 2, dtype=torch.float64))


def _truncated_npz(path):
    np.savez(path, key=np.array("k"), values=np.arange(4000.0))
    path.write_bytes(path.read_bytes()[:300])  # the zip's central directory is gone
    return path


@needs_proc
def test_unreadable_checkpoint_is_refused_with_its_file_closed(tmp_path):
    # np.load(path) of a truncated zip keeps its file open for as long as the error lives
    path = _truncated_npz(tmp_path / "k.checkpoint.npz")
    with pytest.raises(CNNGPError, match=r"unreadable .*delete it to start over") as info:
        Checkpoint(path, key="k").load((1, 4), torch.float64, n_pairs=4)
    assert str(path) in str(info.value)
    assert open_handles(path) == 0  # checked while the error (and its traceback) is alive


@needs_proc
def test_read_npz_closes_its_file_on_every_exit(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, a=np.arange(3))
    with read_npz(good) as z:
        assert open_handles(good) == 1
        np.testing.assert_array_equal(z["a"], [0, 1, 2])
    assert open_handles(good) == 0
    with pytest.raises(RuntimeError, match="inside"):
        with read_npz(good):
            raise RuntimeError("inside")
    assert open_handles(good) == 0
    bad = _truncated_npz(tmp_path / "bad.npz")
    with pytest.raises(Exception):
        with read_npz(bad):
            pass
    assert open_handles(bad) == 0
    npy = tmp_path / "plain.npy"
    np.save(npy, np.arange(3))
    with pytest.raises(ValueError, match="not a .npz archive"):
        with read_npz(npy):
            pass
    assert open_handles(npy) == 0
    with pytest.raises(ValueError):  # an object array is never unpickled
        with read_npz(_pickled(tmp_path / "obj.npz")) as z:
            z["a"]


def _pickled(path):
    np.savez(path, a=np.array([object()], dtype=object))
    return path

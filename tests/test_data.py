"""Tests of cnngp.io.data: loaders of local files and class-balanced subsets."""

from __future__ import annotations

import gzip
import os
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from cnngp.errors import CNNGPError
from cnngp.io.data import (
    CIFAR10_CLASSES,
    Dataset,
    balanced_subset,
    blocks,
    load_array,
    load_dataset,
    load_digits,
)

# --------------------------------------------------------------------------------------
# Writers of the official file formats (independent of the loader)
# --------------------------------------------------------------------------------------


def _random_cifar(rng, n):
    """Images (n, 32, 32, 3) uint8 HWC and labels (n,) in 0..9."""
    return (
        rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, size=n).astype(np.uint8),
    )


def _write_cifar_bin(folder: Path, sizes=(3, 2, 4, 1, 2, 3), seed=0):
    """Write data_batch_1..5.bin + test_batch.bin; return (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    xs, ys = [], []
    for name, n in zip(names, sizes):
        x, y = _random_cifar(rng, n)
        with open(folder / name, "wb") as fh:
            for img, lab in zip(x, y):
                fh.write(bytes([int(lab)]))
                fh.write(img.transpose(2, 0, 1).tobytes())  # CHW, row-major
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def _write_cifar_py(folder: Path, sizes=(3, 2, 4, 1, 2, 3), seed=1, protocol=2):
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    xs, ys = [], []
    for name, n in zip(names, sizes):
        x, y = _random_cifar(rng, n)
        batch = {
            b"batch_label": b"training batch",
            b"labels": [int(v) for v in y],
            b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072).copy(),
            b"filenames": [b"img_%d.png" % i for i in range(n)],
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
    head += struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, gz: bool, seed=2, n_train=7, n_test=4):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, arr in arrays.items():
        data = _idx_bytes(arr)
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as fh:
                fh.write(data)
        else:
            (folder / name).write_bytes(data)
    return arrays


# --------------------------------------------------------------------------------------
# digits and .npz
# --------------------------------------------------------------------------------------


def test_load_digits_matches_sklearn():
    from sklearn.datasets import load_digits as sk

    x, y = load_digits()
    ref = sk()
    assert x.shape == (1797, 8, 8, 1) and x.dtype == np.float64
    np.testing.assert_array_equal(x[..., 0] * 16.0, ref.images)
    np.testing.assert_array_equal(y, ref.target)
    assert x.min() == 0.0 and x.max() == 1.0
    ds = load_dataset("digits")
    assert ds.name == "digits" and ds.x_test is None and ds.n_classes == 10
    np.testing.assert_array_equal(ds.x_train, x)


def test_npz_round_trip_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (6, 4, 5, 3), dtype=np.uint8)
    xte = rng.random((3, 4, 5, 3))
    np.savez(
        tmp_path / "toy.npz",
        x_train=xtr,
        y_train=np.array([0, 1, 2, 0, 1, 2], np.uint8),
        x_test=xte,
        y_test=np.array([2, 1, 0]),
        class_names=np.array(["a", "b", "c"]),
    )
    ds = load_dataset(tmp_path / "toy.npz")
    assert isinstance(ds, Dataset)
    np.testing.assert_array_equal(ds.x_train * 255.0, xtr.astype(np.float64))
    np.testing.assert_array_equal(ds.x_test, xte)
    assert ds.y_train.dtype == np.int64 and ds.y_train.tolist() == [0, 1, 2, 0, 1, 2]
    assert ds.class_names == ("a", "b", "c") and ds.name == "toy"
    assert ds.image_shape == (4, 5, 3)
    # one line of what was read: the 8-bit training images scaled into [0, 1]
    lo, hi = xtr.min() / 255, xtr.max() / 255
    assert ds.describe() == (f"6 training images of 4×5, 3 channels, values in [{lo:.3g}, {hi:.3g}], 3 classes; "
                             "3 test images")


def test_describe_says_what_a_data_set_holds_as_read(tmp_path):
    """The sweep's first line: digits (no test split, 1 channel), signals, and raw values a
    file left unscaled (0 … 255 as float), which the line makes visible."""
    assert load_dataset("digits").describe() == ("1,797 training images of 8×8, 1 channel, values in [0, 1], "
                                                "10 classes; no test split")
    np.savez(tmp_path / "raw.npz", x_train=np.linspace(0, 255, 2 * 7 * 2).reshape(2, 7, 2),
             y_train=np.array([0, 1]))
    assert load_dataset(tmp_path / "raw.npz").describe() == (
        "2 training images of length 7, 2 channels, values in [0, 255], 2 classes; no test split")


@pytest.mark.filterwarnings("ignore:max_iter")
def test_sweep_and_learn_print_the_data_line_first(tmp_path, capsys):
    from cnngp.cli.main import main

    digits = "data: digits: 1,797 training images of 8×8, 1 channel, values in [0, 1], 10 classes; no test split"
    assert main(["sweep", "--arch", "cnngp1", "--n", "20", "--folds", "2", "--lengthscales", "1",
                 "--out", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().err.splitlines()[0] == digits + "; class-balanced training subsets of N = 20 (seed 0)"
    assert main(["learn", "--arch", "cnngp1", "--n", "20", "--folds", "2", "--max-iter", "2",
                 "--seed", "3", "--out", str(tmp_path / "l")]) == 0
    assert capsys.readouterr().err.splitlines()[0] == digits + "; a class-balanced training subset of n = 20 (seed 3)"
    assert main(["sweep", "--arch", "cnngp1", "--n", "20", "--folds", "2", "--lengthscales", "1", "--quiet",
                 "--out", str(tmp_path / "q")]) == 0
    assert "data:" not in capsys.readouterr().err


def test_npz_three_axes_are_signals_and_default_names(tmp_path):
    # one layout rule everywhere: (N, *spatial, C), so 3 axes are N 1-D signals (N, L, C),
    # as in cnngp.kernel; grey images carry their channel axis
    np.savez(tmp_path / "g.npz", x_train=np.zeros((4, 3, 3), np.uint8), y_train=[0, 1, 3, 1])
    ds = load_dataset(str(tmp_path / "g.npz"))
    assert ds.x_train.shape == (4, 3, 3)
    assert ds.class_names == ("0", "1", "2", "3") and ds.x_test is None


def test_one_dtype_policy_for_datasets_and_the_api(tmp_path):
    """bool is 0/1, int16 is taken as its numbers, uint8 is scaled: the same in load_dataset
    (sweep), cnngp.kernel (API) and as_images (CLI)."""
    import cnngp
    from cnngp.validation import as_images

    net = cnngp.Serial(cnngp.Conv(1), cnngp.ReLU(), cnngp.Readout())
    raw = np.array([[[[0], [1]], [[1], [0]]], [[[1], [1]], [[0], [0]]]])
    for dtype, scale in ((np.bool_, 1.0), (np.int16, 1.0), (np.uint8, 1 / 255), (np.float32, 1.0)):
        x = raw.astype(dtype)
        np.savez(tmp_path / "d.npz", x_train=x, y_train=[0, 1])
        np.testing.assert_array_equal(load_dataset(tmp_path / "d.npz").x_train, raw * scale)
        np.testing.assert_array_equal(as_images(x), raw * scale)
        np.testing.assert_allclose(
            cnngp.kernel(net, x).numpy(), cnngp.kernel(net, raw * scale).numpy(), rtol=1e-15
        )


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(y_train=[0]), r"lacks the array\(s\) \['x_train'\]"),
        (dict(x_train=np.zeros((3, 2, 2, 1)), y_train=[0, 1]), "mismatched lengths"),
        (
            dict(x_train=np.zeros((2, 2, 2, 1)), y_train=[0, 3], class_names=["a", "b"]),
            r"label 3, out of range for 2 classes",
        ),
        (dict(x_train=np.zeros((2, 2, 2, 1)), y_train=[0, -1]), "negative label"),
        (dict(x_train=np.zeros((2, 2, 2, 1), np.complex64), y_train=[0, 1]), "got a complex array"),
        (dict(x_train=np.full((2, 2, 2, 1), 1e200), y_train=[0, 1]), r"pixel values reach 1e\+200"),
        (
            dict(x_train=np.zeros((2, 2, 2, 1)), y_train=[0, 1], x_test=np.zeros((1, 2, 2, 1))),
            "only one of x_test / y_test",
        ),
        (dict(x_train=np.zeros((2, 2, 2, 1)), y_train=[0.5, 1]), "integer class labels"),
    ],
)
def test_npz_validation(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset(tmp_path / "bad.npz")


def test_missing_source_and_non_npz_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset(tmp_path / "nope.npz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a .npz archive"):
        load_dataset(tmp_path / "x.txt")
    (tmp_path / "fake.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not a .npz archive"):
        load_dataset(tmp_path / "fake.npz")


# --------------------------------------------------------------------------------------
# load_array
# --------------------------------------------------------------------------------------


def test_load_array(tmp_path):
    x8 = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.savez(tmp_path / "a.npz", x_train=x8, k=np.eye(2, dtype=np.float32), other=np.arange(3))
    out = load_array(tmp_path / "a.npz")
    assert out.dtype == np.uint8  # as stored: as_images scales it, in one place
    np.testing.assert_array_equal(out, x8)
    np.testing.assert_array_equal(load_array(f"{tmp_path / 'a.npz'}:k"), np.eye(2))
    np.testing.assert_array_equal(load_array(f"{tmp_path / 'a.npz'}:other"), [0.0, 1.0, 2.0])
    np.savez(tmp_path / "one.npz", kernel=np.ones((2, 2)))
    np.testing.assert_array_equal(load_array(tmp_path / "one.npz"), np.ones((2, 2)))


def test_load_array_errors(tmp_path):
    np.savez(tmp_path / "a.npz", p=np.zeros(2), q=np.zeros(2))
    with pytest.raises(FileNotFoundError, match="file not found"):
        load_array(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match=r"no array 'zz'.*available arrays: \['p', 'q'\]"):
        load_array(f"{tmp_path / 'a.npz'}:zz")
    with pytest.raises(ValueError, match=r"none of the default arrays.*\['p', 'q'\]"):
        load_array(tmp_path / "a.npz")
    np.save(tmp_path / "plain.npy", np.zeros(2))
    with pytest.raises(ValueError, match="not a .npz archive"):
        load_array(tmp_path / "plain.npy")
    np.savez(tmp_path / "s.npz", x=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="non-numeric"):
        load_array(tmp_path / "s.npz")
    # a valid zip behind a .npy array passes zipfile.is_zipfile, and np.load reads the array
    behind = (tmp_path / "plain.npy").read_bytes() + (tmp_path / "a.npz").read_bytes()
    (tmp_path / "behind.npz").write_bytes(behind)
    with pytest.raises(CNNGPError, match=r"^path_spec: cannot read \.npz archive .*behind\.npz"):
        load_array(tmp_path / "behind.npz")


# --------------------------------------------------------------------------------------
# CIFAR-10 binary and python
# --------------------------------------------------------------------------------------


def test_cifar_binary_round_trip(tmp_path):
    xtr, ytr, xte, yte = _write_cifar_bin(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.name == "cifar10" and ds.class_names == CIFAR10_CLASSES
    assert ds.x_train.shape == (12, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.x_train * 255.0, xtr.astype(np.float64))
    np.testing.assert_array_equal(ds.x_test * 255.0, xte.astype(np.float64))
    np.testing.assert_array_equal(ds.y_train, ytr)
    np.testing.assert_array_equal(ds.y_test, yte)


def test_cifar_binary_in_official_subfolder(tmp_path):
    sub = tmp_path / "cifar-10-batches-bin"
    sub.mkdir()
    xtr, ytr, _, _ = _write_cifar_bin(sub)
    ds = load_dataset(tmp_path)
    np.testing.assert_array_equal(ds.y_train, ytr)


def test_cifar_binary_truncated_and_bad_label(tmp_path):
    _write_cifar_bin(tmp_path)
    f = tmp_path / "data_batch_3.bin"
    raw = f.read_bytes()
    f.write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin is truncated"):
        load_dataset(tmp_path)
    f.write_bytes(bytes([10]) + raw[1:])
    with pytest.raises(ValueError, match=r"label 10, out of range for 10 classes"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_round_trip(tmp_path, protocol):
    xtr, ytr, xte, yte = _write_cifar_py(tmp_path, protocol=protocol)
    ds = load_dataset(tmp_path)
    np.testing.assert_array_equal(ds.x_train * 255.0, xtr.astype(np.float64))
    np.testing.assert_array_equal(ds.x_test * 255.0, xte.astype(np.float64))
    np.testing.assert_array_equal(ds.y_train, ytr)
    np.testing.assert_array_equal(ds.y_test, yte)


class _Evil:
    """Pickles to a call of os.system: loading it with plain pickle runs a command."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


class _EvalEvil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (eval, (f"open({str(self.sentinel)!r}, 'w').close()",))


@pytest.mark.parametrize("evil_cls", [_Evil, _EvalEvil])
def test_cifar_python_malicious_pickle_rejected(tmp_path, evil_cls):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write_cifar_py(data_dir)
    sentinel = tmp_path / "SENTINEL"
    # Sanity check of the oracle: plain pickle would run the payload.
    payload = pickle.dumps({b"data": evil_cls(sentinel), b"labels": [0]}, protocol=2)
    (data_dir / "data_batch_2").write_bytes(payload)
    with pytest.raises(ValueError, match=r"refusing to load global .*only NumPy array"):
        load_dataset(data_dir)
    assert not sentinel.exists()
    pickle.loads(payload)  # the unrestricted unpickler does create it
    assert sentinel.exists()


def test_cifar_python_truncated_and_wrong_content(tmp_path):
    _write_cifar_py(tmp_path)
    f = tmp_path / "test_batch"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"test_batch \(truncated or corrupt\)"):
        load_dataset(tmp_path)
    with open(f, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(ValueError, match=r"shape \(N, 3072\)"):
        load_dataset(tmp_path)
    with open(f, "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, fh)
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------
# MNIST IDX
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_round_trip(tmp_path, gz):
    arrays = _write_mnist(tmp_path, gz)
    ds = load_dataset(tmp_path)
    assert ds.name == "mnist" and ds.x_train.shape == (7, 28, 28, 1)
    np.testing.assert_array_equal(
        ds.x_train[..., 0] * 255.0, arrays["train-images-idx3-ubyte"].astype(np.float64)
    )
    np.testing.assert_array_equal(
        ds.x_test[..., 0] * 255.0, arrays["t10k-images-idx3-ubyte"].astype(np.float64)
    )
    np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_mnist_corrupt_files(tmp_path):
    arrays = _write_mnist(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    good = f.read_bytes()
    f.write_bytes(good[:-10])
    with pytest.raises(ValueError, match=r"truncated or corrupt.*shape \(7, 28, 28\)"):
        load_dataset(tmp_path)
    f.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match="bad magic number"):
        load_dataset(tmp_path)
    f.write_bytes(good)
    labels = arrays["train-labels-idx1-ubyte"].copy()
    labels[0] = 12
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    with pytest.raises(ValueError, match="label 12, out of range"):
        load_dataset(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        _idx_bytes(arrays["train-labels-idx1-ubyte"][:5])
    )
    with pytest.raises(ValueError, match="7 images but 5 labels"):
        load_dataset(tmp_path)


def test_mnist_bad_gzip(tmp_path):
    _write_mnist(tmp_path, gz=True)
    f = tmp_path / "t10k-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset(tmp_path)


def test_folder_without_known_files(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    looked_for = r"Looked for: CIFAR-10 binary \(data_batch_1\.bin"
    with pytest.raises(FileNotFoundError, match=looked_for) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert "test_batch" in msg and "train-images-idx3-ubyte[.gz]" in msg
    (tmp_path / "data_batch_1.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"incomplete; missing \['data_batch_2\.bin'"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------
# Balanced subsets and blocks
# --------------------------------------------------------------------------------------


def test_balanced_subset_interleaved_and_seeded():
    rng = np.random.default_rng(3)
    y = rng.permutation(np.repeat(np.arange(10), 30))
    idx = balanced_subset(y, 200, seed=7)
    assert idx.shape == (200,) and len(np.unique(idx)) == 200
    np.testing.assert_array_equal(y[idx], np.tile(np.arange(10), 20))
    np.testing.assert_array_equal(idx, balanced_subset(y, 200, seed=7))
    assert not np.array_equal(idx, balanced_subset(y, 200, seed=8))
    # Taking every image of every class is balanced too.
    big = balanced_subset(y, 300, seed=7)
    assert np.all(np.bincount(y[big]) == 30)


def test_balanced_subset_errors():
    y = np.repeat(np.arange(3), [4, 5, 6])
    with pytest.raises(ValueError, match="multiple of the number of classes"):
        balanced_subset(y, 7, seed=0)
    with pytest.raises(ValueError, match="class 0 has only 4"):
        balanced_subset(y, 15, seed=0)
    with pytest.raises(ValueError, match=r"class\(es\) \[1\] missing"):
        balanced_subset(np.array([0, 2, 2, 0]), 2, seed=0)
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] missing"):
        balanced_subset(y, 3, seed=0, n_classes=4)


def test_blocks_disjoint_cover_balanced():
    y = np.repeat(np.arange(10), 40)
    order = balanced_subset(y, 320, seed=0)
    bl = blocks(320, 80)
    assert len(bl) == 4
    allidx = np.concatenate(bl)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(320))
    for b in bl:
        assert np.all(np.bincount(y[order[b]], minlength=10) == 8)
    with pytest.raises(ValueError, match="does not divide"):
        blocks(320, 60)
    with pytest.raises(ValueError, match="not a multiple of the number of classes"):
        blocks(320, 64, n_classes=10)


# --------------------------------------------------------------------------------------
# The committed real-data slice (examples/cifar10-small.npz, examples/README.md)
# --------------------------------------------------------------------------------------


def test_example_cifar10_slice():
    path = Path(__file__).resolve().parents[1] / "examples" / "cifar10-small.npz"
    ds = load_dataset(path)
    assert ds.x_train.shape == (320, 32, 32, 3) and ds.x_test.shape == (100, 32, 32, 3)
    assert ds.class_names == CIFAR10_CLASSES
    assert np.all(np.bincount(ds.y_train) == 32) and np.all(np.bincount(ds.y_test) == 10)
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    raw = np.load(path)
    assert raw["x_train"].dtype == np.uint8
    # rows in official order, from the official splits
    assert np.all(np.diff(raw["train_idx"]) > 0) and np.all(np.diff(raw["test_idx"]) > 0)
    assert raw["train_idx"].max() < 50000 and raw["test_idx"].max() < 10000
    # per-channel means of the slice (0-255), a fingerprint of its pixels
    np.testing.assert_allclose(
        raw["x_train"].mean(axis=(0, 1, 2)), [122.82890015, 120.89560242, 110.69584961], atol=1e-6
    )
    # its first images are the inputs of the neural-tangents reference kernels
    ref = np.load(Path(__file__).resolve().parent / "reference" / "cnngp4.npz")["x"]
    np.testing.assert_array_equal(ds.x_train[: len(ref)], ref)
    idx = balanced_subset(ds.y_train, 320, seed=0)
    np.testing.assert_array_equal(ds.y_train[idx][:20], np.tile(np.arange(10), 2))


@pytest.mark.filterwarnings("ignore:max_iter")
def test_the_data_line_never_precedes_a_refusal(tmp_path, capsys):
    """A refused kernel cache (sweep) or a refused resumed store (learn) is said in one line:
    the data line comes only once the checks have passed."""
    from cnngp.cli.main import main

    sweep = ["sweep", "--arch", "cnngp1", "--n", "20", "--folds", "2", "--out", str(tmp_path / "o"),
             "--kernel-cache", str(tmp_path / "c.npz")]
    assert main(sweep + ["--lengthscales", "1"]) == 0
    assert main(sweep + ["--lengthscales", "1"]) == 0  # read from the cache: the line, after reading it
    assert capsys.readouterr().err.count("data: digits:") == 2
    assert main(sweep + ["--lengthscales", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnngp: error: --kernel-cache:"), err
    learn = ["learn", "--arch", "cnngp1", "--n", "20", "--folds", "2", "--max-iter", "2", "--params", "readout",
             "--store", str(tmp_path / "L.zarr"), "--out", str(tmp_path / "l")]
    assert main(learn) == 0
    capsys.readouterr()
    assert main(learn + ["--seed", "1"]) == 2  # other training images: the store is refused
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"^cnngp: error: --store: .*L\.zarr' holds a kernel of different images",
                                       err[0]), err

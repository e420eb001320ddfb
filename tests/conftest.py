import os
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
# neural-tangents reference kernels, committed (tests/reference/README.md: what and whence)
REFERENCE = HERE / "reference"
# small real-image slices committed for the examples and the tests (examples/README.md)
EXAMPLES = HERE.parent / "examples"
CIFAR_SMALL = EXAMPLES / "cifar10-small.npz"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def open_handles(path) -> int:
    """How many of this process's file descriptors point at ``path`` (Linux /proc)."""
    target = str(Path(path).resolve())
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(fd) == target
        except OSError:  # the descriptor of the listing itself, closed meanwhile
            pass
    return count


def digits_npz(path):
    """A small .npz data set in the file format users give ``--data``: the first 600 scikit-learn
    digits as uint8 8×8×1 training images, the last 297 as test images."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x8 = np.round(x * 255 / 16).astype(np.uint8).reshape(-1, 8, 8, 1)
    np.savez(path, x_train=x8[:600], y_train=y[:600].astype(np.uint8), x_test=x8[1500:],
             y_test=y[1500:].astype(np.uint8))
    return path


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")


@pytest.fixture(scope="session")
def dask_cluster():
    """One 2-process Dask LocalCluster (loopback only) for every test that runs tiles on real
    workers: started once, as a user's cluster is, rather than once per test (seconds each)."""
    pytest.importorskip("distributed")
    from cnngp.engine.distributed import dask_client

    with dask_client(workers=2) as c:
        c.wait_for_workers(2, timeout=60)
        yield c


@pytest.fixture(scope="session")
def reference_dir():
    """The committed neural-tangents reference kernels (never skipped: they are in the repo)."""
    assert REFERENCE.is_dir(), f"{REFERENCE} is missing from this checkout"
    return REFERENCE


@pytest.fixture(scope="session")
def cifar_images(reference_dir):
    """Six real CIFAR-10 crops, 12×12×3."""
    return np.load(reference_dir / "cnngp4.npz")["x"][:6, :12, :12]


@pytest.fixture(scope="session")
def cifar32(reference_dir):
    """Four real CIFAR-10 images, 32×32×3."""
    return np.load(reference_dir / "cnngp4.npz")["x"][:4]


def last_bits_changed(x: np.ndarray, where) -> np.ndarray:
    """``x`` with the values at ``where`` one unit in the last place higher: the same images as
    preprocessed on another machine (ZCA whitening's last bits follow the BLAS)."""
    y = x.copy()
    y[where] = np.nextafter(y[where], np.inf)
    return y

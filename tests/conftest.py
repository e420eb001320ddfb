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


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")


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

"""What every result records about how it was made: package versions and input hashes."""

from __future__ import annotations

import hashlib
import platform

import numpy as np

__all__ = ["versions", "array_sha256"]


def versions() -> dict:
    """Versions of cnngp, Python and the numerical stack, and the platform."""
    import scipy
    import sklearn
    import torch

    from . import __version__

    return {
        "cnngp": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
    }


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's shape, dtype and bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(str((a.shape, a.dtype.str)).encode())
    h.update(a.tobytes())
    return h.hexdigest()

"""What every result records about how it was made: package versions and input hashes."""

from __future__ import annotations

import hashlib
import platform

import numpy as np

__all__ = ["versions", "array_sha256"]


def versions() -> dict:
    """Versions of cnngp, Python and the numerical stack, and the platform.

    Read from the installed packages' metadata: importing scikit-learn just to ask would add
    a second to every command's start.
    """
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("cnngp", "torch", "numpy", "scipy", "scikit-learn", "numba", "zarr", "dask", "distributed"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    out["platform"] = platform.platform()
    return out


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's shape, dtype and bytes."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(str((a.shape, a.dtype.str)).encode())
    h.update(a.tobytes())
    return h.hexdigest()

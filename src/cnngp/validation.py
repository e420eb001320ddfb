"""One home for what a user can get wrong about arrays and devices.

The image-array policy, the same for the Python API, the command line, the sweep, the data
loaders and the scikit-learn estimators (README, "Image arrays"):

* **layout**: channels last, ``(N, *spatial, C)`` with 1, 2 or 3 spatial dimensions. A 3-D
  array is N one-dimensional signals ``(N, L, C)``, everywhere; a grey image needs its
  channel axis (``x[..., None]``). Only readers of formats that are grey by definition
  (MNIST IDX files) add it themselves.
* **dtype**: ``uint8`` is 8-bit pixels and is scaled by 1/255 to [0, 1]; ``bool`` is 0/1;
  every other integer and floating type is taken as the numbers it holds (no scaling:
  divide 16-bit images by 65535 yourself). Complex, string, object and date arrays are
  refused.
* **values**: finite, and ``|x| <= MAX_ABS_PIXEL`` (1e8). A kernel is quadratic in the
  pixels and grows with depth, so larger values overflow into a NaN kernel; images are
  expected on a scale of about 1.
* **memory**: any strides (a flipped view ``x[:, :, ::-1]``), read-only arrays, memmaps and
  torch tensors are accepted; the result is a new C-contiguous float64 array when needed.
"""

from __future__ import annotations

import numpy as np
import torch

from cnngp.errors import CNNGPError

__all__ = ["as_images", "resolve_dtype", "resolve_device", "parse_bytes", "MAX_ABS_PIXEL", "IMAGE_POLICY"]

#: largest accepted absolute pixel value (see the module docstring)
MAX_ABS_PIXEL = 1e8

#: one line quoted by error messages about dtypes
IMAGE_POLICY = (
    "accepted are uint8 (pixels 0..255, scaled to [0, 1]), bool (0/1), other integer or "
    "floating types (taken as they are)"
)


def _pixel_values(arr: np.ndarray, name: str) -> np.ndarray:
    """float64 pixels under the dtype rule of the module docstring."""
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    if kind in "biuf":
        return np.array(arr, dtype=np.float64, order="C", copy=True)
    what = {"c": "complex", "U": "string", "S": "bytes", "O": "object", "M": "date",
            "m": "time-delta", "V": "structured"}.get(kind, str(arr.dtype))
    raise CNNGPError(f"{name}: got a {what} array (dtype {arr.dtype}); {IMAGE_POLICY}")


def as_images(x, name: str = "x1", channels: int | None = None) -> np.ndarray:
    """Validate images under the package's one image-array policy (module docstring).

    Parameters
    ----------
    x : array-like or torch.Tensor, shape (N, *spatial, C)
    name : str
        How messages name the argument (``"x1"``, ``"--x1"``, ``"x_train in FILE"``).
    channels : int, optional
        The channel count the network expects.

    Returns
    -------
    numpy.ndarray, float64, C-contiguous, writable, shape (N, *spatial, C)
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise CNNGPError(f"{name}: got a complex tensor ({x.dtype}); {IMAGE_POLICY}")
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise CNNGPError(f"{name}: could not be read as an array ({' '.join(str(e).split())})") from None
    arr = _pixel_values(arr, name)
    if arr.ndim not in (3, 4, 5):
        raise CNNGPError(
            f"{name}: expected images of shape (N, *spatial, C) with 1, 2 or 3 spatial "
            f"dimensions, i.e. 3 to 5 axes, got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or any(s == 0 for s in arr.shape[1:]):
        raise CNNGPError(f"{name}: is empty (shape {arr.shape}); expected at least one image")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = int(arr.size - np.count_nonzero(finite))
        raise CNNGPError(f"{name}: contains {bad} NaN or infinite pixel values")
    peak = float(np.max(np.abs(arr)))
    if peak > MAX_ABS_PIXEL:
        raise CNNGPError(
            f"{name}: pixel values reach {peak:.3g}; accepted are |x| <= {MAX_ABS_PIXEL:g} "
            "(the kernel is quadratic in the pixels and would overflow): scale the images "
            "to about [0, 1]"
        )
    if channels is not None and arr.shape[-1] != channels:
        raise CNNGPError(
            f"{name}: has {arr.shape[-1]} channels (last axis) but the network expects "
            f"{channels}; images must be channels-last (N, *spatial, C)"
        )
    return arr


def resolve_dtype(dtype) -> torch.dtype:
    """``"float64"`` / ``"float32"`` (or the torch/numpy dtypes) → torch dtype."""
    if dtype in (torch.float64, "float64", "double", np.float64):
        return torch.float64
    if dtype in (torch.float32, "float32", "float", np.float32):
        return torch.float32
    raise CNNGPError(f"dtype: expected 'float64' or 'float32', got {dtype!r}")


def resolve_device(device, name: str = "device") -> torch.device:
    """A device cnngp computes on: ``cpu``, ``cuda[:i]`` (when torch sees it), ``mps``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise CNNGPError(
            f"{name}: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CNNGPError(f"{name}: {device!r} was requested but torch finds no CUDA device here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CNNGPError(
                f"{name}: {device!r} was requested but torch sees {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CNNGPError(f"{name}: 'mps' was requested but torch finds no MPS device here")
    return dev


def parse_bytes(text: str, flag: str = "--memory-budget") -> int:
    """``2G``, ``500M``, ``1.5GiB``, ``123456`` → bytes (finite, at least 1 MiB); messages name ``flag``."""
    import math

    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    t = str(text).strip().lower().rstrip("b").rstrip("i")
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1024**2):
        raise CNNGPError(f"{flag}: expected a size of at least 1M such as 2G or 500M, got {text!r}")
    return int(value)

"""One home for what a user can get wrong about arrays and devices.

The image-array policy, the same for the Python API, the command line, the sweep, the data
loaders and the scikit-learn estimators (README, "Image arrays"):

* **layout**: channels last, ``(N, *spatial, C)`` with 1, 2 or 3 spatial dimensions. A 3-D
  array is N one-dimensional signals ``(N, L, C)``, everywhere; a grey image needs its
  channel axis (``x[..., None]``). Only readers of formats that are grey by definition
  (MNIST IDX files) add it themselves. Layouts that are more likely a mistake than meant
  are refused rather than guessed (:func:`layout_problem`): a 4-D or 5-D array whose axis 1
  is 1 or 3 while its last axis is larger than 4 ("looks channels-first", e.g.
  ``(N, 3, 32, 32)``), and a 3-D array with two equal trailing axes larger than 4 ("looks
  like grey images", e.g. ``(N, 28, 28)``). Stating the layout (``layout="NCHW"``,
  ``"NHW"``, ``"NHWC"``, … ; the CLI's ``--layout``) converts or accepts such arrays.
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

import weakref

import numpy as np
import torch

from cnngp.errors import CNNGPError

__all__ = ["as_images", "describe_images", "layout_problem", "LAYOUTS", "resolve_dtype", "resolve_device", "parse_bytes", "non_negative_real", "MAX_ABS_PIXEL", "IMAGE_POLICY"]

#: largest accepted absolute pixel value (see the module docstring)
MAX_ABS_PIXEL = 1e8

#: one line quoted by error messages about dtypes
IMAGE_POLICY = (
    "accepted are uint8 (pixels 0..255, scaled to [0, 1]), bool (0/1), other integer or "
    "floating types (taken as they are)"
)


def non_negative_real(value, name: str, accepted: str | None = None, positive: bool = False) -> float:
    """``value`` as a float: a real number (not a bool or a string), finite and >= 0 (> 0 with
    ``positive``).

    The one check behind every variance, noise level, rate and regulariser strength an API
    takes; the message is ``"{name}: expected {accepted}, got {value!r}"`` (``accepted`` by
    default "a finite number >= 0", or "> 0").

    >>> non_negative_real(0.1, "zca")
    0.1
    """
    if accepted is None:
        accepted = f"a finite number {'>' if positive else '>='} 0"
    bad = CNNGPError(f"{name}: expected {accepted}, got {value!r}")
    if isinstance(value, (bool, np.bool_, str, bytes)):
        raise bad
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        raise bad
    return v + 0.0  # (-0.0 is 0)


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


#: the layouts ``as_images(layout=...)`` takes: channels-last (taken as they are), channels-first
#: (the channel axis moved last) and grey (a channel axis of 1 added)
LAYOUTS = {
    "NLC": "last", "NHWC": "last", "NDHWC": "last",
    "NCL": "first", "NCHW": "first", "NCDHW": "first",
    "NL": "grey", "NHW": "grey", "NDHW": "grey",
}

#: arrays whose layout was stated (``as_images(..., layout=...)``): taken as channels-last when
#: they come back (a later ``as_images`` of the same array does not second-guess the user)
_STATED = weakref.WeakValueDictionary()


def _spatial_names(n_spatial: int) -> str:
    return {1: "L", 2: "H, W", 3: "D, H, W"}.get(n_spatial, "*spatial")


def layout_problem(shape, name: str = "x1") -> str | None:
    """Why an array of ``shape`` read as channels-last ``(N, *spatial, C)`` is probably not
    meant that way, or None. Refused (unless the layout is stated): a 4-D/5-D array with
    axis 1 of 1 or 3 and a last axis larger than 4 (channels-first), a 3-D array with two
    equal trailing axes larger than 4 (grey images without a channel axis)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) in (4, 5) and shape[1] in (1, 3) and shape[-1] > 4:
        first = "NCHW" if len(shape) == 4 else "NCDHW"
        last = "NHWC" if len(shape) == 4 else "NDHWC"
        return (f"{name}: shape {shape} looks channels-first ({shape[1]} channel(s) on axis 1, "
                f"{shape[-1]} on the last axis); accepted is channels-last (N, "
                f"{_spatial_names(len(shape) - 2)}, C): transpose to (N, *spatial, C) "
                f"(x.transpose(0, {', '.join(str(i) for i in range(2, len(shape)))}, 1)), or state the "
                f"layout: layout={first!r} (--layout {first.lower()}) to convert it, layout={last!r} "
                f"(--layout {last.lower()}) if it really is channels-last")
    if len(shape) == 3 and shape[1] == shape[2] and shape[2] > 4:
        return (f"{name}: shape {shape} looks like grey images (N, H, W) of {shape[1]}×{shape[2]}, "
                f"but a 3-D array is read as {shape[0]} 1-D signals (N, L, C) of length {shape[1]} "
                f"with {shape[2]} channels; add a channel axis (x[..., None]) or state the layout: "
                "layout='NHW' (--layout nhw) for grey images, layout='NLC' (--layout nlc) for 1-D signals")
    return None


def _apply_layout(arr: np.ndarray, layout, name: str) -> np.ndarray:
    key = str(layout).upper()
    kind = LAYOUTS.get(key)
    if kind is None:
        raise CNNGPError(f"{name}: layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    axes = len(key) + (1 if kind == "grey" else 0)  # the axes once channels-last
    given = axes - (1 if kind == "grey" else 0)
    if arr.ndim != given:
        raise CNNGPError(f"{name}: layout {key!r} needs a {given}-D array, got shape {arr.shape}")
    if kind == "first":
        arr = np.ascontiguousarray(np.moveaxis(arr, 1, -1))
    elif kind == "grey":
        arr = np.ascontiguousarray(arr[..., None])
    return arr


def describe_images(x, name: str = "x1") -> str:
    """One line saying how an array (channels-last, as :func:`as_images` returns) is read:
    ``--x1: 100 images of 32×32, 3 channels (N, H, W, C)``."""
    shape = tuple(int(s) for s in x.shape)
    n, spatial, c = shape[0], shape[1:-1], shape[-1]
    what = {1: "signal", 2: "image", 3: "volume"}.get(len(spatial), "array")
    size = f"length {spatial[0]}" if len(spatial) == 1 else "×".join(str(s) for s in spatial)
    channels = f"{c} channel{'s' if c != 1 else ''}"
    return (f"{name}: {n} {what}{'s' if n != 1 else ''} of {size}, {channels} "
            f"(N, {_spatial_names(len(spatial))}, C)")


def as_images(x, name: str = "x1", channels: int | None = None, layout: str | None = None) -> np.ndarray:
    """Validate images under the package's one image-array policy (module docstring).

    Parameters
    ----------
    x : array-like or torch.Tensor, shape (N, *spatial, C)
    name : str
        How messages name the argument (``"x1"``, ``"--x1"``, ``"x_train in FILE"``).
    channels : int, optional
        The channel count the network expects.
    layout : str, optional
        The layout of ``x`` when stated (:data:`LAYOUTS`): ``"NHWC"``, ``"NLC"``, ``"NDHWC"``
        (channels last: taken as they are, no guessing), ``"NCHW"``, ``"NCL"``, ``"NCDHW"``
        (channels first: the channel axis is moved last), ``"NHW"``, ``"NL"``, ``"NDHW"``
        (grey: a channel axis of 1 is added). Default: channels last, refusing the shapes
        :func:`layout_problem` names.

    Returns
    -------
    numpy.ndarray, float64, C-contiguous, writable, shape (N, *spatial, C)
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise CNNGPError(f"{name}: got a complex tensor ({x.dtype}); {IMAGE_POLICY}")
        if x.is_meta:
            raise CNNGPError(f"{name}: got a tensor on the 'meta' device (shape {tuple(x.shape)}), "
                             "which holds no values; pass images with data (a CPU or CUDA tensor)")
        x = x.detach().cpu().numpy()
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise CNNGPError(f"{name}: could not be read as an array ({' '.join(str(e).split())})") from None
    stated = layout is not None or _STATED.get(id(x)) is x
    if layout is not None:
        arr = _apply_layout(arr, layout, name)
    arr = _pixel_values(arr, name)
    if arr.ndim not in (3, 4, 5):
        raise CNNGPError(
            f"{name}: expected images of shape (N, *spatial, C) with 1, 2 or 3 spatial "
            f"dimensions, i.e. 3 to 5 axes, got shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise CNNGPError(f"{name}: is empty (shape {arr.shape}); expected at least one image")
    if arr.shape[-1] == 0:
        raise CNNGPError(f"{name}: its images have no channels (shape {arr.shape}, channels last); "
                         "expected at least one")
    if any(s == 0 for s in arr.shape[1:-1]):
        axis = next(i for i, s in enumerate(arr.shape[1:-1], start=1) if s == 0)
        raise CNNGPError(f"{name}: its images have no pixels along spatial axis {axis} (shape {arr.shape}); "
                         "expected images of at least 1 pixel per side")
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
    if not stated:  # a network that expects exactly the last axis's channels settles it
        problem = layout_problem(arr.shape, name)
        if problem is not None and (channels is None or arr.shape[-1] != channels):
            raise CNNGPError(problem)
    if channels is not None and arr.shape[-1] != channels:
        raise CNNGPError(
            f"{name}: has {arr.shape[-1]} channels (last axis) but the network expects "
            f"{channels}; images must be channels-last (N, *spatial, C)"
        )
    if stated:
        _STATED[id(arr)] = arr
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
    if dev.type == "cpu" and dev.index not in (None, 0):  # torch would ignore it: one CPU device
        raise CNNGPError(f"{name}: {device!r}: the CPU is one device (torch runs its cores as threads, "
                         "not as devices); give 'cpu'")
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

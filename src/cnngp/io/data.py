"""Image data sets for the experiments, read from local files only.

Nothing here ever downloads anything. Supported sources:

* ``"digits"``: scikit-learn's bundled 8x8 hand-written digits;
* a ``.npz`` archive with arrays ``x_train``, ``y_train`` and optionally ``x_test``,
  ``y_test`` and ``class_names`` (e.g. ``shared/data/cifar10_subset.npz``);
* a directory holding the official CIFAR-10 *binary* version
  (``data_batch_1.bin`` ... ``data_batch_5.bin``, ``test_batch.bin``);
* a directory holding the official CIFAR-10 *python* version (``data_batch_1`` ...
  ``data_batch_5``, ``test_batch``). These files are pickles; they are read with a
  restricted unpickler that can only rebuild plain NumPy arrays, so a tampered file
  cannot run code;
* a directory holding MNIST IDX files (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``,
  each optionally gzip-compressed with a ``.gz`` suffix).

All images are returned channels-last, shape ``(N, H, W, C)``, as float64 in [0, 1]
(8-bit pixels are divided by 255, digits by 16). Labels are int64 in ``0..n_classes-1``.

The module also provides the class-balanced, class-interleaved subsets used by the
paper's protocol (:func:`balanced_subset`, :func:`blocks`).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import pickle
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from cnngp.errors import CNNGPError, MissingFileError
from cnngp.validation import as_images

__all__ = [
    "Dataset",
    "CIFAR10_CLASSES",
    "load_digits",
    "split_array_path",
    "load_dataset",
    "load_array",
    "balanced_subset",
    "blocks",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_DIGIT_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))

_CIFAR_SIDE = 32
_CIFAR_PIXELS = 3 * _CIFAR_SIDE * _CIFAR_SIDE  # 3072 bytes per image, CHW order
_CIFAR_RECORD = 1 + _CIFAR_PIXELS  # binary version: 1 label byte + pixels
_CIFAR_BIN_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_BIN_TEST = "test_batch.bin"
_CIFAR_PY_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_PY_TEST = "test_batch"
# Sub-folders created by extracting the official archives.
_CIFAR_BIN_SUBDIR = "cifar-10-batches-bin"
_CIFAR_PY_SUBDIR = "cifar-10-batches-py"

# MNIST file stems: (images, labels) for train and test. Both the official hyphenated
# names and the common dotted variant ("train-images.idx3-ubyte") are accepted.
_MNIST_STEMS = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


@dataclass(frozen=True)
class Dataset:
    """An image classification data set, channels-last, pixels in [0, 1].

    Attributes
    ----------
    x_train : numpy.ndarray, shape (N, H, W, C), float64
        Training images.
    y_train : numpy.ndarray, shape (N,), int64
        Training labels in ``0..len(class_names)-1``.
    x_test : numpy.ndarray or None, shape (M, H, W, C), float64
        Test images, or None when the source has no test split (e.g. digits).
    y_test : numpy.ndarray or None, shape (M,), int64
        Test labels, or None.
    name : str
        Short name of the source (``"digits"``, ``"cifar10"``, ``"mnist"`` or the stem of
        the ``.npz`` file).
    class_names : tuple of str
        Name of each class; label ``k`` is ``class_names[k]``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    name: str
    class_names: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        """Number of classes, ``len(class_names)``."""
        return len(self.class_names)

    def describe(self) -> str:
        """One line saying what the data set holds as it was read (channels last, values as
        scaled): ``5,000 training images of 32×32, 3 channels, values in [0, 1], 10 classes;
        1,000 test images``. A data set read with the wrong scale or layout shows it here."""
        x = self.x_train
        spatial, c = tuple(int(s) for s in x.shape[1:-1]), int(x.shape[-1])
        size = f"length {spatial[0]}" if len(spatial) == 1 else "×".join(str(s) for s in spatial)
        values = "" if not x.size else f", values in [{float(np.min(x)):.3g}, {float(np.max(x)):.3g}]"
        test = "no test split" if self.x_test is None else f"{len(self.x_test):,} test images"
        return (f"{len(x):,} training images of {size}, {c} channel{'s' if c != 1 else ''}{values}, "
                f"{self.n_classes} classes; {test}")

    def check_test_classes(self) -> None:
        """Refuse test labels above every training label (naming ``dataset``): a classifier
        trained here could never predict them, and they would make the class count count
        classes no training image has. (A class missing from the training labels below their
        largest is the training labels' own fault, said where they are checked.)"""
        if self.y_test is None or not len(self.y_test) or not len(self.y_train):
            return
        unseen = np.unique(self.y_test[self.y_test > self.y_train.max()])
        if unseen.size:
            shown = ", ".join(str(int(c)) for c in unseen[:10]) + (", …" if unseen.size > 10 else "")
            raise CNNGPError(f"dataset: {self.name}: the test labels hold {unseen.size} class(es) ({shown}) "
                             "that no training image has; the classifier can only predict training classes")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, C)`` of one image."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _as_images(x: np.ndarray, what: str, layout: str | None = None) -> np.ndarray:
    """The package's image-array policy (:func:`cnngp.validation.as_images`)."""
    return as_images(x, what, layout=layout)


def _as_labels(y: np.ndarray, what: str, n_classes: int | None) -> np.ndarray:
    """Check labels are a 1-D integer vector in ``0..n_classes-1``; return int64."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise CNNGPError(f"{what} must be 1-D (one label per image); got shape {y.shape}")
    if np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_:
        out = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise CNNGPError(f"{what} must hold integer class labels; got non-integer values")
        out = y.astype(np.int64)
    else:
        raise CNNGPError(f"{what} must hold integer class labels; got dtype {y.dtype}")
    if out.size and out.min() < 0:
        raise CNNGPError(f"{what} has a negative label ({out.min()}); labels must be >= 0")
    if n_classes is not None and out.size and out.max() >= n_classes:
        raise CNNGPError(
            f"{what} has label {out.max()}, out of range for {n_classes} classes "
            f"(accepted: 0..{n_classes - 1})"
        )
    return out


def _check_lengths(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if len(x) != len(y):
        raise CNNGPError(
            f"mismatched lengths in {what}: {len(x)} images but {len(y)} labels"
        )


# --------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """Load scikit-learn's bundled hand-written digits (no download).

    Returns
    -------
    x : numpy.ndarray, shape (1797, 8, 8, 1), float64
        Images, pixel value / 16, so in [0, 1].
    y : numpy.ndarray, shape (1797,), int64
        Labels 0..9.

    Examples
    --------
    >>> x, y = load_digits()
    >>> x.shape, y.shape, float(x.max())
    ((1797, 8, 8, 1), (1797,), 1.0)
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = np.asarray(bunch.images, dtype=np.float64)[..., None] / 16.0
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y


# --------------------------------------------------------------------------------------
# .npz archives
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_npz(path: Path, what: str):
    """The archive at ``path``, open for the ``with`` block (its file closed on every exit)."""
    if not path.exists():
        raise MissingFileError(f"{what}: file not found: {path}")
    if path.is_dir():
        raise CNNGPError(f"{what}: expected a .npz file, got a directory: {path}")
    if not zipfile.is_zipfile(path):
        raise CNNGPError(
            f"{what}: {path} is not a .npz archive (accepted: a NumPy .npz file written by "
            "numpy.savez or numpy.savez_compressed)"
        )
    # the file is opened here, not by np.load(path), which leaves it open when the zip
    # directory cannot be read (engine.storage.read_npz does the same for the engine)
    with open(path, "rb") as f:
        try:
            archive = np.load(f, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):  # a zip behind other bytes
                raise ValueError("it does not start as a zip of .npy arrays")
        except Exception as exc:  # a corrupt zip directory etc.
            raise CNNGPError(f"{what}: cannot read .npz archive {path}: {exc}") from None
        with archive:
            yield archive


def _npz_get(archive, key: str, path: Path) -> np.ndarray:
    def damaged(detail: str) -> CNNGPError:
        return CNNGPError(f"array {key!r} in {path} is truncated or damaged ({detail}); was it cut "
                          "short by an interrupted write, copy or download? write the file again")

    try:
        value = archive[key]
    except ValueError as exc:
        if "Object arrays" in str(exc):  # object arrays need pickle, which we refuse
            raise CNNGPError(
                f"array {key!r} in {path} cannot be read without pickle (object dtype); "
                f"store it as a plain numeric or string array: {exc}"
            ) from None
        # numpy's "EOF: reading array data" or, for a member too short to hold the .npy
        # header, "Cannot load file containing pickled data": the member is cut short
        raise damaged(" ".join(str(exc).split())) from None
    except Exception as exc:
        raise CNNGPError(f"array {key!r} in {path} is corrupt: {exc}") from None
    if not isinstance(value, np.ndarray):  # numpy hands back a member without a .npy header as bytes
        raise damaged("no .npy header")
    return value


def _load_npz_dataset(path: Path, layout: str | None = None) -> Dataset:
    with _open_npz(path, "source") as archive:
        names = list(archive.files)
        missing = [k for k in ("x_train", "y_train") if k not in names]
        if missing:
            raise CNNGPError(
                f"source {path} lacks the array(s) {missing}; a data-set .npz needs "
                f"x_train and y_train (and optionally x_test, y_test, class_names); "
                f"it holds {names}"
            )
        has_test = "x_test" in names or "y_test" in names
        if has_test and not ("x_test" in names and "y_test" in names):
            raise CNNGPError(
                f"source {path} has only one of x_test / y_test; give both or neither"
            )
        class_names = None
        if "class_names" in names:
            cn = _npz_get(archive, "class_names", path)
            if cn.ndim != 1:
                raise CNNGPError(
                    f"class_names in {path} must be 1-D; got shape {cn.shape}"
                )
            class_names = tuple(str(c) for c in cn.tolist())
        x_train = _as_images(_npz_get(archive, "x_train", path), f"x_train in {path}", layout)
        y_train_raw = _npz_get(archive, "y_train", path)
        x_test = y_test_raw = None
        if has_test:
            x_test = _as_images(_npz_get(archive, "x_test", path), f"x_test in {path}", layout)
            y_test_raw = _npz_get(archive, "y_test", path)

    n_classes = None if class_names is None else len(class_names)
    y_train = _as_labels(y_train_raw, f"y_train in {path}", n_classes)
    _check_lengths(x_train, y_train, f"{path} (x_train, y_train)")
    y_test = None
    if has_test:
        y_test = _as_labels(y_test_raw, f"y_test in {path}", n_classes)
        _check_lengths(x_test, y_test, f"{path} (x_test, y_test)")
        if x_test.shape[1:] != x_train.shape[1:]:
            raise CNNGPError(
                f"{path}: x_test images have shape {x_test.shape[1:]} but x_train images "
                f"have shape {x_train.shape[1:]}"
            )
    if class_names is None:
        top = int(y_train.max(initial=-1))
        if y_test is not None:
            top = max(top, int(y_test.max(initial=-1)))
        # labels are class indices: 0, 1e15, ... would make 1e15 classes (and one-hot rows);
        # some classes may go unused, but never more classes than labelled images
        n_labels = len(y_train) + (0 if y_test is None else len(y_test))
        if top + 1 > max(n_labels, 2):
            used = len(np.unique(y_train if y_test is None else np.concatenate([y_train, y_test])))
            raise CNNGPError(
                f"y_train in {path}: labels must be class indices 0..k-1 (accepted: k at most "
                f"{max(n_labels, 2)}, the number of labels), but the largest is {top} for {used} "
                f"distinct labels; remap them (e.g. np.unique(y, return_inverse=True)) or give class_names"
            )
        class_names = tuple(str(i) for i in range(top + 1))
    return Dataset(x_train, y_train, x_test, y_test, path.stem, class_names)


_NPZ_SPEC = re.compile(r"^(?P<file>.+\.npz):(?P<key>[^:/\\]+)$", re.IGNORECASE)


def split_array_path(path_spec: str | os.PathLike) -> tuple[str, str | None]:
    """``"FILE.npz:ARRAY"`` -> ``("FILE.npz", "ARRAY")``; ``"FILE.npz"`` -> ``("FILE.npz", None)``.
    A file whose own name contains the colon is taken as a file."""
    spec = os.fspath(path_spec)
    match = _NPZ_SPEC.match(spec)
    if match and not Path(spec).exists():
        return match.group("file"), match.group("key")
    if spec.lower().endswith(".npz:") and not Path(spec).exists():
        raise CNNGPError(f"{spec!r}: names no array after the colon; give FILE.npz or FILE.npz:ARRAY")
    return spec, None


def load_array(
    path_spec: str | os.PathLike,
    default_keys: Sequence[str] = ("x", "x_train"),
    name: str = "path_spec",
) -> np.ndarray:
    """Load one array from a ``.npz`` file, for the command line.

    Parameters
    ----------
    path_spec : str or path-like
        ``"FILE.npz"`` (take the first of `default_keys` present, or the only array in
        the file) or ``"FILE.npz:ARRAY"`` (take the array named ``ARRAY``).
    default_keys : sequence of str, default ("x", "x_train")
        Array names tried, in order, when `path_spec` names no array.
    name : str, default "path_spec"
        How error messages name the argument (the CLI passes its flag, e.g. ``--x1``).

    Returns
    -------
    numpy.ndarray, as stored (dtype and shape)
        Images still go through :func:`cnngp.validation.as_images`, which applies the
        image-array policy (uint8 scaled by 1/255, and so on) in one place.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If the file is not a ``.npz`` archive, the array is missing (the message lists
        the available arrays), or it is not numeric.
    """
    spec, key = split_array_path(path_spec)
    path = Path(spec)
    with _open_npz(path, name) as archive:
        names = list(archive.files)
        if key is None:
            present = [k for k in default_keys if k in names]
            if present:
                key = present[0]
            elif len(names) == 1:
                key = names[0]
            else:
                raise CNNGPError(
                    f"{name} {spec!r} names no array and none of the default arrays "
                    f"{list(default_keys)} is in it; write {spec}:NAME with NAME one of "
                    f"{names}"
                )
        elif key not in names:
            raise CNNGPError(
                f"{name}: no array {key!r} in {spec}; available arrays: {names}"
            )
        arr = _npz_get(archive, key, path)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise CNNGPError(
            f"{name}: array {key!r} in {spec} has non-numeric dtype {arr.dtype}"
        )
    return arr


# --------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------


def _chw_to_hwc(flat: np.ndarray) -> np.ndarray:
    """(N, 3072) uint8 rows in CHW order -> (N, 32, 32, 3) float64 in [0, 1]."""
    imgs = flat.reshape(-1, 3, _CIFAR_SIDE, _CIFAR_SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(imgs, dtype=np.float64) / 255.0


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise CNNGPError(
            f"{path} is truncated or not a CIFAR-10 binary batch: its size ({raw.size} "
            f"bytes) is not a positive multiple of the record size {_CIFAR_RECORD} "
            "(1 label byte + 3072 pixel bytes)"
        )
    rec = raw.reshape(-1, _CIFAR_RECORD)
    labels = _as_labels(rec[:, 0], f"labels in {path}", len(CIFAR10_CLASSES))
    return _chw_to_hwc(rec[:, 1:]), labels


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _codecs_encode():
    import codecs

    return codecs.encode


# The only globals a pickled dict of NumPy arrays / lists / bytes needs. They are
# resolved here, never imported by the name found in the file.
#  * ``_reconstruct``, ``ndarray``, ``dtype``: an ndarray pickled with protocol <= 4
#    (the official files were written by Python 2 with protocol 2);
#  * ``_frombuffer``: an ndarray pickled with protocol 5 (Python >= 3.8 writers);
#  * ``_codecs.encode``: how Python 3 stores ``bytes`` under protocol <= 2.
# All of them only build arrays / bytes from data; none can run arbitrary code.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): _codecs_encode,
}


class _UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed set."""


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild NumPy arrays and builtin containers, nothing else."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        factory = _SAFE_GLOBALS.get((module, name))
        if factory is None:
            raise _UnsafePickleError(
                f"refusing to load global {module}.{name}: only NumPy array "
                "reconstruction is allowed in a CIFAR-10 python batch"
            )
        return factory()

    def persistent_load(self, pid):  # pragma: no cover - not used by CIFAR files
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _safe_unpickle(path: Path):
    data = path.read_bytes()
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _UnsafePickleError as exc:
        raise CNNGPError(f"unsafe CIFAR-10 python batch {path}: {exc}") from None
    except Exception as exc:  # EOFError, struct errors, ... from truncation
        raise CNNGPError(
            f"cannot read CIFAR-10 python batch {path} (truncated or corrupt): "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _dict_get(d: dict, key: str):
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    return None


def _read_cifar_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    obj = _safe_unpickle(path)
    if not isinstance(obj, dict):
        raise CNNGPError(
            f"{path} is not a CIFAR-10 python batch: expected a pickled dict, got "
            f"{type(obj).__name__}"
        )
    data = _dict_get(obj, "data")
    labels = _dict_get(obj, "labels")
    if data is None or labels is None:
        raise CNNGPError(
            f"{path} is not a CIFAR-10 python batch: the dict must have keys b'data' and "
            f"b'labels'; it has {sorted(map(repr, obj))}"
        )
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise CNNGPError(
            f"{path}: b'data' must be a uint8 array of shape (N, {_CIFAR_PIXELS}); got "
            f"dtype {data.dtype}, shape {data.shape}"
        )
    try:
        y = np.asarray(labels)
    except Exception:  # pragma: no cover - ragged lists etc.
        raise CNNGPError(f"{path}: b'labels' is not a list of integers") from None
    y = _as_labels(y, f"labels in {path}", len(CIFAR10_CLASSES))
    _check_lengths(data, y, str(path))
    return _chw_to_hwc(data), y


def _concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
    )


def _load_cifar(folder: Path, train: Sequence[str], test: str, reader) -> Dataset:
    x_train, y_train = _concat([reader(folder / f) for f in train])
    x_test, y_test = reader(folder / test)
    return Dataset(x_train, y_train, x_test, y_test, "cifar10", CIFAR10_CLASSES)


# --------------------------------------------------------------------------------------
# MNIST IDX
# --------------------------------------------------------------------------------------


#: the largest IDX body read (MNIST's training images are 47 MB)
MAX_IDX_BYTES = 2 * 1024**3
#: the most a gzip'd IDX file may expand (MNIST: about 5x; a decompression bomb: 1000x)
MAX_GZIP_RATIO = 200


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (optionally gzip) holding a uint8 array of `ndim` dimensions.

    The header is read first and its declared size checked (at most :data:`MAX_IDX_BYTES`,
    and for gzip at most :data:`MAX_GZIP_RATIO` times the compressed file) before the body is
    decompressed, and then only as many bytes as it declares (plus one, to detect extra data)."""
    try:
        compressed = path.stat().st_size
        fh = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
        with fh:
            raw = fh.read(4)
            if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
                raise CNNGPError(
                    f"{path} is not an IDX file: bad magic number {raw[:4].hex() or '(empty)'} "
                    "(expected 0x0000 followed by type and rank bytes)"
                )
            dtype_code, rank = raw[2], raw[3]
            if dtype_code != 0x08:
                raise CNNGPError(
                    f"{path}: IDX element type 0x{dtype_code:02x} is not supported (accepted: "
                    "0x08, unsigned bytes, as in MNIST)"
                )
            if rank != ndim:
                raise CNNGPError(f"{path}: IDX rank is {rank}, expected {ndim}")
            head = fh.read(4 * rank)
            if len(head) < 4 * rank:
                raise CNNGPError(f"{path} is truncated: the IDX header is incomplete")
            dims = struct.unpack(f">{rank}I", head)
            expected = int(np.prod(dims, dtype=np.int64))
            limit = MAX_IDX_BYTES
            if path.suffix == ".gz":
                limit = min(limit, MAX_GZIP_RATIO * max(compressed, 1))
            if expected > limit:
                raise CNNGPError(
                    f"{path}: the IDX header declares shape {dims} ({expected:,} bytes of data), over "
                    f"the {limit:,} accepted" + (f" for a {compressed:,}-byte gzip file (at most "
                    f"{MAX_GZIP_RATIO}x; a decompression bomb?)" if path.suffix == ".gz" else "")
                )
            body = fh.read(expected + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise CNNGPError(f"cannot read {path} (corrupt or truncated gzip?): {exc}") from None
    if len(body) != expected:
        held = f"{len(body)}" if len(body) <= expected else "more"
        raise CNNGPError(
            f"{path} is truncated or corrupt: the header announces shape {dims} "
            f"({expected} bytes of data) but the file holds {held} bytes of data"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def _find_mnist_file(folder: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _load_mnist(folder: Path, files: dict[str, Path]) -> Dataset:
    x_train = _read_idx(files["train_images"], 3)
    y_train = _as_labels(_read_idx(files["train_labels"], 1), "MNIST training labels", 10)
    x_test = _read_idx(files["test_images"], 3)
    y_test = _as_labels(_read_idx(files["test_labels"], 1), "MNIST test labels", 10)
    _check_lengths(x_train, y_train, f"MNIST training files in {folder}")
    _check_lengths(x_test, y_test, f"MNIST test files in {folder}")
    return Dataset(
        x_train.astype(np.float64)[..., None] / 255.0,
        y_train,
        x_test.astype(np.float64)[..., None] / 255.0,
        y_test,
        "mnist",
        _DIGIT_CLASSES,
    )


# --------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------


def _load_folder(folder: Path) -> Dataset:
    candidates = [folder]
    for sub in (_CIFAR_BIN_SUBDIR, _CIFAR_PY_SUBDIR):
        if (folder / sub).is_dir():
            candidates.append(folder / sub)

    partial: list[str] = []
    for cand in candidates:
        for train, test, reader, kind in (
            (_CIFAR_BIN_TRAIN, _CIFAR_BIN_TEST, _read_cifar_bin, "CIFAR-10 binary"),
            (_CIFAR_PY_TRAIN, _CIFAR_PY_TEST, _read_cifar_py, "CIFAR-10 python"),
        ):
            wanted = [*train, test]
            present = [f for f in wanted if (cand / f).is_file()]
            if len(present) == len(wanted):
                return _load_cifar(cand, train, test, reader)
            if present:
                missing = [f for f in wanted if f not in present]
                partial.append(f"{kind} files in {cand} are incomplete; missing {missing}")

        found = {k: _find_mnist_file(cand, stems) for k, stems in _MNIST_STEMS.items()}
        if all(found.values()):
            return _load_mnist(cand, found)  # type: ignore[arg-type]
        if any(found.values()):
            missing = [_MNIST_STEMS[k][0] + "[.gz]" for k, v in found.items() if v is None]
            partial.append(f"MNIST files in {cand} are incomplete; missing {missing}")

    looked_for = (
        f"CIFAR-10 binary ({', '.join([*_CIFAR_BIN_TRAIN, _CIFAR_BIN_TEST])}); "
        f"CIFAR-10 python ({', '.join([*_CIFAR_PY_TRAIN, _CIFAR_PY_TEST])}); "
        "MNIST IDX ("
        + ", ".join(s[0] + "[.gz]" for s in _MNIST_STEMS.values())
        + f"); also in sub-folders {_CIFAR_BIN_SUBDIR}/ and {_CIFAR_PY_SUBDIR}/"
    )
    detail = ("; ".join(partial) + ". ") if partial else ""
    raise MissingFileError(
        f"source folder {folder} holds no known data set. {detail}Looked for: {looked_for}"
    )


def load_dataset(source: str | os.PathLike, layout: str | None = None) -> Dataset:
    """Load a data set from local files (never downloads).

    Parameters
    ----------
    source : str or path-like
        ``"digits"`` (scikit-learn's bundled digits; all 1797 images go to the training
        split and the test split is None), a path to a ``.npz`` archive (arrays
        ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test``,
        ``class_names``), or a directory holding the official CIFAR-10 binary or python
        batches or the four MNIST IDX files (plain or ``.gz``). For CIFAR-10 the
        sub-folders ``cifar-10-batches-bin/`` and ``cifar-10-batches-py/`` created by
        extracting the official archives are also searched.
    layout : str, optional
        For a ``.npz`` archive: the layout of its image arrays when they are not channels-last
        (``"NCHW"``, ``"NHW"``, … as :func:`cnngp.validation.as_images` takes it). The bundled
        digits and the CIFAR-10 / MNIST files have a layout of their own; it is refused there.

    Returns
    -------
    Dataset
        Images channels-last ``(N, H, W, C)``, float64 in [0, 1]; labels int64.

    Raises
    ------
    FileNotFoundError
        If the path does not exist, or a folder holds none of the known layouts (the
        message lists the file names looked for).
    ValueError
        For truncated or corrupt files, a python batch that tries to load anything but
        NumPy arrays, labels out of range, or images and labels of different lengths.

    Examples
    --------
    >>> ds = load_dataset("digits")
    >>> ds.x_train.shape, ds.n_classes, ds.x_test is None
    ((1797, 8, 8, 1), 10, True)
    """
    if isinstance(source, (str, os.PathLike)) and not os.fspath(source).strip():  # Path("") is "."
        raise CNNGPError("source: is empty; accepted sources: 'digits', a .npz file, or a folder with "
                         "CIFAR-10 or MNIST files")
    is_digits = isinstance(source, str) and source.lower() == "digits"
    if layout is not None and (is_digits or not Path(source).expanduser().is_file()):
        raise CNNGPError(f"layout: applies to the arrays of a .npz data set; {os.fspath(source)!r} "
                         "(the bundled digits, or CIFAR-10 / MNIST files) has a layout of its own")
    if is_digits:
        x, y = load_digits()
        return Dataset(x, y, None, None, "digits", _DIGIT_CLASSES)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        if path.suffix.lower() != ".npz" and not zipfile.is_zipfile(path):
            raise CNNGPError(
                f"source {path} is a file but not a .npz archive; accepted sources: "
                "'digits', a .npz file, or a folder with CIFAR-10 or MNIST files"
            )
        return _load_npz_dataset(path, layout)
    raise MissingFileError(
        f"source {os.fspath(source)!r} does not exist; accepted sources: 'digits', a "
        ".npz file, or a folder with the CIFAR-10 (binary or python) or MNIST IDX files"
    )


# --------------------------------------------------------------------------------------
# Class-balanced subsets in class-interleaved order
# --------------------------------------------------------------------------------------


def _class_count(y: np.ndarray, n_classes: int | None, what: str = "y") -> int:
    y = np.asarray(y)
    if y.ndim != 1 or y.size == 0:
        raise CNNGPError(f"{what} must be a non-empty 1-D label vector; got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise CNNGPError(f"{what} must hold integer labels; got dtype {y.dtype}")
    if y.min() < 0:
        raise CNNGPError(f"{what} has a negative label ({y.min()})")
    k = int(y.max()) + 1 if n_classes is None else int(n_classes)
    if y.max() >= k:
        raise CNNGPError(f"{what} has label {y.max()}, out of range for n_classes={k}")
    counts = np.bincount(y, minlength=k)
    if np.any(counts == 0):
        raise CNNGPError(
            f"class(es) {np.flatnonzero(counts == 0).tolist()} missing from {what}; "
            f"every class 0..{k - 1} must be present"
        )
    return k


def balanced_subset(
    y: np.ndarray, n: int, seed: int | None = 0, n_classes: int | None = None, name: str = "n"
) -> np.ndarray:
    """Indices of a class-balanced random subset, in class-interleaved order.

    For each class ``c = 0, 1, ...`` in turn, ``n // n_classes`` indices are drawn
    without replacement (a permutation of that class's indices, from
    ``numpy.random.default_rng(seed)``). The result is ordered class 0, 1, ..., K-1,
    0, 1, ..., so every contiguous block whose length is a multiple of K starting at a
    multiple of K is itself balanced (see :func:`blocks`).

    Parameters
    ----------
    y : numpy.ndarray, shape (N,), int
        Labels.
    n : int
        Subset size; must be a positive multiple of the number of classes.
    seed : int or None, default 0
        Seed of the NumPy generator.
    n_classes : int, optional
        Number of classes; default ``max(y) + 1``. Every class must occur in `y`.
    name : str, default "n"
        What the messages call `n` (e.g. ``"n_test"`` for a test subset).

    Returns
    -------
    numpy.ndarray, shape (n,), int64
        Indices into `y`; ``y[idx]`` is ``0, 1, ..., K-1, 0, 1, ...``.

    Examples
    --------
    >>> y = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2])
    >>> idx = balanced_subset(y, 6, seed=0)
    >>> y[idx].tolist()
    [0, 1, 2, 0, 1, 2]
    """
    y = np.asarray(y)
    k = _class_count(y, n_classes)
    n = int(n)
    if n <= 0 or n % k:
        raise CNNGPError(
            f"{name}={n} must be a positive multiple of the number of classes ({k})"
        )
    per_class = n // k
    counts = np.bincount(y, minlength=k)
    if per_class > counts.min():
        c = int(np.argmin(counts))
        raise CNNGPError(
            f"{name}={n} needs {per_class} images per class but class {c} has only "
            f"{counts[c]} (largest balanced {name} is {k * counts.min()})"
        )
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in range(k)]
    return np.stack(chosen, axis=1).reshape(-1).astype(np.int64)


def blocks(n_total: int, n: int, n_classes: int = 10) -> list[np.ndarray]:
    """Disjoint contiguous blocks of a class-interleaved order.

    With ``order = balanced_subset(y, n_total, ...)``, ``order[b]`` for each returned
    block ``b`` is a balanced subset of size `n`; the blocks are the paper's disjoint
    smaller-N data sets, taken from one larger kernel matrix.

    Parameters
    ----------
    n_total : int
        Length of the interleaved order (size of the large kernel matrix).
    n : int
        Block size; must divide `n_total` and be a multiple of `n_classes`.
    n_classes : int, default 10
        Number of classes (the period of the interleaving).

    Returns
    -------
    list of numpy.ndarray, each shape (n,), int64
        ``n_total // n`` blocks ``[0..n), [n..2n), ...``.

    Examples
    --------
    >>> [b.tolist() for b in blocks(8, 4, n_classes=2)]
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    n_total, n, n_classes = int(n_total), int(n), int(n_classes)
    if n_classes <= 0:
        raise CNNGPError(f"n_classes={n_classes} must be positive")
    if n <= 0 or n_total <= 0:
        raise CNNGPError(f"n={n} and n_total={n_total} must be positive")
    if n_total % n:
        raise CNNGPError(f"block size n={n} does not divide n_total={n_total}")
    if n % n_classes:
        raise CNNGPError(
            f"block size n={n} is not a multiple of the number of classes "
            f"({n_classes}), so blocks would not be class-balanced"
        )
    return [np.arange(s, s + n, dtype=np.int64) for s in range(0, n_total, n)]

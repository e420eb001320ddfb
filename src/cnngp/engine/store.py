"""The kernel store: a Gram matrix in a Zarr group that many workers fill tile by tile.

Layout of ``K.zarr`` (a folder on a file system every worker sees: local disk, NFS, Lustre):

- ``kernel``: the matrix, shape ``(L, N1, N2)`` (L readouts; 1 for a plain kernel), chunks
  ``(L, T, T)``: one chunk per tile, so a tile's writer owns its chunks and no two writers
  touch the same bytes. A symmetric matrix (x2 is x1) is computed on the tiles on and above
  the diagonal; each off-diagonal tile also writes its mirror chunk.
- ``images/x1`` (and ``images/x2``): the inputs as the engine reads them, so a task needs
  nothing but the store's path and its tile.
- ``self/x1/<layer>`` (and ``self/x2/<layer>``): stage 1, each image's own variances at the
  input of every nonlinearity (:class:`cnngp.engine.gram.SelfRecords`), computed once per image
  block of T images and read by every tile that needs them.
- ``records/``: one small JSON file per finished unit (``tile-i-j.json``, ``self-x1-b.json``),
  written (atomically) only after its data, holding the sha256 of the data. A unit is done only
  when its record exists and the bytes in the store hash to it; a torn, missing or corrupted
  chunk is found by :meth:`KernelStore.verify` and recomputed.
- attributes of the group: what makes the numbers trustworthy and a resume safe (the network
  spec, readouts, sha256 of the inputs, dtype, tile size, shape, versions). Opening a store for a
  different computation is refused, naming what differs.

Writes are idempotent (a unit computed twice writes the same bytes and the same record), which
is what Dask needs: it may run a task twice or rerun the tasks of a lost worker. Two *runs* on
one store (two shells, two jobs of a batch queue) would still compute the same tiles twice and
verify each other's half-written chunks: the run that fills a store holds an advisory lock on its
folder (:func:`writer_lock`), and a second is refused in one line.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import json
import os
import socket
import stat
import time
from pathlib import Path

import numpy as np

from cnngp.engine.gram import Tile, flip_average, mirrored_offsets, tile_plan
from cnngp.engine.storage import check_own_folder, fingerprint
from cnngp.errors import CNNGPError, MissingFileError
from cnngp.settings import env_number

try:
    import fcntl  # POSIX: the writer lock (writer_lock)
except ImportError:  # Windows: stores are not locked there
    fcntl = None

__all__ = ["KernelStore", "TiledKernel", "StoredReadouts", "Tile", "tile_plan", "STORE_FORMAT", "is_store_path", "check_output_store",
           "same_spec"]

#: tiles a store's check (:meth:`KernelStore.verify`) reads and hashes at once: I/O-bound
#: work, so more than this machine's cores where it has few; each holds a tile and its mirror
#: in memory (``CNNGP_VERIFY_THREADS``)
VERIFY_THREADS = env_number("CNNGP_VERIFY_THREADS", min(8, max(4, os.cpu_count() or 1)), 1, integer=True)

#: version tag of the store layout
STORE_FORMAT = "cnngp-kernel-store/1"

#: identity keys that must agree for a resume, in the order a mismatch is reported
IDENTITY_KEYS = ("format", "spec", "readouts", "kernels", "offsets", "flip", "dtype", "x1_sha256", "x2_sha256", "tile", "shape")
#: the identity's keys of the images (the sha256 of x1, x2)
IMAGE_KEYS = ("x1_sha256", "x2_sha256")


def is_store_path(path) -> bool:
    """A ``.zarr`` path (the CLI's cue to write a store rather than an ``.npz``)."""
    return str(path).rstrip("/\\").lower().endswith(".zarr")


def check_output_store(path, what: str = "--out") -> Path:
    """Refuse, before any work, a store path cnngp must not write: an existing file, symbolic
    link or non-empty folder that is not a kernel store, or a missing or unwritable parent."""
    return check_own_folder(path, what, marker="zarr.json", kind="a kernel store",
                            empty_hint="give a store path such as K.zarr",
                            foreign_hint="nothing was overwritten", parents_made=False)


class StoreWriteError(CNNGPError):
    """Writing into a store failed (the file system's reason: a full disk, say). Its message
    names the flag that chose the store (:meth:`named` sets it where the flag is known: a task
    on a worker knows only the path), what was being written, and how to resume."""

    def __init__(self, flag: str, item: str, path: str, reason: str, done: int):
        super().__init__(flag, item, path, reason, done)  # the args: picklable across workers
        self.flag, self.item, self.path, self.reason, self.done = flag, item, path, reason, done

    def named(self, flag: str) -> "StoreWriteError":
        return StoreWriteError(flag, self.item, self.path, self.reason, self.done)

    def __str__(self) -> str:
        return (f"{self.flag}: writing {self.item} of {self.path!r} failed ({self.reason}); its "
                f"{self.done} finished tile(s) are kept: free space (or fix the folder) and rerun "
                "the same command to resume")


def _zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover - a declared dependency
        raise CNNGPError("a kernel store (.zarr) needs zarr-python 3 (pip install 'zarr>=3.1,<4'; "
                         "it needs Python >= 3.11)") from None
    return zarr


def _checksum(*arrays) -> str:
    return fingerprint(*[np.ascontiguousarray(a) for a in arrays])


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk leaves no torn temporary behind
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict | None:
    """A record's contents, or None if it is missing or not JSON (a torn record is no record)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def same_spec(a, b) -> bool:
    """Whether two JSON-like values (specs, identities' entries) are equal as stored: compared
    in their canonical JSON, so that key order and tuple-against-list do not count."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _first_difference(stored: dict, wanted: dict, keys=IDENTITY_KEYS) -> str | None:
    """The first of ``keys`` on which two identities differ, or None."""
    return next((key for key in keys if not same_spec(stored.get(key), wanted.get(key))), None)


def difference_words(key: str, stored: dict) -> str:
    """What differs, in words, when a store's (or archive's) identity ``stored`` differs from
    the computation's on ``key`` (:func:`_first_difference`): :data:`_WHAT`'s, and for the
    contents which way round."""
    if key == "offsets":
        return ("contents (it holds offset sums, not kernels)" if stored.get("offsets")
                else "contents (it holds kernels, not offset sums)")
    return _WHAT[key]


_WHAT = {
    "format": "store format", "spec": "network spec", "readouts": "readouts", "kernels": "kernel type (NNGP, NTK)",
    "offsets": "contents (offset sums or kernels)",
    "flip": "flip averaging",
    "x1_sha256": "images (its rows)", "x2_sha256": "images (its columns)", "dtype": "dtype",
    "tile": "tile size", "shape": "shape",
}


#: how far a store's (or lender's) images may be from a computation's, relative to their
#: largest pixel, and still be the same images: the same preprocessing (ZCA whitening's float64 eigenvectors and
#: products) on another machine differs in its last bits, about 1e-13 relative before the
#: images are rounded to the kernel's dtype (float32: at most a unit in the last place)
IMAGE_ROUNDING = 1e-10


def same_to_rounding(kept, x) -> bool:
    """Whether images ``kept`` (a store's or lender's, None: none) are ``x`` to rounding: the same shape
    and dtype, every pixel within :data:`IMAGE_ROUNDING` or 4 units in the last place of the
    dtype, relative to the largest pixel — the kernels of images that close agree within the
    store's spot-check tolerance."""
    if kept is None:
        return False
    kept, x = np.asarray(kept), np.asarray(x)
    if kept.shape != x.shape or kept.dtype != x.dtype or not np.issubdtype(x.dtype, np.floating):
        return False
    scale = float(np.abs(x).max()) if x.size else 0.0
    tolerance = max(IMAGE_ROUNDING, 4 * float(np.finfo(x.dtype).eps)) * scale
    with np.errstate(invalid="ignore"):
        return bool(np.all(np.abs(kept.astype(np.float64) - x.astype(np.float64)) <= tolerance))


def refuse_other_computation(path, attrs: dict, identity: dict, what: str) -> None:
    """Refuse the store at ``path`` (its ``attrs``) unless it was made for the computation
    ``identity`` (:data:`IDENTITY_KEYS`, the format included): resumed only by the same one."""
    key = _first_difference(attrs, identity)
    if key is not None:
        raise CNNGPError(
            f"{what}: {str(path)!r} holds a kernel of different {difference_words(key, attrs)}; resume only with the same "
            f"computation (images, network, readouts, dtype, tile), or give another {what} "
            "(nothing was overwritten)"
        )


@contextlib.contextmanager
def writer_lock(path, what: str = "--out"):
    """Hold the store folder ``path`` for this run's writing while the block runs, creating
    the (empty) folder if there is none yet; a second run on the same store, from another
    process, is refused at once (:class:`CNNGPError`, naming the process where this machine
    can tell). The lock is an advisory ``flock`` on the folder itself: the operating system
    releases it when the run ends, however it ends, so nothing stale is ever left to clear.
    Only the run that plans a store's tiles takes it (its cluster's workers write inside
    it). Where the platform or file system has no ``flock`` (Windows, some network mounts)
    nothing is locked."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        try:
            path.mkdir(parents=True)
        except FileExistsError:  # made meanwhile by another run: the lock below decides
            pass
        except OSError as e:
            raise CNNGPError(f"{what}: creating {str(path)!r} failed ({e.strerror or e})") from None
    if fcntl is None:  # no flock on this platform: unlocked, as before
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:  # not a folder: the store's own checks refuse it, in their words
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                yield  # no flock here (ENOLCK, EBADF on some mounts): unlocked, as before
                return
            holder = _lock_holder(fd)
            raise CNNGPError(
                f"{what}: {str(path)!r} is being written by another run right now"
                + (f" (process {holder} on this machine)" if holder else "")
                + "; let it finish, or stop it, and run again: it resumes from the tiles already done "
                "(nothing was changed)") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def writer_pid(path) -> int | None:
    """The process of this machine filling the store at ``path`` now (holding its
    :func:`writer_lock`), or None: none, another machine's, or not to be told here (Linux's
    ``/proc/locks`` is read; nothing is locked, so asking never gets in a run's way)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        return _lock_holder(fd)
    finally:
        os.close(fd)


def _lock_holder(fd: int) -> int | None:
    """The process holding the ``flock`` on the open folder ``fd``, from Linux's
    ``/proc/locks`` (None elsewhere, or if it cannot be told)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode and fields[4] != str(os.getpid()):
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return None


def _links_in(path: Path, deep: bool) -> str | None:
    """The first symbolic link (or non-file, non-folder) inside the store folder ``path``, as
    a path relative to it, or None. ``deep`` walks every folder (every chunk); otherwise the
    store's own entries and their folders' entries (``records/``, ``images/x1``, ``kernel/c``
    ...), which is what a task about to write checks. Nothing is followed (``lstat``)."""
    stack = [(path, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode):
                if deep or depth < 2:
                    stack.append((Path(entry.path), depth + 1))
            elif not stat.S_ISREG(mode):
                return os.path.relpath(entry.path, path)
    return None


class TiledKernel:
    """What a kernel's identity (``attrs``: :data:`IDENTITY_KEYS`) says of its layout: shape
    ``(L, N1, N2)``, tile size, and whether it is symmetric (x2 is x1). A store and a tile
    archive share it."""

    attrs: dict

    @property
    def symmetric(self) -> bool:
        return self.attrs.get("x2_sha256") is None

    @property
    def shape(self) -> tuple:
        return tuple(self.attrs["shape"])

    @property
    def tile(self) -> int:
        return int(self.attrs["tile"])


class KernelStore(TiledKernel):
    """A Gram matrix being computed, or computed, in a Zarr group at ``path``.

    Create or resume one with :meth:`create`; open a finished or partial one with
    :meth:`open`. ``store.kernel`` is the Zarr array ``(L, N1, N2)``.
    """

    def __init__(self, path, group, what: str = "--out"):
        self.path = Path(path)
        self.group = group
        self.what = what
        self.attrs = dict(group.attrs)
        self.records_dir = self.path / "records"

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def create(cls, path, identity: dict, x1: np.ndarray, x2: np.ndarray | None,
               self_layers: dict, provenance: dict, what: str = "--out") -> "KernelStore":
        """Create the store for ``identity`` (see :data:`IDENTITY_KEYS`), or reopen the one
        at ``path`` if it was made for exactly this computation; anything else is refused.

        ``self_layers`` maps each recorded layer index to its grid (the stage-1 arrays).
        """
        zarr = _zarr()
        path = Path(path)
        identity = {"format": STORE_FORMAT, **identity}
        if path.exists() or path.is_symlink():
            if not path.is_dir() or path.is_symlink():
                raise CNNGPError(f"{what}: {str(path)!r} exists and is not a kernel store (a folder)")
            if not (path / "zarr.json").exists():
                if any(path.iterdir()):
                    raise CNNGPError(f"{what}: {str(path)!r} is a folder that is not a kernel store; "
                                     "nothing was overwritten")
            else:
                store = cls.open(path, what=what)
                if store.images_within_rounding(identity, {"x1": x1, "x2": x2}):
                    store._rekey_images(identity, {"x1": x1, "x2": x2})  # the same images, last bits aside
                refuse_other_computation(path, store.attrs, identity, what)  # (open refused a half-created one)
                store.check_for_work()
                return store
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(path), mode="w-")
            # what it is for, first: a store torn while being created (an interrupt, a full disk)
            # is then recognised as this computation's and refused as half-created, with the remedy
            group.attrs.update({**identity, **provenance, "self_layers": sorted(self_layers),
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            L, n1, n2 = identity["shape"]
            t = identity["tile"]
            dtype = np.dtype(identity["dtype"])
            group.create_array("kernel", shape=(L, n1, n2), chunks=(L, min(t, n1), min(t, n2)),
                               dtype=dtype, fill_value=np.nan, compressors=None)
            images = group.require_group("images")
            selfs = group.require_group("self")
            for name, x in (("x1", x1), ("x2", x2)):
                if x is None:
                    continue
                arr = images.create_array(name, shape=x.shape, chunks=(min(t, x.shape[0]), *x.shape[1:]),
                                          dtype=x.dtype, compressors=None)
                arr[...] = x
                sub = selfs.require_group(name)
                for layer, grid in self_layers.items():
                    sub.create_array(str(layer), shape=(x.shape[0], *grid),
                                     chunks=(min(t, x.shape[0]), *grid), dtype=dtype,
                                     fill_value=np.nan, compressors=None)
            (path / "records").mkdir(exist_ok=True)
            group.attrs["complete_layout"] = True  # last: a store without it was torn while created
        except OSError as e:
            raise CNNGPError(f"{what}: creating {str(path)!r} failed ({e.strerror or e})") from None
        return cls.open(path, what=what)

    @staticmethod
    def stored_tile(path) -> int | None:
        """The tile size of the store at ``path``, or None if there is none (yet)."""
        try:
            with open(Path(path) / "zarr.json") as f:
                attrs = json.load(f).get("attributes", {})
        except (OSError, ValueError, AttributeError):  # AttributeError: not a JSON object
            return None
        if not isinstance(attrs, dict):  # edited: open() says so with its --out
            return None
        tile = attrs.get("tile") if attrs.get("format") == STORE_FORMAT else None
        return int(tile) if isinstance(tile, int) and not isinstance(tile, bool) else None

    @classmethod
    def open(cls, path, what: str = "store") -> "KernelStore":
        """Open an existing store (read and write)."""
        zarr = _zarr()
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"{what}: kernel store {str(path)!r} does not exist")
        if not (path / "zarr.json").is_file():
            raise CNNGPError(f"{what}: {str(path)!r} is not a kernel store (no zarr.json)")
        try:
            group = zarr.open_group(str(path), mode="r+")
        except Exception as e:  # a damaged zarr.json
            raise CNNGPError(f"{what}: {str(path)!r} cannot be opened as a kernel store ({e})") from None
        if group.attrs.get("format") != STORE_FORMAT:
            raise CNNGPError(f"{what}: {str(path)!r} is not a {STORE_FORMAT} store "
                             f"(format {group.attrs.get('format')!r})")
        if not group.attrs.get("complete_layout"):  # set last by create(): torn while it was made
            raise CNNGPError(f"{what}: {str(path)!r} was left half-created (stopped while its arrays were being "
                             "made, before any tile); delete it and run again (unless another process is "
                             "creating it right now)")
        store = cls(path, group, what)
        store._check_attrs()
        store._check_links(deep=False)
        store._check_dtypes()
        return store

    # -- integrity: what is read back must be what the store recorded ---------------------
    def _check_links(self, deep: bool) -> None:
        link = _links_in(self.path, deep)
        if link is not None:
            raise CNNGPError(f"{self.what}: {str(self.path)!r} holds {link!r}, a symbolic link (or not a "
                             "file or folder); cnngp writes only inside its own store and will not use it")

    def _check_attrs(self) -> None:
        """The recorded attributes have the types cnngp writes (an edited zarr.json is refused
        with one line, not a crash where a value is used)."""
        a = self.attrs

        def count(v, low=0):
            return isinstance(v, int) and not isinstance(v, bool) and v >= low

        checks = {
            "tile": lambda v: count(v, 1),
            "shape": lambda v: isinstance(v, list) and len(v) == 3 and all(count(n) for n in v),
            "readouts": lambda v: v is None or isinstance(v, list) and all(isinstance(r, dict) for r in v),
            "spec": lambda v: isinstance(v, dict),
            "self_layers": lambda v: v is None or (isinstance(v, list) and all(count(n) for n in v)),
            "x1_sha256": lambda v: isinstance(v, str),
            "x2_sha256": lambda v: v is None or isinstance(v, str),
            "labels": lambda v: v is None or isinstance(v, list),
        }
        for key, ok in checks.items():
            value = a.get(key)
            if not ok(value):
                shown = repr(value)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise CNNGPError(f"{self.what}: {str(self.path)!r} records no valid {key} ({shown}) "
                                 "in its zarr.json; it was altered")

    def _check_dtypes(self) -> None:
        """The arrays' dtypes (in their zarr.json) are the store's recorded dtype, and the
        kernel array has the recorded shape."""
        try:
            recorded = np.dtype(self.attrs.get("dtype"))
        except TypeError:
            raise CNNGPError(f"{self.what}: {str(self.path)!r} records no valid dtype "
                             f"({self.attrs.get('dtype')!r}); it was altered") from None
        arrays = [("kernel", lambda: self.group["kernel"])]
        for which in ("x1", "x2"):
            for layer in self.attrs.get("self_layers") or []:
                if which == "x1" or not self.symmetric:
                    arrays.append((f"self/{which}/{layer}",
                                   lambda w=which, l=layer: self.group["self"][w][str(l)]))
        for name, get in arrays:
            try:
                actual = np.dtype(get().dtype)
            except Exception as e:
                raise CNNGPError(f"{self.what}: {str(self.path)!r} has no readable array {name} "
                                 f"({' '.join(str(e).split()) or type(e).__name__}); it was altered") from None
            if actual != recorded:
                raise CNNGPError(f"{self.what}: {str(self.path)!r}: its array {name} is {actual}, but the store "
                                 f"records dtype {recorded}; it was altered (delete it and run again)")
        shape = tuple(self.group["kernel"].shape)
        if shape != tuple(self.attrs["shape"]):
            raise CNNGPError(f"{self.what}: {str(self.path)!r}: its kernel array has shape {shape}, but the store "
                             f"records shape {tuple(self.attrs['shape'])}; it was altered (delete it and run again)")

    def check_for_work(self) -> None:
        """Before computing into this store (a resume): no symbolic link anywhere inside it, and
        its stored images hash to the sha256 it recorded of the inputs (the images every task
        reads back), so that no tile is computed from altered images. A records folder that
        was deleted is made again: the tiles it recorded count as missing and are recomputed
        (a tile is trusted only with its record)."""
        self._check_links(deep=True)
        if not self.records_dir.is_dir() and not self.records_dir.exists():
            try:
                self.records_dir.mkdir()
            except OSError as e:
                raise CNNGPError(f"{self.what}: {str(self.path)!r} lacks its records folder and it cannot be "
                                 f"made again ({e.strerror or e})") from None
        damaged = self.damaged_images()
        if damaged:
            raise CNNGPError(f"{self.what}: {str(self.path)!r}: its stored images images/{damaged[0]} do not "
                             f"match the sha256 it recorded of them ({damaged[0]}_sha256); the store was "
                             "altered, delete it and run again")

    def damaged_images(self) -> list[str]:
        """The stored image arrays (``"x1"``, ``"x2"``) that are unreadable or do not hash to
        the sha256 the store recorded of its inputs: a resume refuses the store then."""
        damaged = []
        for which in ("x1", "x2"):
            recorded = self.attrs.get(f"{which}_sha256")
            if recorded is None:
                continue
            try:
                stored = np.asarray(self.group["images"][which][...])
                same = fingerprint(stored) == recorded
            except Exception:
                same = False
            if not same:
                damaged.append(which)
        return damaged

    def images_within_rounding(self, identity: dict, images: dict) -> bool:
        """Whether this store, made for ``identity`` but for the sha256 of its images, keeps
        images that are ``images`` (``{"x1": ..., "x2": ...}``, as stored) to rounding
        (:func:`same_to_rounding`): the same preprocessing (``--zca``) on another machine, whose
        last bits differ. Such a store is resumed, not refused: its tiles are the kernel of
        these images within the dtype's rounding (:meth:`create` rekeys it)."""
        if _first_difference(self.attrs, identity, tuple(k for k in IDENTITY_KEYS if k not in IMAGE_KEYS)):
            return False
        differ = self._image_keys_differing(identity)
        for key in differ:
            which = key.removesuffix("_sha256")
            try:  # each kept image read and hashed once (it may be a 50,000-image array)
                kept = np.asarray(self.group["images"][which][...])
                kept_sha = fingerprint(kept)
            except Exception:  # unreadable: refused as other images
                return False
            x = images.get(which)
            if x is None or not (kept_sha == identity.get(key)  # rewritten by a rekey cut short
                                 or kept_sha == self.attrs.get(key) and same_to_rounding(kept, x)):  # intact
                return False
        return bool(differ)

    def _image_keys_differing(self, identity: dict) -> list[str]:
        """The image keys (:data:`IMAGE_KEYS`) on which this store's identity differs from ``identity``."""
        return [k for k in IMAGE_KEYS if not same_spec(self.attrs.get(k), identity.get(k))]

    def _rekey_images(self, identity: dict, images: dict) -> None:
        """Make the store that of ``images`` (checked by :meth:`images_within_rounding`): its
        kept images rewritten, then the sha256 it records of them, and the change recorded
        (``images_rounded_otherwise``; a rewrite cut short between the two is finished by the
        next resume, whose check accepts kept images that already hash to the new sha256)."""
        differ = self._image_keys_differing(identity)
        try:
            for key in differ:
                self.group["images"][key.removesuffix("_sha256")][...] = images[key.removesuffix("_sha256")]
            entry = {"previous": {k: self.attrs.get(k) for k in differ}, "host": socket.gethostname(),
                     "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            values = {**{k: identity.get(k) for k in differ},
                      "images_rounded_otherwise": [*(self.attrs.get("images_rounded_otherwise") or []), entry]}
            self.group.attrs.update(values)
        except OSError as e:
            raise CNNGPError(f"{self.what}: rewriting the images of {str(self.path)!r} failed ({e.strerror or e})") \
                from None
        self.attrs.update(values)

    # -- shape of the work ----------------------------------------------------------------
    @property
    def kernel(self):
        return self.group["kernel"]

    def tiles(self) -> list[Tile]:
        _, n1, n2 = self.shape
        return tile_plan(n1, None if self.symmetric else n2, self.tile)

    def image_blocks(self) -> list[tuple[str, int, slice]]:
        """Stage-1 units: (set, block, images) for every block of T images of x1 (and x2)."""
        _, n1, n2 = self.shape
        sets = [("x1", n1)] + ([] if self.symmetric else [("x2", n2)])
        return [(name, b, slice(s, min(s + self.tile, n))) for name, n in sets
                for b, s in enumerate(range(0, n, self.tile))]

    def images(self, which: str, sl: slice) -> np.ndarray:
        return self.group["images"][which][sl]

    @contextlib.contextmanager
    def _writing(self, item: str):
        """A failure of the file system while writing ``item`` (a full disk, a read-only or
        vanished folder) becomes a :class:`StoreWriteError`. The item's record is written
        last, so a torn chunk has no record and is recomputed on resume."""
        try:
            yield
        except OSError as e:
            done = sum(1 for _ in self.records_dir.glob("tile-*.json")) if self.records_dir.is_dir() else 0
            raise StoreWriteError(self.what, item, str(self.path), e.strerror or str(e), done) from None

    # -- stage 1: self records ----------------------------------------------------------
    def write_self(self, which: str, block: int, sl: slice, variances: dict) -> None:
        with self._writing(f"the self records of {which} block {block}"):
            self._write_self(which, block, sl, variances)

    def _write_self(self, which: str, block: int, sl: slice, variances: dict) -> None:
        arrays = []
        for layer in self.attrs["self_layers"]:
            data = np.asarray(variances[layer], dtype=self.kernel.dtype)
            self.group["self"][which][str(layer)][sl] = data
            arrays.append(data)
        _atomic_json(self.records_dir / f"self-{which}-{block}.json",
                     {"sha256": _checksum(*arrays), "images": [sl.start, sl.stop]})

    def read_self(self, which: str, sl: slice) -> dict:
        return {layer: self.group["self"][which][str(layer)][sl] for layer in self.attrs["self_layers"]}

    def self_done(self, which: str, block: int, sl: slice) -> bool:
        record = self._record(f"self-{which}-{block}")
        if record is None:
            return False
        try:
            arrays = [self.group["self"][which][str(layer)][sl] for layer in self.attrs["self_layers"]]
        except Exception:
            return False
        return record.get("sha256") == _checksum(*arrays)

    # -- stage 2: tiles -----------------------------------------------------------------
    def write_tile(self, tile: Tile, block: np.ndarray, seconds: float | None = None,
                   cpu_seconds: float | None = None, origin: str | None = None, worker: bool = False) -> None:
        """Write a tile's block ``(L, R, C)`` (and its mirror), then its record, with what the
        tile took: ``seconds`` of wall time and ``cpu_seconds`` of its process's CPU time
        (every thread's), so that a computation's cost survives pauses and interruptions.
        ``origin``: the store or archive it was copied from
        (:func:`cnngp.engine.lending.reuse_tiles`), recorded as such; ``worker``: computed by
        a cluster's worker, recorded as such until this process vouches for it
        (:func:`cnngp.engine.distributed.spot_check`)."""
        with self._writing(f"tile {tile.name}"):
            self._write_tile(tile, block, seconds, cpu_seconds, origin, worker)

    def _write_tile(self, tile: Tile, block: np.ndarray, seconds: float | None, cpu_seconds: float | None,
                    origin: str | None = None, worker: bool = False) -> None:
        data = np.ascontiguousarray(np.asarray(block, dtype=self.kernel.dtype))
        self.kernel[:, tile.rows, tile.cols] = data
        record = {"sha256": _checksum(data), "rows": [tile.rows.start, tile.rows.stop],
                  "cols": [tile.cols.start, tile.cols.stop], "pairs": tile.pairs,
                  "seconds": seconds, "cpu_seconds": cpu_seconds, "host": os.uname().nodename, "pid": os.getpid()}
        if origin is not None:
            record["reused_from"] = origin
        if worker:
            record["worker"] = True
        if tile.mirror:
            # pair (x', x); a store of offset sums reverses its offsets: S_x'x[δ] = S_xx'[−δ]
            # (the mirror term's, flip="mirror", all but the width's: gram.mirrored_offsets)
            if self.attrs.get("offsets"):
                data_t = mirrored_offsets(data, self.attrs.get("offset_shape") or [len(data)],
                                          self.attrs.get("flip"))
            else:
                data_t = data
            mirror = np.ascontiguousarray(np.swapaxes(data_t, 1, 2))
            self.kernel[:, tile.cols, tile.rows] = mirror
            record["mirror_sha256"] = _checksum(mirror)
        _atomic_json(self.records_dir / f"{tile.name}.json", record)

    def _record(self, name: str) -> dict | None:
        return _read_json(self.records_dir / f"{name}.json")

    def _recorded(self, key: str, tiles) -> float:
        """The sum of ``key`` (``seconds``, ``cpu_seconds``) over the records of ``tiles``."""
        return sum((self._record(t.name) or {}).get(key) or 0.0 for t in tiles)

    def _lenders(self, tiles) -> dict:
        """{store: number of ``tiles`` copied from it} (their records' ``reused_from``)."""
        out = {}
        for t in tiles:
            source = (self._record(t.name) or {}).get("reused_from")
            if source is not None:
                out[source] = out.get(source, 0) + 1
        return out

    def tile_state(self, tile: Tile) -> str:
        """'done', 'missing' (no record) or 'bad' (a record the bytes do not match)."""
        record = self._record(tile.name)
        if record is None:
            return "missing"
        try:
            if record.get("sha256") != _checksum(self.kernel[:, tile.rows, tile.cols]):
                return "bad"
            if tile.mirror and record.get("mirror_sha256") != _checksum(self.kernel[:, tile.cols, tile.rows]):
                return "bad"
        except Exception:  # an unreadable chunk
            return "bad"
        return "done"

    def verify(self, threads: int | None = None) -> dict:
        """Check every tile against its record: ``{"done": [...], "missing": [...], "bad": [...]}``
        (lists of :class:`Tile`, in the plan's order). Reads the whole matrix once, ``threads``
        tiles at a time (default :data:`VERIFY_THREADS`): reading chunks and hashing them
        release the GIL, so a store on a parallel file system is checked at its bandwidth."""
        tiles = self.tiles()
        threads = min(len(tiles), VERIFY_THREADS if threads is None else int(threads))
        if threads <= 1:
            states = [self.tile_state(t) for t in tiles]
        else:
            with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="cnngp-verify") as pool:
                states = list(pool.map(self.tile_state, tiles))
            # a tile found bad is checked again alone before it is recomputed: rare, and so a
            # read that failed for being concurrent never costs a tile
            states = [self.tile_state(t) if s == "bad" else s for t, s in zip(tiles, states)]
        out = {"done": [], "missing": [], "bad": []}
        for tile, state in zip(tiles, states):
            out[state].append(tile)
        return out

    def forget(self, tile: Tile) -> None:
        """Drop a tile's record (before recomputing a bad tile)."""
        try:
            os.unlink(self.records_dir / f"{tile.name}.json")
        except FileNotFoundError:
            pass

    def forget_self_records(self) -> None:
        """Drop every image block's self record: the next run computes them again."""
        for path in self.records_dir.glob("self-*.json"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def vouch(self, tiles) -> None:
        """Mark the records of ``tiles`` (a worker's) as checked by this process (``worker``
        becomes ``"checked"``)."""
        for tile in tiles:
            record = self._record(tile.name)
            if record is not None and record.get("worker") is True:
                _atomic_json(self.records_dir / f"{tile.name}.json", {**record, "worker": "checked"})

    def unchecked_worker_tiles(self) -> dict:
        """{(host, pid): [tiles]} of the finished tiles a cluster's worker computed that this
        process has not checked (:func:`cnngp.engine.distributed.spot_check`), by worker."""
        out: dict = {}
        for tile in self.tiles():
            record = self._record(tile.name)
            if record is not None and record.get("worker") is True and "reused_from" not in record:
                out.setdefault((record.get("host"), record.get("pid")), []).append(tile)
        return out

    # -- reading --------------------------------------------------------------------------
    def complete(self) -> bool:
        state = self.verify()
        return not state["missing"] and not state["bad"]

    def readout(self, index: int, rows=slice(None), cols=slice(None)) -> np.ndarray:
        """One readout's matrix (or a block of it) as float64."""
        return np.asarray(self.kernel[index, rows, cols], dtype=np.float64)

    def labels(self) -> list:
        return list(self.attrs.get("labels") or [])

    def annotate(self, **values) -> None:
        """Record provenance beside the identity, e.g. ``preprocessing`` (how the images were
        transformed before the kernel: the store holds and hashes the transformed ones).
        The identity's keys cannot be changed this way."""
        clash = [k for k in values if k in IDENTITY_KEYS or k in ("complete_layout", "self_layers")]
        if clash:
            raise CNNGPError(f"{self.what}: {', '.join(clash)} is part of the store's identity; not annotated")
        self.group.attrs.update(values)
        self.attrs.update(values)

    def info(self) -> dict:
        """What ``cnngp info K.zarr`` prints: shape, dtype, tiles done/total, bad tiles, stored
        images that no longer match their recorded sha256, provenance."""
        state = self.verify()
        tiles = self.tiles()
        done_pairs = sum(t.pairs for t in state["done"])
        return {
            "path": str(self.path),
            "format": self.attrs.get("format"),
            "shape": list(self.shape),
            "dtype": self.attrs.get("dtype"),
            "tile": self.tile,
            "symmetric": self.symmetric,
            "tiles_total": len(tiles),
            "tiles_done": len(state["done"]),
            "tiles_missing": len(state["missing"]),
            "tiles_bad": [t.name for t in state["bad"]],
            "pairs_total": sum(t.pairs for t in tiles),
            "pairs_done": done_pairs,
            "complete": not state["missing"] and not state["bad"],  # its kernel tiles
            "being_written_by": writer_pid(self.path),  # a run of this machine filling it now (its pid)
            # resumes on the same images rounded otherwise (another machine's preprocessing)
            "images_rounded_otherwise": list(self.attrs.get("images_rounded_otherwise") or []),
            "images_damaged": self.damaged_images(),  # a resume refuses the store then
            "readouts": len(self.attrs.get("readouts") or [None]),
            "labels": self.labels(),
            "x1_sha256": self.attrs.get("x1_sha256"),
            "x2_sha256": self.attrs.get("x2_sha256"),
            "spec": self.attrs.get("spec"),
            "flip": self.attrs.get("flip") or False,  # True: flip-averaged, "mirror": the mirror term
            "offsets": bool(self.attrs.get("offsets")),  # offset sums S[δ] (cnngp learn), not readouts
            "offset_shape": self.attrs.get("offset_shape"),
            "preprocessing": self.attrs.get("preprocessing"),
            "created": self.attrs.get("created"),
            "versions": self.attrs.get("versions"),
            "tiles_reused_from": self._lenders(state["done"]),  # --reuse: {source store: tiles}
            # computed by a cluster's workers: checked by this process's spot check, or not yet
            "tiles_by_workers": self._by_workers(state["done"]),
            "seconds_recorded": self._recorded("seconds", state["done"]),
            "cpu_seconds_recorded": self._recorded("cpu_seconds", state["done"]),
            # of which in tiles copied from another store: their time was spent there
            "seconds_recorded_reused": self._recorded("seconds", self._copied(state["done"])),
        }

    def _by_workers(self, tiles) -> dict:
        """{"checked": n, "unchecked": m}: those of ``tiles`` a cluster's worker computed,
        vouched for by a spot check (:func:`cnngp.engine.distributed.spot_check`) or not yet."""
        marks = [(self._record(t.name) or {}).get("worker") for t in tiles]
        return {"checked": marks.count("checked"), "unchecked": marks.count(True)}

    def _copied(self, tiles) -> list:
        """Those of ``tiles`` whose records say they were copied from another store (``--reuse``)."""
        return [t for t in tiles if (self._record(t.name) or {}).get("reused_from") is not None]



class _ReadoutSequence:
    """A sequence of (N1, N2) float64 readout matrices read one at a time from complete stores
    (what the sweep iterates over, so that one readout is in memory at once): bounds and
    finiteness checked here, the reading by :meth:`_matrix`."""

    shape: tuple

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        matrix = self._matrix(index % len(self))
        if not np.all(np.isfinite(matrix)):
            raise CNNGPError(f"kernel: readout {index} {self._where()} has NaN or infinite entries")
        return matrix

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    def _matrix(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def _where(self) -> str:
        raise NotImplementedError


def _complete(store: KernelStore) -> KernelStore:
    state = store.verify()
    if state["missing"] or state["bad"]:
        raise CNNGPError(
            f"{store.what}: {str(store.path)!r} is not complete ({len(state['missing'])} "
            f"missing and {len(state['bad'])} bad tiles); run the same command again to finish it"
        )
    return store


class StoredReadouts(_ReadoutSequence):
    """The readouts of a complete store as a sequence of (N1, N2) float64 matrices."""

    def __init__(self, store: KernelStore):
        self.store = _complete(store)
        self.shape = store.shape

    def _matrix(self, index: int) -> np.ndarray:
        return self.store.readout(index)

    def _where(self) -> str:
        return f"in {str(self.store.path)!r}"


class FlipAveragedReadouts(_ReadoutSequence):
    """The flip-averaged kernels ½[K + K_mirror] (docs/maths.md §9) of two complete stores,
    the plain kernel and its mirror term (``flip="mirror"``), as a sequence of (N1, N2)
    float64 matrices. The average is taken in the stores' dtype, as the engine takes it in a
    flip plan's pass, so that the result is that of a flip-averaged store to the bit."""

    def __init__(self, plain: StoredReadouts, mirror: StoredReadouts):
        if plain.shape != mirror.shape or plain.store.attrs.get("labels") != mirror.store.attrs.get("labels"):
            raise CNNGPError(
                f"kernel: {str(mirror.store.path)!r} is not the mirror term of {str(plain.store.path)!r} "
                f"(shapes {tuple(mirror.shape)} and {tuple(plain.shape)}, or other readouts)"
            )
        self.plain, self.mirror, self.shape = plain, mirror, plain.shape

    def _matrix(self, index: int) -> np.ndarray:
        a = np.asarray(self.plain.store.kernel[index])
        b = np.asarray(self.mirror.store.kernel[index])
        return flip_average(a, b).astype(np.float64)

    def _where(self) -> str:
        return f"of {str(self.plain.store.path)!r} and its mirror term"

"""Gram-matrix storage: atomic files and resumable checkpoints.

A long Gram computation writes a checkpoint every few seconds: the matrix so far and how many
image pairs (in the engine's fixed enumeration order) are done, with a fingerprint of the
network, inputs and settings. Rerunning the same computation with the same checkpoint path
resumes after the last saved pair; a checkpoint of a different computation is refused. Every
file is written to a temporary name and renamed into place, so an interrupted write never
leaves a file that looks complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cnngp.errors import CNNGPError
from cnngp.settings import env_number

__all__ = ["atomic_write", "check_output_file", "check_output_dir", "fingerprint", "Checkpoint"]


def _kind_of(path: Path) -> str | None:
    """What is at ``path`` when it is not a regular file (None for a regular file or
    nothing): 'a symbolic link', 'a folder', 'a character device', ..."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreadable ({e.strerror})"
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_output_file(path, what: str = "--out") -> Path:
    """Refuse, before any work, an output path cnngp must not or cannot write.

    cnngp writes only regular files, through a temporary file renamed into place: an
    existing folder, symbolic link, device (``/dev/null`` included), FIFO or socket at
    ``path`` is refused rather than replaced, as is a missing or unwritable parent folder.
    """
    if path is None or not str(path).strip():
        raise CNNGPError(f"{what}: is empty; give a file path such as K.npz")
    text = str(path)
    path = Path(text)
    if text.endswith(("/", os.sep)):
        raise CNNGPError(f"{what}: {text!r} names a folder; give a file path such as {text}K.npz")
    kind = _kind_of(path)
    if kind is not None:
        raise CNNGPError(
            f"{what}: {text!r} is {kind}; cnngp writes only regular files and will not "
            "replace it (give the path of a new or existing regular file)"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise CNNGPError(f"{what}: folder {str(parent)!r} does not exist")
    if not parent.is_dir():
        raise CNNGPError(f"{what}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CNNGPError(f"{what}: cannot write into folder {str(parent)!r} (permission denied)")
    if path.exists() and not os.access(path, os.W_OK):
        raise CNNGPError(f"{what}: {text!r} exists and is read-only")
    return path


def check_output_dir(out, files=(), what: str = "--out") -> None:
    """Fail before any computation if DIR cannot be created or written, is a kernel store, or
    if a file cnngp would place there is not a regular file (a link, a device, a folder)."""
    if not str(out).strip():  # before Path(""), which is "."
        raise CNNGPError(f"{what}: is empty; give a folder such as cnngp-sweep")
    out = Path(out)
    if (out / "zarr.json").is_file():
        raise CNNGPError(f"{what}: {str(out)!r} is a Zarr folder (a kernel store?); results go in a folder "
                         "of their own, give another")
    if out.is_symlink() and not out.is_dir():
        raise CNNGPError(f"{what}: {str(out)!r} is a symbolic link that does not lead to a folder")
    if out.exists() and not out.is_dir():
        raise CNNGPError(f"{what}: {str(out)!r} exists and is not a folder")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise CNNGPError(f"{what}: cannot write into {str(probe)!r}")
    if out.is_dir():
        for name in files:
            check_output_file(out / name, what)


def check_own_folder(path, what: str, *, marker: str, kind: str, empty_hint: str,
                     foreign_hint: str, parents_made: bool) -> Path:
    """Refuse, before any work, a folder cnngp must not write as ``kind`` (a kernel store, a
    tile archive): an empty name, a link, a file, a non-empty folder without ``marker`` (a
    folder of someone else's), an unwritable folder, or a parent that is missing (unless
    ``parents_made``) or unwritable."""
    if path is None or not str(path).strip():
        raise CNNGPError(f"{what}: is empty; {empty_hint}")
    path = Path(path)
    if path.is_symlink():
        raise CNNGPError(f"{what}: {str(path)!r} is a symbolic link; cnngp writes only its own folders")
    if path.exists():
        if not path.is_dir():
            raise CNNGPError(f"{what}: {str(path)!r} exists and is not a folder ({kind} is one)")
        if not (path / marker).is_file() and any(path.iterdir()):
            raise CNNGPError(f"{what}: {str(path)!r} is a folder that is not {kind}; {foreign_hint}")
        if not os.access(path, os.W_OK):
            raise CNNGPError(f"{what}: {str(path)!r} is not writable")
        return path
    parent = path.absolute().parent
    while parents_made and not parent.exists():  # made with it
        parent = parent.parent
    if not parent.is_dir():
        raise CNNGPError(f"{what}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise CNNGPError(f"{what}: the folder {str(parent)!r} is not writable")
    return path


@contextlib.contextmanager
def read_npz(path):
    """``np.load`` of a ``.npz`` path, without pickle, whose file is closed on every exit.

    ``np.load(path)`` leaves its file open when the archive itself cannot be read (a
    truncated zip, say): that handle would outlive the error until garbage collection, and
    on some systems keeps the file from being deleted. Here the file is ours to close.
    A file that is not an ``.npz`` archive raises ``ValueError``."""
    with open(path, "rb") as f:
        archive = np.load(f, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("not a .npz archive")
        with archive:
            yield archive


def atomic_write(path, write, what: str = "--out") -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it into place.

    The target is checked by :func:`check_output_file` first (only regular files are ever
    replaced). If writing fails — a full disk, say — the temporary file is removed, the
    target is left as it was, and a :class:`CNNGPError` names ``what`` and the reason.
    """
    path = check_output_file(path, what)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise CNNGPError(f"{what}: cannot create a file in {str(parent)!r} ({e.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CNNGPError(
                f"{what}: writing {str(path)!r} failed ({e.strerror or e}); nothing was written"
            ) from None
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_files(out, files: dict[str, bytes], what: str = "--out") -> None:
    """Write the files ``{name: bytes}`` into the folder ``out`` as one: each atomically (a
    temporary file, fsynced, renamed into place, in the order given: put the one whose presence
    means complete last), and on failure leave the folder as it was (or absent) — a file it had
    is hard-linked aside before its new version replaces it, and put back if a later one fails.
    A failed write (a full disk, say) is a :class:`CNNGPError` naming ``what`` and the file."""
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    temps: dict[str, str] = {}
    placed: list[tuple[Path, str | None]] = []  # (file put in place, the previous version's link)
    name = None
    try:
        for name, payload in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=out)
            temps[name] = tmp
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())  # on disk before any rename makes it the output
            os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; give the usual mode
        for name, tmp in temps.items():  # results.json last: its presence means complete
            target, previous = out / name, None
            if target.exists():
                previous = tempfile.mktemp(prefix=f".{name}.", suffix=".previous", dir=out)
                try:
                    os.link(target, previous)  # the old version kept (a second name) until all are placed
                except OSError:  # a file system without hard links
                    shutil.copy2(target, previous)
            placed.append((target, previous))
            os.replace(tmp, target)
    except BaseException as e:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except OSError:
                pass
        for target, previous in reversed(placed):  # back as it was: old versions, no new files
            try:
                if previous is not None:
                    os.replace(previous, target)
                    if os.path.lexists(previous):  # still the target's own link (never replaced): a no-op rename
                        os.unlink(previous)
                else:
                    target.unlink()
            except OSError:
                pass
        if created:
            try:
                out.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError):
            target = out / name if name is not None else out
            raise CNNGPError(f"{what}: writing {str(target)!r} failed ({e.strerror or e}); "
                             f"nothing was written to {str(out)!r}") from None
        raise
    for _, previous in placed:
        if previous is not None:
            try:
                os.unlink(previous)
            except OSError:
                pass


def fingerprint(*parts) -> str:
    """sha256 over JSON-able descriptions and arrays (inputs are hashed by their bytes)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (np.ndarray, torch.Tensor)):
            a = np.ascontiguousarray(part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else part)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.reshape(-1).view(np.uint8))  # its bytes, without a copy of them
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


class CheckpointMismatchError(CNNGPError):
    """A checkpoint file of another computation (network, inputs or settings changed)."""


class Checkpoint:
    """A resumable partial Gram matrix at ``path`` (an ``.npz``).

    Parameters
    ----------
    path : path-like
    key : str
        Fingerprint of the computation; a checkpoint with another key is refused.
    every : float, optional
        Seconds between saves (default :attr:`EVERY`, 30 s or ``CNNGP_CHECKPOINT_SECONDS``).
    """

    #: default seconds between saves (``CNNGP_CHECKPOINT_SECONDS``)
    EVERY = env_number("CNNGP_CHECKPOINT_SECONDS", 30.0, 0)

    def __init__(self, path, key: str, every: float | None = None):
        self.path = Path(path)
        self.key = key
        self.every = float(self.EVERY if every is None else every)
        self._last = time.monotonic()

    def load(self, shape, dtype, n_pairs: int) -> tuple[torch.Tensor, int] | None:
        """(matrix so far, pairs done), or None when there is nothing to resume.

        Everything read is checked: the key, a pairs counter in ``0..n_pairs``, the shape,
        a floating dtype and the sha256 of the values (:meth:`checksum`, saved with them: a
        value altered in the file, finite or not, is refused). A file that fails is refused
        with a message naming it."""
        if not self.path.exists():
            return None
        kind = _kind_of(self.path)
        if kind is not None:
            raise CNNGPError(f"checkpoint: {str(self.path)!r} is {kind}, not a checkpoint file")
        try:
            with read_npz(self.path) as z:
                key = z["key"]
                done = z["pairs_done"]
                values = z["values"]
                checksum = z["values_sha256"] if "values_sha256" in z.files else None
        except Exception as e:
            raise CNNGPError(
                f"checkpoint: {str(self.path)!r} is unreadable ({' '.join(str(e).split())}); "
                "delete it to start over"
            ) from None
        if key.shape != () or key.dtype.kind != "U" or str(key) != self.key:
            raise CheckpointMismatchError(
                f"checkpoint: {str(self.path)!r} belongs to a different computation (network, "
                "inputs or settings changed); delete it or choose another checkpoint path"
            )
        if done.shape != () or done.dtype.kind not in "iu" or not 0 <= int(done) <= n_pairs:
            raise CNNGPError(
                f"checkpoint: {str(self.path)!r} is corrupt (pairs done {done!r} is not an "
                f"integer in 0..{n_pairs}); delete it to start over"
            )
        if tuple(values.shape) != tuple(shape) or values.dtype.kind != "f":
            raise CNNGPError(
                f"checkpoint: {str(self.path)!r} is corrupt (values {values.dtype} "
                f"{values.shape}, expected float {tuple(shape)}); delete it to start over"
            )
        if checksum is None:
            raise CNNGPError(
                f"checkpoint: {str(self.path)!r} has no checksum of its values (written by an older "
                "cnngp, or altered); delete it to start over"
            )
        if checksum.shape != () or checksum.dtype.kind != "U" or str(checksum) != self.checksum(values):
            raise CNNGPError(
                f"checkpoint: {str(self.path)!r} is corrupt (its values do not match their checksum "
                "values_sha256); delete it to start over"
            )
        return torch.as_tensor(values, dtype=dtype), int(done)

    @staticmethod
    def checksum(values) -> str:
        """sha256 of the values array (its shape, dtype and bytes), saved as ``values_sha256``."""
        return fingerprint(np.asarray(values))

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    def save(self, values: torch.Tensor, pairs_done: int) -> None:
        numbers = values.cpu().numpy()
        arrays = {
            "key": np.array(self.key),
            "pairs_done": np.array(pairs_done),
            "values": numbers,
            "values_sha256": np.array(self.checksum(numbers)),
        }
        atomic_write(self.path, lambda f: np.savez(f, **arrays), what="checkpoint")
        self._last = time.monotonic()

    def postpone(self) -> None:
        """Count the next interval from now (after a save that failed)."""
        self._last = time.monotonic()

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

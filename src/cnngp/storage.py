"""Gram-matrix storage: atomic files and resumable checkpoints.

A long Gram computation writes a checkpoint every few seconds: the matrix so far and how many
image pairs (in the engine's fixed enumeration order) are done, with a fingerprint of the
network, inputs and settings. Rerunning the same computation with the same checkpoint path
resumes after the last saved pair; a checkpoint of a different computation is refused. Every
file is written to a temporary name and renamed into place, so an interrupted write never
leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .errors import CNNGPError

__all__ = ["atomic_write", "fingerprint", "Checkpoint"]


def atomic_write(path, write, what: str = "--out") -> None:
    """Call ``write(fileobj)`` on a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CNNGPError(f"{what}: folder {str(parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def fingerprint(*parts) -> str:
    """sha256 over JSON-able descriptions and arrays (inputs are hashed by their bytes)."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (np.ndarray, torch.Tensor)):
            a = np.ascontiguousarray(part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else part)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


class Checkpoint:
    """A resumable partial Gram matrix at ``path`` (an ``.npz``).

    Parameters
    ----------
    path : path-like
    key : str
        Fingerprint of the computation; a checkpoint with another key is refused.
    every : float
        Seconds between saves.
    """

    def __init__(self, path, key: str, every: float = 30.0):
        self.path = Path(path)
        self.key = key
        self.every = float(every)
        self._last = time.monotonic()

    def load(self, shape, dtype) -> tuple[torch.Tensor, int] | None:
        """(matrix so far, pairs done), or None when there is nothing to resume."""
        if not self.path.exists():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                key = str(z["key"])
                done = int(z["pairs_done"])
                values = z["values"]
        except Exception as e:
            raise CNNGPError(
                f"checkpoint: {str(self.path)!r} is unreadable ({e}); delete it to start over"
            ) from None
        if key != self.key:
            raise CNNGPError(
                f"checkpoint: {str(self.path)!r} belongs to a different computation (network, "
                "inputs or settings changed); delete it or choose another checkpoint path"
            )
        if tuple(values.shape) != tuple(shape):
            raise CNNGPError(f"checkpoint: {str(self.path)!r} has shape {values.shape}, expected {shape}")
        return torch.as_tensor(values, dtype=dtype), done

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every

    def save(self, values: torch.Tensor, pairs_done: int) -> None:
        arrays = {
            "key": np.array(self.key),
            "pairs_done": np.array(pairs_done),
            "values": values.cpu().numpy(),
        }
        atomic_write(self.path, lambda f: np.savez(f, **arrays), what="checkpoint")
        self._last = time.monotonic()

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

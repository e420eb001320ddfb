"""The kernel state that flows through the layers (PAPER.md §2).

For a batch of B input pairs (x, x') a layer ℓ is described by the second moments of its
outputs over **pairs of positions**:

* ``cross``  — K_xx'[q, q'], either the full position-pair tensor of shape ``(B, *F, *F)``
  (``full=True``; the first D spatial axes index x, the last D index x') or only its spatial
  diagonal ``(B, *F)`` (``full=False``), used when every layer downstream has independent
  weights.
* ``var1``, ``var2`` — the diagonals K_xx[p, p] and K_x'x'[p', p'] of each input's own
  covariance, shape ``(B, *F)``; needed by nonlinearities, ``None`` elsewhere.

``F`` is the spatial grid (``spatial``); an empty ``spatial`` (after a readout, flatten or
global pooling) makes ``cross`` shape ``(B,)`` and both representations coincide.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import CNNGPError

__all__ = ["KernelState"]


@dataclass(frozen=True)
class KernelState:
    cross: torch.Tensor
    spatial: tuple
    full: bool
    var1: torch.Tensor | None = None
    var2: torch.Tensor | None = None

    def __post_init__(self):
        spatial = tuple(int(s) for s in self.spatial)
        object.__setattr__(self, "spatial", spatial)
        full = bool(self.full) and len(spatial) > 0
        object.__setattr__(self, "full", full)
        b = self.cross.shape[0] if self.cross.dim() else -1
        expected = (b,) + spatial + (spatial if full else ())
        if tuple(self.cross.shape) != expected:
            raise CNNGPError(
                f"KernelState.cross: expected shape {expected} for spatial grid {spatial} "
                f"({'full' if full else 'diagonal'}), got {tuple(self.cross.shape)}"
            )
        for name in ("var1", "var2"):
            v = getattr(self, name)
            if v is not None:
                if tuple(v.shape) != (b,) + spatial:
                    raise CNNGPError(
                        f"KernelState.{name}: expected shape {(b,) + spatial}, got {tuple(v.shape)}"
                    )
                if v.dtype != self.cross.dtype or v.device != self.cross.device:
                    raise CNNGPError(f"KernelState.{name}: dtype/device differ from cross")

    @property
    def batch(self) -> int:
        return self.cross.shape[0]

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions D."""
        return len(self.spatial)

    def diagonal(self) -> torch.Tensor:
        """The spatial diagonal K[p, p], shape ``(B, *F)``."""
        if not self.full:
            return self.cross
        b, n = self.batch, 1
        for s in self.spatial:
            n *= s
        flat = self.cross.reshape(b, n, n)
        return torch.diagonal(flat, dim1=1, dim2=2).reshape((b,) + self.spatial)

    def to_diagonal(self) -> "KernelState":
        return replace(self, cross=self.diagonal(), full=False)

    def with_variances(self, var1, var2) -> "KernelState":
        return replace(self, var1=var1, var2=var2)

    def evolve(self, cross, spatial=None, full=None) -> "KernelState":
        """A new state with new ``cross`` (variances dropped: they belong to the old layer)."""
        return KernelState(
            cross=cross,
            spatial=self.spatial if spatial is None else spatial,
            full=self.full if full is None else full,
        )

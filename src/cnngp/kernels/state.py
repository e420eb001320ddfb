"""The kernel state that flows through the layers (docs/maths.md §2).

For a batch of B input pairs (x, x') a layer ℓ is described by the second moments of its
outputs over **pairs of positions**:

* ``cross``  — K_xx'[q, q'] in one of three representations:

  - **full**: the position-pair tensor of shape ``(B, *F, *F)`` (``full=True``; the first D
    spatial axes index x, the last D index x');
  - **diagonal**: only K[q, q], shape ``(B, *F)``, used when every layer downstream has
    independent weights;
  - **band** of radius R (a tuple, one per axis): only the diagonals |q'_d − q_d| ≤ R_d,
    shape ``(B, *F, *(2R + 1))`` with ``cross[b, q, j] = K[q, q + j − R]``; entries whose
    partner q + j − R lies off the grid are kept at exactly 0. Used below correlated or
    pooling layers whose outputs are only needed near their diagonal (strided nets ending in
    an independent readout): the radius a layer needs grows by stride × (radius above) +
    filter extent − 1 going down (docs/maths.md §2 (*)).
* ``var1``, ``var2`` — the diagonals K_xx[p, p] and K_x'x'[p', p'] of each input's own
  covariance, shape ``(B, *F)``; needed by nonlinearities, ``None`` elsewhere.

``F`` is the spatial grid (``spatial``); an empty ``spatial`` (after a readout, flatten or
global pooling) makes ``cross`` shape ``(B,)`` and both representations coincide.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from cnngp.errors import CNNGPError

__all__ = ["KernelState", "Band", "describe"]


@dataclass(frozen=True)
class Band:
    """The band representation of radius ``radius`` (one int ≥ 0 per spatial axis).

    Representations are passed around as ``True`` (full), ``False`` (diagonal) or a Band;
    a Band is deliberately not a truth value, so code that tests ``if full:`` fails loudly
    instead of mistaking a band for the full tensor.
    """

    radius: tuple

    def __post_init__(self):
        object.__setattr__(self, "radius", tuple(int(r) for r in self.radius))
        if any(r < 0 for r in self.radius):
            raise CNNGPError(f"Band: radii must be >= 0, got {self.radius}")

    @property
    def widths(self) -> tuple:
        return tuple(2 * r + 1 for r in self.radius)

    def __bool__(self):
        raise TypeError("a Band representation has no truth value; test `rep is True`")


def describe(rep) -> str:
    """'full', 'diagonal' or 'band R0xR1' for reports (cnngp info)."""
    if isinstance(rep, Band):
        return "band " + "x".join(str(r) for r in rep.radius)
    return "full" if rep is True else "diagonal"


@dataclass(frozen=True)
class KernelState:
    cross: torch.Tensor
    spatial: tuple
    full: bool
    var1: torch.Tensor | None = None
    var2: torch.Tensor | None = None
    band: tuple | None = None
    #: more tensors carried beside ``cross``, by name, each of the same shape, dtype and
    #: representation (a kernel type such as the NTK adds its own): converted with ``cross``
    #: in one place (:meth:`_each`), and passed on by the layers through their linear part
    extra: dict = field(default_factory=dict)
    #: channels of the features whose covariance this is (None: not tracked): only the
    #: standard parameterisation's NTK reads it (docs/maths.md §7)
    channels: int | None = None

    def __post_init__(self):
        spatial = tuple(int(s) for s in self.spatial)
        object.__setattr__(self, "spatial", spatial)
        full = bool(self.full) and len(spatial) > 0
        object.__setattr__(self, "full", full)
        band = None
        if self.band is not None and len(spatial) > 0:
            band = tuple(int(r) for r in self.band)
            if full or len(band) != len(spatial) or any(r < 0 for r in band):
                raise CNNGPError(
                    f"KernelState.band: expected {len(spatial)} radii >= 0 and full=False, "
                    f"got band={self.band}, full={self.full}"
                )
            if not any(band):
                band = None  # radius 0 is the diagonal
        object.__setattr__(self, "band", band)
        b = self.cross.shape[0] if self.cross.dim() else -1
        tail = spatial if full else (Band(band).widths if band is not None else ())
        expected = (b,) + spatial + tail
        if tuple(self.cross.shape) != expected:
            raise CNNGPError(
                f"KernelState.cross: expected shape {expected} for spatial grid {spatial} "
                f"({describe(self.representation)}), got {tuple(self.cross.shape)}"
            )
        for name, t in self.extra.items():
            if not isinstance(name, str) or name == "cross":
                raise CNNGPError(f"KernelState.extra: names must be strings other than 'cross', got {name!r}")
            if tuple(t.shape) != tuple(self.cross.shape) or t.dtype != self.cross.dtype or t.device != self.cross.device:
                raise CNNGPError(
                    f"KernelState.extra[{name!r}]: expected shape {tuple(self.cross.shape)}, "
                    f"dtype and device of cross, got {tuple(t.shape)} {t.dtype} {t.device}"
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
    def representation(self):
        """True (full), False (diagonal) or a :class:`Band`."""
        if self.band is not None:
            return Band(self.band)
        return self.full

    @property
    def batch(self) -> int:
        return self.cross.shape[0]

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions D."""
        return len(self.spatial)

    def diagonal(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The spatial diagonal K[p, p], shape ``(B, *F)`` (of ``tensor``, one of this state's
        tensors, if given)."""
        t = self.cross if tensor is None else tensor
        if self.band is not None:  # the middle of every band axis
            return t[(Ellipsis,) + tuple(self.band)]
        if not self.full:
            return t
        b, n = self.batch, 1
        for s in self.spatial:
            n *= s
        flat = t.reshape(b, n, n)
        return torch.diagonal(flat, dim1=1, dim2=2).reshape((b,) + self.spatial)

    def _each(self, fn, **changes) -> "KernelState":
        """``fn`` applied to ``cross`` and to every extra tensor alike (representation
        changes), with the other fields replaced by ``changes``."""
        return replace(self, cross=fn(self.cross), extra={k: fn(v) for k, v in self.extra.items()},
                       **changes)

    def to_diagonal(self) -> "KernelState":
        return self._each(self.diagonal, full=False, band=None)

    def to_band(self, radius) -> "KernelState":
        """The band of radius ``radius`` from a full state (or a wider band)."""
        from cnngp.kernels import ops

        radius = tuple(int(r) for r in radius)
        if not any(radius):
            return self.to_diagonal()
        if self.band is not None:
            if self.band == radius:
                return self
            if any(r > s for r, s in zip(radius, self.band)):
                raise CNNGPError(f"KernelState.to_band: cannot widen band {self.band} to {radius}")
            idx = tuple(slice(s - r, s + r + 1) for r, s in zip(radius, self.band))
            return self._each(lambda t: t[(Ellipsis,) + idx], band=radius)
        if not self.full:
            raise CNNGPError("KernelState.to_band: a diagonal state has no off-diagonal entries")
        return self._each(lambda t: ops.band_from_full(t, self.spatial, radius), full=False, band=radius)

    def convert(self, rep) -> "KernelState":
        """This state in representation ``rep`` (True, False or a Band) — only narrowing."""
        if isinstance(rep, Band):
            return self.to_band(rep.radius)
        if rep is True:
            if not self.full:
                raise CNNGPError("KernelState.convert: the full tensor cannot be rebuilt from a part")
            return self
        return self.to_diagonal()

    def with_variances(self, var1, var2) -> "KernelState":
        return replace(self, var1=var1, var2=var2)

    def evolve(self, cross, spatial=None, full=None, band=None, extra=None, channels=...) -> "KernelState":
        """A new state with new ``cross`` (variances dropped: they belong to the old layer)
        and the new ``extra`` tensors (none unless given); ``channels`` kept unless given.

        ``full`` may also be a :class:`Band` (the new representation); by default the
        representation is kept."""
        if isinstance(full, Band):
            full, band = False, full.radius
        elif full is None:
            full, band = self.full, self.band if band is None else band
        return KernelState(
            cross=cross,
            spatial=self.spatial if spatial is None else spatial,
            full=full,
            band=band,
            extra={} if extra is None else dict(extra),
            channels=self.channels if channels is ... else channels,
        )

    def with_extra(self, **tensors) -> "KernelState":
        """This state with more tensors carried beside ``cross`` (see :attr:`extra`)."""
        return replace(self, extra={**self.extra, **tensors})

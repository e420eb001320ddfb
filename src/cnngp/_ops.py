"""Tensor operations on position-pair tensors: the convolution (*) of PAPER.md §2.

A layer with filter taps p, stride s, dilation h and padding reads input position
``i(q, p) = s·q + h·p − pad_before`` for output position q (per spatial axis). On a full
position-pair tensor V of shape ``(B, *F, *F)`` the layer computes

    K[q, q'] = Σ_{p, p'} Σ[p, p'] · V[i(q, p), i(q', p')]                         (*)

Three exact evaluations of (*), chosen by the structure of Σ:

* independent, Σ = I/|P|: only p = p' — a sum of |P| shifted slices, separable over the
  spatial axes (one pair of axes at a time, Σ_d P_d slices instead of Π_d P_d);
* constant, Σ = 11ᵀ/|P|²: a box sum on each side independently, separable per axis;
* general Σ: the first side is unfolded into patches (|P| "channels") and the second side is
  an ordinary D-dimensional convolution whose filter is Σ — one dense GEMM-backed call.

The diagonal-output variants compute only K[q, q] (what a self-covariance needs below an
independent stack) by gathering each output's |P|×|P| block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .errors import CNNGPError

PADDINGS = ("same", "valid", "circular")


@dataclass(frozen=True)
class AxisGeometry:
    """How one spatial axis of a conv/pool layer maps input to output positions."""

    n_in: int
    taps: int
    stride: int = 1
    dilation: int = 1
    padding: str = "same"

    @property
    def extent(self) -> int:
        """Effective filter size (P − 1)·h + 1."""
        return (self.taps - 1) * self.dilation + 1

    @cached_property
    def n_out(self) -> int:
        if self.padding == "valid":
            return (self.n_in - self.extent) // self.stride + 1
        return -(-self.n_in // self.stride)

    @cached_property
    def pad_before(self) -> int:
        if self.padding == "valid":
            return 0
        total = max((self.n_out - 1) * self.stride + self.extent - self.n_in, 0)
        return total // 2  # XLA/TF "SAME": the extra pixel goes after

    def tap_slices(self, tap: int):
        """For one tap: (output slice, input slice) of the outputs reading inside the grid.

        Returns None if no output of this tap reads inside the grid (only zero padding).
        Circular padding is handled by :meth:`tap_index` instead.
        """
        offset = self.dilation * tap - self.pad_before
        s = self.stride
        q0 = max(0, -(offset // s))  # first q with s·q + offset >= 0
        q1 = min(self.n_out, (self.n_in - 1 - offset) // s + 1)
        if q1 <= q0:
            return None
        i0 = s * q0 + offset
        return slice(q0, q1), slice(i0, i0 + s * (q1 - q0 - 1) + 1, s)

    def tap_index(self, tap: int, device=None) -> torch.Tensor:
        """Input index of every output for one tap; ``n_in`` marks a zero-padded read."""
        q = torch.arange(self.n_out, device=device)
        i = self.stride * q + self.dilation * tap - self.pad_before
        if self.padding == "circular":
            return torch.remainder(i, self.n_in)
        return torch.where((i >= 0) & (i < self.n_in), i, torch.full_like(i, self.n_in))

    def patch_index(self, device=None) -> torch.Tensor:
        """(n_out, taps) input indices, ``n_in`` for zero padding."""
        return torch.stack([self.tap_index(p, device) for p in range(self.taps)], dim=1)


def _sl(ndim: int, pairs: dict) -> tuple:
    idx = [slice(None)] * ndim
    for axis, s in pairs.items():
        idx[axis] = s
    return tuple(idx)


def _resize(shape, axes, n):
    shape = list(shape)
    for a in axes:
        shape[a] = n
    return shape


def shift_sum(v: torch.Tensor, axes: tuple, geom: AxisGeometry) -> torch.Tensor:
    """Σ_a v[..., i(q, a) on every axis in ``axes`` simultaneously, ...] / taps.

    With one axis this is a box sum (average pooling of one side); with the two axes (d, D+d)
    of a position-pair tensor it is the diagonal sum of an independent convolution.
    """
    out = v.new_zeros(_resize(v.shape, axes, geom.n_out))
    for tap in range(geom.taps):
        if geom.padding == "circular":
            src = v
            index = geom.tap_index(tap, v.device)
            for a in axes:
                src = src.index_select(a, index)
            out += src
            continue
        sl = geom.tap_slices(tap)
        if sl is None:
            continue
        qs, is_ = sl
        out[_sl(v.dim(), {a: qs for a in axes})] += v[_sl(v.dim(), {a: is_ for a in axes})]
    out *= 1.0 / geom.taps
    return out


def gather_patches(v: torch.Tensor, axis: int, geom: AxisGeometry) -> torch.Tensor:
    """Replace ``axis`` (length n_in) by two axes (n_out, taps): the input read by each tap."""
    pad_shape = list(v.shape)
    pad_shape[axis] = 1
    vp = torch.cat([v, v.new_zeros(pad_shape)], dim=axis)  # index n_in reads zero
    index = geom.patch_index(v.device)
    out = vp.index_select(axis, index.reshape(-1))
    return out.reshape(v.shape[:axis] + (geom.n_out, geom.taps) + v.shape[axis + 1 :])


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def pad_spatial(x: torch.Tensor, geoms) -> torch.Tensor:
    """Pad the last len(geoms) axes of x as the layer's padding says (zeros or wrap-around)."""
    d = len(geoms)
    if all(g.padding == "circular" for g in geoms):
        for k, g in enumerate(geoms):
            axis = x.dim() - d + k
            after = max((g.n_out - 1) * g.stride + g.extent - g.n_in - g.pad_before, 0)
            idx = torch.remainder(
                torch.arange(-g.pad_before, g.n_in + after, device=x.device), g.n_in
            )
            x = x.index_select(axis, idx)
        return x
    pads = []
    for g in reversed(geoms):
        total = max((g.n_out - 1) * g.stride + g.extent - g.n_in, 0) if g.padding != "valid" else 0
        pads += [g.pad_before, total - g.pad_before]
    if any(pads):
        x = F.pad(x, pads)
    return x


def correlated_conv_full(v: torch.Tensor, sigma: torch.Tensor, geoms) -> torch.Tensor:
    """(*) for a general Σ on a full tensor ``(B, *F, *F)`` → ``(B, *Q, *Q)``.

    The first side is unfolded into |P| patch channels; the second side is one
    D-dimensional convolution with filter Σ[p, :] for channel p.
    """
    d = len(geoms)
    b = v.shape[0]
    x = v
    for k, g in enumerate(geoms):  # axis 1 + 2k after previous expansions
        x = gather_patches(x, 1 + 2 * k, g)
    # x: (B, Q0, P0, Q1, P1, ..., F'...) → (B, Q..., P..., F'...)
    perm = [0] + [1 + 2 * k for k in range(d)] + [2 + 2 * k for k in range(d)]
    perm += list(range(1 + 2 * d, x.dim()))
    x = x.permute(perm)
    q_shape = tuple(g.n_out for g in geoms)
    p_shape = tuple(g.taps for g in geoms)
    n_q, n_p = math.prod(q_shape), math.prod(p_shape)
    x = x.reshape((b * n_q, n_p) + tuple(v.shape[1 + d :]))
    x = pad_spatial(x, geoms)
    weight = sigma.reshape((1, n_p) + p_shape)
    out = _CONV[d](
        x,
        weight,
        stride=tuple(g.stride for g in geoms),
        dilation=tuple(g.dilation for g in geoms),
    )
    return out.reshape((b,) + q_shape + q_shape)


def flat_patch_index(geoms, device=None) -> torch.Tensor:
    """(|Q|, |P|) indices into the row-major flattened input grid; |F| marks zero padding."""
    n_in = [g.n_in for g in geoms]
    flat = valid = None
    for k, g in enumerate(geoms):
        idx = g.patch_index(device)  # (Q_k, P_k)
        term = idx * math.prod(n_in[k + 1 :])
        ok = idx < g.n_in
        flat = term if flat is None else _outer_add(flat, term)
        valid = ok if valid is None else _outer_and(valid, ok)
    return torch.where(valid, flat, torch.full_like(flat, math.prod(n_in)))


def _outer_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a: (Qa..., Pa...) flattened as (QA, PA); b: (Qb, Pb) → (QA·Qb, PA·Pb), row-major."""
    qa, pa = a.shape[0], a.shape[1]
    qb, pb = b.shape
    return (a[:, None, :, None] + b[None, :, None, :]).reshape(qa * qb, pa * pb)


def _outer_and(a, b):
    qa, pa = a.shape[0], a.shape[1]
    qb, pb = b.shape
    return (a[:, None, :, None] & b[None, :, None, :]).reshape(qa * qb, pa * pb)


def correlated_conv_diagonal(v: torch.Tensor, sigma: torch.Tensor, geoms) -> torch.Tensor:
    """(*) restricted to q = q' on a full tensor ``(B, *F, *F)`` → ``(B, *Q)``."""
    b = v.shape[0]
    n = math.prod(g.n_in for g in geoms)
    index = flat_patch_index(geoms, v.device)  # (Q, P)
    vf = F.pad(v.reshape(b, n, n), (0, 1, 0, 1))
    blocks = vf[:, index[:, :, None], index[:, None, :]]  # (B, Q, P, P)
    out = torch.einsum("bqpr,pr->bq", blocks, sigma)
    return out.reshape((b,) + tuple(g.n_out for g in geoms))


def check_geometry(geom: AxisGeometry, what: str):
    """Raise a clear error for a padding mode we do not know or a filter that cannot fit."""
    if geom.padding not in PADDINGS:
        raise CNNGPError(f"{what}: padding must be one of {PADDINGS}, got {geom.padding!r}")
    if geom.extent > geom.n_in:
        raise CNNGPError(
            f"{what}: filter of extent {geom.extent} (taps {geom.taps}, dilation "
            f"{geom.dilation}) is larger than its input grid of size {geom.n_in}; "
            "use a smaller filter, window or dilation"
        )

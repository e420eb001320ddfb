"""Tensor operations on position-pair tensors: the convolution (*) of docs/maths.md §2.

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

import functools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from cnngp.errors import CNNGPError

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


def shift_sum(v: torch.Tensor, axes: tuple, geom: AxisGeometry, scale: bool = True) -> torch.Tensor:
    """Σ_a v[..., i(q, a) on every axis in ``axes`` simultaneously, ...] / taps (``scale=False``:
    without the / taps, for callers that scale once for all axes, see :func:`scaled`).

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
    if scale:
        out *= 1.0 / geom.taps
    return out


def scaled(x: torch.Tensor, count: int) -> torch.Tensor:
    """x / count as every engine rounds it: x times fl(1/count), one constant rounded once.

    A float32 3×3 conv scaled per axis, × fl(1/3) twice, is (1 + 6e-8)/9 on average; an engine
    that scales by fl(1/9) then meets variances 6e-8 off its cross terms, and the NTK's V̇ (dV̇/dρ
    ≈ 20 at the ρ ≈ 0.9999 of neighbouring positions) turns that into ~1e-7 of the Gram per
    layer. The fused engines scale by the same fl(1/9) (fused._kron_terms, the Triton tables).
    """
    return x * (1.0 / count)


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


# -- the band representation (docs/maths.md §2 (*) restricted to |q' − q| ≤ R per axis) ----------------


@functools.lru_cache(maxsize=64)
def _band_index_cpu(spatial: tuple, radius: tuple) -> torch.Tensor:
    n = math.prod(spatial)
    idx = torch.zeros((n, 1), dtype=torch.long)  # flat partner index, built axis by axis
    valid = torch.ones((n, 1), dtype=torch.bool)
    grids = torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij")
    for k, (s, r) in enumerate(zip(spatial, radius)):
        partner = grids[k].reshape(n, 1) + torch.arange(-r, r + 1)  # (n, 2r+1)
        ok = (partner >= 0) & (partner < s)
        stride = math.prod(spatial[k + 1 :])
        idx = (idx[:, :, None] + ((partner - grids[k].reshape(n, 1)) * stride)[:, None, :]).reshape(n, -1)
        valid = (valid[:, :, None] & ok[:, None, :]).reshape(n, -1)
    idx = idx + torch.arange(n)[:, None]
    return torch.where(valid, idx, torch.full_like(idx, n))


def band_index(spatial, radius, device=None) -> torch.Tensor:
    """(|F|, W) flat index of the partner q + j − R of every position q and band slot j
    (row-major over axes); |F| marks a partner off the grid."""
    idx = _band_index_cpu(tuple(spatial), tuple(radius))
    return idx if device is None or torch.device(device).type == "cpu" else idx.to(device)


def band_mask(spatial, radius, dtype, device=None) -> torch.Tensor:
    """(*F, *W): 1 where the partner lies on the grid, else 0."""
    idx = band_index(spatial, radius, device)
    shape = tuple(spatial) + tuple(2 * r + 1 for r in radius)
    return (idx < math.prod(spatial)).to(dtype).reshape(shape)


def _unfold2d(v: torch.Tensor, radius) -> torch.Tensor:
    """v (B, C, n0, n1) → (B, C, W, n0·n1): every partner q + j − R of every position q, zero
    off the grid (one im2col call)."""
    b, c = v.shape[:2]
    k = tuple(2 * r + 1 for r in radius)
    return F.unfold(v, k, padding=tuple(radius)).reshape(b, c, math.prod(k), -1)


def band_products(x1: torch.Tensor, x2: torch.Tensor, spatial, radius) -> torch.Tensor:
    """(1/C) Σ_c x1[b, q, c] x2[b, q + j − R, c] for channels-last images (B, *F, C) → the band
    (B, *F, *W) of the input covariance V0 (docs/maths.md §2)."""
    b, c, d = x1.shape[0], x1.shape[-1], len(spatial)
    widths = tuple(2 * r + 1 for r in radius)
    if d == 2:
        patches = _unfold2d(x2.permute(0, 3, 1, 2), radius)  # (B, C, W, |F|)
        x1c = x1.reshape(b, -1, c).transpose(1, 2)[:, :, None, :]  # (B, C, 1, |F|)
        out = (x1c * patches).sum(1) / c  # (B, W, |F|); / C as every input state (gram.input_state)
        return out.transpose(1, 2).reshape((b,) + tuple(spatial) + widths)
    shifted = band_shift(x2, spatial, radius)  # (B, *F, *W, C)
    x1b = x1.reshape((b,) + tuple(spatial) + (1,) * d + (c,))
    return (x1b * shifted).sum(-1) / c


def band_shift(v: torch.Tensor, spatial, radius) -> torch.Tensor:
    """v: (B, *F, *C) → (B, *F, *W, *C) with out[b, q, j] = v[b, q + j − R] (0 off the grid)."""
    b, d, n = v.shape[0], len(spatial), math.prod(spatial)
    rest = tuple(v.shape[1 + d :])
    if d == 2 and not rest:  # a variance map: one im2col call
        out = _unfold2d(v[:, None], radius)[:, 0]  # (B, W, |F|)
        return out.transpose(1, 2).reshape((b,) + tuple(spatial) + tuple(2 * r + 1 for r in radius))
    flat = v.reshape((b, n) + rest)
    flat = torch.cat([flat, flat.new_zeros((b, 1) + rest)], dim=1)
    idx = band_index(spatial, radius, v.device)
    out = flat[:, idx]  # (B, |F|, W, *C)
    return out.reshape((b,) + tuple(spatial) + tuple(2 * r + 1 for r in radius) + rest)


def band_from_full(v: torch.Tensor, spatial, radius) -> torch.Tensor:
    """The band of a full tensor (B, *F, *F) → (B, *F, *W)."""
    b, n = v.shape[0], math.prod(spatial)
    flat = F.pad(v.reshape(b, n, n), (0, 1))
    idx = band_index(spatial, radius, v.device)
    out = flat[:, torch.arange(n, device=v.device)[:, None], idx]
    return out.reshape((b,) + tuple(spatial) + tuple(2 * r + 1 for r in radius))


def band_radius_in(geoms, radius_out, independent: bool) -> tuple:
    """Radius a layer needs below to produce band ``radius_out``: partner offsets s·e + h·(t' − t)
    reach s·R + extent − 1 for a correlated filter, s·R for an independent one (t = t')."""
    return tuple(
        g.stride * r + (0 if independent else g.extent - 1) for g, r in zip(geoms, radius_out)
    )


def _offset_filters(sigma: torch.Tensor, taps: tuple):
    """Σ[t, t'] regrouped by u = t' − t: (U, *taps) filters c_u(t) = Σ[t, t + u] with the
    all-zero ones dropped, and the (U, D) offsets u."""
    d = len(taps)
    s = sigma.reshape(taps + taps)
    us = torch.cartesian_prod(*[torch.arange(-(p - 1), p) for p in taps]).reshape(-1, d)
    ts = torch.cartesian_prod(*[torch.arange(p) for p in taps]).reshape(-1, d)
    partner = us[:, None, :] + ts[None, :, :]  # (U, T, D)
    ok = ((partner >= 0) & (partner < torch.tensor(taps))).all(-1)
    partner = torch.where(ok[..., None], partner, torch.zeros_like(partner))
    index = tuple(ts[None, :, k].expand_as(ok) for k in range(d)) + tuple(
        partner[..., k] for k in range(d)
    )
    filters = torch.where(ok.to(sigma.device), s[index], torch.zeros((), dtype=sigma.dtype, device=sigma.device))
    keep = (filters != 0).any(1)
    return filters[keep].reshape((-1,) + taps), us[keep.cpu()]


def banded_conv(v: torch.Tensor, sigma: torch.Tensor | None, geoms, r_in, r_out) -> torch.Tensor:
    """(*) on a band: v (B, *F, *(2 r_in + 1)) → (B, *Q, *(2 r_out + 1)); entries whose partner
    is off the output grid are left for the caller to zero (see :func:`band_mask`).

    K[q, q + e] = Σ_u Σ_t c_u(t) · V[s·q + h·t − pad, offset s·e + h·u], u = t' − t: for each
    (e, u) an ordinary strided, dilated D-dimensional convolution with filter c_u over the first
    side — one grouped GEMM-backed call. ``sigma`` None means independent taps (u = 0 only,
    separable box sums).
    """
    d = len(geoms)
    b = v.shape[0]
    need = band_radius_in(geoms, r_out, sigma is None)
    if any(n > r for n, r in zip(need, r_in)):
        # a band capped at the grid: the offsets beyond it only reach partners off the grid
        for k, (n, r) in enumerate(zip(need, r_in)):
            if n > r and r < geoms[k].n_in - 1:
                raise CNNGPError(f"banded_conv: input band radius {r} < {n} needed on axis {k}")
        pads = []
        for n, r in zip(reversed(need), reversed(r_in)):
            pads += [max(n - r, 0)] * 2
        v = F.pad(v, pads)
        r_in = tuple(max(n, r) for n, r in zip(need, r_in))
    if sigma is None:  # offsets s·e: a strided view of the band axes, then box sums
        x = v
        for k, g in enumerate(geoms):
            start = r_in[k] - g.stride * r_out[k]
            x = x.narrow(1 + d + k, start, g.stride * 2 * r_out[k] + 1)
            if g.stride > 1:
                x = x[(slice(None),) * (1 + d + k) + (slice(None, None, g.stride),)]
        for k, g in enumerate(geoms):
            x = shift_sum(x, (1 + k,), g, scale=False)
        return scaled(x, math.prod(g.taps for g in geoms))
    taps = tuple(g.taps for g in geoms)
    filters, us = _offset_filters(sigma, taps)
    n_u = filters.shape[0]
    # gather, for every output offset e and filter offset u, the input offset s·e + h·u
    x = v
    e_shape = tuple(2 * r + 1 for r in r_out)
    flat_offsets = torch.zeros((math.prod(e_shape), n_u), dtype=torch.long)
    for k, g in enumerate(geoms):
        e = torch.arange(-r_out[k], r_out[k] + 1)
        e_full = e.reshape([-1 if j == k else 1 for j in range(d)]).expand(e_shape).reshape(-1)
        off = g.stride * e_full[:, None] + g.dilation * us[None, :, k] + r_in[k]
        flat_offsets = flat_offsets * (2 * r_in[k] + 1) + off
    x = v.reshape((b,) + v.shape[1 : 1 + d] + (-1,))
    x = x[..., flat_offsets.to(v.device).reshape(-1)]  # (B, *F, E·U)
    x = x.movedim(-1, 1).reshape((b * math.prod(e_shape), n_u) + tuple(v.shape[1 : 1 + d]))
    x = pad_spatial(x, geoms)
    out = _CONV[d](
        x,
        filters[None],
        stride=tuple(g.stride for g in geoms),
        dilation=tuple(g.dilation for g in geoms),
    )  # (B·E, 1, *Q)
    q_shape = tuple(g.n_out for g in geoms)
    out = out.reshape((b,) + e_shape + q_shape)
    return out.permute([0] + list(range(1 + d, 1 + 2 * d)) + list(range(1, 1 + d)))


def offset_sums(v: torch.Tensor, spatial) -> torch.Tensor:
    """S[δ] = Σ_q V[q, q + δ] of a full tensor v (B, *F, *F), float64, shape (B, M) with the
    offsets δ of :func:`cnngp.kernels.correlations.offsets` (row-major over the 2N_k − 1
    values per axis). A readout with a stationary Σ[p, p'] = w[p' − p] is then Σ_δ w[δ]·S[δ]
    (docs/maths.md §8). One scatter-add per axis pair."""
    d = len(spatial)
    x = v.to(torch.float64)
    for k, n in enumerate(spatial):
        # axes after the k offsets already made: B, δ_0..δ_{k−1}, x_k..x_{D−1}, x'_k..x'_{D−1}
        a, b = 1 + k, 1 + k + (d - k)
        x = x.movedim((a, b), (-2, -1))
        q = torch.arange(n, device=x.device)
        idx = (q[None, :] - q[:, None] + (n - 1)).reshape(-1)  # δ + n − 1 of each (q, q')
        out = x.new_zeros(x.shape[:-2] + (2 * n - 1,))
        out.index_add_(out.dim() - 1, idx, x.reshape(x.shape[:-2] + (n * n,)))
        x = out.movedim(-1, 1 + k)  # the new offset axis after the earlier ones
    return x.reshape(x.shape[0], -1)

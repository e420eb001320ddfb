"""Fast CPU path for full position-pair tensors: fused conv + nonlinearity (numba).

The layers' ``propagate`` (torch) is the reference implementation and the fallback. On the CPU,
when numba imports and ``CNNGP_FAST`` is not ``0``, :func:`run_layers` replaces each
full → full convolution on a 1-D or 2-D grid (zero or no padding; any stride, dilation and
correlation) together with a ReLU-family nonlinearity after it by one numba pass
(:mod:`cnngp.engine.fused_kernels`), so that each 10⁶-entry position-pair tensor crosses memory
once per layer and its pair of slabs stays in cache. The ReLU expectation is evaluated
without arccos (a polynomial exact to the dtype's rounding, docs/maths.md §2). Every other layer
runs its own ``propagate``. Results agree with the torch path to rounding (tests/test_fast_paths.py).

Σ of a conv is split over the spatial axes as Σ = Σ_m A_m ⊗ B_m (exactly: the identity and
the constant are one term; a general Σ uses the SVD of its axis-rearranged matrix, at most
min(P0², P1²) terms — for a stationary isotropic correlation at most one per distinct row of
its tap-offset profile).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cnngp.kernels import ops
from cnngp.kernels.layers import TANGENT, Conv, register_pointwise
from cnngp.settings import env_number
from cnngp.kernels.state import Band, KernelState

__all__ = ["available", "wanted", "run_layers", "Workspace", "conv_plan", "conv_full"]

_KERNELS = None
_IMPORT_FAILED = False

#: bytes of one layer's input + output a fused call handles at once: several pairs per call
#: amortise the per-call work in Python (default chosen in docs/tuning.md)
CACHE_BYTES = env_number("CNNGP_CACHE_BYTES", 64 * 1024**2, 1, integer=True)


def _kernels():
    """The numba kernels, imported on first use; None if numba is missing or disabled."""
    global _KERNELS, _IMPORT_FAILED
    if _KERNELS is None and not _IMPORT_FAILED:
        try:
            from cnngp.engine import fused_kernels

            _KERNELS = fused_kernels
        except Exception:  # numba missing or broken: the torch path does the work
            _IMPORT_FAILED = True
    return _KERNELS


_POOL: ThreadPoolExecutor | None = None
#: work items per thread, taken by whichever thread is free (a thread descheduled on a busy
#: machine delays only its share)
SHARES_PER_THREAD = 2


#: per-thread setting: a thread that runs whole chunks of pairs (:func:`map_chunks`) runs its
#: kernels on itself alone
_LOCAL = threading.local()


def _threads() -> int:
    return getattr(_LOCAL, "threads", None) or max(1, torch.get_num_threads())


def threads() -> int:
    """Threads the fused kernels of this thread use (torch.get_num_threads(), or what
    :func:`use_threads` set for this thread, or 1 inside :func:`map_chunks`)."""
    return _threads()


def use_threads(n: int | None) -> None:
    """Run this thread's fused kernels on ``n`` threads (None: torch.get_num_threads()). A
    task on a Dask worker's thread says so here: torch's thread count, set from such a thread,
    is not always what that thread reads back."""
    _LOCAL.threads = None if n is None else max(1, int(n))


_CHUNK_POOL: ThreadPoolExecutor | None = None


def _single_threaded():
    _LOCAL.threads = 1


def map_chunks(fn, items: list, n_threads: int) -> list:
    """``[fn(item) for item in items]`` on ``n_threads`` threads, each running its kernels on
    itself alone: parallel over pairs instead of over the rows of one call. On small grids
    (Myrtle10's 16×16 and 8×8 layers) and between kernels (layouts, variances, readouts) a
    call's rows are too little work to split, while whole chunks of pairs are independent
    (each pair's values come from the same arithmetic either way: the result is the same to
    the bit). The pool is this module's own, so ``fn`` may use :func:`_run_shares`."""
    global _CHUNK_POOL
    if n_threads <= 1 or len(items) <= 1 or getattr(_LOCAL, "threads", None) == 1:
        return [fn(item) for item in items]
    if _CHUNK_POOL is None or _CHUNK_POOL._max_workers != n_threads:
        _CHUNK_POOL = ThreadPoolExecutor(n_threads, thread_name_prefix="cnngp-pairs",
                                         initializer=_single_threaded)
    return [f.result() for f in [_CHUNK_POOL.submit(fn, item) for item in items]]


def _run_shares(kernel, args, shares):
    """kernel(*args, *share) for every share, on the thread pool (the numba kernels release
    the GIL); the caller's thread when there is one share."""
    global _POOL
    if len(shares) == 1:
        kernel(*args, *shares[0])
        return
    threads = _threads()
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = ThreadPoolExecutor(threads, thread_name_prefix="cnngp")
    for f in [_POOL.submit(kernel, *args, *share) for share in shares]:
        f.result()


def _parallel(kernel, *args):
    """Run ``kernel(*args, first_row, row_step)`` over all rows on torch.get_num_threads()
    threads; share k takes rows k, k + n, k + 2n, …"""
    threads = _threads()
    n = 1 if threads == 1 else threads * SHARES_PER_THREAD
    _run_shares(kernel, args, [(k, n) for k in range(n)])


def _parallel_blocks(kernel, weights, *args, align: int = 1):
    """Run ``kernel(*args, row_lo, row_hi)`` over contiguous blocks of rows of about equal
    total ``weights`` (the work of each row, one entry per row), every boundary a multiple of
    ``align``."""
    rows = len(weights)
    threads = _threads()
    n = 1 if threads == 1 else min(rows, threads * SHARES_PER_THREAD)
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64))])
    edges = np.searchsorted(cum, np.linspace(0.0, cum[-1], n + 1)[1:-1])
    bounds = sorted(set([0, rows] + [int(e) // align * align for e in edges]))
    _run_shares(kernel, args, list(zip(bounds[:-1], bounds[1:])))


def enabled() -> bool:
    return os.environ.get("CNNGP_FAST", "1").strip().lower() not in ("0", "false", "no", "off")


def available(dtype=torch.float64, device="cpu") -> bool:
    """Whether the fused path can run for tensors of this dtype on this device."""
    if not enabled() or torch.device(device).type != "cpu":
        return False
    if dtype not in (torch.float32, torch.float64):
        return False
    return _kernels() is not None


def wanted(layers, grids, flags) -> bool:
    """Whether some layer is a full → full conv the fused path handles (worth importing numba)."""
    if any(isinstance(f, Band) for f in flags):  # bands run on the layers' torch path
        return False
    return any(
        flags[i] is True and flags[i + 1] is True and _supported(layer, grids[i])
        for i, layer in enumerate(layers)
    )


# -- Kronecker split of a conv's Σ ------------------------------------------------------------


def _supported(conv, spatial) -> bool:
    """Whether the fused kernels handle this layer: one that declares itself an affine filter
    (:meth:`cnngp.kernels.layers.Conv.affine_filter`) on a 1-D or 2-D grid without circular padding."""
    declare = getattr(conv, "affine_filter", None)
    if declare is None or not declare():
        return False
    if len(spatial) not in (1, 2):
        return False
    return conv.padding != "circular"


def _axis_geometry(g: ops.AxisGeometry) -> np.ndarray:
    return np.array([g.n_in, g.n_out, g.stride, g.dilation, g.pad_before, g.taps], np.int64)


def _sparse_factors(factors: list[np.ndarray]):
    """Stack the (P, P) factors of all terms: tap pairs where any is non-zero, (E, M) values."""
    stack = np.stack(factors, axis=-1)  # (P, P, M)
    nz = np.argwhere(np.any(stack != 0, axis=-1))
    return np.ascontiguousarray(nz, np.int64), np.ascontiguousarray(stack[nz[:, 0], nz[:, 1]])


def _grouped_factors(factors: list[np.ndarray]):
    """Axis-0 factors for stage 1 as groups of tap pairs sharing their coefficients:
    (ptr (G+1,), taps (E, 2), coef (G, M)). When every A_m is Toeplitz (a stationary Σ) and that
    saves work, a group is a diagonal p0 − p0' = δ (its slabs are summed once, then scaled by each
    term); otherwise each non-zero tap pair is its own group."""
    taps, coef = _sparse_factors(factors)
    m, e = coef.shape[1], len(taps)
    stack = np.stack(factors, axis=-1)
    p = stack.shape[0]
    deltas = np.unique(taps[:, 0] - taps[:, 1])
    tol = 1e-15 * np.abs(stack).max()
    diagonals = [np.diagonal(stack, -d, 0, 1) for d in range(1 - p, p)]  # (M, length) each
    toeplitz = all(np.allclose(dg, dg[:, :1], rtol=0, atol=tol) for dg in diagonals)
    if not toeplitz or e + len(deltas) * m >= e * m:
        return np.arange(e + 1, dtype=np.int64), taps, coef
    order = np.argsort(taps[:, 0] - taps[:, 1], kind="stable")
    taps = taps[order]
    d = taps[:, 0] - taps[:, 1]
    ptr = np.searchsorted(d, deltas, side="left").tolist() + [e]
    gcoef = np.stack([np.diagonal(stack, -int(dd), 0, 1).mean(axis=-1) for dd in deltas])
    return np.asarray(ptr, np.int64), np.ascontiguousarray(taps), np.ascontiguousarray(gcoef)


def _sigma(conv: Conv, kind, taps: tuple) -> np.ndarray:
    """Σ of the conv over its (P0, P1) taps, float64, as (P0, P1, P0, P1)."""
    n = math.prod(taps)
    if kind == "independent":  # also every single-tap filter, whatever its correlation
        sigma = np.eye(n) / n
    elif kind == "constant":
        sigma = np.full((n, n), 1.0 / n**2)
    else:
        sigma = conv.correlation.matrix(taps, torch.float64).numpy()
    return sigma.reshape(taps + taps)


def _kron_terms(sigma: np.ndarray, kind):
    """Factors (A_m over axis 0, B_m over axis 1) with Σ = Σ_m A_m ⊗ B_m, Σ as (P0, P1, P0, P1)."""
    p0, p1 = sigma.shape[:2]
    # The whole scale on B: A = I (or 11ᵀ) is exact in every dtype, so the pair pass rounds the
    # scale once, as conv_diagonal does. Split as I/P0 ⊗ I/P1, a 3×3 conv's float32 pair pass
    # ran (1/3)·(1/3) ≈ (1 + 7e-8)/9 against the variances' 1/9: ρ biased upwards at every
    # layer, which the NTK's V̇ (θ ≈ √(2(1 − ρ)) near ρ = 1) turns into a bias of ~3e-7 a layer.
    if kind == "independent":  # I/|P| = I ⊗ I/|P|
        return [np.eye(p0)], [np.eye(p1) / (p0 * p1)]
    if kind == "constant":  # 11ᵀ/|P|² = 11ᵀ ⊗ 11ᵀ/|P|²
        return [np.ones((p0, p0))], [np.full((p1, p1), 1.0 / (p0 * p1) ** 2)]
    # Van Loan–Pitsianis: R[(p0,p0'), (p1,p1')] = Σ[(p0,p1), (p0',p1')] = U S Wᵀ, keep the terms
    # above rounding. A Σ stationary along axis 0 (R depends on p0 − p0' only) is split as
    # R = E F, E[(p0,p0'), δ] = [p0 − p0' = δ], and F = U S Wᵀ instead: its A_m are then exactly
    # Toeplitz, which stage 1 exploits (_grouped_factors).
    r = sigma.transpose(0, 2, 1, 3).reshape(p0, p0, p1 * p1)
    deltas = np.arange(1 - p0, p0)
    first = np.maximum(0, deltas)  # a tap pair (first, first − δ) on each diagonal
    f = r[first, first - deltas]  # (2P0 − 1, P1²)
    rebuilt = f[np.subtract.outer(np.arange(p0), np.arange(p0)) + p0 - 1]  # E F
    toeplitz = np.allclose(rebuilt, r, rtol=0, atol=1e-15 * np.abs(r).max())
    u, s, wt = np.linalg.svd(f if toeplitz else r.reshape(p0 * p0, p1 * p1), full_matrices=False)
    keep = np.flatnonzero(s > s[0] * 1e-15) if s[0] > 0 else []
    if toeplitz:
        index = np.subtract.outer(np.arange(p0), np.arange(p0)) + p0 - 1
        a = [(u[:, m] * math.sqrt(s[m]))[index] for m in keep]
    else:
        a = [(u[:, m] * math.sqrt(s[m])).reshape(p0, p0) for m in keep]
    b = [(wt[m] * math.sqrt(s[m])).reshape(p1, p1) for m in keep]
    if not a:
        return [np.zeros((p0, p0))], [np.zeros((p1, p1))]
    return a, b


@dataclass(frozen=True)
class Layout:
    """How a full tensor on an (n0, n1) grid is stored for the conv that reads it (see
    :mod:`cnngp.engine.fused_kernels`): buffer (B, n0, n0, s, s, h, h), axis-1 positions shifted by
    ``pad`` and split into ``s`` phases. (pad, s, h) = (0, 1, n1) is the plain paired layout."""

    n0: int
    n1: int
    pad: int
    s: int
    h: int

    def shape(self, b: int) -> tuple:
        return (b, self.n0, self.n0, self.s, self.s, self.h, self.h)

    @property
    def plain(self) -> bool:
        return self.pad == 0 and self.s == 1


class Fused:
    """A full position-pair tensor held in a :class:`Layout` (the executor's working form).

    With ``ntk``, the NTK's Θ (docs/maths.md §7) travels with it in a second buffer
    ``tangent`` of the same layout; ``tangent`` None then means Θ = 0 (the input, Θ(0))."""

    def __init__(self, buf: torch.Tensor, layout: Layout, spatial: tuple,
                 tangent: torch.Tensor | None = None, ntk: bool = False, channels: int | None = None):
        self.buf, self.layout, self.spatial = buf, layout, tuple(spatial)
        self.tangent, self.ntk = tangent, bool(ntk or tangent is not None)
        self.channels = channels  # as KernelState.channels

    def _with(self, buf) -> "Fused":
        return Fused(buf, self.layout, self.spatial)

    def tangent_standard(self) -> torch.Tensor:
        """Θ as a standard (B, *F, *F) tensor (zeros for Θ = 0)."""
        if self.tangent is None:
            return torch.zeros_like(self.standard())
        return self._with(self.tangent).standard()

    @property
    def batch(self) -> int:
        return self.buf.shape[0]

    def _index(self):
        lay = self.layout
        pos = torch.arange(lay.n1) + lay.pad
        return pos % lay.s, pos // lay.s

    def interior(self) -> torch.Tensor:
        """For s = 1: the view (B, n0, n1, n0, n1) of the buffer's grid entries."""
        lay = self.layout
        sl = slice(lay.pad, lay.pad + lay.n1)
        return self.buf[:, :, :, 0, 0, sl, sl].permute(0, 1, 3, 2, 4)

    def standard(self) -> torch.Tensor:
        """The (B, *F, *F) tensor: a view for the plain paired layouts, else a copy."""
        lay, b = self.layout, self.batch
        if lay.s == 1:
            v = self.interior()
        else:
            ph, i = self._index()
            v = self.buf[:, :, :, ph[:, None], ph[None, :], i[:, None], i[None, :]]
            v = v.permute(0, 1, 3, 2, 4)
        return v.reshape((b,) + self.spatial + self.spatial) if len(self.spatial) == 1 else v

    def state(self) -> KernelState:
        extra = {TANGENT: self.tangent_standard()} if self.ntk else {}
        return KernelState(self.standard(), self.spatial, True, extra=extra, channels=self.channels)

    def diagonal(self) -> torch.Tensor:
        """V[x, x] for every position x, shape (B, *F)."""
        ph, i = self._index()
        x0 = torch.arange(self.layout.n0)
        d = self.buf[:, x0[:, None], x0[:, None], ph[None, :], ph[None, :], i[None, :], i[None, :]]
        return d.reshape((self.batch,) + self.spatial)


def _spatial2(spatial) -> tuple:
    return tuple(spatial) if len(spatial) == 2 else (spatial[0], 1)


def to_fused(v, layout: Layout, spatial, ws: "Workspace | None" = None, avoid=()) -> Fused:
    """A standard full tensor (B, *F, *F) — or a KernelState, with its Θ if it has one —
    copied into ``layout`` (zero borders)."""
    if isinstance(v, KernelState):
        x = to_fused(v.cross, layout, spatial, ws, avoid)
        if TANGENT not in v.extra:
            return Fused(x.buf, layout, spatial, channels=v.channels)
        t = to_fused(v.extra[TANGENT], layout, spatial, ws, tuple(avoid) + (x.buf,))
        return Fused(x.buf, layout, spatial, tangent=t.buf, channels=v.channels)
    b = v.shape[0]
    n0, n1 = _spatial2(spatial)
    if ws is not None:
        buf = ws.get(layout, b, v.dtype, avoid=avoid)
    else:
        buf = torch.zeros(layout.shape(b), dtype=v.dtype)
    if v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr():
        v = v.clone()  # v still lives in the buffer it is to be copied into (an identity layer)
    v5 = v.reshape(b, n0, n1, n0, n1)
    if layout.s == 1:  # a strided copy into the buffer's view
        Fused(buf, layout, spatial).interior().copy_(v5)
    else:
        _parallel(_kernels().to_layout, v5.contiguous().numpy(), buf.numpy(), layout.pad)
    return Fused(buf, layout, spatial)


class ConvPlan:
    """Everything the numba conv needs for one Conv layer on one input grid."""

    def __init__(self, conv: Conv, spatial: tuple):
        geoms = conv.geometries(spatial)
        if len(geoms) == 1:  # a 1-D grid is the 2-D grid (n, 1)
            geoms = geoms + [ops.AxisGeometry(1, 1)]
        self.spatial_in = tuple(spatial)
        self.spatial_out = tuple(g.n_out for g in conv.geometries(spatial))
        self.geom0 = _axis_geometry(geoms[0])
        self.geom1 = _axis_geometry(geoms[1])
        kind = conv.correlation_kind(spatial)
        self.sigma = _sigma(conv, kind, (geoms[0].taps, geoms[1].taps))
        self._sigma_as = {}
        a, b = _kron_terms(self.sigma, kind)
        self.a_ptr, self.a_taps, self.a_coef = _grouped_factors(a)
        self.b_taps, self.b_coef = _sparse_factors(b)
        n0, n1 = geoms[0].n_in, geoms[1].n_in
        q0, q1 = geoms[0].n_out, geoms[1].n_out
        g1 = geoms[1]
        span = max(g1.pad_before + n1, g1.stride * (q1 - 1) + g1.dilation * (g1.taps - 1) + 1)
        self.layout = Layout(n0, n1, g1.pad_before, g1.stride, -(-span // g1.stride))
        self.out_standard = Layout(q0, q1, 0, 1, q1)


    def sigma_as(self, dtype: torch.dtype) -> np.ndarray:
        """Σ rounded to ``dtype`` (held as float64): the variances (:func:`conv_diagonal`, summed
        in float64) then scale as the pair pass does, by fl(1/|P|) (ops.scaled)."""
        if dtype not in self._sigma_as:
            np_dtype = torch.empty((), dtype=dtype).numpy().dtype
            self._sigma_as[dtype] = self.sigma.astype(np_dtype).astype(np.float64)
        return self._sigma_as[dtype]


def conv_plan(conv: Conv, spatial) -> ConvPlan | None:
    """The fused plan for ``conv`` on ``spatial``, or None where the torch path is better."""
    if not _supported(conv, spatial):
        return None
    # keyed by everything the plan depends on, by value (layers are mutable; weight_var and
    # bias_var are read at each call)
    key = (tuple(spatial), conv.filter, conv.stride, conv.dilation, conv.padding, conv.correlation.snapshot())
    cache = conv.__dict__.setdefault("_fused_plans", {})
    if key not in cache:
        plan = ConvPlan(conv, spatial)
        # a general Σ of high Kronecker rank (more terms than taps along an axis, e.g. a random
        # user matrix): the one dense GEMM-backed call of the torch path is cheaper. Stationary
        # isotropic Σ have at most min(P0, P1) terms.
        taps = max(int(plan.geom0[5]), int(plan.geom1[5]))
        cache[key] = plan if plan.a_coef.shape[1] <= taps else None
    return cache[key]


def _act_coefficients(act) -> tuple[float, float]:
    """(c_lin, c_relu) with φ's expectation = c_lin·c + c_relu·2·E[relu(u) relu(v)], from the
    layer's declaration φ = a·min(x, 0) + b·max(x, 0): c_lin = a·b, c_relu = (b − a)²/2."""
    a, b = act.relu_coefficients()
    if a == 0.0 and b == math.sqrt(2.0):
        return 0.0, 1.0  # balanced ReLU: 2·E[relu relu] exactly, without rounding (√2)²/2
    return a * b, 0.5 * (b - a) ** 2


def _relu_like(layer) -> bool:
    """Whether ``layer`` declares itself a·min(x, 0) + b·max(x, 0) (what the kernels compute)."""
    declare = getattr(layer, "relu_coefficients", None)
    return declare is not None and declare() is not None


def relu_pointwise(act, cross: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor):
    """``act``'s expectation (an ABReLU) on a diagonal (vx, vy shaped like cross, (B, *F)) or
    band ((B, *F, *W) with vx (B, *F) and vy at each slot's partner) state, by the
    arccos-free relu_value; None where the torch path should do it."""
    if not (
        _relu_like(act)
        and enabled()
        and cross.device.type == "cpu"
        and cross.dtype in (torch.float32, torch.float64)
        and available(cross.dtype)
    ):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (cross, vx, vy)):
        return None  # being differentiated (docs/maths.md §8): torch's autograd form
    if _products_underflow(vx, vy):
        return None  # the torch path's √vx·√vy form (its _relu_expectation_values)
    b = cross.shape[0]
    if vx.dim() == cross.dim():  # diagonal: one row per pair
        shape2 = (b, -1)
        vx2 = vx.reshape(shape2)
    else:  # band: one row per (pair, position), the band slots along it
        rows = vx.numel()
        shape2 = (rows, -1)
        vx2 = vx.reshape(rows, 1)
    k2 = cross.reshape(shape2).contiguous()
    vy2 = vy.reshape(k2.shape).contiguous()
    out = torch.empty_like(k2)
    npd = np.float32 if cross.dtype == torch.float32 else np.float64
    c_lin, c_relu = _act_coefficients(act)
    _parallel(
        _kernels().relu_pointwise, k2.numpy(), vx2.contiguous().numpy(), vy2.numpy(), out.numpy(),
        npd(c_lin), npd(c_relu),
    )
    return out.reshape(cross.shape)


def _products_underflow(vx: torch.Tensor, vy: torch.Tensor) -> bool:
    """Whether two positive variances (values ~1e-160 in float64, ~1e-20 in float32) can
    multiply below the dtype's smallest normal number, where the kernel's √(vx·vy) would
    read as a zero variance."""
    tiny = torch.finfo(vx.dtype).tiny
    lo = [float(torch.where(v > 0, v, torch.inf).min()) if v.numel() else math.inf for v in (vx, vy)]
    return lo[0] * lo[1] < tiny


def _roots(var):
    """sqrt(var) and 1/sqrt(var) (0 where var = 0), as numpy arrays."""
    if isinstance(var, torch.Tensor):
        var = var.detach().numpy()
    r = np.sqrt(np.ascontiguousarray(var))
    inv = np.zeros_like(r)
    np.divide(1, r, out=inv, where=r > 0)
    return r, inv


def roots(var1, var2=None):
    """(sqrt v1, 1/sqrt v1, sqrt v2, 1/sqrt v2) as numpy arrays (B, *Q), 1/0 := 0: the
    variances K_xx[q, q], K_x'x'[q', q'] as the fused nonlinearity reads them."""
    r1, i1 = _roots(var1)
    r2, i2 = (r1, i1) if var2 is None or var2 is var1 else _roots(var2)
    return r1, i1, r2, i2


def conv_fused(
    x: Fused,
    plan: ConvPlan,
    out_layout: Layout,
    act=None,
    var_roots=None,
    symmetric: bool = False,
    ws: "Workspace | None" = None,
    weight_var: float = 1.0,
    bias_var: float = 0.0,
    own: tuple = (1.0, 0.0),
    channels: int | None = None,
    pool: tuple | None = None,
) -> Fused:
    """Conv (docs/maths.md §2 (*)) of a full tensor in its layout, then ``act`` if given, in one pass,
    written in ``out_layout`` (that of the next conv).

    ``var_roots``: :func:`roots` of the diagonals K_xx[q, q], K_x'x'[q', q'] of the conv output
    that the nonlinearity needs. ``symmetric``: x is a self-covariance (var_roots of x with x).
    ``own``: (a, b) of the layer's own NTK term a·(Σ * V) + b
    (:meth:`cnngp.kernels.layers.Layer.tangent_coefficients`); ``channels``: the output's.
    ``pool``: (w, b) of a 2 × 2 stride-2 average pool that follows (:func:`pool_after`): its
    output is written instead, in ``out_layout`` (that of the conv after the pool).
    """
    assert x.layout == plan.layout
    k = _kernels()
    b, dtype = x.batch, x.buf.dtype
    npd = np.float32 if dtype == torch.float32 else np.float64

    def buffer(*avoid):
        if ws is not None:
            return ws.get(out_layout, b, dtype, avoid=tuple(a for a in avoid if a is not None))
        return torch.zeros(out_layout.shape(b), dtype=dtype)

    out = buffer(x.buf, x.tangent)
    # the NTK (docs/maths.md §7): Θ through the same pass (kron_conv_ntk); Θ_in = 0 is t_in None
    ntk = 0 if not x.ntk else (1 if x.tangent is None else 2)
    assert not (ntk and symmetric), "the self pass carries no Θ"
    t_out = buffer(x.buf, x.tangent, out) if ntk else None
    t_in = x.tangent if ntk == 2 else None
    q_shape = (b, plan.geom0[1], plan.geom1[1])
    if act is not None:
        c_lin, c_relu = _act_coefficients(act)
        rx, ix, ry, iy = (a.reshape(q_shape) for a in var_roots)
        code = 1
    else:
        c_lin = c_relu = 0.0
        rx = ix = ry = iy = np.zeros(q_shape, npd)
        code = 0
    args = (
        x.buf.numpy(), out.numpy(), plan.geom0, plan.geom1, out_layout.pad, plan.a_ptr, plan.a_taps,
        plan.a_coef, plan.b_taps, plan.b_coef, float(weight_var), float(bias_var),
        code, npd(c_lin), npd(c_relu), rx, ix, ry, iy,
    )
    if ntk:
        kernel = k.kron_conv_ntk
        args += (float(own[0]), float(own[1]), None if t_in is None else t_in.numpy(), t_out.numpy())
    else:
        kernel = k.kron_conv
        args += (bool(symmetric), np.asarray(pool if pool is not None else (), dtype=np.float64))
    # contiguous rows per share: consecutive q0 rows read overlapping input slabs, which then
    # come from the cache, not memory, once a call's pairs outgrow the L3 cache. A symmetric
    # row q0 computes only the q0' >= q0 slabs: blocks of equal work.
    q0 = int(plan.geom0[1])
    weights = np.tile(np.arange(q0, 0, -1) if symmetric else np.ones(q0), b)
    _parallel_blocks(kernel, weights, *args, align=2 if pool is not None else 1)
    spatial = plan.spatial_out if pool is None else tuple(n // 2 for n in plan.spatial_out)
    return Fused(out, out_layout, spatial, tangent=t_out if ntk else None, ntk=bool(ntk),
                 channels=channels)


def conv_diagonal(x: Fused, plan: ConvPlan, weight_var: float = 1.0, bias_var: float = 0.0) -> torch.Tensor:
    """K[q, q] of the conv's output (B, *Q), from its input in the conv's layout."""
    q = (plan.geom0[1], plan.geom1[1])
    out = np.empty((x.batch,) + q)
    _parallel(
        _kernels().conv_diagonal, x.buf.numpy(), out, plan.geom0, plan.geom1, plan.sigma_as(x.buf.dtype),
        float(weight_var), float(bias_var),
    )
    return torch.as_tensor(out, dtype=x.buf.dtype).reshape((x.batch,) + plan.spatial_out)


def conv_full(v, conv: Conv, act=None, var1=None, var2=None, symmetric=False, theta=None, v_channels=None):
    """``conv`` (then ``act``) on a standard (B, *F, *F) tensor by the fused path, returning a
    standard tensor (a convenience for tests and benchmarks). With ``theta`` (the NTK's Θ
    of the same shape, or 0 for Θ = 0): the pair (K, Θ) of the output; ``v_channels``: the
    input's channel count (the standard parameterisation)."""
    spatial = tuple(v.shape[1 : 1 + (v.dim() - 1) // 2])
    plan = conv_plan(conv, spatial)
    x = to_fused(v, plan.layout, plan.spatial_in)
    if theta is not None:
        t = None if isinstance(theta, (int, float)) and theta == 0 else to_fused(theta, plan.layout, plan.spatial_in).buf
        x = Fused(x.buf, x.layout, x.spatial, tangent=t, ntk=True)
    r = roots(var1, var2) if act is not None else None
    own = conv.tangent_coefficients(v_channels, spatial) if theta is not None else (0.0, 0.0)
    out = conv_fused(x, plan, plan.out_standard, act, r, symmetric, None, conv.weight_var, conv.bias_var,
                     own)
    if theta is not None:
        return out.standard(), out.tangent_standard()
    return out.standard()


# -- readouts from the offset sums --------------------------------------------------------


def _offset_table(head, spatial):
    """Σ of a readout as a function of the offset δ = p' − p, shape (2N0 − 1, 2N1 − 1), or None
    if Σ is not stationary on this grid (then the dense matrix is used)."""
    cache = head.__dict__.setdefault("_fused_offsets", {})
    key = (spatial, head.correlation.snapshot())  # by value: the readout is mutable
    if key not in cache:
        n0, n1 = _spatial2(spatial)
        sigma = head.weights(spatial, torch.float64, "cpu").numpy().reshape(n0, n1, n0, n1)
        d0, d1 = np.arange(1 - n0, n0), np.arange(1 - n1, n1)
        a, b = np.maximum(0, -d0), np.maximum(0, -d1)  # a position where each offset occurs
        table = sigma[a[:, None], b[None, :], (a + d0)[:, None], (b + d1)[None, :]]
        x0, x1 = np.arange(n0), np.arange(n1)
        rebuilt = table[(x0[None, :] - x0[:, None] + n0 - 1)[:, None, :, None],
                        (x1[None, :] - x1[:, None] + n1 - 1)[None, :, None, :]]  # [x0, x1, x0', x1']
        cache[key] = table if np.array_equal(rebuilt, sigma) else None
    return cache[key]


def offset_sums(x: "Fused | None") -> torch.Tensor | None:
    """S[δ] = Σ_q V[q, q + δ] (B, M) float64 of a full tensor held fused in the plain layout
    (:func:`cnngp.kernels.ops.offset_sums`' order), by the numba kernel; None otherwise."""
    if x is None or not x.layout.plain:
        return None
    n0, n1 = _spatial2(x.spatial)
    parts = np.empty((x.batch, n0, 2 * n0 - 1, 2 * n1 - 1))
    _parallel(_kernels().offset_sums, x.buf.numpy(), parts)
    return torch.as_tensor(parts.sum(axis=1).reshape(x.batch, -1))


def apply_heads(heads, x: "Fused | None", kernels=("nngp",)) -> torch.Tensor | None:
    """All readouts of a full 1-D/2-D tensor from its offset sums, accumulated in float64
    (a float32 sum of 10⁶ terms would lose ~1e-4), shape (len(kernels)·L, B) in the order
    [nngp readouts…, ntk readouts…] of ``kernels``; the NTK's readout is
    Θ_out = weight_var · Σ_{p,p'} Σ[p,p'] Θ[p,p'] + K_out (docs/maths.md §7).
    None where the engine's own path applies."""
    if x is None or not x.layout.plain or not all(h.affine_readout() for h in heads):
        return None
    if TANGENT in kernels and not x.ntk:
        return None
    spatial = x.spatial
    tables = []
    for h in heads:
        kind = h.correlation_kind(spatial)
        if kind not in ("independent", "constant"):
            table = _offset_table(h, spatial)
            if table is None:
                return None
            tables.append(table)
        else:
            tables.append(kind)
    n0, n1 = _spatial2(spatial)
    n = n0 * n1

    def readouts(buf):
        """Σ_{p,p'} Σ[p,p'] t[p,p'] of every head, for one buffer t (float64)."""
        parts = np.empty((x.batch, n0, 2 * n0 - 1, 2 * n1 - 1))
        _parallel(_kernels().offset_sums, buf.numpy(), parts)
        sums = parts.sum(axis=1)  # (B, 2N0 − 1, 2N1 − 1)
        out = []
        for table in tables:
            if isinstance(table, str) and table == "independent":
                out.append(sums[:, n0 - 1, n1 - 1] / n)  # the δ = 0 diagonal: mean of V[p, p]
            elif isinstance(table, str):
                out.append(sums.sum(axis=(1, 2)) / n**2)
            else:
                out.append(np.einsum("bij,ij->b", sums, table))
        return out

    filtered = readouts(x.buf)
    parts = {"nngp": [v * h.weight_var + h.bias_var for h, v in zip(heads, filtered)]}
    if TANGENT in kernels:
        theta = readouts(x.tangent) if x.tangent is not None else [0.0] * len(heads)
        parts[TANGENT] = []
        for h, t, f in zip(heads, theta, filtered):
            a, b = h.tangent_coefficients(x.channels, spatial)  # the readout's own term
            parts[TANGENT].append(t * h.weight_var + a * f + b)
    return torch.as_tensor(np.stack([v for k in kernels for v in parts[k]]), dtype=x.buf.dtype)


# -- running a stack of layers -------------------------------------------------------------


class Workspace:
    """Reusable zero-bordered buffers, two per layout (ping-pong), so no layer allocates
    (page faults) and every buffer keeps the zero padding of its layout."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, layout, b: int, dtype, avoid=()) -> torch.Tensor:
        """A buffer of this layout that is none of the tensors ``avoid`` (one tensor or a
        sequence: the ones still being read)."""
        if isinstance(avoid, torch.Tensor):
            avoid = (avoid,)
        busy = {a.data_ptr() for a in avoid if a is not None}
        key = (layout, b, dtype)
        bufs = self._bufs.setdefault(key, [])
        for buf in bufs:
            if buf.data_ptr() not in busy:
                return buf
        shape = layout.shape(b) if isinstance(layout, Layout) else tuple(layout)  # or a shape
        buf = torch.zeros(shape, dtype=dtype)
        bufs.append(buf)
        return buf


def input_state(x1: torch.Tensor, x2: torch.Tensor, full: bool, ws: Workspace, layers=(), flags=(),
                ntk: bool = False):
    """V0[p, p'] = (1/C) Σ_c x[p, c] x'[p', c] (docs/maths.md §2), into a reused buffer: written
    straight into the layout of the first layer when that runs fused (returns a Fused), else a
    KernelState. ``ntk``: with Θ(0) = 0 (docs/maths.md §7)."""
    state = _input_state(x1, x2, full, ws, layers, flags)
    if not ntk:
        return state
    if isinstance(state, Fused):
        return Fused(state.buf, state.layout, state.spatial, ntk=True, channels=state.channels)
    return state.with_extra(**{TANGENT: torch.zeros_like(state.cross)})


def _input_state(x1, x2, full, ws, layers, flags):
    b, c = x1.shape[0], x1.shape[-1]
    spatial = tuple(x1.shape[1:-1])
    if not full:
        return KernelState((x1 * x2).sum(-1) / c, spatial, False, channels=c)
    plan = _fused_plan(list(layers), 0, flags, spatial, available(x1.dtype)) if layers else None
    if plan is not None:
        n0, n1 = _spatial2(spatial)
        out = ws.get(plan.layout, b, x1.dtype)
        a = (x1 / c).reshape(b, n0, n1, c).contiguous().numpy()
        bt = x2.reshape(b, n0, n1, c).transpose(2, 3).contiguous().numpy()
        _parallel(_kernels().input_layout, a, bt, out.numpy(), plan.layout.pad)
        return Fused(out, plan.layout, spatial, channels=c)
    n = math.prod(spatial)
    out = ws.get((b, n, n), b, x1.dtype)
    torch.bmm(x1.reshape(b, n, c), x2.reshape(b, n, c).transpose(1, 2), out=out)
    out /= c  # / C, not × fl(1/C) (fl(1/3) > 1/3): as gram.input_state, so ρ is unbiased
    return KernelState(out.reshape((b,) + spatial + spatial), spatial, True, channels=c)


def _fused_plan(layers, i, flags, spatial, fast):
    """The plan of layer i if it runs fused here (a conv, full input and output), else None."""
    if not fast or i >= len(layers) or not getattr(layers[i], "affine_filter", lambda: False)():
        return None
    if not (flags[i] is True and flags[i + 1] is True):
        return None
    return conv_plan(layers[i], spatial)


#: sum a 2 × 2 average pool into the pass of the conv before it (CNNGP_POOL_FUSION=0: off)
POOL_FUSION = env_number("CNNGP_POOL_FUSION", 1, 0, integer=True) > 0


def pool_after(plan: ConvPlan, pool_plan: "ConvPlan | None", pool) -> tuple | None:
    """(w, b) when ``pool`` (the layer after a conv + nonlinearity) is a 2 × 2 stride-2 average
    over a grid of even sides — a filter of 2 × 2 taps, stride 2, no padding, one weight w for
    all 16 pairs of its window (Σ constant) — so that the conv's pass can sum into its output
    (:func:`kron_conv`'s ``pool``); else None."""
    if pool_plan is None or any(n % 2 for n in plan.spatial_out):
        return None
    for g in (pool_plan.geom0, pool_plan.geom1):  # (n_in, n_out, stride, dilation, pad, taps)
        if int(g[2]) != 2 or int(g[3]) != 1 or int(g[4]) != 0 or int(g[5]) != 2 or 2 * int(g[1]) != int(g[0]):
            return None
    a, bt = pool_plan.a_coef, pool_plan.b_coef
    if a.shape[1] != 1 or len(pool_plan.a_taps) != 4 or len(pool_plan.b_taps) != 4:
        return None
    if np.ptp(a) != 0 or np.ptp(bt) != 0:
        return None
    return float(pool.weight_var) * float(a[0, 0]) * float(bt[0, 0]), float(pool.bias_var)


def run_layers(layers, state, flags, variances, records=None, ws=None, fast=None, step=None):
    """Propagate ``state`` (a KernelState or a Fused) through ``layers`` (flags[i]: full input
    of layer i; flags[-1]: output): the one layer runner of the engine. Layers the fused
    kernels handle run fused when ``fast`` (default: on a CPU where numba is available);
    every other layer, and every layer with ``fast=False``, runs its own ``propagate``.

    Pair mode: ``variances(i, roots)`` returns the variances (var1, var2) of the nonlinearity
    at index i, or with ``roots=True`` their :func:`roots`. Self mode (``records`` a dict of
    lists): the input is an image with itself; the diagonal at every nonlinearity input is
    appended to ``records[i]`` and used as both variances.
    ``step(i, state)``: another engine's offer for layer i of a torch-held ``state`` (e.g.
    :func:`cnngp.engine.gpu.step_hook`): (new state, next layer index), or None to decline.
    Returns (state, fused): the output state, and the same tensor as a :class:`Fused` when the
    last layer ran fused (else None).
    """
    cur: Fused | None = None  # the current tensor when it is held fused, else `state` holds it
    if isinstance(state, Fused):
        cur, state = state, None
        fast = True
    elif fast is None:
        fast = state.cross.device.type == "cpu" and available(state.cross.dtype)
    if ws is None and fast:
        ws = Workspace()
    symmetric = records is not None
    i, n = 0, len(layers)
    while i < n:
        layer = layers[i]
        if step is not None and cur is None:
            taken = step(i, state)
            if taken is not None:
                state, i = taken
                continue
        spatial = cur.spatial if cur is not None else state.spatial
        plan = _fused_plan(layers, i, flags, spatial, fast)
        if plan is not None:
            act = layers[i + 1] if i + 1 < n else None
            if not (_relu_like(act) and flags[i + 2] is True):
                act = None
            if cur is None or cur.layout != plan.layout:
                src = state if cur is None else cur.state()
                cur = to_fused(src, plan.layout, spatial, ws, avoid=_buffers(cur))
            var_roots = None
            if act is not None:
                if symmetric:  # the conv output's diagonal: the variances of the act
                    var = conv_diagonal(cur, plan, layer.weight_var, layer.bias_var)
                    records[i + 1].append(var)
                    var_roots = roots(var)
                else:
                    var_roots = variances(i + 1, True)
            nxt = i + (2 if act is not None else 1)
            nplan = _fused_plan(layers, nxt, flags, plan.spatial_out, fast)
            pool = None
            if act is not None and nplan is not None and not symmetric and not cur.ntk and POOL_FUSION:
                pool = pool_after(plan, nplan, layers[nxt])
            if pool is not None:  # conv + act + 2 × 2 average pool in one pass
                nxt += 1
                nplan = _fused_plan(layers, nxt, flags, tuple(n // 2 for n in plan.spatial_out), fast)
                out_layout = nplan.layout if nplan is not None else Layout(*[n // 2 for n in plan.spatial_out], 0, 1,
                                                                           plan.spatial_out[1] // 2)
            else:
                out_layout = nplan.layout if nplan is not None else plan.out_standard
            own = layer.tangent_coefficients(cur.channels, spatial) if cur.ntk else (0.0, 0.0)
            cur = conv_fused(
                cur, plan, out_layout, act, var_roots, symmetric, ws, layer.weight_var, layer.bias_var,
                own, layer.output_channels(cur.channels), pool,
            )
            i = nxt
            continue
        if cur is not None:
            state, cur = cur.state(), None
        if layer.needs_variances:
            if symmetric:
                d = state.diagonal().clone()  # may be a view of a reused buffer
                records[i].append(d)
                state = state.with_variances(d, d)
            else:
                state = state.with_variances(*variances(i, False))
        state = layer.propagate(state, flags[i + 1])
        i += 1
    if cur is not None:
        return cur.state(), cur
    return state, None


def _buffers(x: "Fused | None") -> tuple:
    return () if x is None else (x.buf, x.tangent)


def chunk_size(elements: int, itemsize: int, tensors: int = 1) -> int:
    """Pairs per fused call so that input and output of the largest layer (``tensors`` of each:
    2 with the NTK's Θ) stay in cache."""
    return max(1, CACHE_BYTES // max(1, 2 * tensors * elements * itemsize))



def _pointwise_engine(layer, cross, vx, vy):
    """What this module offers the layers' diagonal/band evaluation (see
    :func:`cnngp.kernels.layers.register_pointwise`): :func:`relu_pointwise`, which declines layers
    that declare no ReLU form."""
    return relu_pointwise(layer, cross, vx, vy)


register_pointwise(_pointwise_engine)

"""numba kernels behind :mod:`cnngp.engine.fused` (imported lazily: importing numba costs ~1 s).

Everything here works on 2-D grids (a 1-D grid is the 2-D grid (n, 1)) and on one dtype
(float32 or float64) at a time.

**Layout.** A full position-pair tensor V[x0, x1, x0', x1'] (x first side, x' second side) is
kept *paired and phase-split* for the conv that reads it: buffer (B, N0, N0, s, s, H, H) with

    V[x0, x1, x0', x1'] = buf[x0, x0', r % s, c % s, r // s, c // s],  r = pad + x1, c = pad + x1'

where s, pad are the stride and leading zero padding of the reading conv along axis 1 and H
rows of zeros pad each phase. Zero entries outside the grid are the conv's zero padding; each
(x0, x0') slab is contiguous; and a stride-s tap becomes a plain shift inside one phase block.

**Conv** (docs/maths.md §2 (*)) with Σ written as a sum of Kronecker products over the two spatial axes,
Σ[(p0,p1),(p0',p1')] = Σ_m A_m[p0,p0'] · B_m[p1,p1'], runs in two stages per output slab
(q0, q0'):

  stage 1  T_m = Σ_{p0,p0'} A_m[p0,p0'] · slab(x0(q0,p0), x0(q0',p0'))       (whole-slab adds)
  stage 2  K[q1, q1'] = Σ_m Σ_{p1,p1'} B_m[p1,p1'] · T_m[x1(q1,p1), x1(q1',p1')]  (shifted adds)

with x_k(q, p) = s_k·q + h_k·p − pad_k. Only non-zero entries of A_m and B_m are visited: an
independent 3×3 conv (Σ = I/9 = I/3 ⊗ I/3) adds 3 slabs and 3 shifted copies per output, a 2×2
average pool 4 and 4, a stationary correlated filter at most one term per distinct row of its
tap-offset profile. The nonlinearity that follows is applied in the pass that does stage 2's
last shifted adds, over the whole flattened slab while it is in cache (passes of ~10³ entries:
row-by-row loops of Q1 = 32 spent as much on loop set-up as on the work), and written straight
into the layout the next conv reads where that layout has the slab's row pitch (else scattered
row by row from a buffer).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic, overload

_FLAGS = dict(cache=True, error_model="numpy", fastmath={"contract", "nsz", "arcp"})
_INV_PI = 1.0 / math.pi


@intrinsic
def _prefetch_write(typingctx, arr, idx):
    """Hint that arr[idx] (a 1-D C array, idx in range) is about to be written: its cache line
    is fetched while the caller computes (llvm.prefetch, write, high locality)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen

# The balanced-ReLU expectation (docs/maths.md §2) without arccos: with ρ = Σxy/sqrt(ΣxΣy),
#   V = max(Σxy, 0) + sqrt(ΣxΣy)·g(|ρ|)/π,   g(a) = sqrt(1 − a²) − a·arccos(a)
# (ρ ≥ 0: V/sqrt(ΣxΣy) = ρ + g(ρ)/π; ρ < 0: g(−ρ) = g(ρ) + πρ leaves g(|ρ|)/π). g(1 − t) =
# t·sqrt(t)·G(2t − 1) with G smooth on [−1, 1]: a polynomial from Chebyshev interpolation
# (benchmarks/fit_relu_poly.py prints these, highest degree first): max error 1.1e-16 for
# degree 16 in float64 and 4.7e-8 for degree 7 in float32, the rounding of each dtype.
_G64 = (
    7.906598070003905e-12,
    2.7560738323921426e-11,
    6.340817712651167e-11,
    2.2815178176838448e-10,
    8.912760270332491e-10,
    3.2922975329198337e-09,
    1.233846992961815e-08,
    4.752751641991498e-08,
    1.8823228627931607e-07,
    7.714950637620816e-07,
    3.3048961140718203e-06,
    1.501278833924427e-05,
    7.39982103548234e-05,
    0.0004118095595013345,
    0.0027982527541597496,
    0.028167834290537465,
    0.9685287633970561,
)
_G32 = (
    8.764433779201709e-07,
    3.7184429249408682e-06,
    1.4945205847846928e-05,
    7.373228948224375e-05,
    0.0004118232368985815,
    0.002798306540880535,
    0.028167833862185077,
    0.9685287617127246,
)
_C64 = tuple(np.float64(x) for x in reversed(_G64))  # ascending powers, in each dtype
_C32 = tuple(np.float32(x) for x in reversed(_G32))


@njit(inline="always")
def _poly64(x):
    """G(x) in float64 by Estrin's scheme (short dependency chains vectorise better than Horner)."""
    c = _C64
    x2 = x * x
    x4 = x2 * x2
    x8 = x4 * x4
    p03 = (c[0] + c[1] * x) + (c[2] + c[3] * x) * x2
    p47 = (c[4] + c[5] * x) + (c[6] + c[7] * x) * x2
    p8b = (c[8] + c[9] * x) + (c[10] + c[11] * x) * x2
    pcf = (c[12] + c[13] * x) + (c[14] + c[15] * x) * x2
    return (p03 + p47 * x4) + ((p8b + pcf * x4) + c[16] * x8) * x8


@njit(inline="always")
def _poly32(x):
    """G(x) in float32, Estrin's scheme."""
    c = _C32
    x2 = x * x
    p03 = (c[0] + c[1] * x) + (c[2] + c[3] * x) * x2
    p47 = (c[4] + c[5] * x) + (c[6] + c[7] * x) * x2
    return p03 + p47 * (x2 * x2)


def _make_relu_value(dtype, poly):
    """relu_value for one dtype, every constant of that dtype (no silent float64 promotion)."""
    one = dtype(1.0)
    zero = dtype(0.0)
    inv_pi = dtype(_INV_PI)

    @njit(inline="always")
    def relu_value(k, n, inv_n, c_lin, c_relu):
        a = min(abs(k * inv_n), one)
        t = one - a
        g = t * math.sqrt(t) * poly(t + t - one)  # g(a) = t^(3/2)·G(2t − 1)
        return c_lin * k + c_relu * (max(k, zero) + n * g * inv_pi)

    return relu_value


_relu_value32 = _make_relu_value(np.float32, _poly32)
_relu_value64 = _make_relu_value(np.float64, _poly64)


def _in_a(coefs):
    """G(1 − 2a) as a polynomial in a, ascending, from G's coefficients (highest first): one
    operation fewer per entry than forming x = 2t − 1 (conditioning Σ|c_k| a^k / |G| ≤ 1.18 on
    [0, 1], so the dtype's rounding is kept: 3.9e-8 in float32, 1.2e-16 in float64)."""
    pp = np.polynomial.polynomial
    out = np.zeros(1)
    for cj in coefs:  # Horner composition G(1 − 2a), highest degree first
        out = pp.polyadd(pp.polymul(out, [1.0, -2.0]), [cj])
    return out


_A64 = tuple(np.float64(x) for x in _in_a(_G64))
_A32 = tuple(np.float32(x) for x in _in_a(_G32))


@njit(inline="always")
def _poly_a64(a):
    """G(1 − 2a) in float64, Horner (the loops around it keep enough entries in flight)."""
    c = _A64
    p = c[16]
    p = p * a + c[15]
    p = p * a + c[14]
    p = p * a + c[13]
    p = p * a + c[12]
    p = p * a + c[11]
    p = p * a + c[10]
    p = p * a + c[9]
    p = p * a + c[8]
    p = p * a + c[7]
    p = p * a + c[6]
    p = p * a + c[5]
    p = p * a + c[4]
    p = p * a + c[3]
    p = p * a + c[2]
    p = p * a + c[1]
    return p * a + c[0]


@njit(inline="always")
def _poly_a32(a):
    """G(1 − 2a) in float32, Horner."""
    c = _A32
    p = c[7]
    p = p * a + c[6]
    p = p * a + c[5]
    p = p * a + c[4]
    p = p * a + c[3]
    p = p * a + c[2]
    p = p * a + c[1]
    return p * a + c[0]


def _make_relu_scaled(dtype, poly):
    """relu_value with c_relu/π folded into n by the caller, and G(1 − 2a) a polynomial in a:
    fewer multiplications per entry for the fused passes (those run at the FMA units' rate)."""
    one = dtype(1.0)
    zero = dtype(0.0)

    @njit(inline="always")
    def relu_scaled(k, ns, inv_n, c_lin, c_relu):
        a = min(abs(k * inv_n), one)
        t = one - a
        g = t * math.sqrt(t) * poly(a)  # g(a) = t^(3/2)·G(2t − 1)
        return (c_lin * k + c_relu * max(k, zero)) + ns * g

    @njit(inline="always")
    def relu_balanced(k, ns, inv_n):
        a = min(abs(k * inv_n), one)
        t = one - a
        g = t * math.sqrt(t) * poly(a)
        return max(k, zero) + ns * g

    return relu_scaled, relu_balanced


_relu_scaled32, _relu_balanced32 = _make_relu_scaled(np.float32, _poly_a32)
_relu_scaled64, _relu_balanced64 = _make_relu_scaled(np.float64, _poly_a64)


def relu_scaled(k, ns, inv_n, c_lin, c_relu):
    """relu_value(k, n, inv_n, c_lin, c_relu) given ns = c_relu·n/π instead of n."""
    return relu_value(k, ns * math.pi / c_relu if c_relu else 0.0, inv_n, c_lin, c_relu)


@overload(relu_scaled, inline="always")
def _relu_scaled_impl(k, ns, inv_n, c_lin, c_relu):
    if k == numba.types.float32:
        return lambda k, ns, inv_n, c_lin, c_relu: _relu_scaled32(k, ns, inv_n, c_lin, c_relu)
    return lambda k, ns, inv_n, c_lin, c_relu: _relu_scaled64(k, ns, inv_n, c_lin, c_relu)


def relu_balanced(k, ns, inv_n):
    """relu_scaled with c_lin = 0, c_relu = 1 (the balanced ReLU: no multiplications there)."""
    return relu_scaled(k, ns, inv_n, 0.0, 1.0)


@overload(relu_balanced, inline="always")
def _relu_balanced_impl(k, ns, inv_n):
    if k == numba.types.float32:
        return lambda k, ns, inv_n: _relu_balanced32(k, ns, inv_n)
    return lambda k, ns, inv_n: _relu_balanced64(k, ns, inv_n)


def relu_value(k, n, inv_n, c_lin, c_relu):
    """c_lin·k + c_relu·(max(k, 0) + n·g(|ρ|)/π), ρ = k/n (docs/maths.md §2, balanced-ReLU form).

    n = sqrt(Σx Σy), inv_n = 1/n or 0 where n = 0 (then the value is c_relu·max(k, 0) + c_lin·k,
    exactly what the arccos form gives at zero variance). |ρ| is clipped to 1 (rounding).
    (Plain-Python statement of the formula; inside numba the typed overload below is used.)
    """
    a = min(abs(k * inv_n), 1.0)
    g = math.sqrt(1.0 - a * a) - a * math.acos(a)
    return c_lin * k + c_relu * (max(k, 0.0) + n * g * _INV_PI)


@overload(relu_value, inline="always")
def _relu_value_impl(k, n, inv_n, c_lin, c_relu):
    if k == numba.types.float32:
        return lambda k, n, inv_n, c_lin, c_relu: _relu_value32(k, n, inv_n, c_lin, c_relu)
    return lambda k, n, inv_n, c_lin, c_relu: _relu_value64(k, n, inv_n, c_lin, c_relu)



# θ = arccos(ρ) for the NTK's V̇ (docs/maths.md §7), without arccos: arccos(1 − t) = sqrt(t)·H(2t − 1)
# with H smooth on [−1, 1], and arccos(−a) = π − arccos(a) (benchmarks/fit_relu_poly.py):
# max error 2.2e-16 for degree 18 in float64, 9.2e-8 for degree 7 in float32.
_H64 = (
    1.8301166660387483e-11,
    5.95055720852942e-11,
    1.0744638228659012e-10,
    3.555938648200568e-10,
    1.3586330259282336e-09,
    4.543226886430638e-09,
    1.5131804766903207e-08,
    5.1570659071542255e-08,
    1.7797338327760117e-07,
    6.225475446758364e-07,
    2.216019758302968e-06,
    8.063536126055667e-06,
    3.018716999184834e-05,
    0.0001174125045895998,
    0.0004820541005764209,
    0.002149135858989634,
    0.011029313317978552,
    0.0760160912346654,
    1.480960979386122,
)
_H32 = (
    9.466701326646602e-06,
    3.5163113032801017e-05,
    0.0001165034819326453,
    0.0004788339995534139,
    0.002149320263440397,
    0.011029966269836582,
    0.07601608545693156,
    1.480960958929524,
)
_D64 = tuple(np.float64(x) for x in reversed(_H64))
_D32 = tuple(np.float32(x) for x in reversed(_H32))


@njit(inline="always")
def _acos_poly64(x):
    """H(x) in float64, Estrin's scheme."""
    c = _D64
    x2 = x * x
    x4 = x2 * x2
    x8 = x4 * x4
    x16 = x8 * x8
    p03 = (c[0] + c[1] * x) + (c[2] + c[3] * x) * x2
    p47 = (c[4] + c[5] * x) + (c[6] + c[7] * x) * x2
    p8b = (c[8] + c[9] * x) + (c[10] + c[11] * x) * x2
    pcf = (c[12] + c[13] * x) + (c[14] + c[15] * x) * x2
    p1618 = c[16] + c[17] * x + c[18] * x2
    return (p03 + p47 * x4) + (p8b + pcf * x4) * x8 + p1618 * x16


@njit(inline="always")
def _acos_poly32(x):
    """H(x) in float32, Estrin's scheme."""
    c = _D32
    x2 = x * x
    p03 = (c[0] + c[1] * x) + (c[2] + c[3] * x) * x2
    p47 = (c[4] + c[5] * x) + (c[6] + c[7] * x) * x2
    return p03 + p47 * (x2 * x2)


def _make_relu_derivative(dtype, poly):
    one = dtype(1.0)
    zero = dtype(0.0)
    pi = dtype(math.pi)
    inv_pi = dtype(_INV_PI)

    snap = dtype(8.0) * np.finfo(dtype).eps

    @njit(inline="always")
    def relu_derivative(k, inv_n, c_lin, c_relu):
        r = k * inv_n
        a = min(abs(r), one)
        t = one - a
        if t < snap:  # |ρ| within rounding of 1 (an image with itself): θ = 0, not sqrt(2t)
            t = zero
        theta = math.sqrt(t) * poly(t + t - one)  # arccos(|ρ|)
        if r < zero:
            theta = pi - theta
        return c_lin + c_relu * (one - theta * inv_pi)

    return relu_derivative


_relu_derivative32 = _make_relu_derivative(np.float32, _acos_poly32)
_relu_derivative64 = _make_relu_derivative(np.float64, _acos_poly64)


def relu_derivative(k, inv_n, c_lin, c_relu):
    """V̇ = E[φ′(u)φ′(v)] = c_lin + c_relu·(1 − θ/π), θ = arccos(ρ), ρ = k·inv_n clipped to
    [−1, 1] (docs/maths.md §7): φ′ is a below 0 and b above, so with c_lin = ab and
    c_relu = (b − a)²/2 this is (a² + b²)(π − θ)/2π + ab·θ/π. inv_n = 0 (a zero variance)
    gives θ = π/2, as the torch path. 1 − |ρ| below 8ε counts as 0: θ ≈ sqrt(2(1 − |ρ|))
    would turn the rounding of k and n (summed in different orders) into a sqrt(ε) error
    where an image meets itself. (Plain-Python statement; numba uses the overload below.)
    """
    r = min(max(k * inv_n, -1.0), 1.0)
    return c_lin + c_relu * (1.0 - math.acos(r) * _INV_PI)


@overload(relu_derivative, inline="always")
def _relu_derivative_impl(k, inv_n, c_lin, c_relu):
    if k == numba.types.float32:
        return lambda k, inv_n, c_lin, c_relu: _relu_derivative32(k, inv_n, c_lin, c_relu)
    return lambda k, inv_n, c_lin, c_relu: _relu_derivative64(k, inv_n, c_lin, c_relu)


_B64 = tuple(np.float64(x) for x in _in_a(_H64) / math.pi)  # H(1 − 2a)/π, ascending
_B32 = tuple(np.float32(x) for x in _in_a(_H32) / math.pi)


@njit(inline="always")
def _acos_a64(a):
    """arccos(a)/(π·sqrt(1 − a)) = H(1 − 2a)/π in float64, Horner."""
    c = _B64
    p = c[18]
    p = p * a + c[17]
    p = p * a + c[16]
    p = p * a + c[15]
    p = p * a + c[14]
    p = p * a + c[13]
    p = p * a + c[12]
    p = p * a + c[11]
    p = p * a + c[10]
    p = p * a + c[9]
    p = p * a + c[8]
    p = p * a + c[7]
    p = p * a + c[6]
    p = p * a + c[5]
    p = p * a + c[4]
    p = p * a + c[3]
    p = p * a + c[2]
    p = p * a + c[1]
    return p * a + c[0]


@njit(inline="always")
def _acos_a32(a):
    """H(1 − 2a)/π in float32, Horner."""
    c = _B32
    p = c[7]
    p = p * a + c[6]
    p = p * a + c[5]
    p = p * a + c[4]
    p = p * a + c[3]
    p = p * a + c[2]
    p = p * a + c[1]
    return p * a + c[0]


def _make_relu_both(dtype, poly_g, poly_h):
    one = dtype(1.0)
    zero = dtype(0.0)
    half = dtype(0.5)
    snap = dtype(8.0) * np.finfo(dtype).eps

    @njit(inline="always")
    def relu_both(k, ns, inv_n, c_lin, c_relu):
        r = k * inv_n
        a = min(abs(r), one)
        t = one - a
        sq = math.sqrt(t)
        value = (c_lin * k + c_relu * max(k, zero)) + ns * (t * sq * poly_g(a))
        # θ/π = arccos(|ρ|)/π = sqrt(t)·H(1 − 2a)/π, 0 within rounding of |ρ| = 1
        th = (sq * dtype(t >= snap)) * poly_h(a)
        # 1 − θ/π for ρ ≥ 0; ρ < 0: θ → π − θ leaves θ'/π (no branches: they vectorise worse)
        return value, c_lin + c_relu * (half + math.copysign(half - th, r))

    return relu_both


_relu_both32 = _make_relu_both(np.float32, _poly_a32, _acos_a32)
_relu_both64 = _make_relu_both(np.float64, _poly_a64, _acos_a64)


def relu_both(k, ns, inv_n, c_lin, c_relu):
    """(relu_scaled(k, ns, …), relu_derivative(k, inv_n, …)) sharing |ρ|, t and sqrt(t)."""
    n = ns * math.pi / c_relu if c_relu else 0.0
    return relu_value(k, n, inv_n, c_lin, c_relu), relu_derivative(k, inv_n, c_lin, c_relu)


@overload(relu_both, inline="always")
def _relu_both_impl(k, ns, inv_n, c_lin, c_relu):
    if k == numba.types.float32:
        return lambda k, ns, inv_n, c_lin, c_relu: _relu_both32(k, ns, inv_n, c_lin, c_relu)
    return lambda k, ns, inv_n, c_lin, c_relu: _relu_both64(k, ns, inv_n, c_lin, c_relu)



@njit(nogil=True, **_FLAGS)
def kron_conv(
    v, out, geom0, geom1, out_pad, a_ptr, a_taps, a_coef, b_taps, b_coef,
    wv, bv, act, c_lin, c_relu, rx, ix, ry, iy, symmetric, pool, row_lo, row_hi,
):
    """Full → full conv (docs/maths.md §2 (*)) by Kronecker terms, then an optional ReLU-family act.

    v (B, N0, N0, s1, s1, H, H) in the layout of this conv (see the module docstring) → out
    (B, Q0, Q0, so, so, Ho, Ho) in the layout of the next one (so, Ho from its shape, leading
    padding out_pad). geom_k = (n_in, n_out, stride, dilation, pad_before, taps) of axis k.
    Axis 0's factors: groups g of tap pairs (p0, p0') = a_taps[a_ptr[g]:a_ptr[g + 1]] with
    A_m[p0, p0'] = a_coef[g, m] for all of them; axis 1: tap pairs b_taps[e] with
    B_m[p1, p1'] = b_coef[e, m]. K = wv·(Σ …) + bv; act = 1 then writes
    c_lin·K + c_relu·(max(K, 0) + n·g(|ρ|)/π) with n = rx[b,q]·ry[b,q'], 1/n = ix[b,q]·iy[b,q']
    (relu_value).
    symmetric: v is a self-covariance (V[x, x'] = V[x', x], rx = ry): only slabs q0 ≤ q0' are
    computed, the others mirrored. Threads share the work by output rows (b, q0): this call does
    the contiguous rows row_lo … row_hi − 1 (neighbouring rows share input slabs in the cache).

    pool = (w, b) (empty: none): a 2 × 2 stride-2 average pool follows, K_pool[P, P'] =
    b + w·Σ K[2P + a, 2P' + a'] over the 16 pairs of its windows (w = its weight_var·Σ entry):
    out is then the pool's output in the layout of the conv after it (Q0/2 × Q1/2 positions),
    each slab (q0, q0') adding its 2 × 2 blocks into output slab (q0/2, q0'/2) — no scatter of
    this conv's output, no pass of the pool. Output slab (P, P') is complete after rows
    q0 = 2P, 2P + 1 (so row_lo, row_hi are even) and all q0'; not with ``symmetric``.

    Every pass runs over a whole flattened slab (rows of hh, the last hh − Q1 entries of each
    row junk), never row by row: with Q1 = 32 the per-row loop set-up cost as much as the work.
    Stage 1 of a rank-one Σ sums up to four slabs per pass; stage 2's last three shifted reads
    are summed inside the nonlinearity's pass (no store and reload of K); the nonlinearity
    reads its variances from per-row and per-column arrays tiled to the slab's shape. Where
    the next conv's rows have this conv's pitch (stride 1, Ho = hh) that pass writes straight
    into the output slab and the junk lands on its zero padding, which is then restored;
    otherwise it goes to a buffer that is scattered row by row.
    """
    nb = v.shape[0]
    dtype = v.dtype
    zero = dtype.type(0.0)
    n_in0, q_0, s0, h0, pad0 = geom0[0], geom0[1], geom0[2], geom0[3], geom0[4]
    q_1, s1, h1 = geom1[1], geom1[2], geom1[3]
    hh = v.shape[5]
    so = out.shape[3]
    ho = out.shape[5]
    slab_len = s1 * s1 * hh * hh
    out_len = so * so * ho * ho
    line = max(1, 64 // out.itemsize)  # entries per cache line
    vf = v.reshape((nb, v.shape[1], v.shape[2], slab_len))
    outf = out.reshape((nb, out.shape[1], out.shape[2], out_len))
    n_terms = a_coef.shape[1]
    ac = a_coef.astype(dtype)
    w = dtype.type(wv)  # wv, bv in the array dtype (no silent float64 promotion)
    bias = dtype.type(bv)
    t = np.zeros((n_terms, slab_len), dtype)
    dbuf = np.empty(slab_len, dtype)
    n_acc = (q_1 - 1) * hh + q_1  # rows of hh, the last one only q_1 long
    acc = np.zeros(n_acc, dtype)
    val = np.zeros(n_acc, dtype)
    # stage 2's reads, every (tap pair e, term m) one source: term, offset in the flattened
    # phase block, coefficient (times wv); the last three go into the final pass (padded with
    # zero coefficients), the others are summed into acc before it
    n_b = b_taps.shape[0]
    n_src = n_b * n_terms
    n_fin = max(n_src, 3)
    s_term = np.zeros(n_fin, np.int64)
    s_off = np.zeros(n_fin, np.int64)
    s_coef = np.zeros(n_fin, dtype)
    for e in range(n_b):
        r = h1 * b_taps[e, 0]
        c = h1 * b_taps[e, 1]
        off = ((r % s1) * s1 + c % s1) * hh * hh + (r // s1) * hh + c // s1
        for m in range(n_terms):
            s_term[e * n_terms + m] = m
            s_off[e * n_terms + m] = off
            s_coef[e * n_terms + m] = w * dtype.type(b_coef[e, m])
    n_pre = n_fin - 3
    # stage 1 of a rank-one Σ: the valid taps' slabs and coefficients (up to four per pass)
    n_a = a_taps.shape[0]
    tap_x = np.zeros(n_a, np.int64)
    tap_xb = np.zeros(n_a, np.int64)
    tap_c = np.zeros(n_a, dtype)
    # the nonlinearity's variances tiled to the slab: per output row (b, q0), per column (b, q0')
    rxf = np.zeros(n_acc, dtype)
    ixf = np.zeros(n_acc, dtype)
    ryt = np.zeros((q_0, n_acc), dtype)
    iyt = np.zeros((q_0, n_acc), dtype)
    tiled_b = -1
    ns_scale = c_relu * dtype.type(_INV_PI)  # relu_scaled's n·c_relu/π
    balanced = c_lin == 0 and c_relu == 1  # the plain ReLU: relu_balanced
    # a uniform 3-tap B (with a uniform 3-tap A: the independent 3 × 3 conv): stage 1 moves into
    # the final pass, its 9 shifted reads summed there (no store and reload of T; 15% less CPU
    # time in cache, 20% in float64)
    uniform_b = n_terms == 1 and n_src == 3 and s_coef[0] == s_coef[1] and s_coef[1] == s_coef[2]
    # straight into the output slab: its flattened rows have this slab's pitch
    pooled = pool.shape[0] > 0
    direct = so == 1 and ho == hh and not pooled
    pool_w = dtype.type(pool[0]) if pooled else zero
    pool_b = dtype.type(pool[1]) if pooled else zero
    base = out_pad * ho + out_pad
    # where output position i goes in the next layout (no integer division in the loops):
    # phase and index o_ph[i], o_ix[i]; phase pc holds i = ph_i0[pc] + so·k at index ph_k0[pc] + k
    o_ph = np.empty(q_1, np.int64)
    o_ix = np.empty(q_1, np.int64)
    for i in range(q_1):
        o_ph[i] = (out_pad + i) % so
        o_ix[i] = (out_pad + i) // so
    ph_i0 = np.empty(so, np.int64)
    ph_k0 = np.empty(so, np.int64)
    ph_n = np.empty(so, np.int64)
    for pc in range(so):
        i0 = (pc - out_pad) % so
        ph_i0[pc] = i0
        ph_k0[pc] = (out_pad + i0) // so
        ph_n[pc] = max(0, (q_1 - i0 + so - 1) // so)
    pairs = so == 2 and ph_i0[0] == 0  # stride 2, even padding: outputs 2k, 2k + 1 → phases 0, 1
    n_pair = ph_n[1] if so == 2 else 0
    pair_off = np.empty(q_1, np.int64)  # where row q1's phase 0 starts in the flattened slab
    for i in range(q_1):
        pair_off[i] = (o_ph[i] * so * ho + o_ix[i]) * ho + ph_k0[0]
    for bq in range(row_lo, min(row_hi, nb * q_0)):
        b = bq // q_0
        q0 = bq % q_0
        if act == 1:
            if b != tiled_b:
                for q0b in range(q_0):
                    for q1 in range(q_1):
                        dy = ryt[q0b, q1 * hh : q1 * hh + q_1]
                        di = iyt[q0b, q1 * hh : q1 * hh + q_1]
                        for i in range(q_1):
                            dy[i] = ry[b, q0b, i]
                            di[i] = iy[b, q0b, i]
                tiled_b = b
            for q1 in range(q_1):
                for i in range(q_1):
                    rxf[q1 * hh + i] = rx[b, q0, q1] * ns_scale
                    ixf[q1 * hh + i] = ix[b, q0, q1]
        start = q0 if symmetric else 0
        for q0b in range(start, q_0):
            if not direct and not pooled:  # the output slab's lines arrive while stages 1 and 2 run (the
                # scatter below stalls on them otherwise; the direct pass's stores overlap its
                # arithmetic, and prefetching made it slower)
                oslab = outf[b, q0, q0b]
                for i in range(0, out_len, line):
                    _prefetch_write(oslab, i)
            # stage 1: T_m = Σ A_m[p0, p0'] slab(x0(q0, p0), x0(q0', p0'))
            fuse = False
            if n_terms == 1:
                ns = 0
                for g in range(a_ptr.shape[0] - 1):
                    for e in range(a_ptr[g], a_ptr[g + 1]):
                        x = s0 * q0 + h0 * a_taps[e, 0] - pad0
                        xb = s0 * q0b + h0 * a_taps[e, 1] - pad0
                        if x < 0 or x >= n_in0 or xb < 0 or xb >= n_in0:
                            continue  # zero padding
                        tap_x[ns] = x
                        tap_xb[ns] = xb
                        tap_c[ns] = ac[g, 0]
                        ns += 1
                tm = t[0]
                if ns == 0:
                    tm[:] = 0
                # a uniform 3 × 3 (independent conv): stages 1 and 2 in the final pass
                fuse = uniform_b and ns == 3 and tap_c[0] == tap_c[1] and tap_c[1] == tap_c[2]
                j = 3 if fuse else 0
                while j < ns:
                    left = ns - j
                    nk = left if left <= 4 else 3  # sources in this pass
                    a0 = vf[b, tap_x[j], tap_xb[j]]
                    c0 = tap_c[j]
                    if nk == 1:
                        if j == 0:
                            for i in range(slab_len):
                                tm[i] = c0 * a0[i]
                        else:
                            for i in range(slab_len):
                                tm[i] += c0 * a0[i]
                    elif nk == 2:
                        a1 = vf[b, tap_x[j + 1], tap_xb[j + 1]]
                        c1 = tap_c[j + 1]
                        if j == 0:
                            for i in range(slab_len):
                                tm[i] = c0 * a0[i] + c1 * a1[i]
                        else:
                            for i in range(slab_len):
                                tm[i] += c0 * a0[i] + c1 * a1[i]
                    elif nk == 3:
                        a1 = vf[b, tap_x[j + 1], tap_xb[j + 1]]
                        a2 = vf[b, tap_x[j + 2], tap_xb[j + 2]]
                        c1 = tap_c[j + 1]
                        c2 = tap_c[j + 2]
                        if j == 0:
                            for i in range(slab_len):
                                tm[i] = c0 * a0[i] + c1 * a1[i] + c2 * a2[i]
                        else:
                            for i in range(slab_len):
                                tm[i] += c0 * a0[i] + c1 * a1[i] + c2 * a2[i]
                    else:
                        a1 = vf[b, tap_x[j + 1], tap_xb[j + 1]]
                        a2 = vf[b, tap_x[j + 2], tap_xb[j + 2]]
                        a3 = vf[b, tap_x[j + 3], tap_xb[j + 3]]
                        c1 = tap_c[j + 1]
                        c2 = tap_c[j + 2]
                        c3 = tap_c[j + 3]
                        if j == 0:
                            for i in range(slab_len):
                                tm[i] = (c0 * a0[i] + c1 * a1[i]) + (c2 * a2[i] + c3 * a3[i])
                        else:
                            for i in range(slab_len):
                                tm[i] += (c0 * a0[i] + c1 * a1[i]) + (c2 * a2[i] + c3 * a3[i])
                    j += nk
            else:
                # the taps in groups sharing their coefficients (one tap each, or the diagonals
                # p0 − p0' = δ of a Toeplitz A_m): each group's slabs are summed into D, then
                # T_m += coef·D
                t_init = False
                for g in range(a_ptr.shape[0] - 1):
                    nd = 0
                    for e in range(a_ptr[g], a_ptr[g + 1]):
                        x = s0 * q0 + h0 * a_taps[e, 0] - pad0
                        xb = s0 * q0b + h0 * a_taps[e, 1] - pad0
                        if x < 0 or x >= n_in0 or xb < 0 or xb >= n_in0:
                            continue  # zero padding
                        src = vf[b, x, xb]
                        if a_ptr[g + 1] - a_ptr[g] == 1:
                            dsum = src  # a single tap: no copy
                        elif nd == 0:
                            dsum = dbuf
                            for i in range(slab_len):
                                dsum[i] = src[i]
                        else:
                            for i in range(slab_len):
                                dsum[i] += src[i]
                        nd += 1
                    if nd == 0:
                        continue
                    for m in range(n_terms):
                        coef = ac[g, m]
                        tm = t[m]
                        if not t_init:
                            for i in range(slab_len):
                                tm[i] = coef * dsum[i]
                        else:
                            for i in range(slab_len):
                                tm[i] += coef * dsum[i]
                    t_init = True
                if not t_init:
                    t[:] = 0
            if fuse:
                cc = tap_c[0] * s_coef[0]
                f0 = vf[b, tap_x[0], tap_xb[0]]
                f1 = vf[b, tap_x[1], tap_xb[1]]
                f2 = vf[b, tap_x[2], tap_xb[2]]
                o0 = s_off[0]
                o1 = s_off[1]
                o2 = s_off[2]
                x00 = f0[o0 : o0 + n_acc]
                x10 = f1[o0 : o0 + n_acc]
                x20 = f2[o0 : o0 + n_acc]
                x01 = f0[o1 : o1 + n_acc]
                x11 = f1[o1 : o1 + n_acc]
                x21 = f2[o1 : o1 + n_acc]
                x02 = f0[o2 : o2 + n_acc]
                x12 = f1[o2 : o2 + n_acc]
                x22 = f2[o2 : o2 + n_acc]
                dstf = outf[b, q0, q0b, base : base + n_acc] if direct else val
                syt = ryt[q0b]
                iyr = iyt[q0b]
                if act == 1 and balanced:
                    for i in range(n_acc):
                        sm = ((x00[i] + x10[i]) + x20[i]) + ((x01[i] + x11[i]) + x21[i]) + ((x02[i] + x12[i]) + x22[i])
                        kv = bias + cc * sm
                        dstf[i] = relu_balanced(kv, rxf[i] * syt[i], ixf[i] * iyr[i])
                elif act == 1:
                    for i in range(n_acc):
                        sm = ((x00[i] + x10[i]) + x20[i]) + ((x01[i] + x11[i]) + x21[i]) + ((x02[i] + x12[i]) + x22[i])
                        kv = bias + cc * sm
                        dstf[i] = relu_scaled(kv, rxf[i] * syt[i], ixf[i] * iyr[i], c_lin, c_relu)
                else:
                    for i in range(n_acc):
                        sm = ((x00[i] + x10[i]) + x20[i]) + ((x01[i] + x11[i]) + x21[i]) + ((x02[i] + x12[i]) + x22[i])
                        dstf[i] = bias + cc * sm
            # stage 2, all but the last three shifted reads: acc = Σ coef·T_m[off + ·]
            for e in range(n_pre):
                coef = s_coef[e]
                src = t[s_term[e], s_off[e] : s_off[e] + n_acc]
                if e == 0:
                    for i in range(n_acc):
                        acc[i] = coef * src[i]
                else:
                    for i in range(n_acc):
                        acc[i] += coef * src[i]
            # the last three and the nonlinearity in one pass over the slab
            u0 = t[s_term[n_pre], s_off[n_pre] : s_off[n_pre] + n_acc]
            u1 = t[s_term[n_pre + 1], s_off[n_pre + 1] : s_off[n_pre + 1] + n_acc]
            u2 = t[s_term[n_pre + 2], s_off[n_pre + 2] : s_off[n_pre + 2] + n_acc]
            d0 = s_coef[n_pre]
            d1 = s_coef[n_pre + 1]
            d2 = s_coef[n_pre + 2]
            if direct:
                dst = outf[b, q0, q0b, base : base + n_acc]
            else:
                dst = val
            if fuse:
                pass
            elif act == 1:
                syt = ryt[q0b]
                iyr = iyt[q0b]
                if balanced and n_pre == 0:
                    for i in range(n_acc):
                        kv = ((bias + d0 * u0[i]) + d1 * u1[i]) + d2 * u2[i]
                        dst[i] = relu_balanced(kv, rxf[i] * syt[i], ixf[i] * iyr[i])
                elif n_pre == 0:
                    for i in range(n_acc):
                        kv = ((bias + d0 * u0[i]) + d1 * u1[i]) + d2 * u2[i]
                        dst[i] = relu_scaled(kv, rxf[i] * syt[i], ixf[i] * iyr[i], c_lin, c_relu)
                else:
                    for i in range(n_acc):
                        kv = (((bias + acc[i]) + d0 * u0[i]) + d1 * u1[i]) + d2 * u2[i]
                        dst[i] = relu_scaled(kv, rxf[i] * syt[i], ixf[i] * iyr[i], c_lin, c_relu)
            else:
                if n_pre > 0:
                    for i in range(n_acc):
                        dst[i] = (((bias + acc[i]) + d0 * u0[i]) + d1 * u1[i]) + d2 * u2[i]
                else:
                    for i in range(n_acc):
                        dst[i] = ((bias + d0 * u0[i]) + d1 * u1[i]) + d2 * u2[i]
            if direct:  # the junk of each row fell on the zero padding: restore it
                for q1 in range(q_1 - 1):
                    for i in range(q_1, hh):
                        dst[q1 * hh + i] = zero
            # rows into the next conv's layout (unless written already), mirrors
            if direct and symmetric and q0b != q0:
                # slab (q0', q0) holds the transpose: written row by row (contiguous lines),
                # read down the columns of this slab while it is in L1
                mirror = outf[b, q0b, q0]
                for r in range(q_1):
                    mrow = mirror[base + r * hh : base + r * hh + q_1]
                    col = dst[r:]
                    for c in range(q_1):
                        mrow[c] = col[c * hh]
                continue
            if direct:
                continue
            if pooled:  # the 2 × 2 windows of this slab into output slab (q0/2, q0'/2)
                # plain sums of the 16 entries of each window (no product in the loops: FMA
                # contraction, which fastmath allows, then cannot differ between a loop's
                # vector body and its remainder, i.e. with the buffer's address), then one
                # scaling pass after the last of the four slabs
                oslab = outf[b, q0 // 2, q0b // 2]
                first = q0 % 2 == 0 and q0b % 2 == 0
                for r in range(q_1 // 2):
                    o = (out_pad + r) * ho + out_pad
                    u = dst[2 * r * hh : 2 * r * hh + q_1]
                    d = dst[(2 * r + 1) * hh : (2 * r + 1) * hh + q_1]
                    orow = oslab[o : o + q_1 // 2]
                    if first:
                        for k in range(q_1 // 2):
                            orow[k] = (u[2 * k] + u[2 * k + 1]) + (d[2 * k] + d[2 * k + 1])
                    else:
                        for k in range(q_1 // 2):
                            orow[k] += (u[2 * k] + u[2 * k + 1]) + (d[2 * k] + d[2 * k + 1])
                if q0 % 2 == 1 and q0b % 2 == 1:  # complete: K = b + w·Σ
                    for r in range(q_1 // 2):
                        o = (out_pad + r) * ho + out_pad
                        orow = oslab[o : o + q_1 // 2]
                        for k in range(q_1 // 2):
                            orow[k] *= pool_w
                        for k in range(q_1 // 2):
                            orow[k] += pool_b
                continue
            for q1 in range(q_1):
                row = dst[q1 * hh : q1 * hh + q_1]
                if not direct:
                    if so == 1:
                        drow = out[b, q0, q0b, 0, 0, out_pad + q1, out_pad : out_pad + q_1]
                        for i in range(q_1):
                            drow[i] = row[i]
                    elif pairs:  # both phases in one loop: interleaved reads vectorise
                        slab = outf[b, q0, q0b]
                        p0 = pair_off[q1]
                        p1 = p0 + ho * ho + ph_k0[1] - ph_k0[0]
                        dp0 = slab[p0 : p0 + n_pair]
                        dp1 = slab[p1 : p1 + n_pair]
                        for k in range(n_pair):
                            dp0[k] = row[2 * k]
                            dp1[k] = row[2 * k + 1]
                        if ph_n[0] > n_pair:
                            slab[p0 + n_pair] = row[2 * n_pair]
                    else:  # column phase pc holds the outputs i = ph_i0[pc] + so·k
                        for pc in range(so):
                            drow = out[b, q0, q0b, o_ph[q1], pc, o_ix[q1], ph_k0[pc] :]
                            src = row[ph_i0[pc] :]
                            if so == 2:  # a constant stride vectorises
                                for k in range(ph_n[pc]):
                                    drow[k] = src[2 * k]
                            else:
                                for k in range(ph_n[pc]):
                                    drow[k] = src[so * k]
                if symmetric and q0b != q0:  # slab (q0', q0) holds the transpose: a column
                    for pr in range(so):
                        dcol = out[b, q0b, q0, pr, o_ph[q1], ph_k0[pr] :, o_ix[q1]]
                        src = row[ph_i0[pr] :]
                        for k in range(ph_n[pr]):
                            dcol[k] = src[so * k]


@njit(inline="always")
def _stage1(vf, b, q0, q0b, geom0, a_ptr, a_taps, ac, t, dbuf, tap_x, tap_xb, tap_c, may_fuse):
    """Stage 1 of :func:`kron_conv` for one slab (q0, q0'): T_m = Σ A_m[p0, p0'] slab(x0(q0, p0),
    x0(q0', p0')) into t (M, slab_len), from vf (B, N0, N0, slab_len). A rank-one Σ sums up to
    four slabs per pass (its valid taps left in tap_*); otherwise the taps go in groups sharing
    their coefficients (one tap each, or the diagonals p0 − p0' = δ of a Toeplitz A_m): each
    group's slabs are summed into dbuf, then T_m += coef·D. Returns True, summing nothing,
    when may_fuse and the taps are three with one coefficient (the caller's final pass reads
    the slabs)."""
    n_in0, s0, h0, pad0 = geom0[0], geom0[2], geom0[3], geom0[4]
    slab_len = t.shape[1]
    n_terms = ac.shape[1]
    if n_terms == 1:
        ns = 0
        for g in range(a_ptr.shape[0] - 1):
            for e in range(a_ptr[g], a_ptr[g + 1]):
                x = s0 * q0 + h0 * a_taps[e, 0] - pad0
                xb = s0 * q0b + h0 * a_taps[e, 1] - pad0
                if x < 0 or x >= n_in0 or xb < 0 or xb >= n_in0:
                    continue  # zero padding
                tap_x[ns] = x
                tap_xb[ns] = xb
                tap_c[ns] = ac[g, 0]
                ns += 1
        if may_fuse and ns == 3 and tap_c[0] == tap_c[1] and tap_c[1] == tap_c[2]:
            return True
        tm = t[0]
        if ns == 0:
            tm[:] = 0
        j = 0
        while j < ns:
            left = ns - j
            nk = left if left <= 4 else 3  # sources in this pass
            a0 = vf[b, tap_x[j], tap_xb[j]]
            c0 = tap_c[j]
            if nk == 1:
                if j == 0:
                    for i in range(slab_len):
                        tm[i] = c0 * a0[i]
                else:
                    for i in range(slab_len):
                        tm[i] += c0 * a0[i]
            elif nk == 2:
                a1 = vf[b, tap_x[j + 1], tap_xb[j + 1]]
                c1 = tap_c[j + 1]
                if j == 0:
                    for i in range(slab_len):
                        tm[i] = c0 * a0[i] + c1 * a1[i]
                else:
                    for i in range(slab_len):
                        tm[i] += c0 * a0[i] + c1 * a1[i]
            elif nk == 3:
                a1 = vf[b, tap_x[j + 1], tap_xb[j + 1]]
                a2 = vf[b, tap_x[j + 2], tap_xb[j + 2]]
                c1 = tap_c[j + 1]
                c2 = tap_c[j + 2]
                if j == 0:
                    for i in range(slab_len):
                        tm[i] = c0 * a0[i] + c1 * a1[i] + c2 * a2[i]
                else:
                    for i in range(slab_len):
                        tm[i] += c0 * a0[i] + c1 * a1[i] + c2 * a2[i]
            else:
                a1 = vf[b, tap_x[j + 1], tap_xb[j + 1]]
                a2 = vf[b, tap_x[j + 2], tap_xb[j + 2]]
                a3 = vf[b, tap_x[j + 3], tap_xb[j + 3]]
                c1 = tap_c[j + 1]
                c2 = tap_c[j + 2]
                c3 = tap_c[j + 3]
                if j == 0:
                    for i in range(slab_len):
                        tm[i] = (c0 * a0[i] + c1 * a1[i]) + (c2 * a2[i] + c3 * a3[i])
                else:
                    for i in range(slab_len):
                        tm[i] += (c0 * a0[i] + c1 * a1[i]) + (c2 * a2[i] + c3 * a3[i])
            j += nk
        return False
    t_init = False
    for g in range(a_ptr.shape[0] - 1):
        nd = 0
        for e in range(a_ptr[g], a_ptr[g + 1]):
            x = s0 * q0 + h0 * a_taps[e, 0] - pad0
            xb = s0 * q0b + h0 * a_taps[e, 1] - pad0
            if x < 0 or x >= n_in0 or xb < 0 or xb >= n_in0:
                continue  # zero padding
            src = vf[b, x, xb]
            if a_ptr[g + 1] - a_ptr[g] == 1:
                dsum = src  # a single tap: no copy
            elif nd == 0:
                dsum = dbuf
                for i in range(slab_len):
                    dsum[i] = src[i]
            else:
                for i in range(slab_len):
                    dsum[i] += src[i]
            nd += 1
        if nd == 0:
            continue
        for m in range(n_terms):
            coef = ac[g, m]
            tm = t[m]
            if not t_init:
                for i in range(slab_len):
                    tm[i] = coef * dsum[i]
            else:
                for i in range(slab_len):
                    tm[i] += coef * dsum[i]
        t_init = True
    if not t_init:
        t[:] = 0
    return False


@njit(inline="always")
def _scatter_row(out, outf, b, q0, q0b, q1, row, out_pad, o_ph, o_ix, ph_i0, ph_k0, ph_n, pair_off):
    """Row q1 (``row``, length Q1) of slab (q0, q0') into the next conv's layout when the pass
    did not write it there."""
    so = out.shape[3]
    ho = out.shape[5]
    q_1 = row.shape[0]
    if so == 1:
        drow = out[b, q0, q0b, 0, 0, out_pad + q1, out_pad : out_pad + q_1]
        for i in range(q_1):
            drow[i] = row[i]
    elif so == 2 and ph_i0[0] == 0:  # both phases in one loop: interleaved reads vectorise
        n_pair = ph_n[1]
        slab = outf[b, q0, q0b]
        p0 = pair_off[q1]
        p1 = p0 + ho * ho + ph_k0[1] - ph_k0[0]
        dp0 = slab[p0 : p0 + n_pair]
        dp1 = slab[p1 : p1 + n_pair]
        for k in range(n_pair):
            dp0[k] = row[2 * k]
            dp1[k] = row[2 * k + 1]
        if ph_n[0] > n_pair:
            slab[p0 + n_pair] = row[2 * n_pair]
    else:  # column phase pc holds the outputs i = ph_i0[pc] + so·k
        for pc in range(so):
            drow = out[b, q0, q0b, o_ph[q1], pc, o_ix[q1], ph_k0[pc] :]
            src = row[ph_i0[pc] :]
            for k in range(ph_n[pc]):
                drow[k] = src[so * k]


@njit(nogil=True, **_FLAGS)
def kron_conv_ntk(
    v, out, geom0, geom1, out_pad, a_ptr, a_taps, a_coef, b_taps, b_coef,
    wv, bv, act, c_lin, c_relu, rx, ix, ry, iy, own_a, own_b, tin, tout, row_lo, row_hi,
):
    """:func:`kron_conv` (not symmetric) carrying the NTK's Θ (docs/maths.md §7) through the
    same pass: tout (out's layout) gets Θ = wv·(Σ * Θ_in) + own_a·(Σ * V) + own_b — the
    layer's own parameters' term: (wv, bv), i.e. K, in the NTK parameterisation, (fan_in, 1)
    in the standard one, (0, 0) for a pool — times V̇ = relu_derivative(K, …) when act = 1.
    Θ_in is tin (v's layout), or 0 where tin is None (numba compiles that case apart and
    prunes the branch). The passes are :func:`kron_conv`'s (whole flattened slabs; V and V̇
    share |ρ|, t and sqrt(t) in :func:`relu_both`). A separate kernel from :func:`kron_conv`:
    with a mode flag there the NNGP-only conv ran ~30% slower (CNNGP-14, float32).
    """
    nb = v.shape[0]
    dtype = v.dtype
    zero = dtype.type(0.0)
    q_0 = geom0[1]
    q_1, s1, h1 = geom1[1], geom1[2], geom1[3]
    hh = v.shape[5]
    so = out.shape[3]
    ho = out.shape[5]
    slab_len = s1 * s1 * hh * hh
    out_len = so * so * ho * ho
    line = max(1, 64 // out.itemsize)  # entries per cache line
    vf = v.reshape((nb, v.shape[1], v.shape[2], slab_len))
    outf = out.reshape((nb, out.shape[1], out.shape[2], out_len))
    toutf = tout.reshape((nb, out.shape[1], out.shape[2], out_len))
    n_terms = a_coef.shape[1]
    ac = a_coef.astype(dtype)
    w = dtype.type(wv)  # wv, bv in the array dtype (no silent float64 promotion)
    bias = dtype.type(bv)
    oa = dtype.type(own_a)  # the layer's own parameters' term oa·(Σ * V) + ob
    ob = dtype.type(own_b)
    t = np.zeros((n_terms, slab_len), dtype)
    tt = np.zeros((n_terms, slab_len), dtype)
    dbuf = np.empty(slab_len, dtype)
    n_acc = (q_1 - 1) * hh + q_1  # rows of hh, the last one only q_1 long
    acc = np.zeros(n_acc, dtype)
    acc_t = np.zeros(n_acc, dtype)
    val = np.zeros(n_acc, dtype)
    val_t = np.zeros(n_acc, dtype)
    # stage 2's reads as in kron_conv (coefficients without wv here)
    n_b = b_taps.shape[0]
    n_src = n_b * n_terms
    n_fin = max(n_src, 3)
    s_term = np.zeros(n_fin, np.int64)
    s_off = np.zeros(n_fin, np.int64)
    s_coef = np.zeros(n_fin, dtype)
    for e in range(n_b):
        r = h1 * b_taps[e, 0]
        c = h1 * b_taps[e, 1]
        off = ((r % s1) * s1 + c % s1) * hh * hh + (r // s1) * hh + c // s1
        for m in range(n_terms):
            s_term[e * n_terms + m] = m
            s_off[e * n_terms + m] = off
            s_coef[e * n_terms + m] = dtype.type(b_coef[e, m])
    n_pre = n_fin - 3
    n_a = a_taps.shape[0]
    tap_x = np.zeros(n_a, np.int64)
    tap_xb = np.zeros(n_a, np.int64)
    tap_c = np.zeros(n_a, dtype)
    rxf = np.zeros(n_acc, dtype)
    ixf = np.zeros(n_acc, dtype)
    ryt = np.zeros((q_0, n_acc), dtype)
    iyt = np.zeros((q_0, n_acc), dtype)
    tiled_b = -1
    ns_scale = c_relu * dtype.type(_INV_PI)  # relu_both's n·c_relu/π
    direct = so == 1 and ho == hh
    base = out_pad * ho + out_pad
    o_ph = np.empty(q_1, np.int64)
    o_ix = np.empty(q_1, np.int64)
    for i in range(q_1):
        o_ph[i] = (out_pad + i) % so
        o_ix[i] = (out_pad + i) // so
    ph_i0 = np.empty(so, np.int64)
    ph_k0 = np.empty(so, np.int64)
    ph_n = np.empty(so, np.int64)
    for pc in range(so):
        i0 = (pc - out_pad) % so
        ph_i0[pc] = i0
        ph_k0[pc] = (out_pad + i0) // so
        ph_n[pc] = max(0, (q_1 - i0 + so - 1) // so)
    pairs = so == 2 and ph_i0[0] == 0
    n_pair = ph_n[1] if so == 2 else 0
    uniform_b = n_terms == 1 and n_src == 3 and s_coef[0] == s_coef[1] and s_coef[1] == s_coef[2]
    tinf = vf if tin is None else tin.reshape((nb, v.shape[1], v.shape[2], slab_len))
    pair_off = np.empty(q_1, np.int64)
    for i in range(q_1):
        pair_off[i] = (o_ph[i] * so * ho + o_ix[i]) * ho + ph_k0[0]
    for bq in range(row_lo, min(row_hi, nb * q_0)):
        b = bq // q_0
        q0 = bq % q_0
        if act == 1:
            if b != tiled_b:
                for q0b in range(q_0):
                    for q1 in range(q_1):
                        dy = ryt[q0b, q1 * hh : q1 * hh + q_1]
                        di = iyt[q0b, q1 * hh : q1 * hh + q_1]
                        for i in range(q_1):
                            dy[i] = ry[b, q0b, i]
                            di[i] = iy[b, q0b, i]
                tiled_b = b
            for q1 in range(q_1):
                for i in range(q_1):
                    rxf[q1 * hh + i] = rx[b, q0, q1] * ns_scale
                    ixf[q1 * hh + i] = ix[b, q0, q1]
        for q0b in range(q_0):
            if not direct:  # see kron_conv
                oslab = outf[b, q0, q0b]
                tslab = toutf[b, q0, q0b]
                for i in range(0, out_len, line):
                    _prefetch_write(oslab, i)
                    _prefetch_write(tslab, i)
            fuse = _stage1(vf, b, q0, q0b, geom0, a_ptr, a_taps, ac, t, dbuf, tap_x, tap_xb, tap_c, uniform_b)
            if tin is not None and not fuse:
                _stage1(tinf, b, q0, q0b, geom0, a_ptr, a_taps, ac, tt, dbuf, tap_x, tap_xb, tap_c, False)
            if fuse:  # stage 1 inside the final pass, as in kron_conv
                cc = tap_c[0] * s_coef[0]
                if direct:
                    dst = outf[b, q0, q0b, base : base + n_acc]
                    dst_t = toutf[b, q0, q0b, base : base + n_acc]
                else:
                    dst = val
                    dst_t = val_t
                o0 = s_off[0]
                o1 = s_off[1]
                o2 = s_off[2]
                f0 = vf[b, tap_x[0], tap_xb[0]]
                f1 = vf[b, tap_x[1], tap_xb[1]]
                f2 = vf[b, tap_x[2], tap_xb[2]]
                x00 = f0[o0 : o0 + n_acc]
                x10 = f1[o0 : o0 + n_acc]
                x20 = f2[o0 : o0 + n_acc]
                x01 = f0[o1 : o1 + n_acc]
                x11 = f1[o1 : o1 + n_acc]
                x21 = f2[o1 : o1 + n_acc]
                x02 = f0[o2 : o2 + n_acc]
                x12 = f1[o2 : o2 + n_acc]
                x22 = f2[o2 : o2 + n_acc]
                syt = ryt[q0b]
                iyr = iyt[q0b]
                if tin is not None:
                    g0 = tinf[b, tap_x[0], tap_xb[0]]
                    g1 = tinf[b, tap_x[1], tap_xb[1]]
                    g2 = tinf[b, tap_x[2], tap_xb[2]]
                    y00 = g0[o0 : o0 + n_acc]
                    y10 = g1[o0 : o0 + n_acc]
                    y20 = g2[o0 : o0 + n_acc]
                    y01 = g0[o1 : o1 + n_acc]
                    y11 = g1[o1 : o1 + n_acc]
                    y21 = g2[o1 : o1 + n_acc]
                    y02 = g0[o2 : o2 + n_acc]
                    y12 = g1[o2 : o2 + n_acc]
                    y22 = g2[o2 : o2 + n_acc]
                    if act == 1:
                        for i in range(n_acc):
                            sv = cc * (((x00[i] + x10[i]) + x20[i]) + ((x01[i] + x11[i]) + x21[i]) + ((x02[i] + x12[i]) + x22[i]))
                            st = cc * (((y00[i] + y10[i]) + y20[i]) + ((y01[i] + y11[i]) + y21[i]) + ((y02[i] + y12[i]) + y22[i]))
                            kv = w * sv + bias
                            vv, dv = relu_both(kv, rxf[i] * syt[i], ixf[i] * iyr[i], c_lin, c_relu)
                            dst[i] = vv
                            dst_t[i] = ((w * st + oa * sv) + ob) * dv
                    else:
                        for i in range(n_acc):
                            sv = cc * (((x00[i] + x10[i]) + x20[i]) + ((x01[i] + x11[i]) + x21[i]) + ((x02[i] + x12[i]) + x22[i]))
                            st = cc * (((y00[i] + y10[i]) + y20[i]) + ((y01[i] + y11[i]) + y21[i]) + ((y02[i] + y12[i]) + y22[i]))
                            dst[i] = w * sv + bias
                            dst_t[i] = (w * st + oa * sv) + ob
                elif act == 1:
                    for i in range(n_acc):
                        sv = cc * (((x00[i] + x10[i]) + x20[i]) + ((x01[i] + x11[i]) + x21[i]) + ((x02[i] + x12[i]) + x22[i]))
                        kv = w * sv + bias
                        vv, dv = relu_both(kv, rxf[i] * syt[i], ixf[i] * iyr[i], c_lin, c_relu)
                        dst[i] = vv
                        dst_t[i] = (oa * sv + ob) * dv
                else:
                    for i in range(n_acc):
                        sv = cc * (((x00[i] + x10[i]) + x20[i]) + ((x01[i] + x11[i]) + x21[i]) + ((x02[i] + x12[i]) + x22[i]))
                        dst[i] = w * sv + bias
                        dst_t[i] = oa * sv + ob
            if not fuse:
                for e in range(n_pre):
                    coef = s_coef[e]
                    src = t[s_term[e], s_off[e] : s_off[e] + n_acc]
                    src_t = tt[s_term[e], s_off[e] : s_off[e] + n_acc]
                    if e == 0:
                        for i in range(n_acc):
                            acc[i] = coef * src[i]
                            acc_t[i] = coef * src_t[i]
                    else:
                        for i in range(n_acc):
                            acc[i] += coef * src[i]
                            acc_t[i] += coef * src_t[i]
                o0 = s_off[n_pre]
                o1 = s_off[n_pre + 1]
                o2 = s_off[n_pre + 2]
                u0 = t[s_term[n_pre], o0 : o0 + n_acc]
                u1 = t[s_term[n_pre + 1], o1 : o1 + n_acc]
                u2 = t[s_term[n_pre + 2], o2 : o2 + n_acc]
                w0 = tt[s_term[n_pre], o0 : o0 + n_acc]
                w1 = tt[s_term[n_pre + 1], o1 : o1 + n_acc]
                w2 = tt[s_term[n_pre + 2], o2 : o2 + n_acc]
                d0 = s_coef[n_pre]
                d1 = s_coef[n_pre + 1]
                d2 = s_coef[n_pre + 2]
                if direct:
                    dst = outf[b, q0, q0b, base : base + n_acc]
                    dst_t = toutf[b, q0, q0b, base : base + n_acc]
                else:
                    dst = val
                    dst_t = val_t
                if act == 1:
                    syt = ryt[q0b]
                    iyr = iyt[q0b]
                    if tin is not None:
                        for i in range(n_acc):
                            sv = ((acc[i] + d0 * u0[i]) + d1 * u1[i]) + d2 * u2[i]
                            st = ((acc_t[i] + d0 * w0[i]) + d1 * w1[i]) + d2 * w2[i]
                            kv = w * sv + bias
                            vv, dv = relu_both(kv, rxf[i] * syt[i], ixf[i] * iyr[i], c_lin, c_relu)
                            dst[i] = vv
                            dst_t[i] = ((w * st + oa * sv) + ob) * dv
                    else:
                        for i in range(n_acc):
                            sv = ((acc[i] + d0 * u0[i]) + d1 * u1[i]) + d2 * u2[i]
                            kv = w * sv + bias
                            vv, dv = relu_both(kv, rxf[i] * syt[i], ixf[i] * iyr[i], c_lin, c_relu)
                            dst[i] = vv
                            dst_t[i] = (oa * sv + ob) * dv
                else:
                    if tin is not None:
                        for i in range(n_acc):
                            sv = ((acc[i] + d0 * u0[i]) + d1 * u1[i]) + d2 * u2[i]
                            st = ((acc_t[i] + d0 * w0[i]) + d1 * w1[i]) + d2 * w2[i]
                            dst[i] = w * sv + bias
                            dst_t[i] = (w * st + oa * sv) + ob
                    else:
                        for i in range(n_acc):
                            sv = ((acc[i] + d0 * u0[i]) + d1 * u1[i]) + d2 * u2[i]
                            dst[i] = w * sv + bias
                            dst_t[i] = oa * sv + ob
            if direct:  # the junk of each row fell on the zero padding: restore it
                for q1 in range(q_1 - 1):
                    for i in range(q_1, hh):
                        dst[q1 * hh + i] = zero
                        dst_t[q1 * hh + i] = zero
                continue
            if pairs:  # stride 2, even padding (see kron_conv)
                oslab = outf[b, q0, q0b]
                tslab = toutf[b, q0, q0b]
                for q1 in range(q_1):
                    row = dst[q1 * hh : q1 * hh + q_1]
                    row_t = dst_t[q1 * hh : q1 * hh + q_1]
                    p0 = pair_off[q1]
                    p1 = p0 + ho * ho + ph_k0[1] - ph_k0[0]
                    dp0 = oslab[p0 : p0 + n_pair]
                    dp1 = oslab[p1 : p1 + n_pair]
                    for k in range(n_pair):
                        dp0[k] = row[2 * k]
                        dp1[k] = row[2 * k + 1]
                    dp0 = tslab[p0 : p0 + n_pair]
                    dp1 = tslab[p1 : p1 + n_pair]
                    for k in range(n_pair):
                        dp0[k] = row_t[2 * k]
                        dp1[k] = row_t[2 * k + 1]
                    if ph_n[0] > n_pair:
                        oslab[p0 + n_pair] = row[2 * n_pair]
                        tslab[p0 + n_pair] = row_t[2 * n_pair]
                continue
            for q1 in range(q_1):
                _scatter_row(out, outf, b, q0, q0b, q1, dst[q1 * hh : q1 * hh + q_1], out_pad,
                             o_ph, o_ix, ph_i0, ph_k0, ph_n, pair_off)
                _scatter_row(tout, toutf, b, q0, q0b, q1, dst_t[q1 * hh : q1 * hh + q_1], out_pad,
                             o_ph, o_ix, ph_i0, ph_k0, ph_n, pair_off)


@njit(nogil=True, **_FLAGS)
def input_layout(x1, x2t, out, pad, first_row, row_step):
    """V0[x, x'] = (1/C) Σ_c x1[x, c] x2[x', c] (docs/maths.md §2) straight into the layout
    (B, N0, N0, s, s, H, H) of the first conv. x1 (B, N0, N1, C) is pre-divided by C; x2t is
    x2 as (B, N0, C, N1)."""
    nb, n0, n1, nc = x1.shape
    s = out.shape[3]
    row = np.empty(n1, x1.dtype)
    for bx in range(first_row, nb * n0, row_step):
        b = bx // n0
        x0 = bx % n0
        for x0b in range(n0):
            for j in range(n1):
                r = pad + j
                dst = out[b, x0, x0b, 0, 0, r, pad : pad + n1] if s == 1 else row
                for c in range(nc):
                    a = x1[b, x0, j, c]
                    src = x2t[b, x0b, c]
                    if c == 0:
                        for i in range(n1):
                            dst[i] = a * src[i]
                    else:
                        for i in range(n1):
                            dst[i] += a * src[i]
                if s != 1:
                    for pc in range(s):
                        i0 = (pc - pad) % s
                        drow = out[b, x0, x0b, r % s, pc, r // s, (pad + i0) // s :]
                        for k in range((n1 - i0 + s - 1) // s):
                            drow[k] = row[i0 + s * k]


@njit(nogil=True, **_FLAGS)
def to_layout(v, out, pad, first_row, row_step):
    """Standard (B, N0, N1, N0, N1) → the layout (B, N0, N0, s, s, H, H) with padding ``pad``
    (the zero borders of ``out`` are left as they are)."""
    nb, n0, n1 = v.shape[0], v.shape[1], v.shape[2]
    s = out.shape[3]
    for bx in range(first_row, nb * n0, row_step):
        b = bx // n0
        x0 = bx % n0
        for x1 in range(n1):
            r = pad + x1
            for x0b in range(n0):
                src = v[b, x0, x1, x0b]
                for x1b in range(n1):
                    c = pad + x1b
                    out[b, x0, x0b, r % s, c % s, r // s, c // s] = src[x1b]


@njit(nogil=True, **_FLAGS)
def offset_sums(v, out, first_row, row_step):
    """out[b, x0, d0, d1] = Σ_{x1; x0' − x0 = d0 − (N0−1), x1' − x1 = d1 − (N1−1)} V in float64,
    from the plain paired layout v (B, N0, N0, 1, 1, N1, N1): the sums of a full tensor along
    each position offset δ = x' − x, one partial per x0 (summed by the caller). A readout with a
    stationary Σ is Σ_δ Σ(δ)·Σ_x0 out[.., δ]."""
    nb, n0, n1 = v.shape[0], v.shape[1], v.shape[5]
    for bx in range(first_row, nb * n0, row_step):
        b = bx // n0
        x0 = bx % n0
        part = out[b, x0]
        part[:, :] = 0
        for x0b in range(n0):
            for x1 in range(n1):
                row = v[b, x0, x0b, 0, 0, x1]
                dst = part[x0b - x0 + n0 - 1, n1 - 1 - x1 : 2 * n1 - 1 - x1]
                for x1b in range(n1):
                    dst[x1b] += np.float64(row[x1b])


@njit(nogil=True, **_FLAGS)
def conv_diagonal(v, out, geom0, geom1, sigma, wv, bv, first_row, row_step):
    """The diagonal K[q, q] = wv·Σ_{p,p'} Σ[p, p'] V[x(q, p), x(q, p')] + bv of a conv's output
    (what a nonlinearity after it needs as variances), read from v in the conv's layout.
    sigma (P0, P1, P0, P1); out (B, Q0, Q1) float64."""
    nb = v.shape[0]
    s = v.shape[3]
    n_in0, q_0, s0, h0, pad0, taps0 = geom0[0], geom0[1], geom0[2], geom0[3], geom0[4], geom0[5]
    q_1, s1, h1, taps1 = geom1[1], geom1[2], geom1[3], geom1[5]
    # padded axis-1 coordinate s1·q1 + h1·p1 → (phase, index) in the layout
    ph = np.empty((q_1, taps1), np.int64)
    ix = np.empty((q_1, taps1), np.int64)
    for q1 in range(q_1):
        for p1 in range(taps1):
            r = s1 * q1 + h1 * p1
            ph[q1, p1] = r % s
            ix[q1, p1] = r // s
    for bq in range(first_row, nb * q_0, row_step):
        b = bq // q_0
        q0 = bq % q_0
        for q1 in range(q_1):
            total = 0.0
            for p0 in range(taps0):
                x = s0 * q0 + h0 * p0 - pad0
                if x < 0 or x >= n_in0:
                    continue
                for p0b in range(taps0):
                    xb = s0 * q0 + h0 * p0b - pad0
                    if xb < 0 or xb >= n_in0:
                        continue
                    slab = v[b, x, xb]
                    for p1 in range(taps1):
                        for p1b in range(taps1):
                            total += sigma[p0, p1, p0b, p1b] * np.float64(
                                slab[ph[q1, p1], ph[q1, p1b], ix[q1, p1], ix[q1, p1b]]
                            )
            out[b, q0, q1] = wv * total + bv


@njit(nogil=True, **_FLAGS)
def relu_pointwise(k, vx, vy, out, c_lin, c_relu, first_row, row_step):
    """The ReLU-family expectation (relu_value) entry by entry, for the diagonal and band
    representations: k, vy, out (R, W); vx (R, W) or (R, 1) (one variance per row, broadcast
    over the band slots). n = sqrt(vx·vy), 1/n = 0 where n = 0."""
    zero = k.dtype.type(0.0)
    one = k.dtype.type(1.0)
    w = k.shape[1]
    per_row = vx.shape[1] == 1
    for r in range(first_row, k.shape[0], row_step):
        if per_row:
            sx = vx[r, 0]
            for j in range(w):
                n = math.sqrt(sx * vy[r, j])
                inv = one / n if n > zero else zero
                out[r, j] = relu_value(k[r, j], n, inv, c_lin, c_relu)
        else:
            for j in range(w):
                n = math.sqrt(vx[r, j] * vy[r, j])
                inv = one / n if n > zero else zero
                out[r, j] = relu_value(k[r, j], n, inv, c_lin, c_relu)

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
tap-offset profile. The nonlinearity that follows is applied to each output row while it is in
cache, and the row is written straight into the layout the next conv reads.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit
from numba.extending import overload

_FLAGS = dict(cache=True, error_model="numpy", fastmath={"contract", "nsz", "arcp"})
_INV_PI = 1.0 / math.pi

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


@njit(inline="always")
def _filter_slab(v, b, q0, q0b, geom0, a_ptr, a_taps, ac, bc, b_off, t, dbuf, acc, n_acc):
    """acc = the (q0, q0') output slab of Σ * v before the affine part (stages 1 and 2 of the
    module docstring), rows of length hh, for one input buffer v in the conv's layout."""
    n_in0, s0, h0, pad0 = geom0[0], geom0[2], geom0[3], geom0[4]
    slab_len = t.shape[1]
    n_terms = ac.shape[1]
    # stage 1: T_m = Σ A_m[p0, p0'] slab(x0(q0, p0), x0(q0', p0')), the taps in groups
    # sharing their coefficients (one tap each, or the diagonals p0 − p0' = δ of a
    # Toeplitz A_m): each group's slabs are summed into D, then T_m += coef·D
    t_init = False
    for g in range(a_ptr.shape[0] - 1):
        nd = 0
        for e in range(a_ptr[g], a_ptr[g + 1]):
            x = s0 * q0 + h0 * a_taps[e, 0] - pad0
            xb = s0 * q0b + h0 * a_taps[e, 1] - pad0
            if x < 0 or x >= n_in0 or xb < 0 or xb >= n_in0:
                continue  # zero padding
            src = v[b, x, xb].reshape(slab_len)
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
    # stage 2: every tap pair is one shifted add over the flattened phase block
    for e in range(b_off.shape[0]):
        off = b_off[e]
        for m in range(n_terms):
            coef = bc[e, m]
            src = t[m, off : off + n_acc]
            if e == 0 and m == 0:
                for i in range(n_acc):
                    acc[i] = coef * src[i]
            else:
                for i in range(n_acc):
                    acc[i] += coef * src[i]


@njit(nogil=True, **_FLAGS)
def _put_row(out, b, q0, q0b, q1, row, out_pad, o_ph, o_ix, ph_i0, ph_k0, ph_n, symmetric):
    """Write output row q1 of slab (q0, q0') (``row``, length Q1) into the next conv's layout
    (for stride 1 the caller wrote it in place already), and its mirror when symmetric."""
    so = out.shape[3]
    if so != 1:  # column phase pc holds the outputs i = ph_i0[pc] + so·k
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


@njit(nogil=True, **_FLAGS)
def kron_conv(
    v, out, geom0, geom1, out_pad, a_ptr, a_taps, a_coef, b_taps, b_coef,
    wv, bv, act, c_lin, c_relu, rx, ix, ry, iy, symmetric, row_lo, row_hi,
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
    """
    nb = v.shape[0]
    dtype = v.dtype
    n_in0, q_0, s0, h0, pad0 = geom0[0], geom0[1], geom0[2], geom0[3], geom0[4]
    q_1, s1, h1 = geom1[1], geom1[2], geom1[3]
    hh = v.shape[5]
    so = out.shape[3]
    slab_len = s1 * s1 * hh * hh
    n_terms = a_coef.shape[1]
    ac = a_coef.astype(dtype)
    bc = b_coef.astype(dtype)
    w = v.dtype.type(wv)  # wv, bv in the array dtype (no silent float64 promotion)
    bias = v.dtype.type(bv)
    t = np.zeros((n_terms, slab_len), dtype)
    dbuf = np.empty(slab_len, dtype)
    # stage 2 reads, per tap pair: the phase block and the shift inside it
    n_b = b_taps.shape[0]
    b_off = np.empty(n_b, np.int64)
    for e in range(n_b):
        r = h1 * b_taps[e, 0]
        c = h1 * b_taps[e, 1]
        b_off[e] = ((r % s1) * s1 + c % s1) * hh * hh + (r // s1) * hh + c // s1
    n_acc = (q_1 - 1) * hh + q_1  # rows of hh, the last one only q_1 long
    acc = np.empty(q_1 * hh, dtype)
    val = np.empty(q_1, dtype)
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
    for bq in range(row_lo, min(row_hi, nb * q_0)):
        b = bq // q_0
        q0 = bq % q_0
        start = q0 if symmetric else 0
        for q0b in range(start, q_0):
            # stage 1: T_m = Σ A_m[p0, p0'] slab(x0(q0, p0), x0(q0', p0')), the taps in groups
            # sharing their coefficients (one tap each, or the diagonals p0 − p0' = δ of a
            # Toeplitz A_m): each group's slabs are summed into D, then T_m += coef·D
            t_init = False
            for g in range(a_ptr.shape[0] - 1):
                nd = 0
                for e in range(a_ptr[g], a_ptr[g + 1]):
                    x = s0 * q0 + h0 * a_taps[e, 0] - pad0
                    xb = s0 * q0b + h0 * a_taps[e, 1] - pad0
                    if x < 0 or x >= n_in0 or xb < 0 or xb >= n_in0:
                        continue  # zero padding
                    src = v[b, x, xb].reshape(slab_len)
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
            # stage 2: every tap pair is one shifted add over the flattened phase block
            for e in range(n_b):
                off = b_off[e]
                for m in range(n_terms):
                    coef = bc[e, m]
                    src = t[m, off : off + n_acc]
                    if e == 0 and m == 0:
                        for i in range(n_acc):
                            acc[i] = coef * src[i]
                    else:
                        for i in range(n_acc):
                            acc[i] += coef * src[i]
            # the nonlinearity, row by row, written into the next conv's layout
            for q1 in range(q_1):
                row = acc[q1 * hh : q1 * hh + q_1]
                if so == 1:
                    dst = out[b, q0, q0b, 0, 0, out_pad + q1, out_pad : out_pad + q_1]
                else:
                    dst = val
                if act == 1:
                    sx = rx[b, q0, q1]
                    isx = ix[b, q0, q1]
                    syr = ry[b, q0b]
                    isy = iy[b, q0b]
                    for i in range(q_1):
                        dst[i] = relu_value(w * row[i] + bias, sx * syr[i], isx * isy[i], c_lin, c_relu)
                else:
                    for i in range(q_1):
                        dst[i] = w * row[i] + bias
                if so != 1:  # column phase pc holds the outputs i = ph_i0[pc] + so·k
                    for pc in range(so):
                        drow = out[b, q0, q0b, o_ph[q1], pc, o_ix[q1], ph_k0[pc] :]
                        src = dst[ph_i0[pc] :]
                        if so == 2:  # a constant stride vectorises
                            for k in range(ph_n[pc]):
                                drow[k] = src[2 * k]
                        else:
                            for k in range(ph_n[pc]):
                                drow[k] = src[so * k]
                if symmetric and q0b != q0:  # slab (q0', q0) holds the transpose: a column
                    for pr in range(so):
                        dcol = out[b, q0b, q0, pr, o_ph[q1], ph_k0[pr] :, o_ix[q1]]
                        src = dst[ph_i0[pr] :]
                        for k in range(ph_n[pr]):
                            dcol[k] = src[so * k]


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
    prunes the branch). A separate kernel from :func:`kron_conv`, whose loops it shares
    through :func:`_filter_slab` and :func:`_put_row`: with those helpers or a mode flag the
    NNGP-only conv ran ~30% slower (CNNGP-14, float32).
    """
    nb = v.shape[0]
    dtype = v.dtype
    q_0 = geom0[1]
    q_1, s1, h1 = geom1[1], geom1[2], geom1[3]
    hh = v.shape[5]
    so = out.shape[3]
    slab_len = s1 * s1 * hh * hh
    n_terms = a_coef.shape[1]
    ac = a_coef.astype(dtype)
    bc = b_coef.astype(dtype)
    w = v.dtype.type(wv)  # wv, bv in the array dtype (no silent float64 promotion)
    bias = v.dtype.type(bv)
    t = np.zeros((n_terms, slab_len), dtype)
    dbuf = np.empty(slab_len, dtype)
    # stage 2 reads, per tap pair: the phase block and the shift inside it
    n_b = b_taps.shape[0]
    b_off = np.empty(n_b, np.int64)
    for e in range(n_b):
        r = h1 * b_taps[e, 0]
        c = h1 * b_taps[e, 1]
        b_off[e] = ((r % s1) * s1 + c % s1) * hh * hh + (r // s1) * hh + c // s1
    n_acc = (q_1 - 1) * hh + q_1  # rows of hh, the last one only q_1 long
    acc = np.empty(q_1 * hh, dtype)
    acc_t = np.zeros(q_1 * hh, dtype)
    val = np.empty(q_1, dtype)
    val_t = np.empty(q_1, dtype)
    oa = v.dtype.type(own_a)  # the layer's own parameters' term oa·(Σ * V) + ob
    ob = v.dtype.type(own_b)
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
    for bq in range(row_lo, min(row_hi, nb * q_0)):
        b = bq // q_0
        q0 = bq % q_0
        for q0b in range(q_0):
            _filter_slab(v, b, q0, q0b, geom0, a_ptr, a_taps, ac, bc, b_off, t, dbuf, acc, n_acc)
            if tin is not None:
                _filter_slab(tin, b, q0, q0b, geom0, a_ptr, a_taps, ac, bc, b_off, t, dbuf, acc_t, n_acc)
            # the nonlinearity, row by row, written into the next conv's layout
            for q1 in range(q_1):
                row = acc[q1 * hh : q1 * hh + q_1]
                if so == 1:
                    dst = out[b, q0, q0b, 0, 0, out_pad + q1, out_pad : out_pad + q_1]
                else:
                    dst = val
                row_t = acc_t[q1 * hh : q1 * hh + q_1]
                if so == 1:
                    dst_t = tout[b, q0, q0b, 0, 0, out_pad + q1, out_pad : out_pad + q_1]
                else:
                    dst_t = val_t
                if act == 1:
                    sx = rx[b, q0, q1]
                    isx = ix[b, q0, q1]
                    syr = ry[b, q0b]
                    isy = iy[b, q0b]
                    for i in range(q_1):
                        k = w * row[i] + bias
                        n = sx * syr[i]
                        inv_n = isx * isy[i]
                        dst[i] = relu_value(k, n, inv_n, c_lin, c_relu)
                        dst_t[i] = (w * row_t[i] + oa * row[i] + ob) * relu_derivative(k, inv_n, c_lin, c_relu)
                else:
                    for i in range(q_1):
                        k = w * row[i] + bias
                        dst[i] = k
                        dst_t[i] = w * row_t[i] + oa * row[i] + ob
                _put_row(tout, b, q0, q0b, q1, dst_t, out_pad, o_ph, o_ix, ph_i0, ph_k0, ph_n, False)
                _put_row(out, b, q0, q0b, q1, dst, out_pad, o_ph, o_ix, ph_i0, ph_k0, ph_n, False)


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

"""Triton kernels behind :mod:`cnngp.engine.gpu` (imported lazily: ``import cnngp`` never
imports triton). Whether they compile for the GPU or run under Triton's interpreter
(``TRITON_INTERPRET=1``, numpy on the CPU) is fixed when this module is first imported.

**Layout.** A full position-pair tensor on a 2-D grid (a 1-D grid is the grid (n, 1)) is the
plain contiguous (B, N0, N1, N0, N1) tensor V[b, x0, x1, x0', x1'].

**Conv** (docs/maths.md §2 (*)): each program computes BLOCK consecutive entries
(b, q0, q1, q0', q1') of the output,

    K[q, q'] = wv · Σ_e Σ[p_e, p'_e] · V[x(q, p_e), x(q', p'_e)] + bv,
    x_k(q, p) = s_k·q_k + h_k·p_k − pad_k,

looping over the non-zero tap pairs e of Σ (a table (4, E) of the dilated tap offsets
(h0·p0, h1·p1, h0·p0', h1·p1') and their coefficients), TAPS of them per step: an independent 3×3 conv visits 9 pairs, a 2×2 average pool 16, a correlated
3×3 filter 81. Reads outside the grid are masked (the zero padding); stride and dilation are
index arithmetic, so nothing is copied or shifted in memory. The ReLU-family nonlinearity
that follows (``ACT``) is applied to the block in registers before it is stored:

    c_lin·K + c_relu·(max(K, 0) + n·g(|ρ|)/π),  n = √(Σx Σy),  ρ = K/n,
    g(a) = √(1 − a²) − a·arccos(a)

(docs/maths.md §2, the balanced-ReLU form of :func:`cnngp.engine.fused_kernels.relu_value`),
with g(1 − t) = t·√t·G(2t − 1) evaluated by the polynomial G of that module (exact to the
dtype's rounding; no arccos is needed, which not every Triton backend offers in float64).

**NTK** (``NTK``, docs/maths.md §7): Θ travels beside K through the same stencil,

    Θ_out = (wv·(Σ * Θ_in) + own_a·(Σ * V) + own_b) · V̇,   V̇ = c_lin + c_relu·(1 − θ/π),

θ = arccos(ρ) = √t·H(2t − 1) for |ρ| = 1 − t (π − that for ρ < 0), the order of
:func:`cnngp.engine.fused_kernels.kron_conv_ntk`; V̇ = 1 without a nonlinearity.

Every floating-point constant (weight and bias variances, the polynomials, π) comes in a
small tensor of the data's dtype, so float64 runs in float64 throughout (a Python float
argument of a Triton kernel is passed as float32).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: indices into the parameter tensor ``par`` (in the data's dtype)
P_WV, P_BV, P_CLIN, P_CRELU, P_OWN_A, P_OWN_B, P_PI, P_INV_PI, P_SNAP = range(9)
N_PAR = 9


@triton.jit
def _horner(x, poly_ptr, N: tl.constexpr):
    """Σ_k c_k x^(N−1−k), coefficients highest degree first (as _G64/_H64 of fused_kernels)."""
    p = tl.load(poly_ptr) + 0.0 * x
    for k in tl.static_range(1, N):
        p = p * x + tl.load(poly_ptr + k)
    return p


@triton.jit
def conv_act_kernel(
    v_ptr, t_ptr, out_ptr, tout_ptr,
    taps_ptr, coef_ptr, n_taps,
    rx_ptr, ix_ptr, ry_ptr, iy_ptr,
    par_ptr, g_ptr, h_ptr,
    n_pairs, n0, n1, q0, q1,
    s0, s1, pad0, pad1,
    ACT: tl.constexpr, NTK: tl.constexpr, NG: tl.constexpr, NH: tl.constexpr,
    BLOCK: tl.constexpr, TAPS: tl.constexpr,
):
    """One full → full conv (then an optional ReLU-family act) for BLOCK consecutive entries
    of the flattened output (B, Q0, Q1, Q0, Q1) (a block may span pairs); see the module
    docstring. v, t (Θ_in): (B, N0, N1, N0, N1);
    out, tout: (B, Q0, Q1, Q0, Q1); rx, ix, ry, iy: (B, Q0, Q1) = √var, 1/√var (0 where
    var = 0) of each side's conv-output variances."""
    pid = tl.program_id(0).to(tl.int64)
    flat = pid * BLOCK + tl.arange(0, BLOCK)  # over all pairs: (b, q0, q1, q0', q1'), int64
    total = q0 * q1 * q0 * q1
    valid = flat < n_pairs * total
    b = flat // total
    offs = (flat - b * total).to(tl.int32)
    # the output entry [c0, c1, r0, r1] = K[(q0, q1), (q0', q1')] of this lane
    r1 = offs % q1
    rest = offs // q1
    r0 = rest % q0
    rest = rest // q0
    c1 = rest % q1
    c0 = rest // q1
    # x(q, 0): the input position of tap 0 (docs/maths.md §2: s·q + h·p − pad)
    x0 = s0 * c0 - pad0
    x1 = s1 * c1 - pad1
    y0 = s0 * r0 - pad0
    y1 = s1 * r1 - pad1
    in_base = b * (n0 * n1 * n0 * n1)
    dtype = v_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK], dtype=dtype)
    acc_t = tl.zeros([BLOCK], dtype=dtype)
    # Σ * V (and Σ * Θ): a masked gather per non-zero tap pair of Σ, TAPS pairs at a time
    # (a [BLOCK, TAPS] tile summed over its taps; TAPS = 1 is the plain loop)
    x0 = x0[:, None]
    x1 = x1[:, None]
    y0 = y0[:, None]
    y1 = y1[:, None]
    ok = valid[:, None]
    base = in_base[:, None]
    for e0 in range(0, n_taps, TAPS):
        e = e0 + tl.arange(0, TAPS)
        e_ok = e < n_taps
        # the table (4, E) holds h·p, the dilated tap offsets (h0·p0, h1·p1, h0·p0', h1·p1')
        i0 = x0 + tl.load(taps_ptr + e, mask=e_ok, other=0)[None, :]
        i1 = x1 + tl.load(taps_ptr + n_taps + e, mask=e_ok, other=0)[None, :]
        j0 = y0 + tl.load(taps_ptr + 2 * n_taps + e, mask=e_ok, other=0)[None, :]
        j1 = y1 + tl.load(taps_ptr + 3 * n_taps + e, mask=e_ok, other=0)[None, :]
        coef = tl.load(coef_ptr + e, mask=e_ok, other=0.0)[None, :]
        inside = ok & e_ok[None, :] & (i0 >= 0) & (i0 < n0) & (i1 >= 0) & (i1 < n1)
        inside = inside & (j0 >= 0) & (j0 < n0) & (j1 >= 0) & (j1 < n1)
        idx = base + (((i0 * n1 + i1) * n0 + j0) * n1 + j1).to(tl.int64)
        acc += tl.sum(coef * tl.load(v_ptr + idx, mask=inside, other=0.0), axis=1)
        if NTK:
            acc_t += tl.sum(coef * tl.load(t_ptr + idx, mask=inside, other=0.0), axis=1)
    wv = tl.load(par_ptr + 0)
    bv = tl.load(par_ptr + 1)
    k = wv * acc + bv  # docs/maths.md §2 (*)
    val = k
    if ACT or NTK:
        c_lin = tl.load(par_ptr + 2)
        c_relu = tl.load(par_ptr + 3)
        pi = tl.load(par_ptr + 6)
        inv_pi = tl.load(par_ptr + 7)
    if ACT:
        qb = b * (q0 * q1)
        sx = tl.load(rx_ptr + qb + c0 * q1 + c1, mask=valid, other=0.0)
        isx = tl.load(ix_ptr + qb + c0 * q1 + c1, mask=valid, other=0.0)
        sy = tl.load(ry_ptr + qb + r0 * q1 + r1, mask=valid, other=0.0)
        isy = tl.load(iy_ptr + qb + r0 * q1 + r1, mask=valid, other=0.0)
        n = sx * sy
        inv_n = isx * isy
        rho = k * inv_n
        # balanced-ReLU form (docs/maths.md §2): g(|ρ|) = t^(3/2)·G(2t − 1), t = 1 − |ρ|
        t = 1.0 - tl.minimum(tl.abs(rho), 1.0)
        g = t * tl.sqrt(t) * _horner(t + t - 1.0, g_ptr, NG)
        val = c_lin * k + c_relu * (tl.maximum(k, 0.0) + n * g * inv_pi)
    tl.store(out_ptr + flat, val, mask=valid)
    if NTK:
        own_a = tl.load(par_ptr + 4)
        own_b = tl.load(par_ptr + 5)
        theta_out = wv * acc_t + own_a * acc + own_b  # docs/maths.md §7
        if ACT:
            # V̇ = c_lin + c_relu·(1 − θ/π), θ = arccos(ρ); 1 − |ρ| within 8ε of 0 counts as 0
            # (an image with itself), as the CPU kernels
            snap = tl.load(par_ptr + 8)
            tt = tl.where(t < snap, 0.0, t)
            theta = tl.sqrt(tt) * _horner(tt + tt - 1.0, h_ptr, NH)
            theta = tl.where(rho < 0.0, pi - theta, theta)
            theta_out = theta_out * (c_lin + c_relu * (1.0 - theta * inv_pi))
        tl.store(tout_ptr + flat, theta_out, mask=valid)

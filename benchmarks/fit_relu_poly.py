"""Derive the polynomial used by cnngp.engine.fused for the ReLU expectation (PAPER.md §2).

With ρ = Σxy/sqrt(ΣxΣy), the balanced-ReLU expectation is

    V = max(Σxy, 0) + sqrt(ΣxΣy) · g(|ρ|) / π,     g(a) = sqrt(1 − a²) − a·arccos(a),

(for ρ ≥ 0 this is sqrt(ΣxΣy)·(ρ + g(ρ)/π); for ρ < 0, g(−ρ) = g(ρ) + πρ gives g(|ρ|)/π).
g(a) = ∫_a^1 arccos(s) ds behaves like t^{3/2} at t = 1 − a → 0 and is analytic elsewhere on
the disc |t| < 2, so g(1 − t) = t·sqrt(t)·G(t) with G analytic there; G is interpolated at
Chebyshev points of x = 2t − 1 ∈ [−1, 1] in 60-digit arithmetic and written in monomials of x
(highest degree first, for Horner).

The NTK's derivative expectation (docs/maths.md §7) needs θ = arccos(ρ) itself. arccos(1 − t)
= sqrt(t)·H(t) with H analytic on the same disc (H(0) = √2), so H is fitted the same way; for
ρ < 0, arccos(ρ) = π − arccos(|ρ|). Run this to print the coefficient tables.
"""

from __future__ import annotations

import mpmath as mp
import numpy as np

mp.mp.dps = 60


def G(t):
    a = 1 - t
    return (mp.sqrt(1 - a * a) - a * mp.acos(a)) / (t * mp.sqrt(t))


def H(t):
    return mp.acos(1 - t) / mp.sqrt(t)


def fit(degree, f=G):
    n = degree + 1
    nodes = [mp.cos(mp.pi * (k + mp.mpf(1) / 2) / n) for k in range(n)]
    vals = [f((x + 1) / 2) for x in nodes]
    # Chebyshev coefficients, then monomials of x
    cheb = []
    for j in range(n):
        s = sum(v * mp.cos(j * mp.pi * (k + mp.mpf(1) / 2) / n) for k, v in enumerate(vals))
        cheb.append(s * (1 if j == 0 else 2) / n)
    mono = [mp.mpf(0)] * n
    tk_prev, tk = [mp.mpf(1)], [mp.mpf(0), mp.mpf(1)]  # T0, T1 as monomial lists
    polys = [tk_prev, tk]
    for j in range(2, n):
        nxt = [mp.mpf(0)] * (j + 1)
        for i, c in enumerate(polys[-1]):
            nxt[i + 1] += 2 * c
        for i, c in enumerate(polys[-2]):
            nxt[i] -= c
        polys.append(nxt)
    for j, c in enumerate(cheb):
        for i, pc in enumerate(polys[j]):
            mono[i] += c * pc
    return [float(c) for c in reversed(mono)]


def horner(coefs, x, dtype):
    x = np.asarray(x, dtype)
    acc = np.full_like(x, coefs[0])
    for c in coefs[1:]:
        acc = acc * x + dtype(c)
    return acc


LIMITS = {G: 2 * mp.sqrt(2) / 3, H: mp.sqrt(2)}  # the values at t = 0 (x = −1)


def max_error(coefs, dtype, m=4001, f=G):
    xs = np.linspace(-1, 1, m)
    approx = horner(coefs, xs, dtype)
    exact = np.array([float(f((mp.mpf(float(x)) + 1) / 2)) if x > -1 else float(LIMITS[f]) for x in xs])
    return float(np.max(np.abs(approx.astype(np.float64) - exact)))


if __name__ == "__main__":
    for f in (G, H):
        for dtype, degrees in ((np.float64, range(12, 21)), (np.float32, range(5, 11))):
            for d in degrees:
                c = fit(d, f)
                print(f.__name__, dtype.__name__, d, f"max |error| {max_error(c, dtype, f=f):.2e}")
    for name, f, d in (("_G64", G, 16), ("_G32", G, 7), ("_H64", H, 18), ("_H32", H, 7)):
        print(f"{name} = (")
        for c in fit(d, f):
            print(f"    {c!r},")
        print(")")

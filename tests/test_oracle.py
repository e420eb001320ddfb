"""Checks of the brute-force oracle (tests/oracle.py) against things independent of it:
neural-tangents reference kernels, the arc-cosine MLP closed form, numerical integration of
each nonlinearity's Gaussian expectation, and Monte Carlo over finite random networks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, special

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import brute_force_hidden, brute_force_kernel, correlation_matrix  # noqa: E402
from reference_cases import BODIES  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "reference"  # committed (tests/reference/README.md)

RELU = {"type": "relu"}

# The networks of tests/reference/cases.json (tests/reference_cases.py), with how many images
# the loops can afford.
REFERENCE_BODIES = {name: (n, BODIES[name]) for name, n in
                    (("conv1d_digits", 5), ("conv3d_random", 2), ("mixed_mnist", 2))}


def _reference_cases():
    cases = []
    for name in REFERENCE_BODIES:
        if name != "mixed_mnist":  # its flatten readout adds nothing but run time
            cases.append(pytest.param(name, "kernel_flatten", None, id=f"{name}-flatten"))
        cases.append(pytest.param(name, "kernel_gap", None, id=f"{name}-gap"))
        cases.append(pytest.param(name, "kernel_matern32", 0, id=f"{name}-matern32[0]"))
    cases.append(pytest.param("conv1d_digits", "kernel_matern32", 1, id="conv1d_digits-matern32[1]"))
    return cases


@pytest.mark.parametrize("case, key, index", _reference_cases())
def test_against_neural_tangents(case, key, index):
    path = REFERENCE / f"{case}.npz"
    n, body = REFERENCE_BODIES[case]
    data = np.load(path)
    x = data["x"][:n]
    if key == "kernel_flatten":
        head = [{"type": "flatten"}, {"type": "readout", "weight_var": 1.0}]
        expected = data[key]
    elif key == "kernel_gap":
        head = [{"type": "global_avg_pool"}, {"type": "readout", "weight_var": 1.0}]
        expected = data[key]
    else:
        lam = float(data["lengthscales"][index])
        head = [{"type": "readout", "correlation": {"type": "matern", "nu": 1.5, "lengthscale": lam}}]
        expected = data[key][index]
    expected = expected[:n, :n]
    spec = {"input_channels": x.shape[-1], "layers": body + head}
    got = brute_force_kernel(spec, x)
    assert got.shape == (n, n)
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel < 1e-9, f"{case} {key}: relative error {rel:.3g}"


def test_reference_specs_match_cases_json():
    path = REFERENCE / "cases.json"
    names = {c["case"] for c in json.loads(path.read_text())}
    assert set(REFERENCE_BODIES) <= names


# --------------------------------------------------------------------------------------------
# 1x1 images: the network is an MLP, and the kernel is the arc-cosine recursion
# --------------------------------------------------------------------------------------------


def _arccos_mlp(x, y, layers, readout):
    """Cho & Saul degree-1 arc-cosine recursion, written in its angular form."""
    kxx, kyy, kxy = x @ x / len(x), y @ y / len(y), x @ y / len(x)
    for wv, bv in layers:
        kxx, kyy, kxy = wv * kxx + bv, wv * kyy + bv, wv * kxy + bv
        theta = math.acos(max(-1.0, min(1.0, kxy / math.sqrt(kxx * kyy))))
        j1 = math.sin(theta) + (math.pi - theta) * math.cos(theta)
        # 2 * E[relu relu] = (1/pi) sqrt(kxx kyy) J1(theta); the variances pass unchanged
        kxy = math.sqrt(kxx * kyy) * j1 / math.pi
    return readout[0] * kxy + readout[1]


def test_1x1_images_give_arccos_mlp():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 1, 4))
    mlp = [(1.5, 0.1), (0.8, 0.2), (2.0, 0.0)]
    readout = (1.3, 0.05)
    # On a 1x1 image only the centre tap of a SAME filter reads data: weight_var * Sigma[c, c].
    matern = {"type": "matern", "nu": 2.5, "lengthscale": 0.7}
    centre = correlation_matrix(matern, (3, 3))[4, 4]
    spec = {
        "input_channels": 4,
        "layers": [
            {"type": "conv", "filter": 3, "weight_var": mlp[0][0] * 9, "bias_var": mlp[0][1]},
            RELU,
            {"type": "conv", "filter": 1, "weight_var": mlp[1][0], "bias_var": mlp[1][1]},
            RELU,
            {"type": "conv", "filter": [3, 3], "dilation": 2, "correlation": matern,
             "weight_var": mlp[2][0] / centre, "bias_var": mlp[2][1]},
            RELU,
            {"type": "readout", "weight_var": readout[0], "bias_var": readout[1]},
        ],
    }
    got = brute_force_kernel(spec, x)
    flat = x.reshape(3, 4)
    expected = np.array([[_arccos_mlp(a, b, mlp, readout) for b in flat] for a in flat])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Nonlinearities against numerical integration of E[phi(u) phi(v)]
# --------------------------------------------------------------------------------------------


def _phi(layer):
    kind = layer["type"]
    if kind == "relu":
        return lambda t: math.sqrt(2.0) * max(t, 0.0)
    if kind == "abrelu":
        return lambda t: layer["a"] * min(t, 0.0) + layer["b"] * max(t, 0.0)
    if kind == "erf":
        return lambda t: layer["a"] * math.erf(layer["b"] * t) + layer["c"]
    return lambda t: t


def _gaussian_expectation(f, sx, sy, c):
    """E[f(u) g(v)] by quadrature, split into quadrants (the kinks lie on the axes)."""
    det = sx * sy - c * c
    norm = 1.0 / (2.0 * math.pi * math.sqrt(det))

    def integrand(v, u):
        q = (sy * u * u - 2.0 * c * u * v + sx * v * v) / det
        return f(u) * f(v) * norm * math.exp(-0.5 * q)

    total = 0.0
    for ua, ub in ((-np.inf, 0.0), (0.0, np.inf)):
        for va, vb in ((-np.inf, 0.0), (0.0, np.inf)):
            val, _ = integrate.dblquad(integrand, ua, ub, va, vb, epsabs=1e-11, epsrel=1e-9)
            total += val
    return total


def _inputs_with_covariance(sx, sy, c):
    """Two 1x1, 2-channel images whose input kernel V0 = x.x'/2 is [[sx, c], [c, sy]]."""
    cos = c / math.sqrt(sx * sy)
    x = math.sqrt(2 * sx) * np.array([1.0, 0.0])
    y = math.sqrt(2 * sy) * np.array([cos, math.sqrt(1 - cos * cos)])
    return np.stack([x, y]).reshape(2, 1, 1, 2)


@pytest.mark.parametrize(
    "layer",
    [
        {"type": "relu"},
        {"type": "abrelu", "a": -0.3, "b": 1.7},
        {"type": "abrelu", "a": 0.1, "b": 1.0},
        {"type": "erf", "a": 1.4, "b": 0.6, "c": 0.25},
        {"type": "identity"},
    ],
    ids=lambda layer: "-".join(str(v) for v in layer.values()),
)
@pytest.mark.parametrize("sx, sy, c", [(1.0, 1.0, 0.3), (0.7, 2.2, -0.9), (1.3, 0.4, 0.7)])
def test_nonlinearity_matches_quadrature(layer, sx, sy, c):
    x = _inputs_with_covariance(sx, sy, c)
    spec = {"layers": [{"type": "conv", "filter": 1}, layer, {"type": "readout"}]}
    hidden = brute_force_hidden(spec, x).reshape(2, 2)
    f = _phi(layer)
    cov = np.array([[sx, c], [c, sy]])
    for i in range(2):
        for j in range(2):
            if i == j:  # E[f(u)^2]: a 1-D integral
                s = cov[i, i]
                expected, _ = integrate.quad(
                    lambda u: f(u) ** 2 * math.exp(-u * u / (2 * s)) / math.sqrt(2 * math.pi * s),
                    -np.inf, np.inf, epsabs=1e-13, epsrel=1e-11,
                )
            else:
                expected = _gaussian_expectation(f, cov[i, i], cov[j, j], cov[i, j])
            assert hidden[i, j] == pytest.approx(expected, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize(
    "layer, expected",
    [({"type": "relu"}, 0.0), ({"type": "abrelu", "a": 0.2, "b": 1.0}, 0.0),
     ({"type": "erf", "a": 1.0, "b": 1.0, "c": 0.3}, 0.09)],
)
def test_zero_variance_positions_give_finite_values(layer, expected):
    x = np.zeros((2, 1, 3, 1))
    x[1, 0, 1, 0] = 1.0  # image 0 is blank; image 1 has one bright pixel
    spec = {"layers": [{"type": "conv", "filter": [1, 1]}, layer, {"type": "readout"}]}
    hidden = brute_force_hidden(spec, x)
    assert np.all(np.isfinite(hidden))
    np.testing.assert_allclose(hidden[0, 0], expected, atol=0)
    np.testing.assert_allclose(hidden[0, 1], expected, atol=0)


# --------------------------------------------------------------------------------------------
# Monte Carlo over finite networks with one nonlinearity. With a single nonlinearity every
# second moment is exact at any width (the pre-activations are exactly Gaussian, the layers
# after it are linear), so one channel per layer and many samples suffice.
# --------------------------------------------------------------------------------------------


def _sqrt_psd(m):
    w, v = np.linalg.eigh(m)
    return v * np.sqrt(np.clip(w, 0, None))


def _finite_conv(h, weights, bias, filt, stride, dilation, padding):
    """h: (M, *grid, C) samples; weights: (M, |P|, C) taps row-major; -> (M, *out, 1).

    Written as pad-then-slice (np.pad), independent of the oracle's index arithmetic."""
    grid = h.shape[1:-1]
    pads, outs = [(0, 0)], []
    for n, P, s, d in zip(grid, filt, stride, dilation):
        e = (P - 1) * d + 1
        if padding == "valid":
            out, total = (n - e) // s + 1, 0
        else:
            out = math.ceil(n / s)
            total = max((out - 1) * s + e - n, 0)
        pads.append((total // 2, total - total // 2))
        outs.append(out)
    pads.append((0, 0))
    hp = np.pad(h, pads, mode="wrap" if padding == "circular" else "constant")
    z = np.zeros((h.shape[0], *outs))
    for t, p in enumerate(np.ndindex(*filt)):
        sl = tuple(slice(d * pi, d * pi + s * (o - 1) + 1, s) for pi, s, d, o in zip(p, stride, dilation, outs))
        z += np.einsum("m...c,mc->m...", hp[(slice(None),) + sl], weights[:, t, :])
    return (z + bias.reshape((-1,) + (1,) * len(outs)))[..., None]


def _sample_layer(rng, m, layer, grid_ndim, channels):
    """Draw weights (m, |P|, C) with covariance weight_var * Sigma / C per input channel."""
    kind = layer["type"]
    filt = layer["filter"] if kind == "conv" else layer["window"]
    filt = tuple(filt) if isinstance(filt, list) else (filt,) * grid_ndim
    corr = layer.get("correlation") if kind == "conv" else {"type": "constant"}
    sigma = correlation_matrix(corr, filt)
    wv = layer.get("weight_var", 1.0) if kind == "conv" else 1.0
    bv = layer.get("bias_var", 0.0) if kind == "conv" else 0.0
    if kind == "avgpool":  # fixed averaging weights (one channel here), not random
        assert channels == 1
        w = np.full((m, len(sigma), 1), 1.0 / len(sigma))
    else:
        root = _sqrt_psd(wv * sigma / channels)
        w = np.einsum("pk,mkc->mpc", root, rng.standard_normal((m, len(sigma), channels)))
    b = math.sqrt(bv) * rng.standard_normal(m)

    def per_dim(key, default):
        v = layer.get(key, default)
        return tuple(v) if isinstance(v, list) else (v,) * grid_ndim

    stride = per_dim("stride", 1 if kind == "conv" else layer["window"])
    dilation = per_dim("dilation", 1)
    padding = layer.get("padding", "same" if kind == "conv" else "valid")
    return lambda h: _finite_conv(h, w, b, filt, stride, dilation, padding)


NONLIN = {
    "relu": lambda z, l: math.sqrt(2) * np.maximum(z, 0),
    "abrelu": lambda z, l: l["a"] * np.minimum(z, 0) + l["b"] * np.maximum(z, 0),
    "erf": lambda z, l: l.get("a", 1) * special.erf(l.get("b", 1) * z) + l.get("c", 0),
}


def _mean_and_se(a, b, m):
    """a: (n, m, A), b: (n, m, B) samples -> mean over m of a[i, :, p] b[j, :, q] and its s.e."""
    mean = np.einsum("ima,jmb->ijab", a, b) / m
    second = np.einsum("ima,jmb->ijab", a * a, b * b) / m
    return mean, np.sqrt(np.clip(second - mean**2, 0, None) / m)


def _monte_carlo(spec, x, m, seed):
    """Sample finite networks; returns ((mean, s.e.) of f(x_i) f(x_j), (mean, s.e.) of the
    activations' products right after the nonlinearity, shape (n, n, |F|, |F|))."""
    rng = np.random.default_rng(seed)
    ndim = x.ndim - 2
    n = x.shape[0]
    h = np.repeat(x, m, axis=0)  # (n*m, *grid, C): image i occupies rows i*m .. (i+1)*m
    for layer in spec["layers"]:
        kind = layer["type"]
        if kind in ("conv", "avgpool"):
            apply = _sample_layer(rng, m, layer, ndim, h.shape[-1])
            h = np.concatenate([apply(h[i * m:(i + 1) * m]) for i in range(n)])
        elif kind in NONLIN:
            h = NONLIN[kind](h, layer)
            act = h.reshape(n, m, -1)
            hidden = _mean_and_se(act, act, m)
        elif kind == "global_avg_pool":
            h = h.reshape(n * m, -1, h.shape[-1]).mean(axis=1)
            ndim = 0
        elif kind == "readout":
            grid = h.shape[1:-1]
            sigma = correlation_matrix(layer.get("correlation"), grid)
            root = _sqrt_psd(layer.get("weight_var", 1.0) * sigma)
            w = rng.standard_normal((m, len(sigma))) @ root.T
            b = math.sqrt(layer.get("bias_var", 0.0)) * rng.standard_normal(m)
            flat = h.reshape(n, m, -1)
            f = np.einsum("nmp,mp->nm", flat, w) + b
        else:
            raise AssertionError(kind)
    mean, se = _mean_and_se(f[..., None], f[..., None], m)
    return (mean[..., 0, 0], se[..., 0, 0]), hidden


MC_SPECS = {
    "1d-dilated-circular-correlated": (
        (3, 9, 2),
        [
            {"type": "conv", "filter": 3, "dilation": 2, "padding": "circular", "weight_var": 1.7,
             "bias_var": 0.3, "correlation": {"type": "matern", "nu": 1.5, "lengthscale": 1.3}},
            {"type": "relu"},
            {"type": "conv", "filter": 2, "stride": 2, "padding": "same", "weight_var": 0.9,
             "correlation": {"type": "rbf", "lengthscale": 0.8}},
            {"type": "avgpool", "window": 2, "stride": 1, "padding": "same"},
            {"type": "readout", "weight_var": 1.2, "bias_var": 0.1,
             "correlation": {"type": "matern", "nu": 0.5, "lengthscale": 2.0}},
        ],
    ),
    "2d-strided-user-erf": (
        (2, 5, 4, 3),
        [
            {"type": "conv", "filter": [3, 2], "stride": [2, 1], "dilation": [1, 2], "padding": "same",
             "weight_var": 1.1, "bias_var": 0.2, "correlation": {"type": "user", "matrix": "random"}},
            {"type": "erf", "a": 1.3, "b": 0.7, "c": 0.2},
            {"type": "conv", "filter": 2, "padding": "valid", "correlation": {"type": "constant"}},
            {"type": "global_avg_pool"},
            {"type": "readout", "weight_var": 2.0, "bias_var": 0.5},
        ],
    ),
    "3d-circular-abrelu": (
        (2, 3, 3, 3, 1),
        [
            {"type": "conv", "filter": 3, "stride": 2, "padding": "circular",
             "correlation": {"type": "matern", "nu": 2.5, "lengthscale": 1.0}},
            {"type": "abrelu", "a": -0.4, "b": 1.1},
            {"type": "readout", "correlation": {"type": "rbf", "lengthscale": 1.5}},
        ],
    ),
}


@pytest.mark.parametrize("name", list(MC_SPECS))
def test_monte_carlo_finite_network(name):
    shape, layers = MC_SPECS[name]
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    layers = [dict(layer) for layer in layers]
    for layer in layers:
        corr = layer.get("correlation")
        if corr and corr.get("matrix") == "random":
            a = rng.standard_normal((6, 6))
            layer["correlation"] = {"type": "user", "matrix": (a @ a.T + 0.5 * np.eye(6)).tolist()}
    spec = {"input_channels": shape[-1], "layers": layers}
    (mean, se), (hidden_mean, hidden_se) = _monte_carlo(spec, x, m=100_000, seed=2)
    # the position-pair covariance right after the (only) nonlinearity, entry by entry
    upto = next(k for k, layer in enumerate(layers) if layer["type"] in NONLIN) + 1
    hidden = brute_force_hidden({"layers": layers[:upto] + [{"type": "readout"}]}, x)
    n = len(x)
    hidden = hidden.reshape(n, n, hidden_mean.shape[2], hidden_mean.shape[3])
    z = np.abs(hidden - hidden_mean) / hidden_se
    assert z.max() < 5.0, f"hidden covariance off by {z.max():.1f} standard errors"
    # the kernel, through the linear layers after it
    got = brute_force_kernel(spec, x)
    z = np.abs(got - mean) / se
    assert z.max() < 5.0, f"oracle {got}\nMonte Carlo {mean}\n(standard errors {se})"


# --------------------------------------------------------------------------------------------
# Correlations and bookkeeping
# --------------------------------------------------------------------------------------------


def test_correlation_limits_are_exact():
    shape = (3, 2)
    n = 6
    for corr in ({"type": "matern", "nu": 0.5}, {"type": "matern", "nu": 2.5}, {"type": "rbf"}):
        assert np.array_equal(correlation_matrix({**corr, "lengthscale": 0}, shape), np.eye(n) / n)
        for inf in ("inf", float("inf")):
            assert np.array_equal(correlation_matrix({**corr, "lengthscale": inf}, shape), np.ones((n, n)) / n**2)
        m = correlation_matrix({**corr, "lengthscale": 1.7}, shape)
        assert m.sum() == pytest.approx(1.0)
        assert np.all(np.linalg.eigvalsh(m) > -1e-12)


def test_correlation_entries_by_hand():
    # 1-D filter of 2 taps, distance 1: [[1, k], [k, 1]] / (2 + 2k)
    lam = 0.9
    for corr, k in [
        ({"type": "matern", "nu": 0.5}, math.exp(-1 / lam)),
        ({"type": "matern", "nu": 1.5}, (1 + math.sqrt(3) / lam) * math.exp(-math.sqrt(3) / lam)),
        ({"type": "matern", "nu": 2.5}, (1 + math.sqrt(5) / lam + 5 / (3 * lam**2)) * math.exp(-math.sqrt(5) / lam)),
        ({"type": "rbf"}, math.exp(-1 / (2 * lam**2))),
    ]:
        m = correlation_matrix({**corr, "lengthscale": lam}, (2,))
        np.testing.assert_allclose(m, np.array([[1, k], [k, 1]]) / (2 + 2 * k), rtol=1e-14)
    # row-major taps in 2-D: tap (0,1) and (1,0) are sqrt(2) apart
    m = correlation_matrix({"type": "rbf", "lengthscale": 1.0}, (2, 2))
    assert m[1, 2] / m[0, 0] == pytest.approx(math.exp(-1.0))


def test_x2_none_equals_explicit_x2_and_is_symmetric():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 3, 2))
    spec = {"layers": [
        {"type": "conv", "filter": [2, 3], "stride": [2, 1], "padding": "same",
         "correlation": {"type": "matern", "nu": 1.5, "lengthscale": 1.0}},
        RELU,
        {"type": "readout", "correlation": {"type": "matern", "nu": 1.5, "lengthscale": 2.0}},
    ]}
    hidden = brute_force_hidden(spec, x)
    assert hidden.shape == (3, 3, 2, 3, 2, 3)
    np.testing.assert_allclose(hidden, brute_force_hidden(spec, x, x), rtol=1e-14)
    # V_{x_j x_i}[p, p'] = V_{x_i x_j}[p', p]
    np.testing.assert_allclose(hidden, hidden.transpose(1, 0, 4, 5, 2, 3), rtol=1e-14)
    k = brute_force_kernel(spec, x)
    np.testing.assert_allclose(k, k.T, rtol=1e-14)
    np.testing.assert_allclose(brute_force_kernel(spec, x[:2], x[1:]), k[:2, 1:], rtol=1e-14)
    assert np.all(np.linalg.eigvalsh(k) > 0)


def test_avgpool_is_a_constant_correlated_conv_and_user_identity_is_independent():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 5, 5, 1))
    pool = {"type": "avgpool", "window": 2, "padding": "same"}
    conv = {"type": "conv", "filter": 2, "stride": 2, "padding": "same", "correlation": {"type": "constant"}}
    head = [RELU, {"type": "readout", "correlation": {"type": "rbf", "lengthscale": 1.0}}]
    np.testing.assert_array_equal(
        brute_force_kernel({"layers": [pool] + head}, x), brute_force_kernel({"layers": [conv] + head}, x)
    )
    user = {"type": "conv", "filter": 3, "correlation": {"type": "user", "matrix": np.eye(9).tolist()}}
    indep = {"type": "conv", "filter": 3}
    np.testing.assert_allclose(
        brute_force_kernel({"layers": [user] + head}, x), brute_force_kernel({"layers": [indep] + head}, x), rtol=1e-14
    )


def test_nonlinearity_after_flatten():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 2))
    spec = {"layers": [{"type": "conv", "filter": 3}, RELU, {"type": "flatten"}, {"type": "erf"},
                       {"type": "readout", "weight_var": 2.0, "bias_var": 0.1}]}
    flat = brute_force_hidden({"layers": spec["layers"][:3] + [{"type": "readout"}]}, x)
    hidden = brute_force_hidden(spec, x)
    assert hidden.shape == (2, 2)
    s = flat
    expected = (2 / np.pi) * np.arcsin(2 * s / np.sqrt(np.outer(1 + 2 * np.diag(s), 1 + 2 * np.diag(s))))
    np.testing.assert_allclose(hidden, expected, rtol=1e-14)
    np.testing.assert_allclose(brute_force_kernel(spec, x), 2.0 * expected + 0.1, rtol=1e-14)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"layers": [{"type": "conv", "filter": 3}]}, "readout"),
        ({"input_channels": 3, "layers": [{"type": "readout"}]}, "input_channels"),
        ({"layers": [{"type": "pool"}, {"type": "readout"}]}, "unknown layer"),
        ({"layers": [{"type": "conv", "filter": [3, 3]}, {"type": "readout"}]}, "filter"),
        ({"layers": [{"type": "conv", "filter": 9, "padding": "valid"}, {"type": "readout"}]}, "does not fit"),
        ({"layers": [{"type": "readout", "correlation": {"type": "matern", "nu": 1.0, "lengthscale": 1}}]}, "nu"),
    ],
)
def test_bad_specs_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        brute_force_kernel(spec, np.ones((1, 5, 2)))

"""The brute-force oracle's neural tangent kernel (tests/oracle.py): against neural-tangents'
reference NTKs, against quadrature of E[phi'(u) phi'(v)], against the (L + 1) K closed form of
bias-free balanced-ReLU networks, and the library's NTK (cnngp.kernel / cnngp.readout_sweep with
get="ntk" / "both") against the oracle on randomised small networks."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle import brute_force_hidden, brute_force_kernel, brute_force_ntk  # noqa: E402
from reference_cases import BODIES  # noqa: E402
from test_oracle import _gaussian_expectation, _inputs_with_covariance  # noqa: E402

NTK_REFERENCE = Path(__file__).resolve().parent / "reference" / "ntk"  # committed

RELU = {"type": "relu"}


def _rel(got, expected) -> float:
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def _load(case):
    path = NTK_REFERENCE / f"{case}.npz"
    return np.load(path)


# --------------------------------------------------------------------------------------------
# neural-tangents reference NTKs (tests/reference/ntk). The 32x32 cases (ntk_cnngp4,
# ntk_myrtle10_paper) are out of reach of the loops; mixed_mnist runs on 2 of its images.
# --------------------------------------------------------------------------------------------

NTK_BODIES = {"ntk_conv1d_digits": (4, BODIES["conv1d_digits"]), "ntk_mixed_mnist": (2, BODIES["mixed_mnist"])}


def _ntk_cases():
    cases = []
    for key in ("ntk_flatten", "ntk_gap"):
        cases.append(pytest.param("ntk_conv1d_digits", key, None, id=f"conv1d_digits-{key}"))
    for index in (0, 1):
        cases.append(pytest.param("ntk_conv1d_digits", "ntk_matern32", index, id=f"conv1d_digits-matern32[{index}]"))
    cases.append(pytest.param("ntk_mixed_mnist", "ntk_gap", None, id="mixed_mnist-ntk_gap"))
    cases.append(pytest.param("ntk_mixed_mnist", "ntk_matern32", 0, id="mixed_mnist-matern32[0]"))
    return cases


@pytest.mark.parametrize("case, key, index", _ntk_cases())
def test_ntk_against_neural_tangents(case, key, index):
    data = _load(case)
    n, body = NTK_BODIES[case]
    x = data["x"][:n]
    if key == "ntk_flatten":
        head = [{"type": "flatten"}, {"type": "readout", "weight_var": 1.0}]
        expected_nngp = data["nngp_flatten"][:n, :n]
    elif key == "ntk_gap":
        head = [{"type": "global_avg_pool"}, {"type": "readout", "weight_var": 1.0}]
        expected_nngp = data["nngp_gap"][:n, :n]
    else:
        lam = float(data["lengthscales"][index])
        head = [{"type": "readout", "correlation": {"type": "matern", "nu": 1.5, "lengthscale": lam}}]
        expected_nngp = None
    expected = (data[key] if index is None else data[key][index])[:n, :n]
    spec = {"input_channels": x.shape[-1], "layers": body + head}
    nngp, ntk = brute_force_kernel(spec, x, get="both")
    assert ntk.shape == (n, n)
    rel = _rel(ntk, expected)
    assert rel < 1e-9, f"{case} {key}: NTK relative error {rel:.3g}"
    if expected_nngp is not None:
        assert _rel(nngp, expected_nngp) < 1e-9
    if case == "ntk_conv1d_digits":  # (cheap) get="both" is exactly the two separate kernels
        np.testing.assert_array_equal(nngp, brute_force_kernel(spec, x))
        np.testing.assert_array_equal(ntk, brute_force_ntk(spec, x))


def test_ntk_reference_files_match_cases_json():
    path = NTK_REFERENCE / "cases.json"
    names = {c["case"] for c in json.loads(path.read_text())}
    assert set(NTK_BODIES) <= names


# --------------------------------------------------------------------------------------------
# E[phi'(u) phi'(v)] against quadrature. With a single 1x1 conv (Theta = 0 below it) the NTK
# right after the nonlinearity is K_pre[i, j] * Vdot[i, j], and K_pre is the input covariance.
# --------------------------------------------------------------------------------------------


def _dphi(layer):
    kind = layer["type"]
    if kind == "relu":
        return lambda t: math.sqrt(2.0) if t > 0 else 0.0
    if kind == "abrelu":
        return lambda t: layer["b"] if t > 0 else layer["a"]
    if kind == "erf":
        return lambda t: layer["a"] * layer["b"] * 2.0 / math.sqrt(math.pi) * math.exp(-((layer["b"] * t) ** 2))
    return lambda t: 1.0


@pytest.mark.parametrize(
    "layer",
    [
        {"type": "relu"},
        {"type": "abrelu", "a": -0.3, "b": 1.7},
        {"type": "erf", "a": 1.4, "b": 0.6, "c": 0.25},
        {"type": "identity"},
    ],
    ids=lambda layer: "-".join(str(v) for v in layer.values()),
)
@pytest.mark.parametrize("sx, sy, c", [(1.0, 1.0, 0.3), (0.7, 2.2, -0.9)])
def test_ntk_nonlinearity_matches_quadrature(layer, sx, sy, c):
    x = _inputs_with_covariance(sx, sy, c)
    spec = {"layers": [{"type": "conv", "filter": 1}, layer, {"type": "readout"}]}
    tangent = brute_force_hidden(spec, x, get="ntk").reshape(2, 2)
    f = _dphi(layer)
    cov = np.array([[sx, c], [c, sy]])
    for i in range(2):
        for j in range(2):
            if i == j:  # E[f(u)^2]: a 1-D integral
                s = cov[i, i]
                vdot, _ = integrate.quad(
                    lambda u: f(u) ** 2 * math.exp(-u * u / (2 * s)) / math.sqrt(2 * math.pi * s),
                    -np.inf, 0.0, epsabs=1e-13, epsrel=1e-11,
                )
                upper, _ = integrate.quad(
                    lambda u: f(u) ** 2 * math.exp(-u * u / (2 * s)) / math.sqrt(2 * math.pi * s),
                    0.0, np.inf, epsabs=1e-13, epsrel=1e-11,
                )
                vdot += upper
            else:
                vdot = _gaussian_expectation(f, cov[i, i], cov[j, j], cov[i, j])
            assert tangent[i, j] == pytest.approx(cov[i, j] * vdot, rel=1e-7, abs=1e-10)


def test_ntk_zero_variance_positions_are_finite():
    # image 0 is blank: zero variances (the ReLU family's angle is pi/2 there, as neural-tangents)
    x = np.zeros((2, 1, 3, 1))
    x[1, 0, 1, 0] = 1.0
    for layer in (RELU, {"type": "abrelu", "a": 0.2, "b": 1.0}, {"type": "erf", "a": 1.0, "b": 1.0, "c": 0.3}):
        spec = {"layers": [{"type": "conv", "filter": [1, 1], "bias_var": 0.0}, layer, {"type": "readout"}]}
        nngp, ntk = brute_force_kernel(spec, x, get="both")
        assert np.all(np.isfinite(ntk)) and np.all(np.isfinite(nngp))
        # the blank image's pre-activations have K = 0, hence Theta = 0: only the readout's own K
        assert ntk[0, 0] == nngp[0, 0] and ntk[0, 1] == nngp[0, 1]


# --------------------------------------------------------------------------------------------
# Tolerances for the library. Agreement is 1e-9 relative, except at image pairs x = x' of
# networks with a ReLU-family layer: there E[phi' phi'] is evaluated at perfect correlation
# (rho = 1 at p = p'), where theta = arccos(rho) ~ sqrt(2 (1 - rho)) is sqrt-conditioned; a
# one-ulp difference between c and sqrt(vx vy) gives theta ~ 1.5e-8 and moves Vdot by ~1e-8 at
# that entry. The oracle, propagating each image's own tensor, has c = vx = vy exactly there;
# an engine that computes the self variances and the cross tensor separately need not.
# (neural-tangents' own ntk_cnngp4 is 4.8e-9 off its exact (L + 1) K diagonal.)
# --------------------------------------------------------------------------------------------

RTOL = 1e-9
RTOL_RELU_SAME_IMAGE = 1e-8
RELU_FAMILY = ("relu", "abrelu")


def _has_relu_family(layers):
    return any(layer["type"] in RELU_FAMILY for layer in layers)


def _check_library(got, expected, same_image, relu_family, what):
    """max |got - expected| / max |expected|: < RTOL over all entries, except < the looser
    RTOL_RELU_SAME_IMAGE at entries whose two images are the same image (``same_image`` mask)
    in a network with a ReLU-family layer. Returns the two errors (other entries, same image)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = np.abs(expected).max()
    diff = np.abs(got - expected)
    other = float(diff[~same_image].max() / scale) if (~same_image).any() else 0.0
    same = float(diff[same_image].max() / scale) if same_image.any() else 0.0
    assert other < RTOL, f"{what}: relative error {other:.3g} (pairs of different images)"
    limit = RTOL_RELU_SAME_IMAGE if relu_family else RTOL
    assert same < limit, f"{what}: relative error {same:.3g} (pairs x = x')"
    return other, same


def test_library_relu_vdot_is_exact_at_perfect_correlation():
    """V̇ at c = vx = vy is exact: θ comes from √(vx·vy − c²), which is 0 there."""
    import torch

    import cnngp

    v = torch.tensor(np.random.default_rng(1).uniform(0.1, 3.0, 10_000), dtype=torch.float64)
    for layer, exact in ((cnngp.ReLU(), 1.0), (cnngp.ABReLU(-0.3, 1.7), (0.09 + 2.89) / 2)):
        vdot = layer.derivative_expectation(v, v, v).numpy()
        np.testing.assert_allclose(vdot, exact, rtol=1e-14, atol=0)


# --------------------------------------------------------------------------------------------
# Closed form: a bias-free balanced-ReLU net with independent convs and a flatten readout has,
# on the diagonal x = x', Theta = (L + 1) K (Vdot = 1 where u = v, and every layer's K is the
# tap average of the diagonal below it), L the number of hidden conv + relu layers.
# --------------------------------------------------------------------------------------------

CLOSED_FORM = {
    "2d-3-layers": ((3, 5, 4, 2), [
        {"type": "conv", "filter": 3}, RELU,
        {"type": "conv", "filter": [2, 3], "stride": [2, 1], "padding": "valid"}, RELU,
        {"type": "conv", "filter": 2, "padding": "same"}, RELU,
    ]),
    "1d-4-layers": ((3, 9, 2), [
        {"type": "conv", "filter": 3}, RELU,
        {"type": "conv", "filter": 3, "stride": 2, "padding": "valid"}, RELU,
        {"type": "conv", "filter": 2, "padding": "same"}, RELU,
        {"type": "conv", "filter": 1}, RELU,
    ]),
    "1d-1-layer-flatten": ((3, 6, 2), [{"type": "conv", "filter": 3, "padding": "circular"}, RELU, {"type": "flatten"}]),
}


@pytest.mark.parametrize("name", list(CLOSED_FORM))
def test_ntk_balanced_relu_closed_form(name):
    import cnngp

    shape, body = CLOSED_FORM[name]
    L = sum(layer["type"] == "conv" for layer in body)
    x = np.random.default_rng(7).standard_normal(shape)
    spec = {"input_channels": shape[-1], "layers": body + [{"type": "readout", "weight_var": 1.0}]}
    nngp, ntk = brute_force_kernel(spec, x, get="both")
    np.testing.assert_allclose(np.diag(ntk), (L + 1) * np.diag(nngp), rtol=1e-13, atol=0)
    # off the diagonal the NTK is smaller than (L + 1) K (Vdot < 1 there) but positive
    off = ~np.eye(len(x), dtype=bool)
    assert np.all(ntk[off] < (L + 1) * nngp[off]) and np.all(ntk[off] > 0)
    lib_nngp, lib_ntk = (t.numpy() for t in cnngp.kernel(cnngp.from_spec(spec), x, get="both"))
    # the diagonal is all x = x' pairs (see RTOL_RELU_SAME_IMAGE)
    np.testing.assert_allclose(np.diag(lib_ntk), (L + 1) * np.diag(lib_nngp), rtol=RTOL_RELU_SAME_IMAGE, atol=0)
    _check_library(lib_ntk, ntk, np.eye(len(x), dtype=bool), True, f"{name} NTK")
    _check_library(lib_nngp, nngp, np.zeros((len(x),) * 2, dtype=bool), False, f"{name} NNGP")


def test_ntk_reference_closed_form():
    """The same identity in neural-tangents' own numbers (ntk_cnngp4: 4 hidden layers)."""
    data = _load("ntk_cnngp4")
    # to 1e-8 only: neural-tangents' arccos loses digits at perfect correlation (4.8e-9 here)
    np.testing.assert_allclose(np.diag(data["ntk_flatten"]), 5 * np.diag(data["nngp_flatten"]),
                               rtol=RTOL_RELU_SAME_IMAGE, atol=0)


# --------------------------------------------------------------------------------------------
# The library against the oracle on randomised small networks
# --------------------------------------------------------------------------------------------

SEED = 20240611
N_NETWORKS = 16
N_SWEEPS = 4
SHAPES = [(3, 4, 4, 2), (3, 5, 4, 2), (3, 7, 2), (3, 9, 2), (3, 4, 5, 1)]


def _random_correlation(rng, n_taps, allow_user=True):
    kinds = ["independent", "constant", "matern", "rbf", "none"] + (["user"] if allow_user else [])
    kind = kinds[rng.integers(len(kinds))]
    if kind == "none":
        return None
    if kind in ("independent", "constant"):
        return {"type": kind}
    if kind == "user":
        a = rng.standard_normal((n_taps, n_taps))
        return {"type": "user", "matrix": (a @ a.T + 0.5 * np.eye(n_taps)).tolist()}
    u = rng.random()
    lam = 0 if u < 0.08 else ("inf" if u < 0.16 else float(rng.uniform(0.3, 3.0)))
    if kind == "rbf":
        return {"type": "rbf", "lengthscale": lam}
    return {"type": "matern", "nu": float(rng.choice([0.5, 1.5, 2.5])), "lengthscale": lam}


def _random_nonlinearity(rng):
    kind = ["relu", "abrelu", "erf", "identity"][rng.integers(4)]
    if kind == "abrelu":
        return {"type": "abrelu", "a": float(rng.uniform(-0.5, 0.5)), "b": float(rng.uniform(0.5, 1.6))}
    if kind == "erf":
        return {"type": "erf", "a": float(rng.uniform(0.5, 1.5)), "b": float(rng.uniform(0.3, 1.2)),
                "c": float(rng.uniform(-0.3, 0.3))}
    return {"type": kind}


def _out_size(n, filt, stride, dilation, padding):
    e = (filt - 1) * dilation + 1
    if padding == "valid":
        return (n - e) // stride + 1 if n >= e else 0
    return -(-n // stride)


def _random_conv(rng, grid):
    """A conv whose dilated filter fits the grid in every dimension (as the library requires,
    whatever the padding)."""
    d = len(grid)
    while True:
        same_filter = d == 1 or rng.random() < 0.3  # one int for every dimension
        filt = [int(rng.integers(1, 4))] * d if same_filter else [int(rng.integers(1, 4)) for _ in range(d)]
        stride = [int(rng.choice([1, 1, 2])) for _ in range(d)]
        dilation = [int(rng.choice([1, 1, 2])) for _ in range(d)]
        padding = str(rng.choice(["same", "valid", "same", "circular"]))
        if all((f - 1) * h + 1 <= n for n, f, h in zip(grid, filt, dilation)):
            break
    out = tuple(_out_size(n, f, s, h, padding) for n, f, s, h in zip(grid, filt, stride, dilation))
    layer = {"type": "conv", "filter": filt[0] if same_filter else filt, "stride": stride,
             "dilation": dilation, "padding": padding, "weight_var": float(rng.uniform(0.5, 2.0))}
    if rng.random() < 0.6:
        layer["bias_var"] = float(rng.uniform(0.0, 0.4))
    corr = _random_correlation(rng, math.prod(filt))
    if corr is not None:
        layer["correlation"] = corr
    return layer, out


def _random_body(rng, grid):
    layers = []
    for _ in range(int(rng.integers(1, 4))):
        conv, grid = _random_conv(rng, grid)
        layers += [conv, _random_nonlinearity(rng)]
        if rng.random() < 0.35 and min(grid) >= 2:
            padding = str(rng.choice(["valid", "same"]))
            stride = int(rng.choice([1, 2]))
            layers.append({"type": "avgpool", "window": 2, "stride": stride, "padding": padding})
            grid = tuple(_out_size(n, 2, stride, 1, padding) for n in grid)
    return layers, grid


def _random_readout(rng, grid, kind=None):
    layer = {"type": "readout", "weight_var": float(rng.uniform(0.5, 2.0))}
    if rng.random() < 0.5:
        layer["bias_var"] = float(rng.uniform(0.0, 0.5))
    if kind is None:
        corr = _random_correlation(rng, math.prod(grid), allow_user=False)
    else:
        corr = {"type": kind}
        if kind == "matern":
            corr.update(nu=float(rng.choice([0.5, 1.5, 2.5])), lengthscale=float(rng.uniform(0.5, 4.0)))
        elif kind == "rbf":
            corr["lengthscale"] = float(rng.uniform(0.5, 3.0))
    if corr is not None:
        layer["correlation"] = corr
    return layer


def _random_network(index):
    rng = np.random.default_rng([SEED, index])
    shape = SHAPES[index % len(SHAPES)]
    body, grid = _random_body(rng, shape[1:-1])
    head = int(rng.integers(4))
    if head == 0:  # a readout over the last grid, correlated or not
        layers = body + [_random_readout(rng, grid)]
    elif head == 1:
        layers = body + [{"type": "flatten"}, _random_readout(rng, ())]
    elif head == 2:
        layers = body + [{"type": "global_avg_pool"}, _random_readout(rng, ())]
    else:  # a nonlinearity with no grid left
        layers = body + [{"type": "flatten"}, _random_nonlinearity(rng), _random_readout(rng, ())]
    x = rng.standard_normal(shape)
    return {"input_channels": shape[-1], "layers": layers}, x


def _describe(spec):
    return json.dumps(spec["layers"], default=str)[:2000]


@pytest.mark.parametrize("index", range(N_NETWORKS))
def test_library_ntk_matches_oracle(index):
    import cnngp

    spec, x = _random_network(index)
    model = cnngp.from_spec(spec)
    nngp, ntk = brute_force_kernel(spec, x, get="both")
    lib_nngp, lib_ntk = (t.numpy() for t in cnngp.kernel(model, x, get="both"))
    assert lib_ntk.shape == ntk.shape == (len(x), len(x))
    relu = _has_relu_family(spec["layers"])
    same = np.eye(len(x), dtype=bool)
    _check_library(lib_ntk, ntk, same, relu, f"NTK of {_describe(spec)}")
    _check_library(lib_nngp, nngp, np.zeros_like(same), False, f"NNGP of {_describe(spec)}")
    # get="ntk" alone, and two different image sets (no mirroring; x1[1] is x2[0])
    alone = cnngp.kernel(model, x[:2], x[1:], get="ntk").numpy()
    expected = brute_force_ntk(spec, x[:2], x[1:])
    np.testing.assert_allclose(expected, ntk[:2, 1:], rtol=1e-12, atol=1e-14)
    same = np.array([[False, False], [True, False]])
    _check_library(alone, expected, same, relu, f"NTK (x1 != x2) of {_describe(spec)}")


@pytest.mark.parametrize("index", range(N_SWEEPS))
def test_library_readout_sweep_ntk_matches_oracle(index):
    import cnngp

    rng = np.random.default_rng([SEED, 1000 + index])
    shape = SHAPES[index % len(SHAPES)]
    body, grid = _random_body(rng, shape[1:-1])
    x = rng.standard_normal(shape)
    heads = [_random_readout(rng, grid, kind) for kind in ("matern", "independent", "constant", "rbf", "matern")]
    readouts = [cnngp.from_spec({"layers": [h]}).layers[0] for h in heads]
    net = cnngp.from_spec({"input_channels": shape[-1], "layers": body})
    lib_ntk = cnngp.readout_sweep(net, readouts, x, get="ntk").numpy()
    lib_nngp, lib_ntk2 = (t.numpy() for t in cnngp.readout_sweep(net, readouts, x, get="both"))
    assert lib_ntk.shape == (len(heads), len(x), len(x))
    np.testing.assert_allclose(lib_ntk2, lib_ntk, rtol=1e-13, atol=0)
    same = np.eye(len(x), dtype=bool)
    for k, head in enumerate(heads):
        spec = {"input_channels": shape[-1], "layers": body + [head]}
        nngp, ntk = brute_force_kernel(spec, x, get="both")
        _check_library(lib_ntk[k], ntk, same, _has_relu_family(body), f"readout {k} NTK of {_describe(spec)}")
        _check_library(lib_nngp[k], nngp, np.zeros_like(same), False, f"readout {k} NNGP of {_describe(spec)}")

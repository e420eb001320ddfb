"""The kernel engine against independent oracles: neural-tangents reference kernels, a
brute-force loop implementation of PAPER.md §2, closed forms, and exact limits."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cnngp
from cnngp import Constant, Independent, Matern, RBF, Readout, Serial
from cnngp.io.spec import from_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import rel_err  # noqa: E402
from oracle import brute_force_kernel  # noqa: E402
from reference_cases import BODIES  # noqa: E402


# -- neural-tangents 0.6.5 reference kernels -----------------------------------------------------


@pytest.mark.parametrize("case", sorted(BODIES))
def test_matches_neural_tangents(case, reference_dir):
    data = np.load(reference_dir / f"{case}.npz")
    body = from_spec({"layers": BODIES[case]})
    readouts = [Readout(), Readout(correlation=Constant())]
    lengthscales = data["lengthscales"] if "lengthscales" in data.files else []
    readouts += [Readout(correlation=Matern(1.5, lam)) for lam in lengthscales]
    k = cnngp.readout_sweep(body, readouts, data["x"]).numpy()
    assert rel_err(k[0], data["kernel_flatten"]) <= 1e-6
    assert rel_err(k[1], data["kernel_gap"]) <= 1e-6
    if len(lengthscales):
        assert rel_err(k[2:], data["kernel_matern32"]) <= 1e-6


def test_named_architectures_match_reference(reference_dir):
    data = np.load(reference_dir / "myrtle10_paper.npz")
    x = data["x"][:2]
    for corr, key in ((Independent(), "kernel_flatten"), (Constant(), "kernel_gap")):
        net = cnngp.io.architectures.get("myrtle10-paper", readout=corr)
        assert rel_err(cnngp.kernel(net, x), data[key][:2, :2]) <= 1e-6


# -- brute-force oracle over random configurations ------------------------------------------------

CORRELATIONS = [
    {"type": "independent"},
    {"type": "constant"},
    {"type": "matern", "nu": 0.5, "lengthscale": 0.7},
    {"type": "matern", "nu": 1.5, "lengthscale": 1.3},
    {"type": "matern", "nu": 2.5, "lengthscale": 2.0},
    {"type": "rbf", "lengthscale": 0.9},
    {"type": "matern", "nu": 1.5, "lengthscale": 0},
    {"type": "rbf", "lengthscale": "inf"},
]
NONLINEARITIES = [
    {"type": "relu"},
    {"type": "abrelu", "a": -0.3, "b": 0.8},
    {"type": "erf", "a": 1.5, "b": 0.7, "c": 0.1},
    {"type": "identity"},
]


def _random_case(seed):
    """A random small network: D, filters, strides, dilations, paddings, correlations."""
    rng = np.random.default_rng(seed)
    d = int(rng.choice([1, 2, 2, 3]))
    size = {1: 7, 2: 5, 3: 3}[d]
    grid = [size] * d
    layers = []
    for _ in range(int(rng.integers(1, 3))):
        filt = [int(rng.integers(1, min(3, n) + 1)) for n in grid]
        dil = int(rng.integers(1, 3))
        if any((f - 1) * dil + 1 > n for f, n in zip(filt, grid)):
            dil = 1
        padding = str(rng.choice(["same", "valid", "circular"]))
        stride = int(rng.integers(1, 3))
        layers.append(
            {
                "type": "conv",
                "filter": filt,
                "stride": stride,
                "dilation": dil,
                "padding": padding,
                "weight_var": float(rng.uniform(0.5, 2.0)),
                "bias_var": float(rng.choice([0.0, 0.1])),
                "correlation": CORRELATIONS[int(rng.integers(len(CORRELATIONS)))],
            }
        )
        layers.append(NONLINEARITIES[int(rng.integers(len(NONLINEARITIES)))])
        if padding == "valid":
            grid = [(n - (f - 1) * dil - 1) // stride + 1 for n, f in zip(grid, filt)]
        else:
            grid = [-(-n // stride) for n in grid]
    if d == 2 and rng.random() < 0.5 and min(grid) >= 2:
        layers.append({"type": "avgpool", "window": 2, "stride": 1, "padding": "same"})
    layers.append({"type": "readout", "weight_var": 1.3, "bias_var": 0.05,
                   "correlation": CORRELATIONS[int(rng.integers(len(CORRELATIONS)))]})
    channels = int(rng.integers(1, 3))
    x1 = rng.standard_normal((2, *([size] * d), channels))
    x2 = rng.standard_normal((1, *([size] * d), channels))
    return {"input_channels": channels, "layers": layers}, x1, x2


@pytest.mark.parametrize("seed", range(24))
def test_matches_brute_force_oracle(seed):
    spec, x1, x2 = _random_case(seed)
    net = from_spec(spec)
    expected = brute_force_kernel(spec, x1, x2)
    got = cnngp.kernel(net, x1, x2).numpy()
    assert rel_err(got, expected) <= 1e-9, spec
    expected_sym = brute_force_kernel(spec, x1)
    assert rel_err(cnngp.kernel(net, x1).numpy(), expected_sym) <= 1e-9, spec


@pytest.mark.parametrize(
    "conv",
    [
        {"type": "conv", "filter": [3, 2], "stride": [2, 1], "dilation": [1, 2], "padding": "same",
         "correlation": {"type": "user", "matrix": (np.eye(6) + 0.3).tolist()}},
        {"type": "conv", "filter": 3, "stride": 2, "padding": "circular",
         "correlation": {"type": "matern", "nu": 1.5, "lengthscale": 1.0}},
        {"type": "conv", "filter": 4, "stride": 2, "padding": "same",
         "correlation": {"type": "rbf", "lengthscale": 1.5}},
    ],
)
def test_correlated_intermediate_conv_matches_oracle(conv):
    rng = np.random.default_rng(3)
    spec = {"layers": [conv, {"type": "relu"}, {"type": "conv", "filter": 2}, {"type": "relu"},
                       {"type": "readout", "correlation": {"type": "matern", "nu": 2.5, "lengthscale": 1.0}}]}
    x = rng.uniform(size=(3, 6, 5, 2))
    assert rel_err(cnngp.kernel(from_spec(spec), x), brute_force_kernel(spec, x)) <= 1e-9


# -- limits and closed forms ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_images():
    return np.random.default_rng(0).uniform(size=(4, 6, 6, 3))


def test_lengthscale_limits_are_exact(small_images):
    body = Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU())
    heads = [
        Readout(correlation=Independent()),
        Readout(correlation=Matern(1.5, 0)),
        Readout(correlation=RBF(0)),
        Readout(correlation=Constant()),
        Readout(correlation=Matern(1.5, math.inf)),
        Readout(correlation=RBF("inf")),
        Readout(correlation=Matern(1.5, 1e-4)),
        Readout(correlation=Matern(0.5, 1e6)),
    ]
    k = cnngp.readout_sweep(body, heads, small_images)
    assert torch.equal(k[0], k[1]) and torch.equal(k[0], k[2])
    assert torch.equal(k[3], k[4]) and torch.equal(k[3], k[5])
    assert rel_err(k[6], k[0]) <= 1e-6
    assert rel_err(k[7], k[3]) <= 1e-6


def test_conv_lengthscale_limits(small_images):
    def net(corr):
        return Serial(cnngp.Conv(3, correlation=corr), cnngp.ReLU(), Readout(correlation=Matern(1.5, 2.0)))

    k_ind = cnngp.kernel(net(Independent()), small_images)
    k_const = cnngp.kernel(net(Constant()), small_images)
    assert torch.equal(cnngp.kernel(net(Matern(1.5, 0.0)), small_images), k_ind)
    assert torch.equal(cnngp.kernel(net(RBF(math.inf)), small_images), k_const)
    assert rel_err(cnngp.kernel(net(Matern(1.5, 1e-4)), small_images), k_ind) <= 1e-6
    assert rel_err(cnngp.kernel(net(Matern(1.5, 1e6)), small_images), k_const) <= 1e-6
    # and a constant-correlated conv is exactly an average pool
    pool = Serial(cnngp.AvgPool(3, stride=1, padding="same"), cnngp.ReLU(), Readout(correlation=Matern(1.5, 2.0)))
    assert rel_err(cnngp.kernel(pool, small_images), k_const) <= 1e-12


def _arccos_mlp(x1, x2, depth, weight_var, bias_var):
    """Closed-form arc-cosine MLP kernel (Cho & Saul) with balanced ReLU, by its angle form."""
    c = x1.shape[-1]
    kxy = x1 @ x2.T / c * weight_var + bias_var
    kxx = (x1 * x1).sum(1) / c * weight_var + bias_var
    kyy = (x2 * x2).sum(1) / c * weight_var + bias_var
    for _ in range(depth):
        norm = np.sqrt(np.outer(kxx, kyy))
        theta = np.arccos(np.clip(kxy / norm, -1, 1))
        kxy = norm / np.pi * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) * weight_var + bias_var
        kxx = kxx * weight_var + bias_var
        kyy = kyy * weight_var + bias_var
    return kxy


def test_one_by_one_images_give_the_arccos_mlp_kernel():
    rng = np.random.default_rng(1)
    x1, x2 = rng.standard_normal((5, 1, 1, 4)), rng.standard_normal((3, 1, 1, 4))
    depth, w, b = 3, 1.7, 0.2
    layers = []
    for _ in range(depth):
        layers += [cnngp.Conv(1, weight_var=w, bias_var=b), cnngp.ReLU()]
    net = Serial(*layers, Readout(w, b, Matern(1.5, 3.0)))  # one position: any readout is dense
    expected = _arccos_mlp(x1[:, 0, 0], x2[:, 0, 0], depth, w, b)
    assert rel_err(cnngp.kernel(net, x1, x2), expected) <= 1e-12


# -- Gram matrices -------------------------------------------------------------------------------



def test_gram_symmetric_psd_and_consistent(cifar_images):
    net = cnngp.io.architectures.get("cnngp3", readout=Matern(1.5, 2.0))
    k = cnngp.kernel(net, cifar_images).numpy()
    assert np.array_equal(k, k.T)
    eig = np.linalg.eigvalsh(k)
    assert eig.min() >= -1e-10 * np.diag(k).mean()
    # the upper-triangle path equals the rectangular path, and batching changes nothing
    k_rect = cnngp.kernel(net, cifar_images, cifar_images[:3], batch_size=2).numpy()
    assert rel_err(k_rect, k[:, :3]) <= 1e-13


def test_diagonal_path_equals_full_path(cifar_images):
    """Independent everywhere → only the spatial diagonal; a sweep forces the full tensor."""
    body = Serial(*cnngp.io.architectures.body("cnngp3"))
    assert body.representation((12, 12), False) == [False] * 7
    k_diag = cnngp.kernel(Serial(body, Readout()), cifar_images)
    k_full = cnngp.readout_sweep(body, [Readout(), Readout(correlation=Constant())], cifar_images)[0]
    assert body.representation((12, 12), True) == [True] * 7
    assert rel_err(k_diag, k_full) <= 1e-13


def test_float32_agrees_with_float64(cifar_images):
    x = cifar_images
    net = cnngp.io.architectures.get("cnngp4", readout=Matern(1.5, 2.0))
    k64 = cnngp.kernel(net, x)
    k32 = cnngp.kernel(net, x, dtype="float32")
    assert k32.dtype == torch.float32
    err = rel_err(k32, k64)
    print(f"float32 vs float64 max relative error: {err:.2e}")
    assert err <= 1e-4


def test_myrtle_correlated_runs_and_is_psd(cifar_images):
    x = np.random.default_rng(2).uniform(size=(3, 16, 16, 3))
    net = cnngp.io.architectures.get("myrtle10-correlated", readout=Constant())
    k = cnngp.kernel(net, x).numpy()
    assert np.linalg.eigvalsh(k).min() > 0
    # internal λ = 0 reduces the 6×6 correlated conv to an independent 6×6 conv
    k0 = cnngp.kernel(cnngp.io.architectures.get("myrtle10-correlated", readout=Constant(), internal=Matern(1.5, 0)), x)
    spec = {"layers": [l.to_spec() for l in net.layers]}
    for l in spec["layers"]:
        if l["type"] == "conv" and l["filter"][0] == 6:
            l["correlation"] = {"type": "independent"}
    assert rel_err(k0, cnngp.kernel(from_spec(spec), x)) <= 1e-13


@pytest.mark.parametrize("fast", ["1", "0"])
def test_float32_correlated_readout_on_32x32(reference_dir, monkeypatch, fast):
    """Sums over 10⁶ position pairs accumulate in float64 on both paths (torch and fused)."""
    monkeypatch.setenv("CNNGP_FAST", fast)
    x = np.load(reference_dir / "cnngp4.npz")["x"][:3]
    body = from_spec({"layers": BODIES["cnngp4"][:4]})
    heads = [Readout(correlation=Matern(1.5, lam)) for lam in (0.5, 8.0)] + [Readout(correlation=Constant())]
    k64 = cnngp.readout_sweep(body, heads, x)
    k32 = cnngp.readout_sweep(body, heads, x, dtype="float32")
    err = rel_err(k32, k64)
    print(f"CNNGP_FAST={fast}: float32 vs float64 max relative error {err:.2e}")
    assert err <= 1e-5


# -- the diagonal alone (the test points' prior variances of a GP posterior) ---------------------


@pytest.mark.parametrize("seed", range(6))
def test_kernel_diagonal_matches_brute_force_oracle(seed):
    spec, x1, _ = _random_case(seed)
    expected = np.diagonal(brute_force_kernel(spec, x1))
    got = cnngp.engine.gram.kernel_diagonal(from_spec(spec), x1).numpy()
    assert got.shape == (len(x1),) and rel_err(got, expected) <= 1e-9, spec


def test_kernel_diagonal_of_many_readouts_and_the_ntk(cifar_images):
    from cnngp.engine.gram import kernel_diagonal
    from cnngp.io.architectures import split_network

    body, _, _ = split_network("myrtle5")  # pools: the self pass carries full tensors
    readouts = [Readout(), Readout(correlation=Constant()), Readout(correlation=Matern(1.5, 2.0))]
    x = cifar_images[:5]
    nngp, ntk = kernel_diagonal(body, x, readouts=readouts, get="both", batch_size=2)
    K, T = cnngp.readout_sweep(body, readouts, x, get="both")
    assert nngp.shape == (3, 5)
    np.testing.assert_allclose(nngp.numpy(), torch.diagonal(K, dim1=1, dim2=2).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ntk.numpy(), torch.diagonal(T, dim1=1, dim2=2).numpy(), rtol=1e-12)
    single = kernel_diagonal(body, x[:1], readouts=readouts[2:])  # one image: the lone-pair path
    np.testing.assert_allclose(single.numpy(), nngp[2:, :1].numpy(), rtol=1e-12)
    with pytest.raises(cnngp.CNNGPError, match="readouts: expected a non-empty list"):
        kernel_diagonal(body, x, readouts=[])

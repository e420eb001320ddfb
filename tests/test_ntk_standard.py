"""The NTK in the standard parameterisation (docs/maths.md §7): neural-tangents' own kernels
(``parameterization="standard"``, tests/data/nt_standard_ntk.npz, made by
benchmarks/make_nt_standard_reference.py), the fused path against the torch path, the empirical
NTK of finite standard-parameterised networks, and the errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import cnngp
from cnngp import Conv, Erf, GlobalAvgPool, Matern, RBF, Readout, ReLU, Serial, AvgPool, Constant
from cnngp.errors import CNNGPError
from cnngp.engine import fused
from conftest import rel_err

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "nt_standard_ntk.npz")
CASES = ["flatten_2d", "gap_pool_erf", "readout_on_grid", "conv1d"]


@pytest.fixture(scope="module")
def reference():
    return np.load(REFERENCE)


@pytest.mark.parametrize("fast", ["1", "0"], ids=["fused", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_against_neural_tangents_standard(reference, case, fast, monkeypatch):
    monkeypatch.setenv("CNNGP_FAST", fast)
    net = cnngp.from_spec(json.loads(str(reference[f"{case}_spec"])))
    x = reference[f"{case}_x"]
    nngp, ntk = cnngp.kernel(net, x, get="both")
    assert rel_err(nngp.numpy(), reference[f"{case}_nngp"]) <= 1e-12
    assert rel_err(ntk.numpy(), reference[f"{case}_ntk"]) <= 1e-9


def _correlated_net():
    return Serial(
        Conv(3, correlation=Matern(1.5, 1.0), bias_var=0.1), ReLU(), AvgPool(2),
        Conv(3, stride=2, correlation=RBF(1.3), weight_var=1.5), Erf(), Conv(3), ReLU(),
        Readout(correlation=Matern(1.5, 2.0), bias_var=0.2),
    )


def test_nngp_is_the_same_and_the_ntk_scales_with_the_widths():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 10, 10, 2))
    net = _correlated_net()
    k_ntk = cnngp.kernel(net, x, get="both")
    for width in (4, 64):
        std = cnngp.standard_parameterization(net, width)
        nngp, theta = cnngp.kernel(std, x, get="both")
        assert torch.equal(nngp, k_ntk[0])  # the NNGP does not see the parameterisation
        assert not torch.allclose(theta, k_ntk[1])
    # Θ is affine in the readout's fan-in C·|F|: the readout adds C·|F|·(Σ*V) + 1, the rest
    # grows with the earlier widths; with only the last width changed, Θ(2C) − Θ(C) is the
    # readout's C·|F|·(Σ*V) (and the next-to-last conv's own term, which does not see C)
    a = cnngp.kernel(cnngp.standard_parameterization(net, [5, 6, 8]), x, get="ntk")
    b = cnngp.kernel(cnngp.standard_parameterization(net, [5, 6, 16]), x, get="ntk")
    c = cnngp.kernel(cnngp.standard_parameterization(net, [5, 6, 24]), x, get="ntk")
    assert rel_err(c - b, b - a) < 1e-12
    assert torch.all(b > a)


def test_fused_path_carries_the_standard_terms(monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (4, 12, 12, 3))
    x[0, :3] = 0.0  # zero-variance positions
    net = cnngp.standard_parameterization(_correlated_net(), [7, 3, 11])
    calls = []
    original = fused.conv_fused
    monkeypatch.setattr(fused, "conv_fused", lambda v, *a, **k: calls.append(v.ntk) or original(v, *a, **k))
    fast = cnngp.kernel(net, x, get="both")
    assert any(calls)
    monkeypatch.setenv("CNNGP_FAST", "0")
    ref = cnngp.kernel(net, x, get="both")
    for f, r in zip(fast, ref):
        assert rel_err(f, r) < 1e-12
    heads = [Readout(correlation=Matern(1.5, s), parameterization="standard") for s in (0.5, 3.0)]
    heads.append(Readout(correlation=Constant(), parameterization="standard"))
    body = Serial(*list(net.layers)[:-1])
    monkeypatch.setenv("CNNGP_FAST", "1")
    sweep = cnngp.readout_sweep(body, heads, x, get="ntk")
    for h, s in zip(heads, sweep):
        assert rel_err(s, cnngp.kernel(Serial(*body.layers, h), x, get="ntk")) < 1e-12


def test_empirical_ntk_of_finite_standard_networks():
    """One hidden layer (correlated conv, correlated readout): the empirical NTK's expectation
    is exact at any width, so the Monte Carlo mean must sit within 4 standard errors."""
    from test_montecarlo_ntk import _errors

    x1 = torch.tensor(np.random.default_rng(2).uniform(-1, 1, (2, 6, 6, 2)))
    x2 = torch.tensor(np.random.default_rng(3).uniform(-1, 1, (2, 6, 6, 2)))
    width = 24
    model = cnngp.standard_parameterization(
        Serial(Conv(3, correlation=Matern(1.5, 1.0), bias_var=0.2, weight_var=1.3), ReLU(),
               Readout(correlation=Matern(0.5, 2.0), bias_var=0.1)), width)
    rel, rse, z = _errors(model, x1, x2, width=width, n_samples=400, n_outputs=1, seed=0, dtype="float64")
    assert rse < 0.03
    assert rel <= 4 * rse, (rel, rse, z)


def test_errors_and_spec():
    with pytest.raises(CNNGPError, match="parameterization: expected one of"):
        Conv(3, parameterization="mean-field")
    with pytest.raises(CNNGPError, match="channels: expected a positive integer"):
        Conv(3, channels=0)
    x = np.random.default_rng(0).uniform(0, 1, (2, 6, 6, 1))
    net = Serial(Conv(3), ReLU(), Readout(parameterization="standard"))  # no channels before the readout
    with pytest.raises(CNNGPError, match="needs the channel count"):
        cnngp.kernel(net, x, get="ntk")
    cnngp.kernel(net, x)  # the NNGP does not need it
    with pytest.raises(CNNGPError, match="width: expected one int or 2"):
        cnngp.standard_parameterization(Serial(Conv(3), ReLU(), Conv(3), ReLU(), Readout()), [4, 5, 6])
    with pytest.raises(CNNGPError, match="width 8"):
        cnngp.finite_network(cnngp.standard_parameterization(Serial(Conv(3), ReLU(), Readout()), 4),
                             in_channels=1, width=8, seed=0).ntk(x)
    # the keys appear in a spec only when they differ from the defaults, and round-trip
    assert "parameterization" not in Conv(3).to_spec() and "channels" not in Conv(3).to_spec()
    std = cnngp.standard_parameterization(Serial(Conv(3), ReLU(), GlobalAvgPool(), Readout()), 5)
    spec = std.to_spec()
    assert spec["layers"][0]["channels"] == 5 and spec["layers"][-1]["parameterization"] == "standard"
    again = cnngp.from_spec(spec)
    assert torch.equal(cnngp.kernel(again, x, get="ntk"), cnngp.kernel(std, x, get="ntk"))

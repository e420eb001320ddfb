"""A shared contract every kernel layer passes (cf. GPyTorch's kernel test base), plus
per-layer closed forms. Each subclass of :class:`LayerContract` names one layer."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cnngp import (
    ABReLU, AvgPool, Constant, Conv, Erf, Flatten, GlobalAvgPool, Identity, Independent, Matern,
    RBF, Readout, ReLU, Sign, Sin, UserCorrelation,
)
from cnngp.testing import LayerContract, NonlinearityContract


class TestConvIndependent(LayerContract):
    def make_layer(self):
        return Conv(3, weight_var=1.7, bias_var=0.2)


class TestConvStridedDilatedValid(LayerContract):
    def make_layer(self):
        return Conv([2, 3], stride=[2, 1], dilation=[2, 1], padding="valid")


class TestConvCircular(LayerContract):
    def make_layer(self):
        return Conv(3, stride=2, padding="circular", correlation=Matern(2.5, 1.0))


@pytest.mark.parametrize("corr", [Constant(), Matern(0.5, 1.0), Matern(1.5, 2.0), RBF(0.7),
                                  UserCorrelation(np.eye(9) + 0.5)])
class TestConvCorrelated(LayerContract):
    @pytest.fixture(autouse=True)
    def _corr(self, corr):
        self.corr = corr

    def make_layer(self):
        return Conv(3, stride=[1, 2], correlation=self.corr, weight_var=2.0, bias_var=0.1)


class TestAvgPool(LayerContract):
    def make_layer(self):
        return AvgPool(2)


class TestAvgPoolSame(LayerContract):
    def make_layer(self):
        return AvgPool(3, stride=1, padding="same")


class TestGlobalAvgPool(LayerContract):
    def make_layer(self):
        return GlobalAvgPool()


class TestFlatten(LayerContract):
    def make_layer(self):
        return Flatten()


@pytest.mark.parametrize("corr", [Independent(), Constant(), Matern(1.5, 2.0), RBF(3.0)])
class TestReadout(LayerContract):
    @pytest.fixture(autouse=True)
    def _corr(self, corr):
        self.corr = corr

    def make_layer(self):
        return Readout(1.5, 0.1, self.corr)


class TestReLU(NonlinearityContract):
    def make_layer(self):
        return ReLU()


class TestABReLU(NonlinearityContract):
    def make_layer(self):
        return ABReLU(-0.2, 1.3)


class TestErf(NonlinearityContract):
    kinks = ()

    def make_layer(self):
        return Erf(1.2, 0.8, 0.1)


# two nonlinearities neural-tangents has: each one class (cnngp.kernels.layers) and one test class


class TestSin(NonlinearityContract):
    kinks = ()

    def make_layer(self):
        return Sin(1.5, 0.7, 0.3)


class TestSign(NonlinearityContract):
    # arcsin(ρ) has an infinite slope at ρ = ±1 (a position against itself): float32's 1e-7
    # in ρ becomes ~3e-4 there, whatever the formula
    float32_rtol = 1e-3

    def make_layer(self):
        return Sign()


class TestIdentity(LayerContract):
    def make_layer(self):
        return Identity()


class TestOneDimensional(TestConvCircular):
    spatial = (9,)


class TestThreeDimensional(TestConvCorrelated):
    spatial = (3, 4, 3)

    def make_layer(self):
        return Conv([2, 3, 2], correlation=self.corr if not isinstance(self.corr, UserCorrelation) else Constant())


# -- closed forms per layer -----------------------------------------------------------------------


def _gauss_expectation(phi, vx, vy, c):
    """E[φ(u)φ(v)] by numerical integration (scipy), independent of the closed forms."""
    from scipy import integrate

    a = math.sqrt(vx)
    rho = c / math.sqrt(vx * vy)
    b1, b2 = math.sqrt(vy) * rho, math.sqrt(vy * max(1 - rho * rho, 0))
    density = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731

    def inner(t):  # E_s[φ(b1 t + b2 s)], kink of ReLU at s = -b1 t / b2
        kink = -b1 * t / b2 if b2 > 0 else 0.0
        f = lambda s: float(phi(np.array(b1 * t + b2 * s))) * density(s)  # noqa: E731
        return integrate.quad(f, -12, 12, points=[kink], limit=200)[0]

    g = lambda t: float(phi(np.array(a * t))) * inner(t) * density(t)  # noqa: E731
    return integrate.quad(g, -12, 12, points=[0.0], limit=200)[0]


@pytest.mark.parametrize(
    "layer, phi",
    [
        (ReLU(), lambda x: math.sqrt(2) * np.maximum(x, 0)),
        (ABReLU(-0.3, 0.9), lambda x: -0.3 * np.minimum(x, 0) + 0.9 * np.maximum(x, 0)),
        (Erf(1.3, 0.6, 0.2), lambda x: 1.3 * __import__("scipy.special").special.erf(0.6 * x) + 0.2),
    ],
)
@pytest.mark.parametrize("vx, vy, c", [(1.0, 2.0, 0.7), (0.5, 0.8, -0.3), (2.0, 2.0, 0.0)])
def test_nonlinearity_expectations_by_quadrature(layer, phi, vx, vy, c):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = float(layer.expectation(t(c), t(vx), t(vy)))
    assert got == pytest.approx(_gauss_expectation(phi, vx, vy, c), rel=1e-6, abs=1e-9)


def test_zero_variance_positions_give_zero_not_nan():
    z = torch.zeros(4, dtype=torch.float64)
    assert torch.equal(ReLU().expectation(z, z, z), z)
    assert torch.equal(ABReLU(0.1, 1.0).expectation(z, z, torch.ones(4, dtype=torch.float64)), z)
    assert torch.equal(Erf().expectation(z, z, z), z)


def test_matern_matrix_closed_form():
    m = Matern(1.5, 2.0).matrix((2, 2)).numpy()
    r = np.array([[0, 1, 1, math.sqrt(2)], [1, 0, math.sqrt(2), 1], [1, math.sqrt(2), 0, 1], [math.sqrt(2), 1, 1, 0]])
    k = (1 + math.sqrt(3) * r / 2) * np.exp(-math.sqrt(3) * r / 2)
    np.testing.assert_allclose(m, k / k.sum(), rtol=1e-14)
    assert torch.equal(Matern(0.5, 0).matrix((3,)), Independent().matrix((3,)))
    assert torch.equal(RBF("inf").matrix((3,)), Constant().matrix((3,)))
    np.testing.assert_allclose(Independent().matrix((2, 2)).numpy(), np.eye(4) / 4)
    np.testing.assert_allclose(Constant().matrix((2, 2)).numpy(), np.ones((4, 4)) / 16)


# -- the new nonlinearities against neural-tangents 0.6.5 ------------------------------------------


def _nt_reference():
    import json
    from pathlib import Path

    return json.loads((Path(__file__).parent / "data" / "nt_sign_sin.json").read_text())


@pytest.mark.parametrize("case", ["sign_sin_flatten", "sin_sign_gap"])
@pytest.mark.parametrize("inputs", ["digits5", "random3c"])
def test_sign_and_sin_match_neural_tangents(case, inputs):
    """tests/data/nt_sign_sin.json: neural-tangents 0.6.5 (float64) kernels of
    Conv(W_std=1.2, b_std=0.3) → φ1 → Conv(W_std=1) → φ2 → Flatten|GlobalAvgPool → Dense(W_std=1),
    3×3 SAME convs, on the first 5 scikit-learn digits (/16) and 4 random 6×7×3 inputs."""
    import cnngp

    ref = _nt_reference()
    x = np.asarray(ref["inputs"][inputs])
    first, second = (Sign(), Sin(1.5, 0.7, 0.3)) if case == "sign_sin_flatten" else (Sin(1.0, 2.0, 0.0), Sign())
    readout = Readout() if case == "sign_sin_flatten" else Readout(correlation=Constant())
    net = cnngp.Serial(Conv(3, weight_var=1.44, bias_var=0.09), first, Conv(3), second, readout)
    got = cnngp.kernel(net, x).numpy()
    want = np.asarray(ref["cases"][f"{case}/{inputs}"])
    # Sin alone agrees to 4e-16; neural-tangents' Sign differs from the exact arcsine by up
    # to 3e-9 relative (it regularises the arcsine's argument), so 1e-8 here
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


def test_state_carries_extra_tensors_through_conversions_and_a_network():
    """KernelState.extra: converted with cross in one place; carried by every linear layer
    through band, diagonal and full representations."""
    import cnngp
    from cnngp.kernels.state import Band
    from cnngp.testing import random_states

    state = random_states((5, 4))
    grown = state.with_extra(theta=2.0 * state.cross)
    for convert in (lambda s: s.to_diagonal(), lambda s: s.to_band((1, 2)),
                    lambda s: s.to_band((2, 2)).to_band((1, 1)), lambda s: s.convert(True)):
        assert torch.equal(convert(grown).extra["theta"], 2.0 * convert(state).cross)
    with pytest.raises(cnngp.CNNGPError, match=r"KernelState.extra\['bad'\]: expected shape"):
        state.with_extra(bad=state.cross[:1])
    # a strided conv on the band path and on the full path: the extra follows σ_w² Σ * ·
    conv = Conv(3, stride=2, bias_var=0.2, weight_var=1.5)
    for rep_in, rep_out in ((True, True), (Band((2, 2)), Band((1, 1))), (True, False)):
        s0 = state if rep_in is True else state.convert(rep_in)
        a = conv.propagate(s0, rep_out)
        b = conv.propagate(s0.with_extra(theta=s0.cross), rep_out)
        assert b.representation == a.representation
        unbiased = torch.where(a.cross != 0, a.cross - 0.2, a.cross)  # band slots off the grid: 0
        torch.testing.assert_close(b.extra["theta"], unbiased, rtol=1e-12, atol=1e-14)

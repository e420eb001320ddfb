"""A shared contract every kernel layer passes (cf. GPyTorch's kernel test base), plus
per-layer closed forms. Each subclass of :class:`LayerContract` names one layer."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from cnngp import (
    ABReLU, AvgPool, Constant, Conv, Erf, Flatten, GlobalAvgPool, Identity, Independent, Matern,
    RBF, Readout, ReLU, UserCorrelation,
)
from cnngp.gram import _input_state
from cnngp.spec import from_spec
from cnngp._ops import band_radius_in
from cnngp.state import Band, KernelState


def _states(spatial, channels=2, batch=3, seed=0, dtype=torch.float64):
    """Full input states of real pairs (x_b, x'_b) with their variances."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand((batch, *spatial, channels), generator=g, dtype=dtype)
    x2 = torch.rand((batch, *spatial, channels), generator=g, dtype=dtype)
    state = _input_state(x1, x2, True)
    v1 = _input_state(x1, x1, False).cross
    v2 = _input_state(x2, x2, False).cross
    return state.with_variances(v1, v2)


class LayerContract:
    spatial = (6, 5)

    def make_layer(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def test_output_grid_and_shapes(self):
        layer = self.make_layer()
        state = _states(self.spatial)
        out_grid = layer.output_spatial(self.spatial)
        full_out = layer.requires_full_input(True, self.spatial) or True
        out = layer.propagate(state, full_out and len(out_grid) > 0)
        assert out.spatial == out_grid
        n = math.prod(out_grid) if out_grid else 1
        assert out.cross.numel() == state.batch * (n * n if out.full else n)
        assert torch.all(torch.isfinite(out.cross))

    def test_diagonal_output_equals_diagonal_of_full_output(self):
        layer = self.make_layer()
        state = _states(self.spatial)
        full = layer.propagate(state, True)
        diag = layer.propagate(state, False)
        torch.testing.assert_close(diag.diagonal(), full.diagonal(), rtol=1e-13, atol=0)

    def test_diagonal_input_when_allowed(self):
        layer = self.make_layer()
        if layer.requires_full_input(False, self.spatial):
            pytest.skip("this layer needs the full covariance")
        state = _states(self.spatial)
        from_full = layer.propagate(state, False).diagonal()
        from_diag = layer.propagate(state.to_diagonal(), False).diagonal()
        torch.testing.assert_close(from_diag, from_full, rtol=1e-13, atol=0)

    def test_band_output_equals_band_of_full_output(self):
        """Band in, band out (radius 1 above, what the layer asks for below) = the band of
        the full computation."""
        layer = self.make_layer()
        if isinstance(layer, GlobalAvgPool) or getattr(layer, "padding", None) == "circular":
            pytest.skip("this layer needs the full covariance")
        state = _states(self.spatial)
        out_grid = layer.output_spatial(self.spatial)
        out = Band(tuple(min(1, n - 1) for n in out_grid)) if out_grid else False
        if isinstance(layer, Conv):
            independent = layer.correlation_kind(self.spatial) == "independent"
            r_out = out.radius if out_grid else (0,) * len(self.spatial)
            r_in = band_radius_in(layer.geometries(self.spatial), r_out, independent)
        elif isinstance(layer, Readout):
            r_in = tuple(n - 1 for n in self.spatial)  # the whole grid: any Σ
        else:
            r_in = out.radius if out_grid else (1,) * len(self.spatial)
        got = layer.propagate(state.to_band(r_in), out)
        if out_grid:
            assert got.band == out.radius
            expected = layer.propagate(state, True).to_band(out.radius).cross
        else:
            expected = layer.propagate(state, False).cross
        torch.testing.assert_close(got.cross, expected, rtol=1e-12, atol=1e-14)

    def test_batch_equals_loop(self):
        layer = self.make_layer()
        state = _states(self.spatial)
        batched = layer.propagate(state, True).cross
        for b in range(state.batch):
            one = KernelState(state.cross[b : b + 1], state.spatial, True, state.var1[b : b + 1], state.var2[b : b + 1])
            torch.testing.assert_close(layer.propagate(one, True).cross[0], batched[b], rtol=1e-13, atol=1e-15)

    def test_spec_round_trip_and_pickle(self):
        layer = self.make_layer()
        state = _states(self.spatial)
        again = from_spec({"layers": [layer.to_spec()]}).layers[0]
        unpickled = pickle.loads(pickle.dumps(layer))
        expected = layer.propagate(state, True).cross
        assert torch.equal(again.propagate(state, True).cross, expected)
        assert torch.equal(unpickled.propagate(state, True).cross, expected)

    def test_float32_close_to_float64(self):
        layer = self.make_layer()
        s64 = _states(self.spatial)
        s32 = KernelState(s64.cross.float(), s64.spatial, True, s64.var1.float(), s64.var2.float())
        out64 = layer.propagate(s64, True).cross
        out32 = layer.propagate(s32, True).cross
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-6)


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


class TestReLU(LayerContract):
    def make_layer(self):
        return ReLU()


class TestABReLU(LayerContract):
    def make_layer(self):
        return ABReLU(-0.2, 1.3)


class TestErf(LayerContract):
    def make_layer(self):
        return Erf(1.2, 0.8, 0.1)


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

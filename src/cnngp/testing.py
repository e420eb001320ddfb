"""The contract every kernel layer passes, public so that a new layer — ours or a user's — is
one class plus one test class (as GPyTorch ships its kernel test base).

    from cnngp.testing import LayerContract, NonlinearityContract

    class TestMyLayer(LayerContract):
        def make_layer(self):
            return MyLayer(...)

    class TestMyNonlinearity(NonlinearityContract):   # all of LayerContract, and more
        def make_layer(self):
            return MyNonlinearity(...)

:class:`LayerContract` checks, on real pairs of random inputs: the output grid and shapes;
diagonal ≡ full (and diagonal input where the layer allows it); band ≡ the band of the full
result; a batch ≡ a loop over its pairs; the JSON spec round trip and pickling; float32 ≈
float64. :class:`NonlinearityContract` adds: the closed-form expectation against numerical
integration of the layer's own φ (:meth:`~cnngp.kernels.layers.Nonlinearity.function`), finite values
at zero variance, the fused CPU path ≡ the torch path in a network, and a Monte Carlo estimate
over finite networks (the layer's finite twin) within its standard error. pytest is needed
only by code that uses this module.
"""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from cnngp.engine.gram import input_state
from cnngp.kernels.layers import Conv, GlobalAvgPool, Readout, Serial
from cnngp.io.spec import from_spec
from cnngp.kernels.ops import band_radius_in
from cnngp.kernels.state import Band, KernelState

__all__ = ["LayerContract", "NonlinearityContract", "gaussian_expectation", "random_states"]


def random_states(spatial, channels=2, batch=3, seed=0, dtype=torch.float64):
    """Full input states of real pairs (x_b, x'_b), with their variances, to propagate."""
    g = torch.Generator().manual_seed(seed)
    x1 = torch.rand((batch, *spatial, channels), generator=g, dtype=dtype)
    x2 = torch.rand((batch, *spatial, channels), generator=g, dtype=dtype)
    state = input_state(x1, x2, True)
    v1 = input_state(x1, x1, False).cross
    v2 = input_state(x2, x2, False).cross
    return state.with_variances(v1, v2)


class LayerContract:
    """Subclass and define ``make_layer``; ``spatial`` is the input grid, ``float32_rtol``
    how close float32 must come to float64."""

    spatial = (6, 5)
    float32_rtol = 1e-5
    #: Θ in float32: V̇ of a kinked φ (ReLU) has unbounded slope in the correlation at ρ → 1,
    #: so float32's rounding of ρ is amplified near the diagonal (≈ eps / √(1 − ρ))
    ntk_float32_rtol = 1e-3

    def make_layer(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def test_output_grid_and_shapes(self):
        layer = self.make_layer()
        state = random_states(self.spatial)
        out_grid = layer.output_spatial(self.spatial)
        full_out = layer.requires_full_input(True, self.spatial) or True
        out = layer.propagate(state, full_out and len(out_grid) > 0)
        assert out.spatial == out_grid
        n = math.prod(out_grid) if out_grid else 1
        assert out.cross.numel() == state.batch * (n * n if out.full else n)
        assert torch.all(torch.isfinite(out.cross))

    def test_diagonal_output_equals_diagonal_of_full_output(self):
        layer = self.make_layer()
        state = random_states(self.spatial)
        full = layer.propagate(state, True)
        diag = layer.propagate(state, False)
        torch.testing.assert_close(diag.diagonal(), full.diagonal(), rtol=1e-13, atol=0)

    def test_diagonal_input_when_allowed(self):
        layer = self.make_layer()
        if layer.requires_full_input(False, self.spatial):
            pytest.skip("this layer needs the full covariance")
        state = random_states(self.spatial)
        from_full = layer.propagate(state, False).diagonal()
        from_diag = layer.propagate(state.to_diagonal(), False).diagonal()
        torch.testing.assert_close(from_diag, from_full, rtol=1e-13, atol=0)

    def test_band_output_equals_band_of_full_output(self):
        """Band in, band out (radius 1 above, what the layer asks for below) = the band of
        the full computation."""
        layer = self.make_layer()
        case = self._band_case(layer)
        if case is None:
            pytest.skip("this layer needs the full covariance")
        got, expected = self._band_pair(layer, random_states(self.spatial), *case)
        torch.testing.assert_close(got.cross, expected.cross, rtol=1e-12, atol=1e-14)

    def _band_case(self, layer):
        """(input band radius, output representation) for the band check, or None."""
        if isinstance(layer, GlobalAvgPool) or getattr(layer, "padding", None) == "circular":
            return None
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
        return r_in, out

    def _band_pair(self, layer, state, r_in, out):
        """(band computation, the same from the full state, cut to the band)."""
        got = layer.propagate(state.to_band(r_in), out)
        if isinstance(out, Band):
            assert got.band == out.radius
            return got, layer.propagate(state, True).to_band(out.radius)
        return got, layer.propagate(state, False)

    def test_batch_equals_loop(self):
        layer = self.make_layer()
        state = random_states(self.spatial)
        batched = layer.propagate(state, True).cross
        for b in range(state.batch):
            one = KernelState(state.cross[b : b + 1], state.spatial, True, state.var1[b : b + 1], state.var2[b : b + 1])
            torch.testing.assert_close(layer.propagate(one, True).cross[0], batched[b], rtol=1e-13, atol=1e-15)

    def test_spec_round_trip_and_pickle(self):
        layer = self.make_layer()
        state = random_states(self.spatial)
        again = from_spec({"layers": [layer.to_spec()]}).layers[0]
        unpickled = pickle.loads(pickle.dumps(layer))
        expected = layer.propagate(state, True).cross
        assert torch.equal(again.propagate(state, True).cross, expected)
        assert torch.equal(unpickled.propagate(state, True).cross, expected)

    def test_extra_tensors_follow_the_linear_part(self):
        """A tensor carried beside ``cross`` (KernelState.extra) goes through a linear layer's
        map without its bias; a nonlinearity refuses it unless it defines a rule."""
        from cnngp.errors import CNNGPError
        from cnngp.kernels.layers import Nonlinearity

        layer = self.make_layer()
        state = random_states(self.spatial)
        probe = state.with_extra(probe=state.cross * 0.5)
        for rep in (True, False):
            if not rep and layer.requires_full_input(False, self.spatial):
                continue
            if isinstance(layer, Nonlinearity):
                if getattr(layer, "needs_variances", True):
                    with pytest.raises(CNNGPError, match="no rule to carry the extra tensor 'probe'"):
                        layer.propagate(probe, rep)
                continue
            out = layer.propagate(probe, rep)
            plain = layer.propagate(state, rep).cross
            bias = getattr(layer, "bias_var", 0.0)
            assert set(out.extra) == {"probe"} and out.extra["probe"].shape == out.cross.shape
            torch.testing.assert_close(out.extra["probe"], 0.5 * (plain - bias), rtol=1e-12, atol=1e-14)

    def _tangent_state(self, state):
        """The state with a Θ to carry: a positive multiple of cross plus a constant."""
        from cnngp.kernels.layers import TANGENT

        return state.with_extra(**{TANGENT: 0.6 * state.cross + 0.2})

    def _has_ntk(self, layer) -> bool:
        from cnngp.errors import CNNGPError
        from cnngp.kernels.layers import Nonlinearity

        if not isinstance(layer, Nonlinearity) or not getattr(layer, "needs_variances", True):
            return True
        one = torch.ones(1, dtype=torch.float64)
        try:
            layer.derivative_expectation(0.5 * one, one, one)
        except CNNGPError:
            return False
        return True

    def test_ntk_rule_and_representations(self):
        """Θ through the layer (docs/maths.md §7): the linear part, plus the output NNGP for a
        trainable layer, times V̇ for a nonlinearity; diagonal ≡ full, band ≡ band of full,
        batch ≡ loop, float32 ≈ float64 — for Θ as for the NNGP."""
        from cnngp.errors import CNNGPError
        from cnngp.kernels.layers import TANGENT, Nonlinearity

        layer = self.make_layer()
        state = self._tangent_state(random_states(self.spatial))
        if not self._has_ntk(layer):
            with pytest.raises(CNNGPError, match="neural tangent kernel|NTK"):
                layer.propagate(state, True)
            return
        full = layer.propagate(state, True)
        theta = full.extra[TANGENT]
        assert theta.shape == full.cross.shape and torch.all(torch.isfinite(theta))
        # the rule, from the layer's own NNGP map on the Θ part alone
        if isinstance(layer, Nonlinearity):
            if getattr(layer, "needs_variances", True):
                vx = state.var1.reshape(state.var1.shape + (1,) * state.ndim)
                vy = state.var2.reshape((state.batch,) + (1,) * state.ndim + state.var2.shape[1:])
                want = state.extra[TANGENT] * layer.derivative_expectation(state.cross, vx, vy)
            else:
                want = state.extra[TANGENT]
        else:
            lin = layer.propagate(state.evolve(state.extra[TANGENT]).with_variances(state.var1, state.var2), True)
            want = lin.cross - getattr(layer, "bias_var", 0.0)
            if getattr(layer, "trainable", False):
                want = want + full.cross
        torch.testing.assert_close(theta, want, rtol=1e-12, atol=1e-14)
        if len(full.spatial) and not layer.requires_full_input(False, self.spatial):
            diag = layer.propagate(state.to_diagonal(), False)
            torch.testing.assert_close(diag.extra[TANGENT], full.to_diagonal().extra[TANGENT],
                                       rtol=1e-12, atol=1e-14)
        case = self._band_case(layer)
        if case is not None:
            got, expected = self._band_pair(layer, state, *case)
            torch.testing.assert_close(got.extra[TANGENT], expected.extra[TANGENT], rtol=1e-12, atol=1e-14)
        for b in range(state.batch):
            one = KernelState(state.cross[b:b + 1], state.spatial, True, state.var1[b:b + 1],
                              state.var2[b:b + 1], extra={TANGENT: state.extra[TANGENT][b:b + 1]})
            torch.testing.assert_close(layer.propagate(one, True).extra[TANGENT][0], theta[b],
                                       rtol=1e-13, atol=1e-15)
        s32 = KernelState(state.cross.float(), state.spatial, True, state.var1.float(), state.var2.float(),
                          extra={TANGENT: state.extra[TANGENT].float()})
        torch.testing.assert_close(layer.propagate(s32, True).extra[TANGENT].double(), theta,
                                   rtol=self.ntk_float32_rtol, atol=1e-6)

    def test_float32_close_to_float64(self):
        layer = self.make_layer()
        s64 = random_states(self.spatial)
        s32 = KernelState(s64.cross.float(), s64.spatial, True, s64.var1.float(), s64.var2.float())
        out64 = layer.propagate(s64, True).cross
        out32 = layer.propagate(s32, True).cross
        assert out32.dtype == torch.float32
        torch.testing.assert_close(out32.double(), out64, rtol=self.float32_rtol, atol=1e-6)




def gaussian_expectation(phi, vx: float, vy: float, c: float, kinks=(0.0,)) -> float:
    """E[φ(u)φ(v)] for a centred Gaussian pair (Var u = vx, Var v = vy, Cov = c) by nested
    adaptive quadrature (scipy), independent of any closed form: u = √vx·t, v = b1·t + b2·s
    with t, s standard normal. ``kinks`` are points where φ is not smooth (its argument)."""
    from scipy import integrate

    a = math.sqrt(vx)
    rho = c / math.sqrt(vx * vy)
    b1, b2 = math.sqrt(vy) * rho, math.sqrt(vy * max(1 - rho * rho, 0))
    density = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731
    f = lambda x: float(phi(torch.tensor(x, dtype=torch.float64)))  # noqa: E731

    def inner(t):
        points = [(k - b1 * t) / b2 for k in kinks] if b2 > 0 else None
        return integrate.quad(lambda s: f(b1 * t + b2 * s) * density(s), -12, 12,
                              points=points, limit=200)[0]

    outer_points = [k / a for k in kinks]
    return integrate.quad(lambda t: f(a * t) * inner(t) * density(t), -12, 12,
                          points=outer_points, limit=200)[0]


class NonlinearityContract(LayerContract):
    """:class:`LayerContract` and the checks of a nonlinearity's maths and twins.

    Attributes a subclass may set: ``kinks`` (arguments where φ is not smooth, for the
    quadrature), ``quadrature_rtol``, ``monte_carlo_width`` and ``monte_carlo_samples``.
    """

    kinks = (0.0,)
    quadrature_rtol = 1e-6
    monte_carlo_width = 32
    monte_carlo_samples = 400

    @pytest.mark.parametrize("vx, vy, c", [(1.0, 2.0, 0.7), (0.5, 0.8, -0.3), (2.0, 2.0, 0.0),
                                           (1.0, 1.0, 0.999)])
    def test_expectation_by_quadrature(self, vx, vy, c):
        layer = self.make_layer()
        t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
        got = float(layer.expectation(t(c), t(vx), t(vy)))
        want = gaussian_expectation(layer.function, vx, vy, c, self.kinks)
        assert got == pytest.approx(want, rel=self.quadrature_rtol, abs=1e-9)

    @pytest.mark.parametrize("vx, vy, c", [(1.0, 2.0, 0.7), (0.5, 0.8, -0.3), (2.0, 2.0, 0.0)])
    def test_derivative_expectation_by_quadrature(self, vx, vy, c):
        """V̇ = E[φ′(u)φ′(v)] (the NTK's) against quadrature of φ′ from autograd of φ."""
        layer = self.make_layer()
        if not self._has_ntk(layer):
            pytest.skip("no NTK for this nonlinearity")

        def dphi(x):
            x = x.detach().clone().requires_grad_(True)
            layer.function(x).sum().backward()
            return x.grad

        t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
        got = float(layer.derivative_expectation(t(c), t(vx), t(vy)))
        want = gaussian_expectation(dphi, vx, vy, c, self.kinks)
        assert got == pytest.approx(want, rel=self.quadrature_rtol, abs=1e-9)

    def test_zero_and_tiny_variances_are_finite(self):
        layer = self.make_layer()
        z = torch.zeros(3, dtype=torch.float64)
        one = torch.ones(3, dtype=torch.float64)
        for c, vx, vy in ((z, z, z), (z, z, one), (1e-200 * one, 1e-200 * one, 1e-200 * one)):
            assert torch.all(torch.isfinite(layer.expectation(c, vx, vy)))
            if self._has_ntk(layer):
                assert torch.all(torch.isfinite(layer.derivative_expectation(c, vx, vy)))

    def _network(self):
        return Serial(Conv(3, weight_var=1.5, bias_var=0.1), self.make_layer(), Conv(3),
                      self.make_layer(), Readout())

    def test_fused_path_equals_torch_path(self, monkeypatch):
        from cnngp.engine import gram

        x = np.random.default_rng(11).uniform(-1, 1, size=(3, 5, 5, 2))
        net = self._network()
        fast = gram.kernel(net, x).numpy()
        monkeypatch.setenv("CNNGP_FAST", "0")
        slow = gram.kernel(net, x).numpy()
        np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-14)

    def test_monte_carlo_of_the_finite_twin(self):
        from cnngp.finite import monte_carlo_kernel
        from cnngp.engine.gram import kernel

        x = np.random.default_rng(12).uniform(-1, 1, size=(3, 4, 4, 2))
        net = self._network()
        analytic = kernel(net, x).numpy()
        empirical, se = monte_carlo_kernel(net, x, width=self.monte_carlo_width,
                                           n_samples=self.monte_carlo_samples, seed=3,
                                           n_outputs=8, dtype="float64")
        z = np.abs(empirical.numpy() - analytic) / np.maximum(se.numpy(), 1e-12)
        # finite width biases the estimate by O(1/width): allow it beside 5 standard errors
        bias = 4.0 / self.monte_carlo_width * np.abs(analytic)
        assert np.all(np.abs(empirical.numpy() - analytic) <= 5 * se.numpy() + bias), z.max()

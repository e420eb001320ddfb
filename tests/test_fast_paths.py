"""The fused numba path (cnngp.engine.fused) against the reference torch path of the layers.

Every optimised path must give the torch path's results: float64 to ~1e-12, float32 within
1e-5 of the float64 Gram matrix; and with numba missing or disabled the torch path runs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cnngp
from cnngp import ABReLU, AvgPool, Constant, Conv, Erf, GlobalAvgPool, Matern, RBF, Readout, ReLU, Serial, UserCorrelation
from cnngp.io import architectures
from cnngp.engine import fused
from cnngp.kernels.layers import TANGENT, _relu_expectation
from cnngp.kernels.state import KernelState

from conftest import rel_err

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba is not installed")


@pytest.fixture
def torch_path(monkeypatch):
    """Run the reference torch path (CNNGP_FAST=0)."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setenv("CNNGP_FAST", "0")
            return fn(*args, **kwargs)

    return run


def _psd_full(b, spatial, seed, dtype=torch.float64):
    """A random self/cross position-pair tensor with matching variances (a valid kernel state)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(spatial)
    x = torch.rand((b, n, 4), generator=g, dtype=torch.float64) - 0.3
    y = torch.rand((b, n, 4), generator=g, dtype=torch.float64) - 0.3
    cross = (x @ y.transpose(1, 2)).reshape((b,) + spatial + spatial)
    selfx = (x @ x.transpose(1, 2)).reshape((b,) + spatial + spatial)
    return cross.to(dtype), selfx.to(dtype)


# -- the ReLU expectation ------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(np.float64, 4e-16), (np.float32, 3e-7)])
def test_relu_polynomial_matches_arccos_form(dtype, tol):
    rng = np.random.default_rng(0)
    vx = rng.uniform(0.1, 3, (1, 64))
    vy = rng.uniform(0.1, 3, (1, 64))
    vx[0, :4] = 0.0  # zero-variance positions (blank borders): the value must be exactly 0
    rho = rng.uniform(-1, 1, (1, 64, 64))
    rho[0, :, :8] = 1 - np.logspace(-16, -1, 8)
    rho[0, :, 8:16] = -1 + np.logspace(-16, -1, 8)
    rho[0, :, 16] = 1.0
    rho[0, :, 17] = -1.0
    rho[0, :, 18] = 0.0
    c = rho * np.sqrt(vx[:, :, None] * vy[:, None, :])
    c[0, :, 19] *= 1 + 1e-15  # |ρ| a rounding error above 1
    ref = 2 * _relu_expectation(
        torch.tensor(c), torch.tensor(vx)[:, :, None], torch.tensor(vy)[:, None, :]
    ).numpy()
    # a 1×1 conv (Σ = [[1]]) on the 1-D grid of 64 positions: K = c, then the ReLU
    conv = Conv(1)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    out = fused.conv_full(
        torch.tensor(c, dtype=tdt), conv, ReLU(), torch.tensor(vx, dtype=tdt), torch.tensor(vy, dtype=tdt)
    ).numpy()
    scale = np.sqrt(vx[:, :, None] * vy[:, None, :]) + np.abs(c)
    assert np.all(np.abs(out - ref) <= tol * np.maximum(scale, 1e-300) + 1e-300)
    assert np.all(out[0, :4] == 0)
    assert np.all(out >= 0)


# -- one conv (+ nonlinearity) on a full tensor ------------------------------------------------

CONVS = [
    ("3x3 same", Conv(3), (7, 6)),
    ("5x3 valid stride 2", Conv([5, 3], stride=[2, 1], padding="valid"), (9, 7)),
    ("3x3 dilation 2 stride 2", Conv(3, stride=2, dilation=2), (8, 7)),
    ("weights and bias", Conv(3, weight_var=1.7, bias_var=0.3), (5, 5)),
    ("avgpool 2x2", AvgPool(2), (6, 8)),
    ("avgpool 3x3 stride 1 same", AvgPool(3, stride=1, padding="same"), (6, 5)),
    ("matern 4x4 stride 2", Conv(4, stride=2, correlation=Matern(1.5, 2.0)), (8, 8)),
    ("rbf 3x2", Conv([3, 2], correlation=RBF(1.3)), (6, 5)),
    ("matern 6x6 stride 2 (myrtle10-correlated)", Conv(6, stride=2, correlation=Matern(1.5, 3.0)), (12, 12)),
    ("1-D stride 2", Conv(3, stride=2), (11,)),
    ("1-D matern", Conv(5, correlation=Matern(0.5, 1.0)), (9,)),
]


def _user_conv():
    """A user Σ of Kronecker rank 2 (a random PSD matrix has rank 4 > 3 taps: torch path)."""
    g = np.random.default_rng(3)
    psd = [(lambda a: a @ a.T)(g.standard_normal((n, n))) for n in (2, 3, 2, 3)]
    return Conv([2, 3], correlation=UserCorrelation(np.kron(psd[0], psd[1]) + np.kron(psd[2], psd[3])))


CONVS.append(("user correlation 2x3", _user_conv(), (5, 6)))


@pytest.mark.parametrize("act", [None, ReLU(), ABReLU(0.2, 1.1)], ids=["conv", "relu", "abrelu"])
@pytest.mark.parametrize("name,conv,spatial", CONVS, ids=[c[0] for c in CONVS])
def test_conv_full_matches_torch(name, conv, spatial, act):
    conv.output_spatial(spatial)
    plan = fused.conv_plan(conv, spatial)
    assert plan is not None
    cross, selfx = _psd_full(2, spatial, seed=len(name))
    state = KernelState(cross, spatial, True)
    ref = conv.propagate(state, True)
    var1 = var2 = None
    if act is not None:
        q = ref.spatial
        g = torch.Generator().manual_seed(1)
        var1 = torch.rand((2,) + q, generator=g, dtype=torch.float64) + 2.0
        var2 = torch.rand((2,) + q, generator=g, dtype=torch.float64) + 2.0
        var1[0, 0] = 0.0  # a zero-variance position
        ref = act.propagate(ref.with_variances(var1, var2), True)
    out = fused.conv_full(cross, conv, act, var1, var2)
    assert out.shape == ref.cross.shape
    assert rel_err(out, ref.cross) < 1e-13

    # self-covariance (symmetric) mode computes half the slabs and mirrors them
    sref = conv.propagate(KernelState(selfx, spatial, True), True)
    d = None
    if act is not None:
        d = sref.diagonal()
        sref = act.propagate(sref.with_variances(d, d), True)
    sout = fused.conv_full(selfx, conv, act, d, d, symmetric=True)
    assert rel_err(sout, sref.cross) < 1e-13


def test_conv_full_float32():
    conv, spatial = Conv(3), (8, 8)
    cross, _ = _psd_full(1, spatial, seed=5)
    ref = conv.propagate(KernelState(cross, spatial, True), True).cross
    out = fused.conv_full(cross.float(), conv)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-6


def test_layer_changes_after_a_run_are_seen(torch_path):
    """Plans are cached on the layers: a changed weight_var or correlation must not be stale."""
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (2, 6, 6, 3))
    conv = Conv(3, correlation=Matern(1.5, 1.0))
    net = Serial(Conv(3), ReLU(), conv, ReLU(), Readout(correlation=Constant()))
    cnngp.kernel(net, x)
    conv.weight_var, conv.bias_var, conv.correlation = 2.0, 0.5, Matern(0.5, 2.0)
    assert rel_err(cnngp.kernel(net, x), torch_path(cnngp.kernel, net, x)) < 1e-12


@pytest.mark.parametrize("route", ["deepcopy", "pickle"])
def test_a_lengthscale_changed_in_place_after_a_copy_is_never_served_a_stale_plan(route):
    """The engines cache plans on the layers, once keyed by the correlation object, whose hash
    follows its value: a network run once, copied (the cache with it), its λ then set in place,
    and copied or pickled again (rehashing the cache: a Dask worker's copy) found the plan of
    the old λ under the new one and computed offset sums off by up to 23 % — silently, into
    stores whose records then matched. Oracles: the same network rebuilt from its spec (no
    history), and the reference torch path."""
    import copy
    import pickle

    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, (3, 8, 8, 1))
    body = Serial(Conv(3), ReLU(), Conv(4, stride=2, padding="same", correlation=Matern(1.5, 3.0)), ReLU(),
                  Conv(3), ReLU())
    cnngp.offset_sums(body, x)  # plans cached for λ = 3
    changed = copy.deepcopy(body)
    changed.layers[2].correlation.lengthscale = 0.3  # in place, on the copy (the old way of learn)
    again = copy.deepcopy(changed) if route == "deepcopy" else pickle.loads(pickle.dumps(changed))
    # the caches are not copied with the layers at all (a worker builds its own)
    assert "_fused_plans" in vars(body.layers[2])
    assert not any(name in vars(layer) for layer in again.layers for name in layer.ENGINE_CACHES)
    want = cnngp.offset_sums(cnngp.io.spec.from_spec(changed.to_spec()), x)
    assert rel_err(cnngp.offset_sums(again, x), want) < 1e-12
    assert rel_err(cnngp.offset_sums(changed, x), want) < 1e-12


def test_high_rank_correlation_uses_dense_path():
    g = np.random.default_rng(0)
    a = g.standard_normal((25, 25))
    conv = Conv(5, correlation=UserCorrelation(a @ a.T))
    assert fused.conv_plan(conv, (8, 8)) is None  # Kronecker rank 25: the dense GEMM is cheaper


def test_unsupported_layers_are_left_to_torch():
    assert fused.conv_plan(Conv(3, padding="circular"), (6, 6)) is None
    assert fused.conv_plan(Conv(3), (4, 4, 4)) is None


# -- whole Gram matrices: fast path vs torch path ---------------------------------------------

NETS = {
    "relu stack + gap": lambda: Serial(Conv(3), ReLU(), Conv(3), ReLU(), Readout(correlation=Constant())),
    "myrtle-like": lambda: Serial(
        Conv(3), ReLU(), AvgPool(2), Conv(3), ReLU(), Readout(correlation=Matern(1.5, 1.0))
    ),
    "correlated + erf + bias": lambda: Serial(
        Conv(4, stride=2, correlation=Matern(1.5, 2.0), bias_var=0.1),
        Erf(),
        Conv(3, weight_var=2.0),
        ABReLU(0.1, 1.0),
        GlobalAvgPool(),
    ),
    "flatten readout (diagonal path)": lambda: Serial(Conv(3), ReLU(), Conv(3), ReLU(), Readout()),
    "non-stationary user readout": lambda: Serial(
        Conv(3), ReLU(), Conv(3, stride=2), ReLU(), Readout(correlation=_user_readout(4 * 4))
    ),
}


def _user_readout(n):
    a = np.random.default_rng(6).standard_normal((n, n))
    return UserCorrelation(a @ a.T)


@pytest.mark.parametrize("name", list(NETS))
def test_gram_matches_torch_path(name, torch_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (4, 8, 8, 3))
    x[0, :2] = 0.0  # blank rows: zero-variance positions
    x2 = rng.uniform(0, 1, (2, 8, 8, 3))
    net = NETS[name]()
    ref = torch_path(cnngp.kernel, net, x)
    fast = cnngp.kernel(net, x)
    assert rel_err(fast, ref) < 1e-12
    assert torch.allclose(fast, fast.T, rtol=0, atol=0)
    ref2 = torch_path(cnngp.kernel, net, x, x2)
    assert rel_err(cnngp.kernel(net, x, x2, batch_size=3), ref2) < 1e-12
    f32 = cnngp.kernel(net, x, dtype="float32")
    assert rel_err(f32, ref) < 1e-5


def test_1d_gram_matches_torch_path(torch_path):
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (4, 12, 2))
    net = Serial(
        Conv(3), ReLU(), Conv(4, stride=2, correlation=Matern(1.5, 2.0)), ABReLU(0.1, 1.0),
        AvgPool(2), Conv(3), ReLU(), Readout(correlation=Matern(0.5, 1.0)),
    )
    assert rel_err(cnngp.kernel(net, x), torch_path(cnngp.kernel, net, x)) < 1e-12


def test_readout_sweep_fast_path(torch_path):
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (3, 8, 8, 3))
    body = Serial(Conv(3), ReLU(), Conv(3), ReLU())
    heads = [Readout(correlation=Matern(1.5, ls)) for ls in (0.5, 2.0)] + [Readout(correlation=Constant())]
    ref = torch_path(cnngp.readout_sweep, body, heads, x)
    assert rel_err(cnngp.readout_sweep(body, heads, x), ref) < 1e-12


def test_without_numba_the_torch_path_runs(monkeypatch, torch_path):
    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (3, 6, 6, 3))
    net = NETS["myrtle-like"]()
    ref = torch_path(cnngp.kernel, net, x)
    monkeypatch.setattr(fused, "_KERNELS", None)
    monkeypatch.setattr(fused, "_IMPORT_FAILED", True)  # as if `import numba` had failed
    assert not fused.available()
    assert torch.equal(cnngp.kernel(net, x), ref)


# -- real images: neural-tangents references --------------------------------------------------


def _reference(reference_dir, case):
    return np.load(reference_dir / f"{case}.npz")


def test_cnngp4_against_neural_tangents(reference_dir):
    r = _reference(reference_dir, "cnngp4")
    body = architectures.body("cnngp4")
    heads = [Readout(correlation=Constant())] + [
        Readout(correlation=Matern(1.5, float(ls))) for ls in r["lengthscales"]
    ]
    k = cnngp.readout_sweep(Serial(*body), heads, r["x"]).numpy()
    assert rel_err(k[0], r["kernel_gap"]) < 1e-10
    assert rel_err(k[1:], r["kernel_matern32"]) < 1e-10
    k32 = cnngp.readout_sweep(Serial(*body), heads, r["x"], dtype="float32").numpy()
    assert rel_err(k32, k) < 1e-5


@pytest.mark.parametrize("case,arch", [("myrtle10", "myrtle10"), ("cnngp14", "cnngp14")])
def test_deep_nets_against_neural_tangents(reference_dir, case, arch):
    r = _reference(reference_dir, case)
    x = r["x"][:3]
    net = architectures.get(arch, readout=Constant())
    k = cnngp.kernel(net, x).numpy()
    assert rel_err(k, r["kernel_gap"][:3, :3]) < 1e-10
    k32 = cnngp.kernel(net, x, dtype="float32").numpy()
    assert rel_err(k32, k) < 1e-5


def test_zero_variance_1d_against_neural_tangents(reference_dir):
    r = _reference(reference_dir, "conv1d_digits")
    net = Serial(
        Conv(5), ReLU(), Conv(3, stride=2), ReLU(), Conv(3, padding="valid"), ReLU(),
        Readout(correlation=Constant()),
    )
    x = r["x"][:5]
    k = cnngp.kernel(net, x).numpy()
    assert rel_err(k, r["kernel_gap"][:5, :5]) < 1e-10


def test_myrtle10_correlated_fast_path_matches_torch(torch_path, cifar32):
    x = cifar32[:2, 8:24, 8:24]  # 16×16 crops of two real CIFAR-10 images
    net = architectures.get("myrtle10-correlated")
    ref = torch_path(cnngp.kernel, net, x)
    assert rel_err(cnngp.kernel(net, x), ref) < 1e-12


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("arch", ["cnngp3", "myrtle5", "strided", "strided1d"])
def test_fused_diagonal_and_band_kernels(monkeypatch, torch_path, cifar32, arch, dtype, tol):
    """The fused arccos-free ReLU (large diagonal/band batches) equals the torch path's atan2
    form, through strides, dilations, paddings, biases and 1-D."""
    import cnngp.kernels.layers

    x = cifar32[:3]
    if arch == "strided":  # strides, dilations, valid/same, bias: every box_conv branch
        net = Serial(Conv([3, 2], stride=[2, 1], dilation=[1, 2], padding="valid", bias_var=0.2),
                     ReLU(), Conv(4, stride=3, weight_var=1.6), ABReLU(-0.2, 1.1), Conv(1), ReLU(),
                     cnngp.Readout())
    elif arch == "strided1d":
        net = Serial(Conv(3, stride=2, dilation=2, bias_var=0.1), ReLU(), Conv(2, padding="valid"),
                     ReLU(), cnngp.Flatten())
        x = x.reshape(3, 32 * 32, 3)
    else:
        net = cnngp.io.architectures.get(arch, readout=cnngp.Independent())
    ref = torch_path(cnngp.kernel, net, x)
    monkeypatch.setattr(cnngp.kernels.layers, "POINTWISE_MIN", 0)  # every batch through the kernels
    calls = []
    original = fused.relu_pointwise
    monkeypatch.setattr(fused, "relu_pointwise", lambda *a: calls.append(1) or original(*a))
    got = cnngp.kernel(net, x, dtype=dtype).double()
    assert calls, "the pointwise kernel was not used"
    assert rel_err(got, ref) < tol


class _HalfReLU(cnngp.ABReLU):
    """A subclass that keeps ABReLU's coefficients but computes another expectation: half of
    it. The fused path must decline it (it declares no ReLU form) rather than run ABReLU's."""

    def expectation(self, c, vx, vy):
        return 0.5 * super().expectation(c, vx, vy)


@pytest.mark.parametrize("readout", [cnngp.Matern(1.5, 2.0), cnngp.Independent()])
def test_overridden_expectation_is_not_computed_with_the_parents_formula(
    monkeypatch, torch_path, readout
):
    from cnngp.kernels import layers

    monkeypatch.setattr(layers, "POINTWISE_MIN", 1)  # the diagonal path's fused kernel too
    net = cnngp.Serial(cnngp.Conv(3), _HalfReLU(0.1, 1.0), cnngp.Conv(3), _HalfReLU(0.1, 1.0),
                       cnngp.Readout(correlation=readout))
    assert _HalfReLU(0.1, 1.0).relu_coefficients() is None
    assert cnngp.ABReLU(0.1, 1.0).relu_coefficients() == (0.1, 1.0)
    x = np.random.default_rng(5).uniform(size=(3, 6, 6, 2))
    fused = cnngp.kernel(net, x).numpy()
    reference = torch_path(cnngp.kernel, net, x).numpy()
    np.testing.assert_allclose(fused, reference, rtol=1e-12)
    # and it is not the parent's kernel (which the old isinstance test computed: ~75 % off)
    parent = cnngp.Serial(cnngp.Conv(3), cnngp.ABReLU(0.1, 1.0), cnngp.Conv(3),
                          cnngp.ABReLU(0.1, 1.0), cnngp.Readout(correlation=readout))
    assert np.abs(cnngp.kernel(parent, x).numpy() / fused - 1).min() > 0.5


class _ScaledConv(cnngp.Conv):
    """Changes the maths by overriding propagate: twice the parent's kernel."""

    def propagate(self, state, full_out):
        out = super().propagate(state, full_out)
        return out.evolve(2.0 * out.cross)


class _ShiftedReadout(cnngp.Readout):
    def propagate(self, state, full_out):
        out = super().propagate(state, full_out)
        return out.evolve(out.cross + 1.0)


def test_overridden_conv_and_readout_are_left_to_their_own_propagate(monkeypatch, torch_path):
    assert cnngp.Conv(3).affine_filter() and cnngp.AvgPool(2).affine_filter()
    assert not _ScaledConv(3).affine_filter() and not _ShiftedReadout().affine_readout()
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), _ScaledConv(3), cnngp.ReLU(),
                       _ShiftedReadout(correlation=cnngp.Matern(1.5, 2.0)))
    x = np.random.default_rng(6).uniform(size=(3, 6, 6, 2))
    fused = cnngp.kernel(net, x).numpy()
    np.testing.assert_allclose(fused, torch_path(cnngp.kernel, net, x).numpy(), rtol=1e-12)
    parent = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(),
                          cnngp.Readout(correlation=cnngp.Matern(1.5, 2.0)))
    np.testing.assert_allclose(fused, 2.0 * cnngp.kernel(parent, x).numpy() + 1.0, rtol=1e-12)


# -- the NTK's Θ through the fused kernels (docs/maths.md §7) ---------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_relu_derivative_polynomial_matches_arccos(dtype):
    """V̇ = c_lin + c_relu(1 − θ/π) by the arccos-free polynomial against the torch layer's
    atan2 form on the same (dtype-rounded) inputs, for ρ across [−1, 1] (ρ = ±1 and a rounding
    step past it) and zero variances."""
    rng = np.random.default_rng(5)
    vx = rng.uniform(0.1, 3, (1, 64)).astype(dtype)
    vy = rng.uniform(0.1, 3, (1, 64)).astype(dtype)
    vx[0, :4] = 0.0  # zero variance: θ = π/2, as the torch path
    rho = rng.uniform(-1, 1, (1, 64, 64))
    rho[0, :, :8] = 1 - np.logspace(-16, -1, 8)
    rho[0, :, 8:16] = -1 + np.logspace(-16, -1, 8)
    rho[0, :, 16], rho[0, :, 17], rho[0, :, 18] = 1.0, -1.0, 0.0
    c = rho * np.sqrt(vx[:, :, None].astype(np.float64) * vy[:, None, :])
    c[0, :, 19] *= 1 + 1e-15
    c = c.astype(dtype)
    eps = np.finfo(dtype).eps
    # θ's sensitivity to the rounding of ρ grows as 1/sqrt(1 − ρ²) (either form has it)
    near = np.abs(np.abs(rho) - 1) < 1e-3
    bound = np.where(near, 4 * np.sqrt(eps), 100 * eps)
    f64 = lambda a: torch.tensor(a.astype(np.float64))  # noqa: E731
    for act in (ReLU(), ABReLU(0.2, 1.1)):
        ref = act.derivative_expectation(f64(c), f64(vx)[:, :, None], f64(vy)[:, None, :]).numpy()
        # a 1×1 conv (Σ = [[1]]) with Θ_in = 1: Θ_out = (1 + K)·V̇
        k, theta = fused.conv_full(
            torch.tensor(c), Conv(1), act, torch.tensor(vx), torch.tensor(vy),
            theta=torch.ones(c.shape, dtype=torch.tensor(c).dtype),
        )
        vdot = theta.double().numpy() / (1.0 + c.astype(np.float64))
        assert np.all(np.abs(vdot - ref) <= bound), float(np.max(np.abs(vdot - ref) - bound))


@pytest.mark.parametrize("act", [None, ReLU(), ABReLU(0.2, 1.1)], ids=["conv", "relu", "abrelu"])
@pytest.mark.parametrize("name,conv,spatial", CONVS, ids=[c[0] for c in CONVS])
def test_conv_full_carries_theta_like_torch(name, conv, spatial, act):
    """Θ_out = weight_var·Σ*Θ_in + K_out (trainable conv; a pool adds no K), then ⊙V̇, from a
    given Θ_in and from Θ_in = 0, against the layers' own propagate."""
    conv.output_spatial(spatial)
    cross, _ = _psd_full(2, spatial, seed=len(name))
    theta_in, _ = _psd_full(2, spatial, seed=len(name) + 100)
    for given in (theta_in, 0):
        t_in = theta_in if torch.is_tensor(given) else torch.zeros_like(cross)
        state = KernelState(cross, spatial, True, extra={TANGENT: t_in})
        ref = conv.propagate(state, True)
        var1 = var2 = None
        if act is not None:
            g = torch.Generator().manual_seed(1)
            var1 = torch.rand((2,) + ref.spatial, generator=g, dtype=torch.float64) + 2.0
            var2 = torch.rand((2,) + ref.spatial, generator=g, dtype=torch.float64) + 2.0
            var1[0, 0] = 0.0
            ref = act.propagate(ref.with_variances(var1, var2), True)
        k, theta = fused.conv_full(cross, conv, act, var1, var2, theta=given)
        assert rel_err(k, ref.cross) < 1e-13
        if not ref.extra[TANGENT].any():  # a pool on Θ = 0: no parameters, Θ stays 0
            assert not theta.any()
        else:
            assert rel_err(theta, ref.extra[TANGENT]) < 1e-13, (name, torch.is_tensor(given))


NTK_NETS = {k: NETS[k] for k in ("relu stack + gap", "myrtle-like", "correlated + erf + bias",
                                 "non-stationary user readout")}


@pytest.mark.parametrize("name", list(NTK_NETS))
def test_ntk_gram_matches_torch_path(name, torch_path, monkeypatch):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (4, 8, 8, 3))
    x[0, :2] = 0.0
    x2 = rng.uniform(0, 1, (2, 8, 8, 3))
    net = NTK_NETS[name]()
    calls = []
    original = fused.conv_fused
    monkeypatch.setattr(fused, "conv_fused", lambda x, *a, **k: calls.append(x.ntk) or original(x, *a, **k))
    ref = torch_path(cnngp.kernel, net, x, get="both")
    assert not calls
    fast = cnngp.kernel(net, x, get="both")
    assert any(calls), "the NTK ran no layer through the fused kernels"
    # V̇ = 1 − θ/π has slope 1/sqrt(1 − ρ²): where an image meets itself (ρ = 1) an ε in the
    # variances (each path sums them in its own order) would move θ by ~sqrt(ε); both paths
    # count 1 − |ρ| within rounding as θ = 0, and agree to rounding (without: 4e-9, 2e-5 float32)
    for f, r in zip(fast, ref):
        assert rel_err(f, r) < 1e-12
    assert torch.equal(fast[1], fast[1].T)
    ref2 = torch_path(cnngp.kernel, net, x, x2, get="ntk")
    assert rel_err(cnngp.kernel(net, x, x2, get="ntk", batch_size=3), ref2) < 1e-12
    assert rel_err(cnngp.kernel(net, x, get="ntk", dtype="float32"), ref[1]) < 1e-5


def test_ntk_1d_and_readout_sweep_match_torch_path(torch_path):
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (4, 12, 2))
    net = Serial(
        Conv(3), ReLU(), Conv(4, stride=2, correlation=Matern(1.5, 2.0)), ABReLU(0.1, 1.0),
        AvgPool(2), Conv(3), ReLU(), Readout(correlation=Matern(0.5, 1.0)),
    )
    assert rel_err(cnngp.kernel(net, x, get="ntk"), torch_path(cnngp.kernel, net, x, get="ntk")) < 1e-12
    x = rng.uniform(0, 1, (3, 8, 8, 3))
    body = Serial(Conv(3), ReLU(), Conv(3), ReLU())
    heads = [Readout(correlation=Matern(1.5, ls)) for ls in (0.5, 2.0)] + [Readout(correlation=Constant())]
    ref = torch_path(cnngp.readout_sweep, body, heads, x, get="both")
    assert rel_err(cnngp.readout_sweep(body, heads, x, get="both"), ref) < 1e-12


@pytest.mark.parametrize("arch", ["myrtle5", "myrtle10"])
def test_self_pass_runs_full_and_fused_where_it_would_carry_bands(arch):
    """Under pools the self pass needs bands, which only the torch path computes; on the fused
    engine it runs on the full tensor instead (GramPlan._prefer_fused_self_pass). Its records
    — each image's variances at every nonlinearity — equal the torch engine's band records."""
    from cnngp.engine.gram import GramPlan
    from cnngp.kernels.state import Band

    x = np.random.default_rng(3).uniform(size=(3, 16, 16, 3))
    net = architectures.get(arch)
    torch_plan = GramPlan(net, x.shape[1:], engine="torch")
    fused_plan = GramPlan(net, x.shape[1:], engine="fused")
    assert any(isinstance(f, Band) for f in torch_plan.plan.self_flags)
    assert not any(isinstance(f, Band) for f in fused_plan.plan.self_flags)
    a = torch_plan.self_records(torch_plan.images(x))
    b = fused_plan.self_records(fused_plan.images(x))
    assert a.variances.keys() == b.variances.keys()
    for i in a.variances:
        assert rel_err(b.variances[i], a.variances[i]) < 1e-12, i
    ka = torch_plan.block(torch_plan.images(x), a)
    kb = fused_plan.block(fused_plan.images(x), b)
    assert rel_err(kb, ka) < 1e-12


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_chunks_of_pairs_on_several_threads_give_the_single_thread_kernel_bit_for_bit(monkeypatch, get):
    """fused.map_chunks runs whole chunks of pairs on each thread (each chunk's kernels on that
    thread alone): the Gram matrix is the one-thread matrix to the bit, for chunks of one pair
    and of several, and every chunk's kernels really ran off the caller's thread. The NTK's
    readout sums depend on the chunk's size in the last bit (also on one thread), so it is held
    to 1e-15."""
    net = Serial(Conv(3), ReLU(), AvgPool(2), Conv(3), ReLU(), Readout(correlation=Matern(1.5, 1.0)))
    x = torch.as_tensor(np.random.default_rng(3).uniform(size=(7, 8, 8, 3)))
    old = torch.get_num_threads()
    seen = []
    real = fused.map_chunks

    def spy(fn, items, n_threads):
        seen.append((len(items), n_threads))
        return real(fn, items, n_threads)

    monkeypatch.setattr(fused, "map_chunks", spy)
    try:
        for cache in (1, 4 * 1024**2):  # chunks of one pair; of several (the same on both sides:
            # the self pass's records at deeper layers follow its chunking in the last bit)
            monkeypatch.setattr(fused, "CACHE_BYTES", cache)
            torch.set_num_threads(1)
            one = cnngp.kernel(net, x, get=get)
            torch.set_num_threads(2)
            seen.clear()
            many = cnngp.kernel(net, x, get=get)
            if get == "nngp":
                assert torch.equal(many, one)
            else:
                assert rel_err(many, one) < 1e-15
            assert any(n > 1 and t == 2 for n, t in seen), seen
    finally:
        torch.set_num_threads(old)


def test_self_pass_batches_on_several_threads_give_the_single_thread_records_bit_for_bit():
    """The self pass runs whole batches of images on each thread (fused.map_chunks): every
    image's records are the one-thread records to the bit (a store's per-block passes rely on
    an image's records not depending on where it was computed)."""
    from cnngp.engine.gram import GramPlan

    net = Serial(Conv(3), ReLU(), AvgPool(2), Conv(3), ReLU(), Readout(correlation=Matern(1.5, 1.0)))
    x = np.random.default_rng(4).uniform(size=(19, 8, 8, 3))  # 3 batches of 8, the last ragged
    plan = GramPlan(net, x.shape[1:])
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = plan.self_records(plan.images(x)).variances
        torch.set_num_threads(2)
        many = plan.self_records(plan.images(x)).variances
        part = plan.self_records(plan.images(x[5:12])).variances  # other neighbours, other batches
    finally:
        torch.set_num_threads(old)
    assert one.keys() == many.keys() and one
    for i in one:
        assert torch.equal(one[i], many[i]) and torch.equal(one[i][5:12], part[i])


def test_a_task_thread_runs_its_kernels_on_the_threads_it_was_given(monkeypatch):
    """A Dask worker's task sets its thread count (distributed._set_threads) on whichever
    thread the worker's pool gives it; what torch reads back there is not always that (2 on a
    2-core machine, seen on LocalCluster workers: each worker then ran its chunks on a pool of
    its own, 4 threads on 2 cores, tiles up to 2× slower). The fused kernels follow the count
    the task set, for that thread only."""
    import threading

    from cnngp.engine import distributed

    seen = {}

    def task():
        distributed._set_threads(1)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # what a worker thread read back
        seen["task"] = fused.threads()
        seen["chunks"] = fused.map_chunks(lambda i: threading.get_ident(), [0, 1, 2], fused.threads())

    t = threading.Thread(target=task)
    t.start()
    t.join()
    assert seen["task"] == 1 and set(seen["chunks"]) == {t.ident}  # inline, on the task's thread
    assert fused.threads() == 2  # this thread: torch's count (patched), untouched by the task's


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-13), ("float32", 2e-6)])
def test_a_pool_after_a_conv_is_summed_in_the_convs_pass(monkeypatch, torch_path, dtype, tol):
    """conv + ReLU + 2×2 stride-2 average pool run as one pass (fused.pool_after: the pool's
    windows summed into its output, no scatter and no pool pass) where the grid's sides are
    even, and give the torch path's kernel and the unfused one's; an odd grid, a pool after a
    conv without a nonlinearity, and the NTK are left to the separate pool."""
    net = Serial(Conv(3, bias_var=0.1), ReLU(), AvgPool(2), Conv(3), ABReLU(0.1, 1.2), AvgPool(2),
                 Readout(correlation=Matern(1.5, 1.0)))
    x = np.random.default_rng(9).uniform(size=(4, 8, 8, 2))
    pools = []
    real = fused.conv_fused

    def spy(*args, **kwargs):
        pools.append(args[11] if len(args) > 11 else kwargs.get("pool"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "conv_fused", spy)
    got = cnngp.kernel(net, x, dtype=dtype)
    assert sum(p is not None for p in pools) >= 2  # both pools fused in the pair pass
    monkeypatch.setattr(fused, "POOL_FUSION", False)
    unfused = cnngp.kernel(net, x, dtype=dtype)
    assert rel_err(got, unfused) < tol
    assert rel_err(got, torch_path(cnngp.kernel, net, x, dtype=dtype)) < tol
    monkeypatch.setattr(fused, "POOL_FUSION", True)
    pools.clear()
    odd = np.random.default_rng(9).uniform(size=(3, 7, 7, 2))
    cnngp.kernel(Serial(Conv(3), ReLU(), AvgPool(2), Readout(correlation=Matern(1.5, 1.0))), odd)
    cnngp.kernel(Serial(Conv(3), AvgPool(2), Conv(3), ReLU(), Readout(correlation=Matern(1.5, 1.0))), x)
    cnngp.kernel(net, x, get="ntk")
    assert all(p is None for p in pools)


def test_a_correlations_snapshot_is_exact_and_quiet():
    """The cache key of a correlation (Correlation.snapshot) tells apart values that its repr
    rounds together (a tensor lengthscale, as autograd learns it), warns about nothing for a
    tensor that requires grad, and tells apart user matrices that differ in one entry."""
    import warnings

    def tensor_lengthscale(value, grad=False):  # as cnngp.inference.learn.with_parameters sets it
        corr = Matern(1.5, 1.0)
        corr.lengthscale = torch.tensor(value, dtype=torch.float64, requires_grad=grad)
        return corr

    a, b = tensor_lengthscale(2.00001), tensor_lengthscale(2.00004, grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert a.snapshot() != b.snapshot()
        assert a.snapshot() == tensor_lengthscale(2.00001).snapshot()
    m = np.eye(4) + 0.1
    other = m.copy()
    other[1, 2] = other[2, 1] = 0.1 + 1e-12
    assert UserCorrelation(m).snapshot() != UserCorrelation(other).snapshot()
    assert UserCorrelation(m).snapshot() == UserCorrelation(m.copy()).snapshot()

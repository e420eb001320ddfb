"""Finite networks sampled from the prior against the analytic kernel (PAPER.md §1–2, §7).

Each layer type is checked in a network with a single nonlinearity after the first random
layer, where the finite-width second moment is *exact* at any width (the first layer's
pre-activations are Gaussian, everything after the nonlinearity is linear in the weights): the
empirical kernel must agree with ``cnngp.kernel`` within 4 Monte Carlo standard errors
(relative Frobenius norms), with a standard error small enough for that to mean something.
The slow tests (``pytest -m slow``) check deep networks, where finite width does bias the
kernel: the bias is resolved at small widths and shrinks like 1/C, and wide networks agree.
"""

from __future__ import annotations

import json
import os
import math

import numpy as np
import pytest
import torch

import cnngp
from cnngp import (
    ABReLU,
    AvgPool,
    Constant,
    Conv,
    Erf,
    Flatten,
    GlobalAvgPool,
    Identity,
    Independent,
    Matern,
    RBF,
    Readout,
    ReLU,
    Serial,
    UserCorrelation,
)
from cnngp.kernels.ops import AxisGeometry
from cnngp.cli.main import main
from cnngp.errors import CNNGPError
from cnngp.finite import (
    covariance_factor,
    finite_network,
    monte_carlo_estimates,
    monte_carlo_kernel,
    network_seed,
)


def _images(n, spatial, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + tuple(spatial) + (channels,), generator=g, dtype=torch.float64)


def _psd(n, rank, seed):
    """A random PSD matrix of the given rank (rank < n: singular) with positive sum."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, rank)) + 0.5
    return a @ a.T


def _errors(model, x1, x2=None, **kw):
    emp, se = monte_carlo_kernel(model, x1, x2, **kw)
    k = cnngp.kernel(model, x1, x2)
    norm = k.norm().item()
    return (emp - k).norm().item() / norm, se.norm().item() / norm


def assert_agrees(model, x1, x2=None, *, width=16, samples=2000, n_outputs=16, seed=0, max_rse=0.03):
    rel, rse = _errors(model, x1, x2, width=width, n_samples=samples, n_outputs=n_outputs, seed=seed)
    assert rse < max_rse, f"standard error {rse:.4f} too large for a meaningful check"
    assert rel <= 4 * rse, f"relative error {rel:.4f} > 4 × standard error {rse:.4f}"


# -- every layer type, in networks whose finite-width second moment is exact ---------------------

CORRELATIONS = {
    "independent": Independent(),
    "constant": Constant(),
    "matern12": Matern(0.5, 1.0),
    "matern32": Matern(1.5, 1.5),
    "matern52": Matern(2.5, 2.0),
    "rbf": RBF(1.0),
    "matern32-lam0": Matern(1.5, 0),
    "rbf-laminf": RBF("inf"),
}


@pytest.mark.parametrize("name", list(CORRELATIONS) + ["user-singular"])
def test_conv_correlations(name):
    corr = UserCorrelation(_psd(9, 3, seed=1)) if name == "user-singular" else CORRELATIONS[name]
    model = Serial(Conv(3, correlation=corr), ReLU(), Conv(3, correlation=corr), Readout())
    assert_agrees(model, _images(3, (5, 5)))


GEOMETRIES = {
    "valid": dict(filter=3, padding="valid"),
    "same-even-filter": dict(filter=2, padding="same"),  # the extra pad pixel goes after
    "same-filter4": dict(filter=4, padding="same"),
    "stride2-valid": dict(filter=3, stride=2, padding="valid"),
    "stride2-same": dict(filter=3, stride=2, padding="same"),
    "stride2-filter2-same": dict(filter=2, stride=2, padding="same"),
    "dilation2-same": dict(filter=2, dilation=2, padding="same"),
    "dilation2-valid": dict(filter=3, dilation=2, padding="valid"),
    "circular": dict(filter=3, padding="circular"),
    "circular-stride2": dict(filter=2, stride=2, padding="circular"),
    "rectangular": dict(filter=[3, 2], stride=[1, 2], dilation=[1, 1], padding="same"),
    "variances": dict(filter=3, weight_var=2.0, bias_var=0.5),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_conv_geometries(name):
    kw = GEOMETRIES[name]
    model = Serial(
        Conv(3, correlation=Matern(1.5, 1.0)), ReLU(), Conv(correlation=Matern(1.5, 1.0), **kw),
        Readout(correlation=Matern(1.5, 1.0)),
    )
    x2 = _images(2, (5, 5), seed=7) if name in ("stride2-same", "circular") else None
    assert_agrees(model, _images(3, (5, 5)), x2)


@pytest.mark.parametrize("spatial", [(7,), (3, 3, 3)], ids=["1d", "3d"])
def test_conv_1d_and_3d(spatial):
    model = Serial(Conv(2, correlation=Matern(1.5, 1.0)), ReLU(), Conv(2, stride=2), Readout())
    assert_agrees(model, _images(3, spatial))


NONLINEARITIES = {
    "relu": ReLU(),
    "abrelu": ABReLU(-0.3, 0.8),
    "erf": Erf(1.5, 0.7, 0.1),
    "identity": Identity(),
}


@pytest.mark.parametrize("name", list(NONLINEARITIES))
def test_nonlinearities(name):
    model = Serial(Conv(3, bias_var=0.2), NONLINEARITIES[name], Readout(correlation=Matern(1.5, 1.0)))
    assert_agrees(model, _images(3, (5, 5)))


POOLS = {
    "avgpool": [AvgPool(2), Readout()],
    "avgpool-same-stride1": [AvgPool(3, 1, "same"), Readout(correlation=Matern(1.5, 1.0))],
    "avgpool-circular": [AvgPool(2, 2, "circular"), Readout(correlation=RBF(1.0))],
    "global-pool": [GlobalAvgPool(), Readout(bias_var=0.1)],
    "flatten": [Flatten(), Readout(weight_var=2.0)],
    "global-pool-no-readout": [GlobalAvgPool()],
    "flatten-no-readout": [Flatten()],
    "dense-head": [GlobalAvgPool(), Readout(bias_var=0.2), Readout()],
}


@pytest.mark.parametrize("name", list(POOLS))
def test_pooling_and_flatten(name):
    model = Serial(Conv(3), ReLU(), *POOLS[name])
    assert_agrees(model, _images(3, (5, 5)))


@pytest.mark.parametrize("name", list(CORRELATIONS) + ["user-singular", "variances"])
def test_readout_correlations(name):
    if name == "user-singular":
        readout = Readout(correlation=UserCorrelation(_psd(25, 4, seed=2)))
    elif name == "variances":
        readout = Readout(weight_var=1.5, bias_var=0.3, correlation=Matern(1.5, 2.0))
    else:
        readout = Readout(correlation=CORRELATIONS[name])
    assert_agrees(Serial(Conv(3), ReLU(), readout), _images(3, (5, 5)), _images(2, (5, 5), seed=3))


def test_readout_on_images():
    """A bare correlated readout is a linear model of the pixels: exact, no hidden layer."""
    assert_agrees(Readout(correlation=Matern(1.5, 1.0)), _images(3, (4, 4)))


# -- Monte Carlo behaviour -------------------------------------------------------------------------


def test_error_shrinks_with_four_times_the_samples():
    """One hidden layer: no finite-width bias, so the error is pure MC noise ∝ 1/√S.

    Root-mean-square over 16 independent replicates (so the check does not hinge on one lucky
    draw): 4× the samples roughly halves both the error and the reported standard error.
    """
    model = Serial(Conv(3, correlation=Matern(1.5, 1.0)), ReLU(), Readout(correlation=Matern(1.5, 2.0)))
    x = _images(3, (4, 4))
    small = [_errors(model, x, width=8, n_samples=150, n_outputs=8, seed=s) for s in range(16)]
    large = [_errors(model, x, width=8, n_samples=600, n_outputs=8, seed=100 + s) for s in range(16)]
    rms = lambda v: math.sqrt(np.mean(np.square(v)))  # noqa: E731
    err_ratio = rms([e for e, _ in large]) / rms([e for e, _ in small])
    se_ratio = np.mean([s for _, s in large]) / np.mean([s for _, s in small])
    assert err_ratio < 0.8, err_ratio
    assert 0.4 < se_ratio < 0.6, se_ratio
    # and the reported standard error matches the observed spread of the error
    assert 0.6 < rms([e for e, _ in small]) / np.mean([s for _, s in small]) < 1.6


def test_batching_does_not_change_the_result():
    model = Serial(Conv(3, correlation=RBF(1.0)), Erf(), AvgPool(2), Readout(correlation=Matern(0.5, 1.0)))
    x, x2 = _images(3, (5, 5)), _images(2, (5, 5), seed=1)
    kw = dict(width=6, n_samples=11, seed=3, n_outputs=3, dtype="float64")
    ref = monte_carlo_kernel(model, x, x2, **kw)
    for batch in (1, 4, 11):
        got = monte_carlo_kernel(model, x, x2, batch=batch, **kw)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # a tiny memory budget forces one network at a time and chunked images
    got = monte_carlo_kernel(model, x, x2, memory_budget=1, **kw)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-14)


def test_network_k_is_finite_network_with_its_seed():
    model = Serial(Conv(3, bias_var=0.1, correlation=Matern(1.5, 1.0)), ReLU(), Conv(2, stride=2),
                   ReLU(), Readout(bias_var=0.2, correlation=Constant()))
    x = _images(4, (5, 5))
    est = monte_carlo_estimates(model, x, width=5, n_samples=3, seed=9, n_outputs=4, dtype="float64")
    for k in range(3):
        net = finite_network(model, 2, 5, seed=network_seed(9, k), n_outputs=4, dtype="float64")
        f = net(x)
        torch.testing.assert_close(est[k], f @ f.T / 4, rtol=1e-12, atol=1e-12)
    emp, _ = monte_carlo_kernel(model, x, width=5, n_samples=3, seed=9, n_outputs=4, dtype="float64")
    torch.testing.assert_close(emp, est.mean(0), rtol=1e-12, atol=1e-14)


def test_seeded_and_reproducible():
    model = Serial(Conv(3), ReLU(), Readout())
    x = _images(2, (4, 4))
    a = monte_carlo_kernel(model, x, width=4, n_samples=5, seed=1)
    b = monte_carlo_kernel(model, x, width=4, n_samples=5, seed=1)
    c = monte_carlo_kernel(model, x, width=4, n_samples=5, seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


# -- the finite layers themselves ------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["same", "valid", "circular"])
@pytest.mark.parametrize("n,taps,stride,dilation", [
    (5, 3, 1, 1), (5, 2, 1, 1), (6, 4, 1, 1), (5, 3, 2, 1), (6, 2, 2, 1), (7, 3, 1, 2),
    (7, 2, 3, 2), (4, 4, 1, 1), (8, 3, 3, 1),
])
def test_conv_indexing_matches_the_engine(n, taps, stride, dilation, padding):
    """Output q reads input i = s·q + h·p − pad_before (``ops.AxisGeometry``), per axis."""
    geom = AxisGeometry(n, taps, stride, dilation, padding)
    if geom.extent > n:
        pytest.skip("filter larger than the grid")
    layer = Conv([taps, 1], stride=[stride, 1], dilation=[dilation, 1], padding=padding)
    net = finite_network(layer, 1, 1, seed=0, dtype="float64")
    x = _images(1, (n, 2), channels=1)
    y = net(x)[0, :, :, 0]  # (n_out, 2)
    w = net.finite[0].weight[0, 0, 0, :, 0]  # (taps,)
    index = geom.patch_index()  # (n_out, taps), n marks zero padding
    xp = torch.cat([x[0, :, :, 0], torch.zeros(1, 2, dtype=x.dtype)])
    expected = (xp[index] * w[None, :, None]).sum(1)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_avgpool_is_the_window_mean():
    net = finite_network(AvgPool(2, 1, "same"), 1, 3, seed=0, dtype="float64")
    x = _images(1, (3, 3), channels=1)
    y = net(x)[0, :, :, 0]
    xp = torch.nn.functional.pad(x[0, :, :, 0], (0, 1, 0, 1))
    expected = (xp[:-1, :-1] + xp[1:, :-1] + xp[:-1, 1:] + xp[1:, 1:]) / 4
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("corr", [Matern(1.5, 1.0), Constant(), Independent(),
                                  UserCorrelation(_psd(9, 2, seed=4))], ids=repr)
def test_sampled_filters_have_the_prior_covariance(corr):
    """W[i, j, :] ~ N(0, weight_var Σ / C_in): 16000 filter draws, empirical covariance."""
    net = finite_network(Conv(3, weight_var=2.0, correlation=corr), 4, 4000, seed=0,
                         spatial=(3, 3), dtype="float64")
    w = net.finite[0].weight[0].reshape(-1, 9)
    cov = w.T @ w / w.shape[0]
    expected = 2.0 * corr.matrix((3, 3)) / 4
    assert (cov - expected).abs().max() < 5 * expected.diagonal().max() * math.sqrt(2 / w.shape[0])


def test_readout_weights_have_the_prior_covariance():
    corr = Matern(1.5, 1.5)
    net = finite_network(Readout(weight_var=3.0, correlation=corr), 2, 1, seed=0,
                         n_outputs=5000, spatial=(3, 3), dtype="float64")
    w = net.finite[0].weight[0].reshape(-1, 9)  # (outputs × channels, positions)
    cov = w.T @ w / w.shape[0]
    expected = 3.0 * corr.matrix((3, 3)) / 2
    assert (cov - expected).abs().max() < 5 * expected.diagonal().max() * math.sqrt(2 / w.shape[0])


@pytest.mark.parametrize("sigma", [
    Constant().matrix((3, 3)), Matern(2.5, 3.0).matrix((4, 4)), torch.tensor(_psd(6, 2, seed=0)),
    torch.zeros(3, 3),
], ids=["constant", "matern", "rank2", "zero"])
def test_covariance_factor_handles_singular_sigma(sigma):
    f = covariance_factor(sigma)
    torch.testing.assert_close(f @ f.T, sigma.to(torch.float64), rtol=0, atol=1e-12 * max(1, sigma.abs().max()))


def test_finite_network_outputs_and_build():
    model = Serial(Conv(3), ReLU(), Conv(2, stride=2), ReLU(), Readout(correlation=Matern(1.5, 1.0)))
    x = _images(5, (6, 6), channels=3)
    lazy = finite_network(model, 3, 7, seed=4, n_outputs=2)
    eager = finite_network(model, 3, 7, seed=4, n_outputs=2, spatial=(6, 6))
    assert lazy(x).shape == (5, 2)
    torch.testing.assert_close(lazy(x), eager(x))
    assert lazy.hidden(x).shape == (5, 3, 3, 7)
    assert finite_network(model[:-1], 3, 7, seed=4)(x).shape == (5, 3, 3, 7)
    assert finite_network(Serial(*model[:-1], Flatten()), 3, 7, seed=4)(x).shape == (5, 63)
    assert lazy(np.asarray(x)).shape == (5, 2)  # numpy input
    uint8 = finite_network(model, 3, 7, seed=4, n_outputs=2)(torch.zeros(1, 6, 6, 3, dtype=torch.uint8))
    assert torch.equal(uint8, torch.zeros(1, 2))
    with pytest.raises(CNNGPError, match="built for"):
        lazy(_images(1, (5, 5), channels=3))
    with pytest.raises(CNNGPError, match="channels"):
        lazy(_images(1, (6, 6), channels=2))
    with pytest.raises(CNNGPError, match="width"):
        finite_network(model, 3, 0)
    with pytest.raises(CNNGPError, match="larger than its input grid"):
        finite_network(model, 3, 4, spatial=(1, 1))


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,match", [
    (dict(width=0), "width"),
    (dict(n_samples=1), "n_samples"),
    (dict(seed=-1), "seed"),
    (dict(batch=0), "batch"),
    (dict(n_outputs=0), "n_outputs"),
    (dict(dtype="float16"), "dtype"),
])
def test_monte_carlo_rejects_bad_arguments(kw, match):
    args = dict(width=4, n_samples=4)
    args.update(kw)
    with pytest.raises(CNNGPError, match=match):
        monte_carlo_kernel(Serial(Conv(3), ReLU(), Readout()), _images(2, (4, 4)), **args)


def test_monte_carlo_rejects_bad_inputs():
    model = Serial(Conv(3), ReLU(), Readout())
    with pytest.raises(CNNGPError, match="x2"):
        monte_carlo_kernel(model, _images(2, (4, 4)), _images(2, (5, 5)), width=2, n_samples=2)
    with pytest.raises(CNNGPError, match="spatial grid"):
        monte_carlo_kernel(model[:-1], _images(2, (4, 4)), width=2, n_samples=2)


# -- command line ----------------------------------------------------------------------------------

SPEC = {
    "input_channels": 2,
    "layers": [
        {"type": "conv", "filter": 3, "correlation": {"type": "matern", "nu": 1.5, "lengthscale": 1.0}},
        {"type": "relu"},
        {"type": "readout", "correlation": {"type": "matern", "nu": 1.5, "lengthscale": 2.0}},
    ],
}


@pytest.fixture()
def cli_files(tmp_path):
    spec = tmp_path / "net.json"
    spec.write_text(json.dumps(SPEC))
    np.savez(tmp_path / "a.npz", x=_images(3, (4, 4)).numpy())
    np.savez(tmp_path / "b.npz", x=_images(2, (4, 4), seed=1).numpy())
    np.savez(tmp_path / "c.npz", x=_images(2, (5, 5), seed=1).numpy())
    bare = dict(SPEC, layers=SPEC["layers"][:2] + [{"type": "flatten"}])
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    return tmp_path


def test_cli_montecarlo_report(cli_files, capsys):
    out = cli_files / "r.json"
    rc = main(["montecarlo", "--arch", str(cli_files / "net.json"), "--x1", str(cli_files / "a.npz"),
               "--x2", str(cli_files / "b.npz"), "--width", "8", "--samples", "400", "--out", str(out),
               "--seed", "3", "--quiet"])
    assert rc == 0
    r = json.loads(out.read_text())
    assert {"analytic", "empirical", "standard_error", "relative_error", "relative_standard_error",
            "max_abs_z", "config", "seed", "versions"} <= set(r)
    assert np.shape(r["analytic"]) == np.shape(r["empirical"]) == np.shape(r["standard_error"]) == (3, 2)
    assert r["seed"] == 3 and r["config"]["width"] == 8 and r["config"]["samples"] == 400
    assert r["relative_error"] <= 4 * r["relative_standard_error"]
    k = cnngp.kernel(cnngp.from_spec(SPEC), _images(3, (4, 4)), _images(2, (4, 4), seed=1))
    np.testing.assert_allclose(r["analytic"], k.numpy(), rtol=1e-12)
    printed = capsys.readouterr().out
    assert "relative error" in printed and "standard error" in printed


@pytest.mark.parametrize("change,match", [
    ({"--width": "0"}, "--width"),
    ({"--samples": "1"}, "--samples"),
    ({"--x2": "c.npz"}, "--x2"),
    ({"--arch": "bare.json"}, "readout"),
    ({"--n1": "0"}, "--n1"),
])
def test_cli_montecarlo_errors(cli_files, capsys, change, match):
    args = {"--arch": "net.json", "--x1": "a.npz", "--width": "4", "--samples": "10"}
    args.update(change)
    out = cli_files / "r.json"
    argv = ["montecarlo", "--out", str(out), "--quiet"]
    for k, v in args.items():
        argv += [k, str(cli_files / v) if v.endswith((".json", ".npz")) else v]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("cnngp: error: ") and match in err
    assert not out.exists()
    assert not list(cli_files.glob(".r.json*"))


# -- deep networks: finite width matters (slow) ----------------------------------------------------


def _deep(nonlinearity, readout=None, conv_correlation=None):
    layers = []
    for _ in range(4):
        layers += [Conv(3, correlation=conv_correlation), nonlinearity]
    return Serial(*layers, readout or Readout())


@pytest.mark.slow
def test_finite_width_bias_shrinks_like_one_over_width():
    """4 conv layers, erf with an offset (a sizeable finite-width bias): resolved at C = 2
    (about 4 %, 13 standard errors), then shrinking like 1/C through C = 8 and C = 32 — the
    O(1/C) correction to the infinite-width limit.

    (At C ≥ 64 this bias is below 0.2 % and would need ~10⁵ networks per width to resolve;
    see the next test for agreement at large widths.)
    """
    model = _deep(Erf(1.0, 1.0, 0.5))
    x = _images(3, (4, 4))
    x[1] = x[0] + 0.3 * x[1]
    err = {}
    for width, samples in ((2, 40000), (8, 40000), (32, 30000)):
        err[width] = _errors(model, x, width=width, n_samples=samples, n_outputs=32, seed=width)
    assert err[2][0] > 10 * err[2][1], err  # the bias is resolved (about 4 %)
    assert err[8][0] < 0.5 * err[2][0], err
    assert err[32][0] < 0.5 * err[8][0], err
    slope = math.log(err[32][0] / err[2][0]) / math.log(16)  # about −1: bias ∝ 1/C
    assert -1.4 < slope < -0.6, (slope, err)


@pytest.mark.slow
def test_deep_correlated_network_agrees_at_large_width():
    """4 correlated conv layers + correlated readout, ReLU: C = 64 → 256 → 1024 all agree with
    the infinite-width kernel within 4 standard errors (each about 2 %; a network's estimate
    fluctuates by about 4/√C here, so the samples shrink as the width grows)."""
    model = _deep(ReLU(), Readout(correlation=Matern(1.5, 2.0)), Matern(1.5, 1.0))
    x = _images(3, (4, 4))
    for width, samples in ((64, 600), (256, 150), (1024, 30)):
        rel, rse = _errors(model, x, width=width, n_samples=samples, n_outputs=256, seed=width)
        assert rse < 0.03, (width, rse)
        assert rel <= 4 * rse, (width, rel, rse)


def test_cli_correlation_figure(tmp_path, capsys):
    """Smoke test of the figure on tiny synthetic images (the real one runs on CIFAR-10)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", x=rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "fig.png"
    argv = ["correlation-figure", "--x", str(tmp_path / "img.npz"), "--out", str(out),
            "--depth", "2", "--positions", "1,1,6,6", "--widths", "2,4", "--draws", "2",
            "--mc-width", "4", "--samples", "3", "--mc-lengthscales", "1", "--quiet"]
    assert main(argv) == 0
    assert main(argv) == 0  # again: its own sidecar is replaced (another file there is refused)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "fig.json").read_text())
    assert set(data["left"]) and len(data["right"]["monte_carlo"]) == 1
    assert data["config"]["widths"] == [2, 4]
    assert "kernel" in capsys.readouterr().out
    # the figure and its sidecar as a pair: a failed PNG write puts the previous sidecar back
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("fig.")}
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("fig.png") and str(src).endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    import cnngp.engine.storage

    os_module = cnngp.engine.storage.os
    os_module.replace = full
    try:
        assert main(argv[:-1] + ["--draws", "3", "--quiet"]) == 2
    finally:
        os_module.replace = real_replace
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(("fig", ".fig"))} == before
    capsys.readouterr()
    rc = main(["correlation-figure", "--x", str(tmp_path / "img.npz"), "--out", str(tmp_path / "bad.png"),
               "--positions", "1,1,9,9", "--quiet"])
    assert rc == 2 and not (tmp_path / "bad.png").exists()
    assert "--positions" in capsys.readouterr().err

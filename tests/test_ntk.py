"""The neural tangent kernel (docs/maths.md §7): neural-tangents' NTKs, closed forms, the API
and command line, and the engine's seams (tiles, stores, readout sweeps) carrying Θ."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import cnngp
from cnngp.cli.main import main
from cnngp.errors import CNNGPError
from conftest import rel_err
from reference_cases import BODIES

NTK_CASES = ["ntk_conv1d_digits", "ntk_mixed_mnist", "ntk_cnngp4", "ntk_myrtle10_paper"]


@pytest.fixture(scope="module")
def ntk_reference(reference_dir):
    path = reference_dir / "ntk"
    return path


#: float64 to 1e-9 and float32 to 1e-6 of neural-tangents' float64 kernels (issue 27). In float32
#: the NTK's V̇ = 1 − θ/π has dV̇/dρ = 1/(π sin θ) ≈ 20 at the ρ ≈ 0.9999 of neighbouring
#: positions in an image, so a bias of a tenth of an ulp in ρ (a scale rounded to float32, e.g.
#: fl(1/3)·fl(1/3) against the variances' 1/9) moved these Grams by 1.2e-6; both CPU engines now
#: round every scale the same way, once (ops.scaled, fused._kron_terms, ConvPlan.sigma_as, the
#: input's / C).
@pytest.mark.parametrize("dtype, tol, engine", [("float64", 1e-9, "fused"), ("float32", 1e-6, "fused"),
                                                 ("float32", 1e-6, "torch")])
@pytest.mark.parametrize("case", NTK_CASES)
def test_against_neural_tangents(ntk_reference, monkeypatch, case, dtype, tol, engine):
    if engine == "torch":
        monkeypatch.setenv("CNNGP_FAST", "0")
    d = np.load(ntk_reference / f"{case}.npz")
    body = cnngp.from_spec({"layers": BODIES[case.removeprefix("ntk_")]})
    x = d["x"]
    for name, corr in (("flatten", cnngp.Independent()), ("gap", cnngp.Constant())):
        nngp, ntk = cnngp.kernel(cnngp.Serial(*body.layers, cnngp.Readout(correlation=corr)), x, get="both",
                                 dtype=dtype)
        assert rel_err(nngp.numpy(), d[f"nngp_{name}"]) <= tol, (case, name)
        assert rel_err(ntk.numpy(), d[f"ntk_{name}"]) <= tol, (case, name)
    readouts = [cnngp.Readout(correlation=cnngp.Matern(1.5, float(lam))) for lam in d["lengthscales"]]
    sweep = cnngp.readout_sweep(body, readouts, x, get="ntk", dtype=dtype).numpy()
    assert rel_err(sweep, d["ntk_matern32"]) <= tol


def _images(n, shape=(5, 5, 2), seed=0):
    return np.random.default_rng(seed).uniform(size=(n,) + shape)


def test_balanced_relu_diagonal_is_depth_plus_one_times_nngp():
    """Without biases, E[φ′²] = 1 for the balanced ReLU, so on the diagonal
    Θ = Σ_layers K = (L + 1)·K (every layer's NNGP equals the input's on the diagonal)."""
    for depth in (1, 3):
        net = cnngp.io.architectures.get(f"cnngp{depth}")
        k, theta = cnngp.kernel(net, _images(3, (6, 6, 3)), get="both")
        # not to 1e-12: at ρ = 1 the angle is √(rounding of ρ) ≈ 1e-8, and V̇ = (π − θ)/π
        np.testing.assert_allclose(np.diag(theta.numpy()), (depth + 1) * np.diag(k.numpy()), rtol=1e-7)


def test_a_linear_network_ntk_is_depth_times_nngp():
    """With identity nonlinearities and no biases the network is linear: Θ = (#trainable) · K."""
    net = cnngp.Serial(cnngp.Conv(3, weight_var=1.3), cnngp.Identity(), cnngp.AvgPool(2),
                       cnngp.Conv(2, padding="valid", weight_var=0.7), cnngp.Readout(weight_var=2.0))
    k, theta = cnngp.kernel(net, _images(4, (6, 6, 2)), get="both")
    np.testing.assert_allclose(theta.numpy(), 3 * k.numpy(), rtol=1e-12)  # 2 convs + readout


@pytest.mark.parametrize("corr", ["conv", "readout"])
def test_lengthscale_limits_are_exact_for_the_ntk(corr):
    x = _images(3)

    def net(c):
        if corr == "conv":
            return cnngp.Serial(cnngp.Conv(3, correlation=c), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(),
                                cnngp.Readout())
        return cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout(correlation=c))

    for lam, end in ((0.0, cnngp.Independent()), (math.inf, cnngp.Constant())):
        got = cnngp.kernel(net(cnngp.Matern(1.5, lam)), x, get="ntk").numpy()
        want = cnngp.kernel(net(end), x, get="ntk").numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_readout_sweep_both_equals_separate_calls():
    body = cnngp.Serial(cnngp.Conv(3, bias_var=0.1), cnngp.Erf(), cnngp.Conv(3), cnngp.ReLU())
    readouts = [cnngp.Readout(correlation=cnngp.Matern(1.5, lam), bias_var=0.2) for lam in (0.0, 1.5, math.inf)]
    x1, x2 = _images(3, seed=1), _images(2, seed=2)
    nngp, ntk = cnngp.readout_sweep(body, readouts, x1, x2, get="both")
    # alone, the NNGP takes the fused CPU path (the NTK runs the layers' own torch code)
    np.testing.assert_allclose(nngp.numpy(), cnngp.readout_sweep(body, readouts, x1, x2).numpy(), rtol=1e-12)
    assert torch.equal(ntk, cnngp.readout_sweep(body, readouts, x1, x2, get="ntk"))
    for i, r in enumerate(readouts):
        one = cnngp.kernel(cnngp.Serial(*body.layers, r), x1, x2, get="ntk")
        np.testing.assert_allclose(ntk[i].numpy(), one.numpy(), rtol=1e-12)


def test_ntk_is_symmetric_and_positive_semidefinite():
    net = cnngp.io.architectures.get("myrtle5")
    theta = cnngp.kernel(net, _images(6, (12, 12, 3)), get="ntk").numpy()
    np.testing.assert_allclose(theta, theta.T, rtol=1e-13)
    assert np.linalg.eigvalsh(theta).min() > -1e-10 * np.abs(theta).max()


def test_tiles_of_an_ntk_store_are_bit_identical(tmp_path):
    from cnngp.engine.distributed import store_kernel
    from cnngp.engine.store import KernelStore

    net = cnngp.io.architectures.get("cnngp2")
    x = _images(7, (6, 6, 3))
    nngp, ntk = cnngp.kernel(net, x, get="both")
    store_kernel(net, x, out=tmp_path / "k.zarr", tile=3, get="both", progress=False)
    stored = np.asarray(KernelStore.open(tmp_path / "k.zarr").kernel[...])
    assert np.array_equal(stored[0], nngp.numpy()) and np.array_equal(stored[1], ntk.numpy())
    with pytest.raises(CNNGPError, match="different kernel type"):
        store_kernel(net, x, out=tmp_path / "k.zarr", tile=3, progress=False)


def test_nonlinearities_without_a_derivative_are_refused():
    net = cnngp.Serial(cnngp.Conv(3), cnngp.Sign(), cnngp.Readout())
    with pytest.raises(CNNGPError, match="Dirac delta"):
        cnngp.kernel(net, _images(2), get="ntk")
    assert torch.isfinite(cnngp.kernel(net, _images(2))).all()  # the NNGP is fine

    class Halved(cnngp.ReLU):  # a subclass that changes the maths must state its V̇ too
        def expectation(self, c, vx, vy):
            return 0.5 * super().expectation(c, vx, vy)

    with pytest.raises(CNNGPError, match="derivative_expectation"):
        cnngp.kernel(cnngp.Serial(cnngp.Conv(3), Halved(), cnngp.Readout()), _images(2), get="ntk")


@pytest.mark.parametrize("bad", ["ntkk", "", ("nngp", "nngp"), 3, ()])
def test_get_is_validated(bad):
    with pytest.raises(CNNGPError, match="get: expected"):
        cnngp.kernel(cnngp.io.architectures.get("cnngp2"), _images(2), get=bad)


def test_cli_get_both_writes_both_kernels(tmp_path, capsys):
    x = tmp_path / "x.npz"
    np.savez(x, x=_images(4, (6, 6, 3)))
    out = tmp_path / "k.npz"
    assert main(["kernel", "--arch", "cnngp2", "--x1", str(x), "--out", str(out), "--get", "both", "--quiet"]) == 0
    with np.load(out) as f:
        nngp, ntk = cnngp.kernel(cnngp.io.architectures.get("cnngp2"), np.load(x)["x"], get="both")
        assert np.array_equal(f["nngp"], nngp.numpy()) and np.array_equal(f["ntk"], ntk.numpy())
        assert np.array_equal(f["kernel"], f["nngp"]) and json.loads(str(f["config"]))["get"] == "both"
    assert main(["kernel", "--arch", "cnngp2", "--x1", str(x), "--out", str(out), "--get", "ntk", "--quiet"]) == 0
    with np.load(out) as f:
        assert np.array_equal(f["kernel"], ntk.numpy()) and "nngp" not in f.files
    capsys.readouterr()
    assert main(["kernel", "--arch", "cnngp2", "--x1", str(x), "--out", str(out), "--get", "tangent"]) == 2
    assert "--get: invalid choice" in capsys.readouterr().err


def test_sweep_with_the_ntk_cross_validates_the_ntk(tmp_path):
    from cnngp.experiments.sweep import run_sweep, sweep_readouts, split_network
    from cnngp.inference import gp
    from cnngp.io.data import Dataset, balanced_subset

    rng = np.random.default_rng(5)
    x = rng.uniform(size=(40, 5, 5, 1))
    y = np.repeat(np.arange(2), 20)
    ds = Dataset(x, y, None, None, "toy", ("a", "b"))
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    out = run_sweep(net, ds, ns=(20,), folds=2, lengthscales=(1.0,), kernel="ntk", progress=False)
    assert out["config"]["kernel"] == "ntk"
    order = balanced_subset(y, 20, seed=0, n_classes=2)
    body, template, _ = split_network(net)
    readouts, labels = sweep_readouts(template, (1.0,), "matern32")
    theta = cnngp.readout_sweep(body, readouts, x[order], get="ntk").numpy()
    for row, th in zip(out["results"], theta):
        from cnngp.experiments.sweep import _folds_for

        cv = gp.cross_validate(th, y[order], folds=_folds_for("paper", 20, y[order], 2, 0), n_classes=2)
        assert row["cv_accuracy"] == cv.best_accuracy
    nngp = run_sweep(net, ds, ns=(20,), folds=2, lengthscales=(1.0,), progress=False)
    assert [r["noise_variance"] for r in nngp["results"]] != [r["noise_variance"] for r in out["results"]]
    with pytest.raises(CNNGPError, match="kernel: expected 'nngp' or 'ntk'"):
        run_sweep(net, ds, ns=(20,), folds=2, kernel="gp", progress=False)

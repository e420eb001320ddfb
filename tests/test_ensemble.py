"""cnngp.inference.ensemble against independent oracles: neural-tangents' own predictions on the
same kernels, a numerical integration of the training dynamics, the GP posterior's closed form."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from cnngp.errors import CNNGPError
from cnngp.inference import gp
from cnngp.inference.ensemble import trained_ensemble
from cnngp.inference.gp import IllConditionedWarning, centered_one_hot

REFERENCE = Path(__file__).parent / "reference" / "ensemble" / "gd_ensemble.npz"


@pytest.fixture(scope="module")
def nt_reference():
    return dict(np.load(REFERENCE))


@pytest.mark.parametrize("mode", ["nngp", "ntk"])
@pytest.mark.parametrize("ridge", [0, 1])
def test_matches_neural_tangents(nt_reference, mode, ridge):
    """neural-tangents 0.6.5's gradient_descent_mse_ensemble on the same cnngp kernels (a CNN
    with a correlated readout on digits; tests/reference/ensemble/make_reference.py), at
    7 finite times and t = inf (its t=None, a Cholesky solve), means and full covariances."""
    d = nt_reference
    n = len(d["y_train"])
    K, T = d["nngp"], d["ntk"]
    ntk = dict(ntk_train=T[:n, :n], ntk_test_train=T[n:, :n]) if mode == "ntk" else {}
    out = trained_ensemble(d["y_train"], K[:n, :n], K[n:, :n], test_prior=K[n:, n:],
                           times=np.r_[d["times"], np.inf], learning_rate=float(d["learning_rate"]),
                           noise_variance=float(d["ridges"][ridge]), full_covariance=True, **ntk)
    mean, cov = d[f"{mode}_mean_{ridge}"], d[f"{mode}_cov_{ridge}"]
    assert out.mode == mode and out.mean.shape == mean.shape == (8, 8, 3)
    np.testing.assert_allclose(out.mean, mean, rtol=0, atol=1e-10 * np.abs(mean).max())
    np.testing.assert_allclose(out.covariance, cov, rtol=0, atol=1e-10 * np.abs(cov).max())
    np.testing.assert_allclose(out.variance, np.diagonal(cov, axis1=1, axis2=2), rtol=0, atol=1e-12)
    # the reference is not trivial: the outputs move with t, and are not converged at t = 5000
    assert np.abs(mean[0]).max() == 0 and np.abs(mean[-2] - mean[-3]).max() > 1e-4
    assert np.abs(mean[-3] - mean[-1]).max() > 1e-3


def _joint(n, m, seed, scale=1.0):
    """A random positive-definite (n + m)-point kernel from random features."""
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(n + m, n + m + 3)) * scale
    return F @ F.T / F.shape[1]


def _integrated(K_joint, T_joint, Y, n, t, c, s2, mode):
    """The ensemble by integrating its ODE numerically (no closed form): every training output
    relaxes as d f_X/dt = −c Θ_r (f_X − Y), every test output as d f_*/dt = −c Θ_*X (f_X − Y),
    from Gaussian initial outputs (covariance K; plus σ² on the training block in NNGP mode).
    The mean solves the ODE from 0; the covariance is Φ S0 Φᵀ with Φ the ODE's linear map."""
    N = K_joint.shape[0]
    Tr = T_joint[:n, :n] + s2 * np.eye(n)
    drive = np.vstack([Tr, T_joint[n:, :n]])  # (N, n): how f_X − Y moves every output

    def mean_rhs(_, z):
        F = z.reshape(N, -1)
        return (-c * drive @ (F[:n] - Y)).ravel()

    def map_rhs(_, z):
        Phi = z.reshape(N, N)
        return (-c * drive @ Phi[:n]).ravel()

    opts = dict(method="DOP853", rtol=1e-12, atol=1e-14)
    F = solve_ivp(mean_rhs, (0, t), np.zeros(N * Y.shape[1]), **opts).y[:, -1].reshape(N, -1)
    Phi = solve_ivp(map_rhs, (0, t), np.eye(N).ravel(), **opts).y[:, -1].reshape(N, N)
    S0 = K_joint.copy()
    if mode == "nngp":
        S0[:n, :n] += s2 * np.eye(n)
    cov = Phi @ S0 @ Phi.T
    return F[n:], cov[n:, n:]


@pytest.mark.parametrize("mode", ["nngp", "ntk"])
@pytest.mark.parametrize("s2", [0.0, 0.3])
def test_matches_integrated_dynamics(mode, s2):
    """Closed form = the ODE integrated numerically, float regression targets (2 columns)."""
    n, m = 7, 3
    K = _joint(n, m, 0)
    T = _joint(n, m, 1, scale=1.7) + K if mode == "ntk" else K
    Y = np.random.default_rng(2).normal(size=(n, 2))
    lr, times = 0.8, np.array([0.5, 4.0, 30.0])
    c = lr / Y.size
    ntk = dict(ntk_train=T[:n, :n], ntk_test_train=T[n:, :n]) if mode == "ntk" else {}
    out = trained_ensemble(Y, K[:n, :n], K[n:, :n], test_prior=K[n:, n:], times=times,
                           learning_rate=lr, noise_variance=s2, full_covariance=True, **ntk)
    for i, t in enumerate(times):
        mean, cov = _integrated(K, T, Y, n, t, c, s2, mode)
        np.testing.assert_allclose(out.mean[i], mean, rtol=0, atol=1e-9)
        np.testing.assert_allclose(out.covariance[i], cov, rtol=0, atol=1e-9)


def test_converged_readout_training_is_the_gp_posterior():
    """NNGP dynamics at t = inf: the GP posterior mean and variance with noise σ² (Cholesky)."""
    n, m, s2 = 30, 6, 0.05
    K = _joint(n, m, 3)
    y = np.arange(n) % 4
    out = trained_ensemble(y, K[:n, :n], K[n:, :n], test_prior=np.diagonal(K)[n:],
                           noise_variance=s2)
    np.testing.assert_allclose(out.mean[0], gp.posterior_mean(K[:n, :n], y, K[n:, :n], s2),
                               rtol=0, atol=1e-10)
    L = np.linalg.cholesky(K[:n, :n] + s2 * np.eye(n))
    W = np.linalg.solve(L, K[:n, n:])
    np.testing.assert_allclose(out.variance[0], np.diagonal(K)[n:] - (W * W).sum(0), rtol=0, atol=1e-10)


def test_start_and_readout_limit():
    """t = 0: mean 0 and the prior covariance. With Θ = K and σ² = 0 the NTK dynamics are the
    NNGP dynamics at every t (Lee et al. 2019: identical when only the readout's kernel acts)."""
    n, m = 9, 4
    K = _joint(n, m, 4)
    y = np.arange(n) % 3
    times = [0.0, 1.0, 40.0, np.inf]
    a = trained_ensemble(y, K[:n, :n], K[n:, :n], test_prior=K[n:, n:], times=times, full_covariance=True)
    b = trained_ensemble(y, K[:n, :n], K[n:, :n], ntk_train=K[:n, :n], ntk_test_train=K[n:, :n],
                         test_prior=K[n:, n:], times=times, full_covariance=True)
    assert np.abs(a.mean[0]).max() == 0
    np.testing.assert_allclose(a.covariance[0], K[n:, n:], atol=1e-14)
    np.testing.assert_allclose(b.covariance[0], K[n:, n:], atol=1e-14)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-10)
    np.testing.assert_allclose(a.covariance, b.covariance, atol=1e-10)
    # the variance shrinks as training goes on, for every test point
    assert np.all(np.diff(a.variance, axis=0) <= 1e-12)


def test_singular_kernel_at_convergence_is_the_pseudo_inverse():
    """A duplicated training image, σ² = 0, t = inf: warned, and the minimum-norm interpolant
    (numpy's pinv), not NaN."""
    n, m = 6, 2
    K = _joint(n, m, 5)
    idx = np.r_[np.arange(n), 0, np.arange(n, n + m)]  # training image 0 twice
    K = K[np.ix_(idx, idx)]
    y = np.r_[np.arange(n) % 2, 0]
    with pytest.warns(IllConditionedWarning, match="pseudo-inverse"):
        out = trained_ensemble(y, K[:n + 1, :n + 1], K[n + 1:, :n + 1], test_prior=np.diagonal(K)[n + 1:])
    Y = centered_one_hot(y, 2)
    pinv = np.linalg.pinv(K[:n + 1, :n + 1], rcond=1e-10)
    np.testing.assert_allclose(out.mean[0], K[n + 1:, :n + 1] @ pinv @ Y, atol=1e-8)
    assert np.all(np.isfinite(out.variance))


@pytest.mark.parametrize("kwargs, message", [
    (dict(times=-1.0), "times must be >= 0"),
    (dict(times=[1.0, np.nan]), "times must be >= 0"),
    (dict(learning_rate=0.0), "learning_rate: expected a finite number > 0, got 0.0"),
    (dict(learning_rate="a"), "learning_rate: expected a finite number > 0"),
    (dict(learning_rate=True), "learning_rate: expected a finite number > 0"),
    (dict(noise_variance=-1.0), "noise_variance must be finite and >= 0"),
    (dict(ntk_train=np.eye(4)), "ntk_train and ntk_test_train go together"),
    (dict(ntk_train=np.eye(3), ntk_test_train=np.ones((2, 3))), r"ntk_train has shape \(3, 3\)"),
    (dict(ntk_train=np.eye(4), ntk_test_train=np.ones((3, 4))), "ntk_test_train has 3 rows"),
    (dict(full_covariance=True), "full_covariance=True needs test_prior"),
    (dict(full_covariance=True, test_prior=np.ones(2)), r"needs the \(2, 2\) matrix"),
    (dict(test_prior=-np.ones(2)), "variances must be >= 0"),
    (dict(y_train=np.array([0, 1, 1])), "y_train has 3 labels"),
    (dict(y_train=np.array([0.5, 1.0, 1.0, 0.0])), "y_train must be integer class labels"),
    (dict(y_train=np.ones((4, 2)) * np.nan), "y_train contains NaN"),
    (dict(nngp_test_train=np.ones((2, 3))), r"nngp_test_train must have shape \(M, 4\)"),
    (dict(nngp_train=np.array([[1.0, 2.0], [0.0, 1.0]])), "not symmetric"),
])
def test_bad_input(kwargs, message):
    args = dict(y_train=np.array([0, 1, 1, 0]), nngp_train=np.eye(4) + 0.1,
                nngp_test_train=np.full((2, 4), 0.1))
    args.update(kwargs)
    with pytest.raises(CNNGPError, match=message):
        trained_ensemble(args.pop("y_train"), args.pop("nngp_train"), args.pop("nngp_test_train"), **args)


@pytest.mark.slow
def test_finite_networks_trained_by_gradient_descent_match_the_ensemble():
    """Monte Carlo: 256 two-hidden-layer ReLU networks of width 128 in the NTK parameterisation
    (the finite twins of the cnngp spec below), each trained by full-batch gradient descent on
    ½ mean (f − y)² with learning rate η; at 100 and 600 steps the mean and variance of their
    test outputs over the networks equal the NTK dynamics of the infinite-width kernels at
    times = steps, learning_rate = η (within 4 Monte Carlo SE plus a finite-width allowance)."""
    import torch

    import cnngp

    torch.manual_seed(0)
    n, m, d, width, nets, eta = 8, 3, 4, 128, 256, 0.012
    x = torch.randn(n + m, d, dtype=torch.float64)
    y = torch.randn(n, 1, dtype=torch.float64)
    spec = {"layers": [{"type": "conv", "filter": 1}, {"type": "relu"}, {"type": "conv", "filter": 1},
                       {"type": "relu"}, {"type": "readout"}]}
    K, T = (k.numpy() for k in cnngp.kernel(cnngp.from_spec(spec), x[:, None, :], get="both"))
    steps = [100, 600]  # (discrete steps: (1 − a)^k for e^(−a k), within 2 % where either is O(1))
    theory = trained_ensemble(y.numpy(), K[:n, :n], K[n:, :n], ntk_train=T[:n, :n], ntk_test_train=T[n:, :n],
                              test_prior=np.diagonal(K)[n:], times=steps, learning_rate=eta)

    W1 = torch.randn(nets, width, d).requires_grad_()      # NTK parameterisation: N(0, 1) weights,
    W2 = torch.randn(nets, width, width).requires_grad_()  # each layer scaled by 1/sqrt(fan-in)
    w3 = torch.randn(nets, width).requires_grad_()
    xf = x.float()

    def outputs():
        a1 = 2 ** 0.5 * torch.relu(torch.einsum("bhd,pd->bph", W1, xf) / d ** 0.5)
        a2 = 2 ** 0.5 * torch.relu(torch.einsum("bkh,bph->bpk", W2, a1) / width ** 0.5)
        return torch.einsum("bk,bpk->bp", w3, a2) / width ** 0.5  # (nets, n + m)

    recorded = {}
    for step in range(1, steps[-1] + 1):
        f = outputs()
        loss = ((f[:, :n] - y[:, 0].float()) ** 2).sum() / (2 * n * 1)  # ½ mean over N × C, per network
        grads = torch.autograd.grad(loss, (W1, W2, w3))
        with torch.no_grad():
            for p, g in zip((W1, W2, w3), grads):
                p -= eta * g
        if step in steps:
            with torch.no_grad():
                recorded[step] = outputs()[:, n:].double().numpy()
    for i, step in enumerate(steps):
        f = recorded[step]
        mean, var = f.mean(0), f.var(0, ddof=1)
        se_mean = np.sqrt(var / nets)
        se_var = var * np.sqrt(2 / (nets - 1))
        want_mean, want_var = theory.mean[i, :, 0], theory.variance[i]
        assert np.all(np.abs(mean - want_mean) < 4 * se_mean + 0.03 * np.sqrt(np.diagonal(K)[n:]))
        assert np.all(np.abs(var - want_var) < 4 * se_var + 0.05 * np.diagonal(K)[n:])
        print(f"step {step}: mean {mean.round(3)} vs {want_mean.round(3)} (SE {se_mean.round(3)}); "
              f"variance {var.round(3)} vs {want_var.round(3)} (SE {se_var.round(3)})")
    # the test is not vacuous: the trained means are well away from the prior's 0
    assert np.abs(theory.mean[-1]).max() > 5 * se_mean.max()


def test_run_ensemble_scores_both_dynamics_and_the_converged_readout_is_the_gp(tmp_path):
    """On digits (no test split: the images outside the n): a row per mode and time; the
    converged readout-only ensemble classifies exactly as the GP posterior mean at the same σ²;
    at t = 0 every class score is 0 (the first class wins, probabilities uniform: NLL log 10)."""
    import math

    import torch

    import cnngp
    from cnngp.experiments.ensemble import run_ensemble
    from cnngp.io.data import balanced_subset, load_digits

    res = run_ensemble("cnngp1", "digits", 60, n_test=40, times=[0, 50, np.inf], noise_variance=1e-3)
    rows = {(r["mode"], r["time"]): r for r in res["rows"]}
    assert set(rows) == {(m, t) for m in ("nngp", "ntk") for t in (0.0, 50.0, math.inf)}
    assert rows["nngp", 0.0]["nll"] == pytest.approx(math.log(10), rel=1e-12)
    x, y = load_digits()
    order = balanced_subset(y, 60, seed=0, n_classes=10)
    rest = np.setdiff1d(np.arange(len(y)), order)
    t_order = rest[balanced_subset(y[rest], 40, seed=0, n_classes=10)]
    net = cnngp.io.architectures.get("cnngp1")
    K = cnngp.kernel(net, torch.as_tensor(x[order])).numpy()
    Ks = cnngp.kernel(net, torch.as_tensor(x[t_order]), torch.as_tensor(x[order])).numpy()
    want = gp.test_accuracy(K, y[order], Ks, y[t_order], 1e-3, 10)
    assert rows["nngp", math.inf]["accuracy"] == want > 0.6
    assert res["config"]["test_images"] == "the training split's images outside the n"
    assert not set(order) & set(t_order)


def test_ensemble_accuracy_shares_exact_ties():
    """t = 0: every mean class score is 0, so the argmax's first class would score that class's
    frequency (0.6 here); an exact tie of k classes counts 1/k instead, chance."""
    from cnngp.experiments.ensemble import _tie_shared_accuracy

    y = np.array([0, 0, 0, 1, 2])
    assert _tie_shared_accuracy(np.zeros((5, 3)), y) == pytest.approx(1 / 3, abs=1e-15)
    mean = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, 1.0, 0.5]])
    assert _tie_shared_accuracy(mean, y) == pytest.approx((0.5 + 0 + 1 + 1 + 0) / 5, abs=1e-15)


def test_ensemble_header_names_how_the_kernels_saw_the_images():
    """The printed header says flips and whose images the whitening was fitted on (its own
    --n training images, not the sweep's "N_max")."""
    from cnngp.experiments.ensemble import run_ensemble
    from cnngp.experiments.plots import input_words

    res = run_ensemble("cnngp1", "digits", 30, n_test=20, times=[0.0], zca=0.1, flip=True)
    assert input_words(res["config"]) == ", flip-averaged, ZCA ε=0.1 (fitted on the n training images)"


def test_ensemble_command_writes_its_results_and_refuses_bad_times(tmp_path, capsys):
    import json

    from cnngp.cli.main import main

    out = tmp_path / "ens"
    assert main(["ensemble", "--arch", "cnngp1", "--n", "30", "--n-test", "20", "--times", "0,10,inf",
                 "--learning-rate", "0.5", "--out", str(out), "--quiet"]) == 0
    def strict(word):
        raise ValueError(f"not strict JSON: {word}")

    res = json.loads((out / "ensemble.json").read_text(), parse_constant=strict)
    assert len(res["rows"]) == 6 and res["config"]["learning_rate"] == 0.5
    assert res["config"]["times"] == [0.0, 10.0, "inf"] and res["rows"][2]["time"] == "inf"
    assert "--times 0,10,inf" in res["config"]["command"] and "torch" in res["versions"]
    for flags, message in ((["--times", "0,-1"], "--times: expected training times >= 0"),
                           (["--learning-rate", "0"], "--learning-rate: expected a finite number > 0"),
                           (["--noise-variance", "nan"], "--noise-variance: expected a finite number >= 0"),
                           (["--zca-mirror"], "--zca-mirror: says how a ZCA whitening is fitted, but no strength")):
        capsys.readouterr()
        assert main(["ensemble", "--n", "20", "--out", str(tmp_path / "x"), *flags]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_null_directions_are_left_out_at_every_time_and_huge_times_converge():
    """A duplicated image (a null direction of the training kernels), kernels rounded through
    float32 (eigenvalues of about −1e-16): times of 1e30 and 1e308 (c t overflows) give the t = ∞
    ensemble, finite and without NaN, not rounding amplified by c t."""
    n, m = 8, 3
    K = _joint(n, m, 6)
    T = K + _joint(n, m, 7)
    idx = np.r_[np.arange(n), 1, np.arange(n, n + m)]
    K, T = (np.asarray(A[np.ix_(idx, idx)], dtype=np.float32).astype(np.float64) for A in (K, T))
    K, T = 0.5 * (K + K.T), 0.5 * (T + T.T)
    y = np.r_[np.arange(n) % 3, 1]
    tr, te = slice(0, n + 1), slice(n + 1, None)
    for ntk in ({}, dict(ntk_train=T[tr, tr], ntk_test_train=T[te, tr])):
        with pytest.warns(IllConditionedWarning, match="left out at every time"):
            out = trained_ensemble(y, K[tr, tr], K[te, tr], test_prior=np.diagonal(K)[te].copy(),
                                   times=[1e30, 1e308, np.inf], **ntk)
        assert np.all(np.isfinite(out.mean)) and np.all(np.isfinite(out.variance))
        np.testing.assert_allclose(out.mean[0], out.mean[2], atol=1e-9)
        np.testing.assert_allclose(out.mean[1], out.mean[2], atol=1e-9)
        np.testing.assert_allclose(out.variance[:2], out.variance[[2, 2]], atol=1e-9)
    with pytest.raises(CNNGPError, match="n_classes=3 does not match the 2 columns"):
        trained_ensemble(np.ones((n + 1, 2)), K[tr, tr], K[te, tr], n_classes=3)
    with pytest.raises(CNNGPError, match="times must be a number"):
        trained_ensemble(y, K[tr, tr], K[te, tr], times=True)

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
    (dict(learning_rate=0.0), "learning_rate must be finite and > 0"),
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

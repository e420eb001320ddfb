"""Tests of cnngp.inference.gp against independent oracles (Cholesky solves, KernelRidge, refits)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from sklearn.kernel_ridge import KernelRidge

from cnngp.errors import CNNGPError
from cnngp.inference import gp
from cnngp.inference.gp import (
    centered_one_hot,
    cross_validate,
    fit_predict,
    leave_one_out,
    mean_and_2se,
    noise_grid,
    paper_folds,
    posterior_mean,
    stratified_folds,
)
from cnngp.inference.gp import test_accuracy as gp_test_accuracy

NOISES = np.array([1e-4, 1e-2, 0.1, 0.5, 2.0])


def _problem(n=80, n_classes=4, d=6, seed=0, lengthscale=1.5):
    """RBF kernel of random points; labels are a noisy function of the points,
    in class-interleaved order."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = np.arange(n) % n_classes
    centres = rng.normal(size=(n_classes, d))
    x = x + 1.0 * centres[y]
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    K = np.exp(-sq / (2 * lengthscale**2 * d))
    return K, y


def _oracle_fold_accuracy(K, y, tr, va, s2, n_classes):
    """Accuracy of a Cholesky solve of one fold at one noise variance."""
    Y = np.eye(n_classes)[y[tr]] - 1.0 / n_classes
    cf = scipy.linalg.cho_factor(K[np.ix_(tr, tr)] + s2 * np.eye(len(tr)))
    mean = K[np.ix_(va, tr)] @ scipy.linalg.cho_solve(cf, Y)
    return np.mean(mean.argmax(1) == y[va]), mean


def test_centered_one_hot():
    Y = centered_one_hot(np.array([2, 0]), 4)
    np.testing.assert_array_equal(Y, [[-0.25, -0.25, 0.75, -0.25], [0.75, -0.25, -0.25, -0.25]])


def test_cross_validate_matches_cholesky_and_kernel_ridge():
    K, y = _problem()
    folds = paper_folds(len(y), 4)
    res = cross_validate(K, y, folds, NOISES)
    assert res.fold_accuracies.shape == (4, len(NOISES))
    for i, (tr, va) in enumerate(folds):
        # The vectorised eigendecomposition means used inside cross_validate.
        s, U = scipy.linalg.eigh(K[np.ix_(tr, tr)])
        B = U.T @ centered_one_hot(y[tr], 4)
        eig_means = gp._eig_means(s, K[np.ix_(va, tr)] @ U, B, NOISES)
        for j, s2 in enumerate(NOISES):
            acc, mean = _oracle_fold_accuracy(K, y, tr, va, s2, 4)
            np.testing.assert_allclose(eig_means[:, :, j].T, mean, rtol=1e-6, atol=1e-9)
            kr = KernelRidge(kernel="precomputed", alpha=s2)
            kr.fit(K[np.ix_(tr, tr)], centered_one_hot(y[tr], 4))
            kr_mean = kr.predict(K[np.ix_(va, tr)])
            np.testing.assert_allclose(mean, kr_mean, rtol=1e-7, atol=1e-10)
            assert res.fold_accuracies[i, j] == pytest.approx(acc, abs=0)
    np.testing.assert_allclose(res.accuracy, res.fold_accuracies.mean(0))
    # Non-trivial problem: accuracies vary with the noise and beat chance.
    assert res.best_accuracy > 0.5 and np.ptp(res.accuracy) > 0
    assert res.best_noise_variance == NOISES[np.argmax(res.accuracy)]


def test_cross_validate_chunking_does_not_change_results(monkeypatch):
    K, y = _problem(seed=1)
    grid = np.exp(np.linspace(-12, 3, 37))
    full = cross_validate(K, y, 4, grid)
    monkeypatch.setattr(gp, "_CHUNK_BYTES", 1)  # one sigma^2 per chunk
    one = cross_validate(K, y, 4, grid)
    np.testing.assert_array_equal(full.fold_accuracies, one.fold_accuracies)
    monkeypatch.setattr(gp, "_CHUNK_BYTES", 8 * 4 * 80 * 5)  # ragged chunks
    ragged = cross_validate(K, y, 4, grid)
    np.testing.assert_array_equal(full.fold_accuracies, ragged.fold_accuracies)


def test_cross_validate_default_grid():
    K, y = _problem(n=40, seed=2)
    res = cross_validate(K, y, 4, n_grid=50)
    folds = paper_folds(40, 4)
    expected = noise_grid([K[np.ix_(tr, tr)] for tr, _ in folds], n=50)
    np.testing.assert_allclose(res.noise_variances, expected, rtol=1e-12)
    assert res.accuracy.shape == (50,) and res.fold_accuracies.shape == (4, 50)
    assert res.best_accuracy == res.accuracy.max()
    np.testing.assert_array_equal(res.best_fold_accuracies, res.fold_accuracies[:, res.best_index])


def test_posterior_mean_fit_predict_test_accuracy():
    K, y = _problem(n=60, seed=3)
    tr, te = np.arange(40), np.arange(40, 60)
    for s2 in (1e-3, 0.3):
        mean = posterior_mean(K[np.ix_(tr, tr)], y[tr], K[np.ix_(te, tr)], s2)
        kr = KernelRidge(kernel="precomputed", alpha=s2).fit(
            K[np.ix_(tr, tr)], centered_one_hot(y[tr], 4)
        )
        np.testing.assert_allclose(mean, kr.predict(K[np.ix_(te, tr)]), rtol=1e-7, atol=1e-10)
        pred = fit_predict(K[np.ix_(tr, tr)], y[tr], K[np.ix_(te, tr)], s2)
        np.testing.assert_array_equal(pred, mean.argmax(1))
        acc = gp_test_accuracy(K[np.ix_(tr, tr)], y[tr], K[np.ix_(te, tr)], y[te], s2)
        assert acc == np.mean(pred == y[te])


def test_posterior_mean_indefinite_falls_back_to_eigh():
    rng = np.random.default_rng(4)
    A = rng.normal(size=(12, 12))
    K = (A + A.T) / 2  # indefinite
    y = np.arange(12) % 3
    Ks = rng.normal(size=(5, 12))
    s2 = 1e-3
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        mean = posterior_mean(K, y, Ks, s2)
    expected = Ks @ np.linalg.solve(K + s2 * np.eye(12), centered_one_hot(y, 3))
    np.testing.assert_allclose(mean, expected, rtol=1e-8, atol=1e-10)


def test_leave_one_out_equals_explicit_refits():
    K, y = _problem(n=30, n_classes=3, seed=5)
    res = leave_one_out(K, y, NOISES)
    s, U = scipy.linalg.eigh(K)
    Y = centered_one_hot(y, 3)
    loo_means = gp._loo_means(s, U, Y, NOISES)
    n = len(y)
    for j, s2 in enumerate(NOISES):
        hits = 0
        for i in range(n):
            keep = np.delete(np.arange(n), i)
            cf = scipy.linalg.cho_factor(K[np.ix_(keep, keep)] + s2 * np.eye(n - 1))
            m_i = K[i, keep] @ scipy.linalg.cho_solve(cf, Y[keep])
            np.testing.assert_allclose(loo_means[:, i, j], m_i, rtol=1e-6, atol=1e-9)
            hits += m_i.argmax() == y[i]
        assert res.accuracy[j] == pytest.approx(hits / n, abs=0)
    assert res.fold_accuracies.shape == (1, len(NOISES))
    assert 0 < res.best_accuracy <= 1


def test_noise_grid_psd_and_indefinite():
    K, _ = _problem(n=20)
    g = noise_grid(K, n=1000)
    assert g.shape == (1000,) and np.all(np.diff(g) > 0)
    # PSD: the grid starts at the conditioning floor 1e-10 * lambda_max (or e^-36)
    lo = max(-36.0, np.log(gp.NOISE_RCOND * np.linalg.eigvalsh(K)[-1]))
    np.testing.assert_allclose(np.log(g[[0, -1]]), [lo, 5.0])
    np.testing.assert_allclose(np.diff(np.log(g)), (5.0 - lo) / 999, rtol=1e-9)
    tiny = np.eye(3) * 1e-9  # lambda_max 1e-9: the floor 1e-19 is below e^-36
    np.testing.assert_allclose(np.log(noise_grid(tiny, n=5)[0]), -36.0)
    # Indefinite fold kernels: the grid starts just above -min eigenvalue over folds.
    K1 = K - 0.05 * np.eye(20)
    K2 = K[:10, :10] - 0.2 * np.eye(10)
    lam = min(np.linalg.eigvalsh(K1)[0], np.linalg.eigvalsh(K2)[0])
    g = noise_grid([K1, K2], n=100)
    assert g[0] == pytest.approx(-lam * (1 + gp.PD_MARGIN), rel=1e-10)
    assert g[-1] == pytest.approx(np.exp(5.0))
    scipy.linalg.cholesky(K2 + g[0] * np.eye(10))  # positive definite, does not raise
    with pytest.raises(ValueError, match="not a valid covariance"):
        noise_grid(-200.0 * np.eye(3))


def _rank_deficient(n=24, rank=3, seed=0):
    """A kernel of rank 3 (3 features; duplicate points), scale about 1, and 2 classes."""
    rng = np.random.default_rng(seed)
    F = rng.normal(size=(n, rank))
    F[n // 2 :] = F[: n - n // 2]  # duplicates
    y = (F[:, 0] > 0).astype(np.int64)
    y[:2] = [0, 1]
    return F @ F.T, y


def test_noise_grid_never_offers_an_ill_conditioned_sigma2():
    """A rank-deficient kernel: every grid value keeps cond(K + sigma^2 I) <= 1e10, and the
    posterior mean at the smallest one agrees on every subset of test rows to rounding (at
    the paper's e^-36 it came out quantised to multiples of 1/64, different per subset)."""
    K, y = _rank_deficient()
    top = np.linalg.eigvalsh(K)[-1]
    g = noise_grid(K, n=50)
    assert g[0] >= gp.NOISE_RCOND * top * (1 - 1e-12)
    res = gp.cross_validate(K, y, folds=4)
    assert res.noise_variances[0] >= gp.NOISE_RCOND * top * 0.5
    s2 = g[0]
    whole = gp.posterior_mean(K, y, K, s2)
    for rows in (np.arange(5), np.arange(3, 20, 2), np.array([7])):
        part = gp.posterior_mean(K, y, K[rows], s2)
        np.testing.assert_allclose(part, whole[rows], rtol=1e-7, atol=1e-7)
    # as sigma^2 -> 0 the training-point means tend to the projection of Y onto the
    # kernel's range, F F^+ Y (closed form from the 3 features)
    rng = np.random.default_rng(0)
    F = rng.normal(size=(24, 3))
    F[12:] = F[:12]
    np.testing.assert_allclose(F @ F.T, K)
    Y = gp.centered_one_hot(y)
    np.testing.assert_allclose(whole, F @ np.linalg.pinv(F) @ Y, atol=1e-6)


def test_ill_conditioned_noise_is_reported():
    K, y = _rank_deficient()
    with pytest.warns(gp.IllConditionedWarning, match=r"noise_variance=2.32e-16 is below 1e-10"):
        with pytest.warns(RuntimeWarning, match="not positive definite"):
            gp.posterior_mean(K, y, K[:2], np.exp(-36.0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gp.posterior_mean(K, y, K[:2], noise_grid(K, n=5)[0])  # the grid's floor: silent


def test_paper_folds_disjoint_cover_balanced():
    n, n_classes = 160, 10
    y = np.arange(n) % n_classes
    folds = paper_folds(n, 4)
    vals = np.concatenate([va for _, va in folds])
    np.testing.assert_array_equal(np.sort(vals), np.arange(n))
    for i, (tr, va) in enumerate(folds):
        np.testing.assert_array_equal(va, np.arange(40 * i, 40 * (i + 1)))
        assert np.intersect1d(tr, va).size == 0 and len(tr) + len(va) == n
        assert np.all(np.bincount(y[va], minlength=10) == 4)
        assert np.all(np.bincount(y[tr], minlength=10) == 12)
    folds = paper_folds(10, 4)  # unequal sizes 3,3,2,2
    assert [len(va) for _, va in folds] == [3, 3, 2, 2]
    with pytest.raises(ValueError, match="cannot be split"):
        paper_folds(3, 4)


def test_stratified_folds():
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(5), [8, 9, 10, 11, 12]))
    folds = stratified_folds(y, 4, seed=1)
    vals = np.concatenate([va for _, va in folds])
    np.testing.assert_array_equal(np.sort(vals), np.arange(len(y)))
    for tr, va in folds:
        assert np.intersect1d(tr, va).size == 0
        counts = np.bincount(y[va], minlength=5)
        np.testing.assert_array_less(np.abs(counts - np.bincount(y) / 4), 1.0)
    with pytest.raises(ValueError, match="class 1 has only 2 samples, fewer than the k=4"):
        stratified_folds(np.array([0, 0, 0, 0, 1, 1]), 4)


def test_cross_validate_errors():
    K, y = _problem(n=40)
    with pytest.raises(ValueError, match="missing from the training fold"):
        cross_validate(K[:10, :10], np.arange(10), 4, NOISES)
    with pytest.raises(ValueError, match="square"):
        cross_validate(K[:, :5], y, 4, NOISES)
    with pytest.raises(ValueError, match="not symmetric"):
        cross_validate(K + np.triu(np.ones_like(K), 1), y, 4, NOISES)
    with pytest.raises(ValueError, match="has 39 labels but the kernel has 40"):
        cross_validate(K, y[:-1], 4, NOISES)
    with pytest.raises(ValueError, match="finite and >= 0"):
        cross_validate(K, y, 4, [-1.0])
    with pytest.raises(ValueError, match="overlap"):
        cross_validate(K, y, [(np.arange(30), np.arange(25, 40))], NOISES)
    with pytest.raises(ValueError, match="NaN"):
        cross_validate(np.full((4, 4), np.nan), np.arange(4) % 2, 2, NOISES)
    with pytest.raises(ValueError, match=r"K_test_train must have shape \(M, 40\)"):
        fit_predict(K, y, K[:, :3], 0.1)


def test_mean_and_2se():
    m, e = mean_and_2se([0.1, 0.2, 0.3])
    assert m == pytest.approx(0.2) and e == pytest.approx(2 * 0.1 / np.sqrt(3))
    assert mean_and_2se([0.7]) == (0.7, 0.0)
    v = np.array([[1.0, 2.0], [3.0, 6.0]])
    m, e = mean_and_2se(v)
    np.testing.assert_allclose(m, [2.0, 4.0])
    np.testing.assert_allclose(e, 2 * np.std(v, axis=0, ddof=1) / np.sqrt(2))
    with pytest.raises(ValueError, match="at least one value"):
        mean_and_2se([])


# -- posterior variance ----------------------------------------------------------------------


def _joint_problem(n=30, m=7, d=3, seed=3):
    """An RBF kernel of n training and m test points, as one joint (n + m) matrix."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + m, d))
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-sq / (2 * 1.3**2)), n


def test_posterior_variance_equals_the_schur_complement():
    J, n = _joint_problem()
    K, Ks, Kss = J[:n, :n], J[n:, :n], J[n:, n:]
    s2 = 0.05
    # the closed form by an independent computation: the conditional covariance of the joint
    # Gaussian (f_test, y_train) is the Schur complement of its training block, by a plain solve
    cov = Kss - Ks @ np.linalg.solve(K + s2 * np.eye(n), Ks.T)
    full = gp.posterior_variance(K, Ks, Kss, s2, full_covariance=True)
    np.testing.assert_allclose(full, cov, rtol=0, atol=1e-10)
    diag = gp.posterior_variance(K, Ks, np.diagonal(Kss), s2)
    np.testing.assert_allclose(diag, np.diagonal(cov), rtol=0, atol=1e-10)
    # the full matrix's diagonal, and a strict reduction below the prior
    np.testing.assert_allclose(gp.posterior_variance(K, Ks, Kss, s2), diag, rtol=0, atol=1e-14)
    assert np.all(diag < np.diagonal(Kss) - 1e-3) and np.all(diag > 0)


def test_posterior_variance_is_the_error_variance_of_the_posterior_mean():
    """Brute force: draw (f_train, f_test) from the GP prior, observe y = f_train + noise, and
    the spread of f_test minus its posterior mean over many draws is the posterior variance."""
    J, n = _joint_problem(n=12, m=3, seed=5)
    s2 = 0.1
    rng = np.random.default_rng(0)
    draws = 40000
    L = np.linalg.cholesky(J + 1e-12 * np.eye(len(J)))
    f = rng.normal(size=(draws, len(J))) @ L.T
    y = f[:, :n] + np.sqrt(s2) * rng.normal(size=(draws, n))
    weights = np.linalg.solve(J[:n, :n] + s2 * np.eye(n), J[:n, n:])  # (n, m)
    err = f[:, n:] - y @ weights
    var = gp.posterior_variance(J[:n, :n], J[n:, :n], np.diagonal(J[n:, n:]), s2)
    se = var * np.sqrt(2.0 / draws)  # sampling SE of a Gaussian variance estimate
    np.testing.assert_array_less(np.abs(err.var(axis=0) - var), 5 * se)


def test_posterior_variance_through_eigh_and_indefinite_kernels(monkeypatch):
    J, n = _joint_problem(n=10, m=2)
    K, Ks, kss = J[:n, :n], J[n:, :n], np.diagonal(J[n:, n:])
    want = gp.posterior_variance(K, Ks, kss, 0.01)

    def no_cholesky(*a, **k):
        raise np.linalg.LinAlgError("forced")

    with monkeypatch.context() as m:  # the eigendecomposition path gives the same numbers
        m.setattr(scipy.linalg, "cho_factor", no_cholesky)
        np.testing.assert_allclose(gp.posterior_variance(K, Ks, kss, 0.01), want, rtol=0, atol=1e-12)
    # an indefinite kernel (rounding of a PSD one) whose K + sigma^2 I is not positive definite:
    # its negative eigenvalues are taken as 0, with a warning
    s, U = np.linalg.eigh(K)
    s_bad = s.copy()
    s_bad[0] = -1e-3
    K_bad = (U * s_bad) @ U.T
    K_bad = 0.5 * (K_bad + K_bad.T)
    with pytest.warns(RuntimeWarning) as caught:  # (and the variances this makes negative)
        got = gp.posterior_variance(K_bad, Ks, kss, 1e-4)
    assert any("negative eigenvalues (down to -0.001" in str(w.message) for w in caught)
    s_psd = np.maximum(s_bad, 0) + 1e-4
    oracle = kss - np.einsum("mj,j,mj->m", Ks @ U, 1 / s_psd, Ks @ U)
    np.testing.assert_allclose(got, np.maximum(oracle, 0), rtol=0, atol=1e-10)


def test_held_out_predictions_equal_explicit_refits():
    K, y = _problem(n=24, n_classes=3, seed=2)
    s2 = 0.05
    mean, var = gp.held_out_predictions(K, y, s2, None, 3)
    for i in range(len(y)):
        rest = np.delete(np.arange(len(y)), i)
        m_i = posterior_mean(K[np.ix_(rest, rest)], y[rest], K[[i]][:, rest], s2, 3)
        v_i = gp.posterior_variance(K[np.ix_(rest, rest)], K[[i]][:, rest], K[[i], [i]], s2)
        np.testing.assert_allclose(mean[i], m_i[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(var[i], v_i[0], rtol=1e-8, atol=1e-12)
    folds = paper_folds(len(y), 3)
    mean_f, var_f = gp.held_out_predictions(K, y, s2, folds, 3)
    for tr, va in folds:
        np.testing.assert_allclose(mean_f[va], posterior_mean(K[np.ix_(tr, tr)], y[tr], K[np.ix_(va, tr)], s2, 3),
                                   rtol=1e-10, atol=1e-12)
        v = np.diagonal(K)[va] - np.diagonal(K[np.ix_(va, tr)] @ np.linalg.solve(
            K[np.ix_(tr, tr)] + s2 * np.eye(len(tr)), K[np.ix_(tr, va)]))
        np.testing.assert_allclose(var_f[va], v, rtol=0, atol=1e-10)


@pytest.mark.parametrize("change, match", [
    (dict(test_prior=np.ones(3)), r"test_prior must be the \(2,\)"),
    (dict(test_prior=np.array([1.0, -0.5])), "test_prior: variances must be >= 0; test point 1 has -0.5"),
    (dict(test_prior=np.array([1.0, np.nan])), "test_prior contains NaN"),
    (dict(test_prior=np.ones(2), full_covariance=True), r"full_covariance=True needs the \(2, 2\)"),
    (dict(K_test_train=np.ones((2, 4))), r"K_test_train must have shape \(M, 3\)"),
    (dict(K_test_train=np.full((2, 3), np.nan)), "K_test_train contains NaN"),
    (dict(noise_variance=-1.0), "noise_variance must be finite and >= 0"),
    (dict(K_train=np.ones((3, 2))), "K_train must be a square"),
])
def test_posterior_variance_bad_input(change, match):
    from cnngp.errors import CNNGPError

    args = dict(K_train=np.eye(3), K_test_train=np.zeros((2, 3)), test_prior=np.ones(2),
                noise_variance=0.1)
    args.update(change)
    with pytest.raises(CNNGPError, match=match):
        gp.posterior_variance(**args)


def test_posterior_variance_negative_beyond_rounding_is_reported():
    with pytest.warns(RuntimeWarning, match="negative beyond rounding"):
        v = gp.posterior_variance(np.eye(2), np.array([[1.0, 0.0]]), np.array([0.1]), 1e-6)
    assert v.tolist() == [0.0]


def test_sigma2_ties_are_decided_by_counts_not_last_bits():
    """Two σ² with the same 13 of 40 right, spread differently over 4 folds of 10, have means
    0.32499999999999996 and 0.325: a tie, so the first (smallest) σ² is chosen, not the one
    whose float happens to be larger."""
    folds = np.array([[0.4, 0.3], [0.3, 0.3], [0.2, 0.2], [0.4, 0.5]])
    assert folds.mean(axis=0)[0] < folds.mean(axis=0)[1]  # the bits differ
    assert gp._make_result(np.array([1e-9, 4.2]), folds).best_index == 0
    # and on real CV problems the choice is always the first within the tie tolerance
    for seed in range(40):
        rng = np.random.default_rng(seed)
        y = np.arange(40) % 4
        f = rng.normal(size=(40, 5)) + 0.6 * np.eye(4, 5)[y]
        r = cross_validate(f @ f.T / 5, y, 4, None, 4, n_grid=200)
        assert r.best_index == np.flatnonzero(r.accuracy >= r.accuracy.max() - gp.TIE_ATOL)[0]


def test_sigma2_below_the_floor_is_reported_not_scored():
    """A duplicated image and σ² = 0 or 1e-16 given explicitly: 1/(s + σ²) is infinite or
    rounding there, so those σ² are warned about and scored NaN (never chosen); the others
    equal brute-force refits; a grid entirely below the floor is refused."""
    K, y = _problem(n=24, n_classes=3, seed=2)
    idx = np.r_[np.arange(24), 0]
    K, y = K[np.ix_(idx, idx)], y[idx]  # image 0 twice: K is singular
    grid = np.array([0.0, 1e-16, 0.05])
    for result in (lambda: leave_one_out(K, y, grid), lambda: cross_validate(K, y, 5, grid)):
        with pytest.warns(gp.IllConditionedWarning, match="reported as NaN"):
            r = result()
        assert np.isnan(r.accuracy[:2]).all() and r.best_index == 2
    # the scored σ²: leave-one-out by explicit refits
    n, hits = len(y), 0
    for i in range(n):
        keep = np.delete(np.arange(n), i)
        m_i = K[i, keep] @ np.linalg.solve(K[np.ix_(keep, keep)] + 0.05 * np.eye(n - 1),
                                           centered_one_hot(y[keep], 3))
        hits += m_i.argmax() == y[i]
    with pytest.warns(gp.IllConditionedWarning):
        assert leave_one_out(K, y, grid).accuracy[2] == hits / n
    with pytest.warns(gp.IllConditionedWarning), pytest.raises(CNNGPError, match="every noise variance is below"):
        leave_one_out(K, y, [0.0])


def test_full_posterior_covariance_has_a_non_negative_diagonal():
    """A test point equal to a training point at σ² = 0: its variance is 0 up to rounding, and
    the full covariance's diagonal is clipped like the variances (not −2e-16)."""
    x = np.random.default_rng(0).normal(size=(12, 3))
    K = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / 2)[:10, :10]
    cov = gp.posterior_variance(K, K[:5], K[:5, :5], 0.0, full_covariance=True)
    assert np.all(np.diagonal(cov) >= 0)
    np.testing.assert_allclose(cov, 0.0, atol=1e-10)
    np.testing.assert_allclose(np.diagonal(cov), gp.posterior_variance(K, K[:5], np.diagonal(K)[:5], 0.0), atol=1e-12)

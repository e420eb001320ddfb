"""cnngp.inference.calibration: probabilities against closed forms and Monte Carlo, metrics against
hand computations, the calibration scale against a known truth and blind to the test labels."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import norm

from cnngp.errors import CNNGPError
from cnngp.inference import calibration as cal
from cnngp.inference import gp


def test_two_classes_equal_the_closed_form():
    # f_1 - f_0 ~ N(mu_1 - mu_0, 2 tau s^2), so P(1) = Phi((mu_1 - mu_0) / sqrt(2 tau s^2))
    rng = np.random.default_rng(0)
    mu = 3 * rng.normal(size=(50, 2))
    v = rng.uniform(0.01, 2.0, 50)
    for tau in (1.0, 0.3):
        z = (mu[:, 1] - mu[:, 0]) / np.sqrt(2 * tau * v)
        p = cal.class_probabilities(mu, v, tau)
        np.testing.assert_allclose(p[:, 1], norm.cdf(z), rtol=0, atol=1e-12)
        # log space stays accurate where the probability is tiny (down to about e^-200 here)
        logp = cal.log_class_probabilities(mu, v, tau)
        np.testing.assert_allclose(logp[:, 1], norm.logcdf(z), rtol=1e-9, atol=1e-12)
    far = cal.log_class_probabilities(np.array([[0.0, 30.0]]), np.array([0.5]))
    assert far[0, 0] == pytest.approx(norm.logcdf(-30.0), rel=1e-9)  # about -454


def test_probabilities_match_monte_carlo_of_the_gaussian_scores():
    rng = np.random.default_rng(1)
    mu = rng.normal(size=(6, 5))
    v = rng.uniform(0.05, 2.0, 6)
    tau = 0.7
    p = cal.class_probabilities(mu, v, tau)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    draws = 200_000
    f = mu[:, None, :] + np.sqrt(tau * v)[:, None, None] * rng.normal(size=(6, draws, 5))
    winner = f.argmax(axis=2)
    mc = np.stack([(winner == c).mean(axis=1) for c in range(5)], axis=1)
    se = np.sqrt(p * (1 - p) / draws)  # binomial SE of the Monte Carlo frequency
    np.testing.assert_array_less(np.abs(p - mc), 5 * se + 1e-9)
    assert p.max() > 0.45 and p.min() < 1e-3  # a non-trivial case: some classes likely, some not


def test_limits_ties_and_argmax():
    mu = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.3, -0.1, 0.2]])
    # zero variance: the one-hot argmax, exact ties shared equally
    p0 = cal.class_probabilities(mu, np.zeros(3))
    np.testing.assert_allclose(p0, [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], atol=1e-15)
    # tied means get equal probabilities at any variance; huge variance: uniform
    p = cal.class_probabilities(mu, np.full(3, 0.4))
    assert p[0, 0] == p[0, 1] and p[0, 2] < p[0, 0]
    np.testing.assert_allclose(cal.class_probabilities(mu, np.full(3, 1e12)), 1 / 3, atol=1e-5)
    # the most probable class is the largest posterior mean
    rng = np.random.default_rng(2)
    m = rng.normal(size=(300, 10))
    probs = cal.class_probabilities(m, rng.uniform(0, 3, 300))
    assert np.array_equal(probs.argmax(axis=1), m.argmax(axis=1))


def test_nll_and_ece_by_hand():
    probs = np.array([
        [0.70, 0.20, 0.10],   # true 0, confidence 0.70, bin 10 = (10/15, 11/15], right
        [0.68, 0.30, 0.02],   # true 1, confidence 0.68, bin 10, wrong
        [0.02, 0.03, 0.95],   # true 2, confidence 0.95, bin 14, right
        [0.25, 0.50, 0.25],   # true 0, confidence 0.50, bin 7 = (7/15, 8/15], wrong
    ])
    y = np.array([0, 1, 2, 0])
    nll = -(math.log(0.70) + math.log(0.30) + math.log(0.95) + math.log(0.25)) / 4
    assert cal.negative_log_likelihood(probs, y) == pytest.approx(nll, rel=1e-14)
    # bin 10: accuracy 1/2, confidence 0.69; bin 14: 1 vs 0.95; bin 7: 0 vs 0.5
    ece = (2 * abs(0.5 - 0.69) + abs(1 - 0.95) + abs(0 - 0.5)) / 4
    assert cal.expected_calibration_error(probs, y) == pytest.approx(ece, rel=1e-12)
    r = cal.reliability(probs, y)
    assert r["n_bins"] == 15 and len(r["edges"]) == 16 and sum(r["count"]) == 4
    assert [i for i, k in enumerate(r["count"]) if k] == [7, 10, 14]
    assert r["accuracy"][10] == 0.5 and r["confidence"][10] == pytest.approx(0.69)
    assert r["accuracy"][0] is None
    m = cal.classification_metrics(probs, y)
    assert m["accuracy"] == 0.5 and m["nll"] == pytest.approx(nll) and m["ece"] == pytest.approx(ece)
    # a probability of 0 for the true class counts as the smallest normal float64
    assert cal.negative_log_likelihood(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-cal.LOG_FLOOR)


def test_fitted_scale_recovers_the_scale_the_labels_were_drawn_with():
    """Labels drawn from the model itself with tau* = 4: the held-out-NLL minimiser is the
    maximum-likelihood estimate of tau, consistent, so it lands near 4."""
    rng = np.random.default_rng(3)
    n, c, tau_true = 3000, 3, 4.0
    mu = rng.normal(size=(n, c))
    v = rng.uniform(0.05, 0.5, n)
    f = mu + np.sqrt(tau_true * v)[:, None] * rng.normal(size=(n, c))
    y = f.argmax(axis=1)
    tau, nll = cal.fit_calibration_scale(mu, v, y)
    assert tau == pytest.approx(tau_true, rel=0.25)
    at = lambda t: cal.negative_log_likelihood(cal.class_probabilities(mu, v, t), y)  # noqa: E731
    assert nll == pytest.approx(at(tau), rel=1e-9)
    assert at(tau) < at(tau * 1.2) and at(tau) < at(tau / 1.2) and at(tau) < at(1.0)


def test_separable_held_out_predictions_fall_back_to_the_gp_variance():
    """Every held-out prediction right: NLL(tau) falls towards 0 as tau -> 0, so the data set no
    scale, and the grid's lower end (one-hot probabilities: each wrong test prediction would cost
    708 nats) must not be taken. tau = 1 with a CalibrationWarning; one wrong prediction among
    them gives an interior minimum again, with no warning."""
    rng = np.random.default_rng(5)
    n, c = 200, 4
    y = np.arange(n) % c
    mu = rng.normal(scale=0.1, size=(n, c))
    mu[np.arange(n), y] += 0.5  # every argmax right
    v = rng.uniform(0.05, 0.5, n)
    at = lambda t: cal.negative_log_likelihood(cal.class_probabilities(mu, v, t), y)  # noqa: E731
    assert at(1e-6) < at(1e-3) < at(1.0)  # the premise: no minimum above 0
    with pytest.warns(cal.CalibrationWarning, match="200 held-out predictions, 200 right"):
        tau, nll = cal.fit_calibration_scale(mu, v, y)
    assert tau == 1.0 and nll == pytest.approx(at(1.0), rel=1e-12)
    wrong = mu.copy()
    wrong[0] = wrong[0, ::-1] if y[0] != c - 1 - y[0] else np.roll(wrong[0], 1)  # one wrong
    assert np.argmax(wrong[0]) != y[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", cal.CalibrationWarning)
        tau1, _ = cal.fit_calibration_scale(wrong, v, y)
    assert 0 < tau1 < 1e3 and tau1 != 1.0


def test_estimator_on_separable_training_folds_keeps_its_nll_finite():
    """Two digits' classes, 30 training images, every leave-one-out prediction right: the
    calibration scale falls back to 1 (it was 4e-10, and the test NLL 42.5 from one-hot
    probabilities); the test NLL is then that of the GP's own variance."""
    from cnngp.inference.estimator import CNNGPClassifier
    from cnngp.io.data import load_digits

    x, y = load_digits()
    keep = (y == 3) | (y == 8)
    x, y = x[keep], y[keep]
    with pytest.warns(cal.CalibrationWarning):
        clf = CNNGPClassifier("cnngp1").fit(x[:30], y[:30])
    assert clf.calibration_scale_ == 1.0
    held_out = CNNGPClassifier("cnngp1", calibration_scale=1.0).fit(x[:30], y[:30])
    P = clf.predict_proba(x[30:130])
    np.testing.assert_allclose(P, held_out.predict_proba(x[30:130]), rtol=1e-12)
    y_test = np.searchsorted(clf.classes_, y[30:130])
    assert (P.argmax(1) != y_test).any() and cal.negative_log_likelihood(P, y_test) < 1.0


def _digits_like(seed=0, n=60, m=40, c=3):
    """A small RBF-kernel classification problem with train and test points."""
    rng = np.random.default_rng(seed)
    centres = 1.5 * rng.normal(size=(c, 4))
    y = np.arange(n + m) % c
    x = centres[y] + rng.normal(size=(n + m, 4))
    J = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / 8.0)
    return J[:n, :n], y[:n], J[n:, :n], np.diagonal(J[n:, n:]).copy(), y[n:]


def test_log_probabilities_are_floored_as_the_nll():
    """A test image equal to a training image of another class, at a small σ²: its log
    probability is far below LOG_FLOOR, and the per-image values (the NLL's ±2 SE, `cnngp
    compare`) are floored exactly as the NLL is, so their mean is the NLL."""
    K, y, Ks, prior, y_test = _digits_like()
    Ks, prior, y_test = K[:3], np.diagonal(K)[:3].copy(), (y[:3] + 1) % 3   # mislabelled copies
    s = cal.test_scores(K, y, Ks, prior, y_test, 1e-6, gp.paper_folds(len(y), 4), 3)
    assert s["log_prob_true"].min() == cal.LOG_FLOOR
    assert s["nll"] == pytest.approx(-np.mean(s["log_prob_true"]), rel=1e-12)


def test_scale_is_chosen_without_the_test_labels():
    K, y, Ks, prior, y_test = _digits_like()
    folds = gp.paper_folds(len(y), 4)
    a = cal.test_scores(K, y, Ks, prior, y_test, 0.05, folds, 3)
    b = cal.test_scores(K, y, Ks, prior, np.roll(y_test, 1), 0.05, folds, 3)
    assert a["calibration_scale"] == b["calibration_scale"]
    assert a["calibration_nll"] == b["calibration_nll"]
    assert a["accuracy"] != b["accuracy"] and a["nll"] != b["nll"]
    tau, nll = cal.calibrate(K, y, 0.05, folds, 3)
    assert a["calibration_scale"] == tau and a["calibration_nll"] == nll
    # the scores are those of the probabilities computed step by step
    mean = gp.posterior_mean(K, y, Ks, 0.05, 3)
    probs = cal.class_probabilities(mean, gp.posterior_variance(K, Ks, prior, 0.05), tau)
    assert a["nll"] == pytest.approx(cal.negative_log_likelihood(probs, y_test), rel=1e-12)
    assert a["accuracy"] == np.mean(mean.argmax(1) == y_test) > 0.6
    # leave-one-out calibration (folds=None) works too
    assert cal.calibrate(K, y, 0.05, None, 3)[0] > 0


@pytest.mark.parametrize("call, match", [
    (lambda: cal.class_probabilities(np.ones(3), np.ones(3)), r"mean must be a 2-D array"),
    (lambda: cal.class_probabilities(np.ones((3, 2)), np.ones(2)), r"variance must have shape \(3,\)"),
    (lambda: cal.class_probabilities(np.ones((2, 2)), np.array([1.0, -1.0])), "variance: variances must be >= 0; row 1 has -1"),
    (lambda: cal.class_probabilities(np.ones((2, 2)), np.array([1.0, np.nan])), "variance contains NaN"),
    (lambda: cal.class_probabilities(np.full((2, 2), np.nan), np.ones(2)), "mean contains NaN"),
    (lambda: cal.class_probabilities(np.ones((2, 2)), np.ones(2), 0.0), "scale must be a finite number > 0"),
    (lambda: cal.negative_log_likelihood(np.array([[0.5, 0.6]]), [0]), "every row must sum to 1"),
    (lambda: cal.negative_log_likelihood(np.array([[0.5, 0.5]]), [2]), r"y: labels must be in 0..1"),
    (lambda: cal.expected_calibration_error(np.array([[0.5, 0.5]]), [0, 1]), r"y must have shape \(1,\)"),
    (lambda: cal.reliability(np.array([[0.5, 0.5]]), [0], n_bins=0), "n_bins must be an integer >= 1"),
    (lambda: cal.expected_calibration_error(np.array([[np.nan, 0.5]]), [0]), "probabilities must be finite"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(CNNGPError, match=match):
        call()

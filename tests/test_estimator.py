"""scikit-learn estimators: the estimator contract, accuracy on digits, agreement with cnngp.inference.gp."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from cnngp import Independent, Matern, Readout, kernel
from cnngp.errors import CNNGPError
from cnngp.inference import gp
from cnngp.io.data import balanced_subset, load_digits
from cnngp.inference.estimator import CNNGPClassifier, CNNGPClassifierCV

# A network of 1x1 convolutions works on inputs of any width, which the checks' tabular data
# (often 1 or 2 features) need: the named architectures' 3-tap convolutions need >= 3
# positions. With image_shape="channels" it is the NNGP of a 2-layer fully connected net; with
# the default layout (1-D signal, one channel) the readout correlation over the features and
# its lengthscale matter, which the CV estimator selects.
TINY = {
    "layers": [
        {"type": "conv", "filter": 1}, {"type": "relu"},
        {"type": "conv", "filter": 1}, {"type": "relu"},
        {"type": "readout"},
    ]
}


def _expected_failed_checks(estimator):
    # predict_proba weighs each point's own posterior variance, decision_function is the
    # posterior mean: for two classes they rank test points differently (module notes)
    return {"check_decision_proba_consistency": "predict_proba uses each point's posterior variance; "
            "decision_function is the posterior mean"}


@parametrize_with_checks(
    [
        CNNGPClassifier(arch=TINY, image_shape="channels"),
        CNNGPClassifierCV(arch=TINY, lengthscales=(0.0, 1.0, "inf")),
        CNNGPClassifierCV(arch=TINY, search="gradient", lengthscales=(1.0,), cv=3),
    ],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits_split():
    x, y = load_digits()
    idx = balanced_subset(y, 400, seed=0)
    return x[idx[:200]], y[idx[:200]], x[idx[200:]], y[idx[200:]]


def test_accuracy_on_digits(digits_split):
    xtr, ytr, xte, yte = digits_split
    clf = CNNGPClassifier("cnngp2").fit(xtr, ytr)
    assert clf.X_fit_.shape == (200, 8, 8, 1) and clf.dual_coef_.shape == (200, 10)
    assert clf.score(xte, yte) > 0.9  # 96.5 % at the time of writing


def test_predictions_equal_gp_fit_predict(digits_split):
    xtr, ytr, xte, yte = digits_split
    xtr, ytr, xte = xtr[:60], ytr[:60], xte[:40]
    clf = CNNGPClassifier("cnngp1", correlation="matern32", lengthscale=2.0, noise_variance=1e-2)
    clf.fit(xtr, ytr)
    net = clf.network_
    assert net.layers[-1].correlation == Matern(1.5, 2.0)
    K = kernel(net, xtr).double().numpy()
    Ks = kernel(net, xte, xtr).double().numpy()
    assert np.array_equal(clf.predict(xte), gp.fit_predict(K, ytr, Ks, 1e-2, 10))
    np.testing.assert_allclose(
        clf.decision_function(xte), gp.posterior_mean(K, ytr, Ks, 1e-2, 10), rtol=1e-9, atol=1e-12
    )


def test_string_labels_and_flattened_images(digits_split):
    xtr, ytr, xte, _ = digits_split
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                      "nine"])
    a = CNNGPClassifier("cnngp1", image_shape=(8, 8, 1)).fit(xtr[:50].reshape(50, -1), names[ytr[:50]])
    b = CNNGPClassifier("cnngp1").fit(xtr[:50], ytr[:50])
    assert a.X_fit_.shape == (50, 8, 8, 1)
    assert np.array_equal(a.predict(xte[:20].reshape(20, -1)), names[b.predict(xte[:20])])
    # images of another shape than fit's are refused in image terms, not "X has 64 features,
    # but CNNGPClassifier is expecting 8" (scikit-learn counts the second axis only)
    with pytest.raises(CNNGPError, match=r"^X: the estimator was fitted on samples of shape \(8, 8, 1\) \(\*spatial, channels\), "
                                         r"got \(64,\); it holds as many values per sample, so reshape it"):
        b.predict(xte[:20].reshape(20, -1))
    with pytest.raises(CNNGPError, match=r"^X: the estimator was fitted on samples of shape \(8, 8, 1\) \(\*spatial, channels\), "
                                         r"got \(4, 8, 1\)$"):
        b.predict_proba(xte[:20, :4])


def test_cv_selection_matches_gp_leave_one_out_and_kfold(digits_split):
    xtr, ytr, xte, yte = digits_split
    xtr, ytr = xtr[:80], ytr[:80]
    lams = (0.0, 1.0, 4.0, math.inf)
    cv = CNNGPClassifierCV("cnngp1", lengthscales=lams).fit(xtr, ytr)
    res = cv.cv_results_
    assert list(res["lengthscale"]) == list(lams)
    assert cv.cv_scores_.shape == (4, len(cv.noise_variances_)) == (4, 1000)
    assert cv.best_score_ == cv.cv_scores_.max() == res["mean_test_score"][cv.best_index_]
    assert cv.lengthscale_ == lams[cv.best_index_]
    assert cv.noise_variance_ == res["noise_variance"][cv.best_index_]
    assert res["rank_test_score"][cv.best_index_] == 1
    # λ = 0 is exactly the independent readout: same leave-one-out curve
    net = CNNGPClassifier("cnngp1", correlation="independent").fit(xtr, ytr).network_
    K0 = kernel(net, xtr).double().numpy()
    loo = gp.leave_one_out(K0, ytr, cv.noise_variances_, 10)
    np.testing.assert_array_equal(loo.accuracy, cv.cv_scores_[0])
    # the refit model is the fixed-hyperparameter classifier at the chosen (λ, σ²)
    fixed = CNNGPClassifier(
        "cnngp1", correlation="matern32", lengthscale=cv.lengthscale_,
        noise_variance=cv.noise_variance_,
    ).fit(xtr, ytr)
    assert np.array_equal(fixed.predict(xte[:50]), cv.predict(xte[:50]))
    assert cv.score(xte[:60], yte[:60]) > 0.85

    assert cv.tied_lengthscales_[0] == cv.lengthscale_
    assert list(cv.tied_lengthscales_) == [lam for lam, m in zip(lams, res["mean_test_score"])
                                           if m >= res["mean_test_score"].max() - 1e-12]

    kf = CNNGPClassifierCV("cnngp1", lengthscales=(0.0,), cv=4, random_state=3).fit(xtr, ytr)
    folds = gp.stratified_folds(ytr, 4, 3)
    ref = gp.cross_validate(K0, ytr, folds, kf.noise_variances_, 10)
    np.testing.assert_array_equal(ref.accuracy, kf.cv_scores_[0])
    assert {"split0_test_score", "split3_test_score"} <= set(kf.cv_results_)


def test_parameter_errors(digits_split):
    xtr, ytr = digits_split[0][:20], digits_split[1][:20]
    with pytest.raises(ValueError, match="needs a lengthscale"):
        CNNGPClassifier("cnngp1", correlation="matern32").fit(xtr, ytr)
    with pytest.raises(ValueError, match="is unknown"):
        CNNGPClassifier("cnngp1", correlation="cosine", lengthscale=1).fit(xtr, ytr)
    with pytest.raises(ValueError, match="noise_variance"):
        CNNGPClassifier("cnngp1", noise_variance=-1).fit(xtr, ytr)
    with pytest.raises(ValueError, match="image_shape"):
        CNNGPClassifier("cnngp1", image_shape=(7, 7, 1)).fit(xtr.reshape(20, -1), ytr)
    with pytest.raises(ValueError, match="at least 2 classes"):
        CNNGPClassifier("cnngp1").fit(xtr, np.zeros(20, int))
    with pytest.raises(ValueError, match="correlation must be one of"):
        CNNGPClassifierCV("cnngp1", correlation="independent").fit(xtr, ytr)
    with pytest.raises(ValueError, match="unknown architecture"):
        CNNGPClassifier("resnet").fit(xtr, ytr)
    with pytest.raises(ValueError, match="channels"):  # images do not match the fit
        CNNGPClassifier("cnngp1").fit(xtr, ytr).predict(np.repeat(xtr, 2, axis=-1))


def test_readout_variances_of_the_architecture_are_kept():
    x, y = load_digits()
    net = {"layers": [{"type": "conv"}, {"type": "relu"},
                      {"type": "readout", "weight_var": 2.0, "bias_var": 0.5}]}
    clf = CNNGPClassifier(net, correlation="constant").fit(x[:30], y[:30])
    head = clf.network_.layers[-1]
    assert isinstance(head, Readout) and (head.weight_var, head.bias_var) == (2.0, 0.5)
    default = CNNGPClassifier("cnngp1").fit(x[:30], y[:30]).network_.layers[-1]
    assert default.correlation == Independent()


@pytest.mark.parametrize("objective", ["mll", "loo"])
def test_gradient_search_on_digits(digits_split, objective):
    """search="gradient": the learned readout's network reproduces the fitted kernel, and it
    classifies digits about as well as the grid."""
    import cnngp

    xtr, ytr, xte, yte = digits_split
    xtr, ytr, xte, yte = xtr[:100], ytr[:100], xte[:100], yte[:100]
    clf = CNNGPClassifierCV("cnngp2", search="gradient", objective=objective, cv=4, lengthscales=(3.0,))
    clf.fit(xtr, ytr)
    assert 0 < clf.lengthscale_ < math.inf and clf.amplitude_ > 0 and clf.noise_variance_ > 0
    assert clf.network_.layers[-1].weight_var == clf.amplitude_
    K = cnngp.kernel(clf.network_, clf.X_fit_).numpy()
    mean = clf.decision_function(xte)
    ref = gp.posterior_mean(K, np.searchsorted(clf.classes_, ytr),
                            cnngp.kernel(clf.network_, clf._images(xte), clf.X_fit_).numpy(),
                            clf.noise_variance_, 10)
    assert np.allclose(mean, ref, rtol=1e-6, atol=1e-9)
    assert clf.score(xte, yte) > 0.85  # 100 training images
    assert clf.cv_results_["objective"][0] == clf.learn_result_.objective


def test_predict_proba_and_return_std_equal_the_gp_computed_by_hand(digits_split):
    from cnngp.engine.gram import kernel_diagonal
    from cnngp.inference import calibration

    xtr, ytr, xte, yte = digits_split
    xtr, ytr, xte, yte = xtr[:60], ytr[:60], xte[:40], yte[:40]
    names = np.array(list("abcdefghij"))[::-1]  # classes_ sorted: column c is label names-order
    clf = CNNGPClassifier("cnngp1", correlation="matern32", lengthscale=2.0, noise_variance=1e-2)
    clf.fit(xtr, names[ytr])
    y_enc = np.searchsorted(clf.classes_, names[ytr])
    net = clf.network_
    K = kernel(net, xtr).double().numpy()
    Ks = kernel(net, xte, xtr).double().numpy()
    prior = np.diagonal(kernel(net, xte).double().numpy())
    np.testing.assert_allclose(kernel_diagonal(net, xte).numpy(), prior, rtol=1e-12)
    var = gp.posterior_variance(K, Ks, prior, 1e-2)
    labels, std = clf.predict(xte, return_std=True)
    assert std.shape == (40,) and np.all(std > 0)
    np.testing.assert_allclose(std, np.sqrt(var), rtol=1e-8)
    assert np.array_equal(labels, clf.predict(xte))
    # τ from exact leave-one-out on the training set alone
    tau, nll = calibration.calibrate(K, y_enc, 1e-2, None, 10)
    assert clf.calibration_scale_ == pytest.approx(tau, rel=1e-9)
    assert clf.calibration_nll_ == pytest.approx(nll, rel=1e-9)
    proba = clf.predict_proba(xte)
    assert proba.shape == (40, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    mean = gp.posterior_mean(K, y_enc, Ks, 1e-2, 10)
    np.testing.assert_allclose(proba, calibration.class_probabilities(mean, var, tau), rtol=1e-7, atol=1e-12)
    assert np.array_equal(clf.classes_[proba.argmax(axis=1)], labels)
    assert np.mean(labels == names[yte]) >= 0.75  # 80 % at the time of writing
    # a given scale is kept: 1.0 is the GP's own posterior
    own = CNNGPClassifier("cnngp1", correlation="matern32", lengthscale=2.0, noise_variance=1e-2,
                          calibration_scale=1.0).fit(xtr, names[ytr])
    assert own.calibration_scale_ == 1.0 and own.calibration_nll_ is None
    np.testing.assert_allclose(own.predict_proba(xte), calibration.class_probabilities(mean, var, 1.0),
                               rtol=1e-7, atol=1e-12)


def test_cv_calibration_uses_the_cv_folds(digits_split):
    from cnngp.inference import calibration

    xtr, ytr = digits_split[0][:80], digits_split[1][:80]
    clf = CNNGPClassifierCV("cnngp1", lengthscales=(0.0,), cv=4, random_state=3).fit(xtr, ytr)
    K = kernel(clf.network_, xtr).double().numpy()
    folds = gp.stratified_folds(ytr, 4, 3)
    tau, _ = calibration.calibrate(K, ytr, clf.noise_variance_, folds, 10)
    assert clf.calibration_scale_ == pytest.approx(tau, rel=1e-9)
    proba = clf.predict_proba(digits_split[2][:30])
    assert proba.shape == (30, 10) and np.array_equal(proba.argmax(1), clf.predict(digits_split[2][:30]))


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), "big", True])
def test_bad_calibration_scale(digits_split, value):
    from cnngp.errors import CNNGPError

    xtr, ytr = digits_split[0][:20], digits_split[1][:20]
    with pytest.raises(CNNGPError, match="calibration_scale must be None or a finite number > 0"):
        CNNGPClassifier("cnngp1", calibration_scale=value).fit(xtr, ytr)


def test_return_std_of_a_flip_averaged_kernel(digits_split):
    """flip=True: the prior variances are the flip-averaged k(x, x) too, so the posterior
    variance is the one of the flip-averaged GP computed by hand."""
    xtr, ytr, xte = digits_split[0][:40], digits_split[1][:40], digits_split[2][:10]
    clf = CNNGPClassifier("cnngp1", noise_variance=1e-2, flip=True).fit(xtr, ytr)
    net = clf.network_
    K = kernel(net, xtr, flip=True).double().numpy()
    Ks = kernel(net, xte, xtr, flip=True).double().numpy()
    prior = np.diagonal(kernel(net, xte, flip=True).double().numpy())
    assert not np.allclose(prior, np.diagonal(kernel(net, xte).double().numpy()))
    _, std = clf.predict(xte, return_std=True)
    np.testing.assert_allclose(std, np.sqrt(gp.posterior_variance(K, Ks, prior, 1e-2)), rtol=1e-8)


def test_cv_ties_within_rounding_break_as_the_sweeps_do(digits_split, monkeypatch):
    """Scores that differ only by rounding (4e-17, as two λ at the paper-scale N = 320) are a
    tie: the first λ wins, as in the sweep (cnngp.inference.selection.first_best), both are
    listed in tied_lengthscales_, and they share rank 1; a real difference is not a tie."""
    xtr, ytr, _, _ = digits_split
    xtr, ytr = xtr[:40], ytr[:40]
    real = CNNGPClassifierCV._cross_validate

    def nudged(bump):
        def cross_validate(Ks, y_enc, folds, noise, n_classes):
            results, noise = real(Ks, y_enc, folds, noise, n_classes)
            for r in results:
                r.accuracy[:] = 0.5
            results[1].accuracy[7] = 0.5 + bump  # λ = 2 a hair (or truly) above λ = 1
            return results, noise
        return staticmethod(cross_validate)

    monkeypatch.setattr(CNNGPClassifierCV, "_cross_validate", nudged(4e-17))
    cv = CNNGPClassifierCV("cnngp1", lengthscales=(1.0, 2.0), cv=2).fit(xtr, ytr)
    assert (cv.lengthscale_, list(cv.tied_lengthscales_)) == (1.0, [1.0, 2.0])
    assert list(cv.cv_results_["rank_test_score"]) == [1, 1]
    monkeypatch.setattr(CNNGPClassifierCV, "_cross_validate", nudged(1e-3))
    cv = CNNGPClassifierCV("cnngp1", lengthscales=(1.0, 2.0), cv=2).fit(xtr, ytr)
    assert (cv.lengthscale_, list(cv.tied_lengthscales_)) == (2.0, [2.0])
    assert list(cv.cv_results_["rank_test_score"]) == [2, 1]


def test_calibration_of_a_singular_kernel_names_the_calibration():
    """noise_variance=0 with duplicated images: the leave-one-out calibration of predict_proba is
    undefined; the refusal names calibration_scale (not a leave-one-out the user never asked
    for), and a given calibration_scale fits."""
    import warnings

    spec = {"layers": [{"type": "conv", "filter": 1}, {"type": "relu"}, {"type": "conv", "filter": 1},
                       {"type": "relu"}, {"type": "readout"}]}
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 4))
    y = (X[:, 0] > 0).astype(int)
    Xd, yd = np.concatenate([X, X[:5]]), np.concatenate([y, y[:5]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CNNGPError, match=r"^calibration_scale: choosing it .* held-out predictions at "
                                             r"noise_variance=0, and K \+ noise_variance\*I is singular"):
            CNNGPClassifier(spec, image_shape="channels", noise_variance=0.0).fit(Xd, yd)
        clf = CNNGPClassifier(spec, image_shape="channels", noise_variance=0.0, calibration_scale=1.0).fit(Xd, yd)
    assert np.allclose(clf.predict_proba(X[:3]).sum(axis=1), 1.0)

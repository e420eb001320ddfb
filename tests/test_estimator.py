"""scikit-learn estimators: the estimator contract, accuracy on digits, agreement with cnngp.inference.gp."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from cnngp import Independent, Matern, Readout, kernel
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


@parametrize_with_checks(
    [
        CNNGPClassifier(arch=TINY, image_shape="channels"),
        CNNGPClassifierCV(arch=TINY, lengthscales=(0.0, 1.0, "inf")),
        CNNGPClassifierCV(arch=TINY, search="gradient", lengthscales=(1.0,), cv=3),
    ]
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

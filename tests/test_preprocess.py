"""Regularised ZCA whitening (cnngp.io.preprocess) and where it enters: the kernel command, the
sweep, learn and the estimators. The oracle is a direct D × D eigendecomposition written here."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from cnngp.cli.main import main
from cnngp.errors import CNNGPError
from cnngp.io.data import Dataset, load_digits
from cnngp.io.preprocess import fit_zca


def _direct(x_train, eps):
    """(μ, W, closed-form whitened covariance) from the D × D covariance, as the definition
    reads: C = X_cᵀX_c/N = U Λ Uᵀ, δ = ε·tr(C)/D, W = U (Λ + δ)^{-1/2} Uᵀ."""
    X = x_train.reshape(len(x_train), -1)
    mu = X.mean(axis=0)
    Xc = X - mu
    C = Xc.T @ Xc / len(X)
    lam, U = np.linalg.eigh(C)
    lam = np.clip(lam, 0, None)
    delta = eps * np.trace(C) / C.shape[0]
    W = U @ np.diag((lam + delta) ** -0.5) @ U.T
    return mu, W, U @ np.diag(lam / (lam + delta)) @ U.T


def _whiten(x, mu, W):
    return ((x.reshape(len(x), -1) - mu) @ W).reshape(x.shape)


RNG = np.random.default_rng(7)
# N < D (30 images of 48 features) and N > D (200 images of 18 features); correlated pixels
SMALL_N = RNG.random((30, 4, 4, 3)) @ np.diag([1.0, 0.5, 0.2]) + 0.3 * RNG.random((30, 1, 1, 1))
LARGE_N = RNG.random((200, 3, 3, 2)) + 0.5 * RNG.random((200, 1, 1, 2))


@pytest.mark.parametrize("x, eps, method", [
    (SMALL_N, 0.1, "gram"), (SMALL_N, 1.0, "gram"), (LARGE_N, 0.1, "covariance"), (LARGE_N, 0.0, "covariance"),
])
def test_whitened_training_covariance_is_the_closed_form(x, eps, method):
    zca = fit_zca(x, eps)
    assert zca.method == method  # the N × N Gram route exactly when N <= D
    z = zca.transform(x).reshape(len(x), -1)
    mu, W, closed = _direct(x, eps)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-12)
    cov = z.T @ z / len(z)
    np.testing.assert_allclose(cov, closed, atol=1e-10)
    np.testing.assert_allclose(zca.whitened_covariance(), closed, atol=1e-10)
    # identity within the regulariser's effect: every eigenvalue is λ/(λ+δ) <= 1, and exactly 1
    # without a regulariser (the full-rank N > D case)
    ev = np.linalg.eigvalsh(cov)
    assert ev.max() <= 1 + 1e-10
    if eps == 0:
        np.testing.assert_allclose(cov, np.eye(cov.shape[0]), atol=1e-10)


@pytest.mark.parametrize("x", [SMALL_N, LARGE_N], ids=["N<D", "N>D"])
@pytest.mark.parametrize("method", ["auto", "gram", "covariance"])
def test_both_routes_equal_the_direct_dxd_whitening(x, method):
    test = RNG.random((7, *x.shape[1:]))
    zca = fit_zca(x, 0.3, method=method)
    mu, W, _ = _direct(x, 0.3)
    np.testing.assert_allclose(zca.matrix(), W, atol=1e-10)
    np.testing.assert_allclose(zca.transform(x), _whiten(x, mu, W), atol=1e-10)
    np.testing.assert_allclose(zca.transform(test), _whiten(test, mu, W), atol=1e-10)
    assert zca.transform(test).shape == test.shape


def test_cifar_sized_few_images_use_the_gram_route():
    """40 CIFAR-sized images (D = 3072): well defined for ε > 0, rank N − 1, against the direct form
    on the directions the images span and the δ^{-1/2} scaling elsewhere."""
    x = np.random.default_rng(1).random((40, 32, 32, 3))
    zca = fit_zca(x, 0.1)
    assert (zca.method, zca.rank, zca.features) == ("gram", 39, 3072)
    z = zca.transform(x).reshape(40, -1)
    # along the spanned directions U_r, the whitened covariance is λ/(λ+δ)
    proj = z @ zca.basis
    np.testing.assert_allclose(proj.T @ proj / 40,
                               np.diag(zca.eigenvalues / (zca.eigenvalues + zca.regulariser)), atol=1e-10)
    v = np.random.default_rng(2).standard_normal(3072)  # an unspanned direction: scaled by δ^{-1/2}
    v -= zca.basis @ (zca.basis.T @ v)
    out = zca.transform((zca.mean + v).reshape(1, 32, 32, 3)).ravel()
    np.testing.assert_allclose(out, v / math.sqrt(zca.regulariser), rtol=1e-9, atol=1e-9)


def test_test_images_change_nothing_fitted():
    """Whitening statistics come from the training images alone; a test image's whitened value
    depends on that image only."""
    a, b = RNG.random((5, 4, 4, 3)), RNG.random((9, 4, 4, 3))
    zca = fit_zca(SMALL_N, 0.2)
    before = {k: np.copy(getattr(zca, k)) for k in ("mean", "basis", "eigenvalues")}
    za = zca.transform(a)
    # to rounding: BLAS may block a 14-row product otherwise than a 5-row one
    np.testing.assert_allclose(zca.transform(np.concatenate([a, b]))[:5], za, rtol=1e-12, atol=1e-12)
    zca.transform(b * 100)
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(zca, k), v)
    assert zca.provenance()["fitted_on"] == 30


@pytest.mark.parametrize("strength", [-0.1, math.nan, math.inf, "0.1", True, None, [0.1]])
def test_bad_strength_is_refused_naming_zca(strength):
    with pytest.raises(CNNGPError, match=r"^zca: expected a number >= 0"):
        fit_zca(SMALL_N, strength)


@pytest.mark.parametrize("strength, words", [(1e-13, "below 1e-12"), (1e-300, "below 1e-12"),
                                              (2e6, "above 1e\\+06"), (1e300, "above 1e\\+06")])
def test_strength_outside_its_range_is_refused(strength, words):
    """Below 1e-12 the unspanned directions' factor δ^(-1/2) blows rounding noise up; above 1e6
    the whitening is only a shrinking scale. The ends of the range are accepted, and there
    W is the closed form."""
    with pytest.raises(CNNGPError, match=rf"^zca: .*{words}"):
        fit_zca(SMALL_N, strength)
    for eps in (1e-12, 1e6):
        zca = fit_zca(SMALL_N, eps)
        xc = (SMALL_N - SMALL_N.mean(axis=0)).reshape(len(SMALL_N), -1)
        lam, U = np.linalg.eigh(xc.T @ xc / len(xc))
        W = (U / np.sqrt(np.clip(lam, 0, None) + eps * lam.sum() / lam.size)) @ U.T
        z = zca.transform(SMALL_N).reshape(len(xc), -1)
        assert np.abs(z - xc @ W).max() <= 1e-6 * np.abs(xc @ W).max()


def test_bad_images_and_zero_strength_are_refused():
    zca = fit_zca(SMALL_N, 0.1)
    with pytest.raises(CNNGPError, match=r"^zca: x has images of shape \(4, 4, 2\), but the whitening was "
                                         r"fitted on images of shape \(4, 4, 3\)"):
        zca.transform(RNG.random((2, 4, 4, 2)))
    with pytest.raises(CNNGPError, match=r"^zca: x_test has images of shape \(\)"):
        zca.transform(np.zeros(3), "x_test")
    with pytest.raises(CNNGPError, match=r"^x: contains 1 NaN"):
        bad = RNG.random((2, 4, 4, 3))
        bad[0, 0, 0, 0] = np.nan
        zca.transform(bad)
    with pytest.raises(CNNGPError, match=r"^zca: 0 \(no regulariser\) needs a full-rank training covariance, "
                                         r"but the 30 images of x_train span 29 of their 48"):
        fit_zca(SMALL_N, 0)
    with pytest.raises(CNNGPError, match=r"^zca: the 4 images of x_train are all identical"):
        fit_zca(np.ones((4, 2, 2, 1)), 0.1)
    with pytest.raises(CNNGPError, match=r"^zca: x_train holds 1 image"):
        fit_zca(SMALL_N[:1], 0.1)
    with pytest.raises(CNNGPError, match=r"^zca: method must be one of auto, gram, covariance"):
        fit_zca(SMALL_N, 0.1, method="svd")


# -- the kernel command ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("zca")
    x, _ = load_digits()
    np.savez(d / "a.npz", x=x[:24])
    np.savez(d / "b.npz", x=x[100:106])
    return d, x[:24], x[100:106]


def test_kernel_command_whitens_with_the_x1_statistics(digits_files, capsys):
    """--zca reaches the kernel: the result differs from the unwhitened kernel and equals the
    kernel of images whitened here by the direct D × D formula, fitted on --x1 only."""
    import cnngp
    from cnngp.cli.main import load_network

    d, x1, x2 = digits_files
    assert main(["kernel", "--arch", "cnngp1", "--x1", str(d / "a.npz"), "--x2", str(d / "b.npz"),
                 "--out", str(d / "plain.npz"), "--quiet"]) == 0
    assert main(["kernel", "--arch", "cnngp1", "--x1", str(d / "a.npz"), "--x2", str(d / "b.npz"),
                 "--out", str(d / "zca.npz"), "--zca", "0.1", "--quiet"]) == 0
    plain, white = np.load(d / "plain.npz"), np.load(d / "zca.npz")
    mu, W, _ = _direct(x1, 0.1)
    want = cnngp.kernel(load_network("cnngp1"), _whiten(x1, mu, W), _whiten(x2, mu, W)).numpy()
    np.testing.assert_allclose(white["kernel"], want, rtol=1e-9, atol=1e-12)
    assert np.abs(white["kernel"] - plain["kernel"]).max() > 1e-2 * np.abs(plain["kernel"]).max()
    config = json.loads(str(white["config"]))
    assert config["zca"] == 0.1 and config["zca_fit"]["fitted_on"] == 24
    assert config["zca_fit"]["fitted_on_images"] == "--x1" and "--zca 0.1" in config["command_line"]
    assert json.loads(str(plain["config"]))["zca"] is None
    assert str(white["x1_sha256"]) == str(plain["x1_sha256"])  # the images as read


def test_kernel_command_fits_on_x2_when_told(digits_files, capsys):
    """A test × train kernel (--x1 TEST --x2 TRAIN) whitens with the training images' statistics
    given --zca-fit x2; without --x2, or without --zca, --zca-fit x2 is refused in one line."""
    import cnngp
    from cnngp.cli.main import load_network

    d, x1, x2 = digits_files
    assert main(["kernel", "--arch", "cnngp1", "--x1", str(d / "a.npz"), "--x2", str(d / "b.npz"),
                 "--out", str(d / "zca2.npz"), "--zca", "0.1", "--zca-fit", "x2", "--quiet"]) == 0
    mu, W, _ = _direct(x2, 0.1)
    want = cnngp.kernel(load_network("cnngp1"), _whiten(x1, mu, W), _whiten(x2, mu, W)).numpy()
    got = np.load(d / "zca2.npz")
    np.testing.assert_allclose(got["kernel"], want, rtol=1e-9, atol=1e-12)
    config = json.loads(str(got["config"]))
    assert config["zca_fit"]["fitted_on_images"] == "--x2" and config["zca_fit"]["fitted_on"] == 6
    for extra, message in ((["--zca", "0.1", "--zca-fit", "x2"], "--zca-fit: x2 fits the whitening on --x2, but no --x2"),
                           (["--zca-fit", "x2"], "--zca-fit: x2 says where to fit a ZCA whitening, but no --zca")):
        capsys.readouterr()
        assert main(["kernel", "--arch", "cnngp1", "--x1", str(d / "a.npz"), "--out", str(d / "no.npz"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
        assert not (d / "no.npz").exists()


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "abc", ""])
def test_kernel_command_refuses_a_bad_zca(digits_files, capsys, value):
    d, _, _ = digits_files
    out = d / f"bad{abs(hash(value))}.npz"
    assert main(["kernel", "--arch", "cnngp1", "--x1", str(d / "a.npz"), "--out", str(out),
                 "--zca", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cnngp: error: --zca: expected a number >= 0, the regulariser as a fraction of the "
                   f"mean eigenvalue (e.g. 0.1), got {value!r}"]
    assert not out.exists()


def test_store_of_whitened_images_is_kept_apart(digits_files, capsys):
    """A store records its whitening, or that it has none; resuming it with another --zca, or
    a store of unwhitened images with --zca, is refused naming the flag and both whitenings."""
    d, _, _ = digits_files
    store = d / "K.zarr"
    args = ["kernel", "--arch", "cnngp1", "--x1", str(d / "a.npz"), "--out", str(store), "--quiet"]
    assert main(args + ["--zca", "0.1"]) == 0
    from cnngp.engine.store import KernelStore

    info = KernelStore.open(store).info()
    assert info["preprocessing"]["zca"]["strength"] == 0.1
    capsys.readouterr()
    assert main(args + ["--zca", "0.2"]) == 2
    assert capsys.readouterr().err == (
        f"cnngp: error: --zca: {str(store)!r} holds kernels of images whitened by ZCA of strength 0.1, not of "
        "images whitened by ZCA of strength 0.2; resume only with the same whitening, or give another store "
        "(nothing was overwritten)\n")
    assert main(args) == 2
    assert "holds kernels of images whitened by ZCA of strength 0.1, not of unwhitened images" in capsys.readouterr().err
    assert main(args + ["--zca", "0.1"]) == 0  # the same whitening: reused
    plain = d / "P.zarr"
    assert main(["kernel", "--arch", "cnngp1", "--x1", str(d / "a.npz"), "--out", str(plain), "--quiet"]) == 0
    assert KernelStore.open(plain).attrs["preprocessing"] == {"zca": None}  # recorded as unwhitened
    assert main(["kernel", "--arch", "cnngp1", "--x1", str(d / "a.npz"), "--out", str(plain), "--quiet",
                 "--zca", "0.1"]) == 2  # named as such (it used to be "a kernel of different images")
    assert capsys.readouterr().err == (
        f"cnngp: error: --zca: {str(plain)!r} holds kernels of unwhitened images, not of images whitened by ZCA "
        "of strength 0.1; resume only with the same whitening, or give another store (nothing was overwritten)\n")
    # a store made before stores recorded it (no preprocessing): its identity refuses the images
    KernelStore.open(plain).group.attrs.__delitem__("preprocessing")
    assert main(["kernel", "--arch", "cnngp1", "--x1", str(d / "a.npz"), "--out", str(plain), "--quiet",
                 "--zca", "0.1"]) == 2
    assert "different images" in capsys.readouterr().err


# -- the sweep, learn and the estimators ----------------------------------------------------


def _dataset(test_offset: int) -> Dataset:
    x, y = load_digits()
    test = slice(1000 + test_offset, 1040 + test_offset)
    return Dataset(x[:200], y[:200], x[test], y[test], "digits", tuple(str(i) for i in range(10)))


SWEEP = dict(ns=(20,), folds=2, lengthscales=[1.0], n_grid=20, test=True, progress=False, dtype="float64")


def test_sweep_fits_on_the_training_subset_only(tmp_path):
    """Other test images: the same whitening and the same cross-validation; the kernels are those
    of the training subset whitened by its own statistics, and of the test images whitened by them."""
    import cnngp
    from cnngp.experiments.sweep import split_network, sweep_readouts

    ds = _dataset(0)
    a = run_sweep_zca(ds, kernel_cache=tmp_path / "a.npz")
    b = run_sweep_zca(_dataset(300))
    with np.load(tmp_path / "a.npz") as z:
        x_sub, x_test = ds.x_train[z["train_index"]], ds.x_test[z["test_index"]]
        K, K_test = z["kernels"], z["test_kernels"]
    mu, W, _ = _direct(x_sub, 0.25)
    body, template, _ = split_network("cnngp1")
    net = cnngp.Serial(body, sweep_readouts(template, [1.0])[0][0])  # the independent readout
    np.testing.assert_allclose(K[0], cnngp.kernel(net, _whiten(x_sub, mu, W)).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(K_test[0], cnngp.kernel(net, _whiten(x_test, mu, W), _whiten(x_sub, mu, W)).numpy(),
                               rtol=1e-9, atol=1e-12)
    assert a["config"]["zca"] == 0.25 and a["config"]["zca_fit"]["fitted_on"] == 20
    assert a["config"]["zca_fit"] == b["config"]["zca_fit"]
    assert [r["cv_accuracy"] for r in a["results"]] == [r["cv_accuracy"] for r in b["results"]]
    assert [r["noise_variance"] for r in a["results"]] == [r["noise_variance"] for r in b["results"]]
    plain = run_sweep_zca(_dataset(0), zca=None)
    assert plain["config"]["zca"] is None and plain["config"]["zca_fit"] is None
    assert plain["config"]["train_sha256"] == a["config"]["train_sha256"]  # the images as read


def test_sweep_zca_fit_rest_whitens_with_the_other_training_images_only(tmp_path):
    """``zca_fit="rest"``: the whitening is fitted on the training images outside the N_max
    subset. Oracle: the direct whitening of those images, applied to the subset and the test
    images alike. Changing the subset's own pixels or the test images changes nothing fitted;
    changing an image of the rest does."""
    import cnngp
    from cnngp.experiments.sweep import split_network, sweep_readouts

    ds = _dataset(0)
    a = run_sweep_zca(ds, zca_fit="rest", kernel_cache=tmp_path / "a.npz")
    with np.load(tmp_path / "a.npz") as z:
        order, x_test = z["train_index"], ds.x_test[z["test_index"]]
        K, K_test = z["kernels"], z["test_kernels"]
    rest = np.setdiff1d(np.arange(len(ds.x_train)), order)
    assert len(rest) == 180 and not set(rest) & set(order)
    mu, W, _ = _direct(ds.x_train[rest], 0.25)
    x_sub = ds.x_train[order]
    body, template, _ = split_network("cnngp1")
    net = cnngp.Serial(body, sweep_readouts(template, [1.0])[0][0])
    np.testing.assert_allclose(K[0], cnngp.kernel(net, _whiten(x_sub, mu, W)).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(K_test[0], cnngp.kernel(net, _whiten(x_test, mu, W), _whiten(x_sub, mu, W)).numpy(),
                               rtol=1e-9, atol=1e-12)
    fit = a["config"]["zca_fit"]
    assert (fit["fit"], fit["fitted_on"]) == ("rest", 180)
    assert fit["fitted_on_images"] == "the training images outside the N_max subset (unlabelled)"

    def changed(where):  # the data set with one image's pixels changed (its label kept)
        x = ds.x_train.copy()
        x[where] = x[where][::-1]
        return Dataset(x, ds.y_train, ds.x_test, ds.y_test, ds.name, ds.class_names)

    assert run_sweep_zca(_dataset(300), zca_fit="rest")["config"]["zca_fit"] == fit  # other test images
    in_subset = run_sweep_zca(changed(order[0]), zca_fit="rest")["config"]["zca_fit"]
    assert in_subset == fit  # the subset's own pixels: not fitted on
    assert run_sweep_zca(changed(rest[0]), zca_fit="rest")["config"]["zca_fit"]["mean_eigenvalue"] \
        != fit["mean_eigenvalue"]


def test_sweep_zca_fit_is_checked_and_kept_apart_in_stores(tmp_path):
    with pytest.raises(CNNGPError, match=r"^zca_fit: expected one of train, rest, got 'test'"):
        run_sweep_zca(_dataset(0), zca_fit="test")
    with pytest.raises(CNNGPError, match=r"^zca_fit: 'rest' says where to fit a ZCA whitening, but no strength"):
        run_sweep_zca(_dataset(0), zca=None, zca_fit="rest")
    x, y = load_digits()
    every = Dataset(x[:20], y[:20], None, None, "twenty", tuple(str(i) for i in range(10)))
    with pytest.raises(CNNGPError, match=r"^zca_fit: 'rest' .* outside the N_max = 20 subset, and there are 0"):
        run_sweep_zca(every, zca_fit="rest", test=False)
    store = tmp_path / "K.zarr"
    run_sweep_zca(_dataset(0), store=store, test=False)
    with pytest.raises(CNNGPError, match=r"^zca: .*K\.zarr' holds kernels of images whitened by ZCA fitted on the "
                                         r"N_max training subset, not on the training images outside"):
        run_sweep_zca(_dataset(0), store=store, test=False, zca_fit="rest")


def run_sweep_zca(ds, zca=0.25, **kw):
    from cnngp.experiments.sweep import run_sweep

    return run_sweep("cnngp1", ds, **{**SWEEP, "zca": zca, **kw})


def test_sweep_kernel_cache_of_unwhitened_images_is_not_reused(tmp_path):
    cache = tmp_path / "k.npz"
    run_sweep_zca(_dataset(0), zca=None, kernel_cache=cache, test=False)
    with pytest.raises(CNNGPError, match=r"differs in zca"):
        run_sweep_zca(_dataset(0), kernel_cache=cache, test=False)


def test_protocols_and_estimators_refuse_a_bad_zca():
    from cnngp.experiments.learned import LearnProtocol
    from cnngp.experiments.sweep import SweepProtocol
    from cnngp.inference.estimator import CNNGPClassifier, CNNGPClassifierCV

    for bad in (-1, math.nan, "0.1"):
        with pytest.raises(CNNGPError, match=r"^zca: expected a number >= 0"):
            SweepProtocol(zca=bad)
        with pytest.raises(CNNGPError, match=r"^zca: expected a number >= 0"):
            LearnProtocol(zca=bad)
        with pytest.raises(CNNGPError, match=r"^zca: expected a number >= 0"):
            SweepProtocol().replace(zca=bad)
        x, y = load_digits()
        for est in (CNNGPClassifier("cnngp1", zca=bad), CNNGPClassifierCV("cnngp1", zca=bad)):
            with pytest.raises(CNNGPError, match=r"^zca: expected a number >= 0"):
                est.fit(x[:20], y[:20])
    assert SweepProtocol(zca=0).zca == 0.0 and LearnProtocol(zca=1).zca == 1.0


def test_estimator_fits_the_whitening_on_training_x_only():
    import cnngp
    from cnngp.inference.estimator import CNNGPClassifier

    x, y = load_digits()
    xtr, ytr, a, b = x[:40], y[:40], x[500:510], x[600:620]
    clf = CNNGPClassifier("cnngp1", correlation="matern32", lengthscale=2.0, noise_variance=1e-2, zca=0.2)
    clf.fit(xtr, ytr)
    mu, W, _ = _direct(xtr, 0.2)
    np.testing.assert_allclose(clf.X_fit_, _whiten(xtr, mu, W), atol=1e-10)
    np.testing.assert_allclose(clf.zca_.mean, xtr.reshape(40, -1).mean(axis=0))
    da = clf.decision_function(a)
    clf.decision_function(b)  # predicting other images changes nothing fitted
    np.testing.assert_array_equal(clf.decision_function(a), da)
    np.testing.assert_allclose(clf.zca_.mean, xtr.reshape(40, -1).mean(axis=0))
    want = cnngp.kernel(clf.network_, _whiten(a, mu, W), _whiten(xtr, mu, W)).numpy() @ clf.dual_coef_
    np.testing.assert_allclose(da, want, rtol=1e-8, atol=1e-12)
    assert CNNGPClassifier("cnngp1").fit(xtr, ytr).zca_ is None


def test_estimator_cv_whitens_before_selection():
    from cnngp.inference.estimator import CNNGPClassifierCV

    x, y = load_digits()
    cv = CNNGPClassifierCV("cnngp1", lengthscales=[1.0, "inf"], noise_variances=[1e-2, 1e-1], zca=0.5)
    cv.fit(x[:30], y[:30])
    mu, W, _ = _direct(x[:30], 0.5)
    np.testing.assert_allclose(cv.X_fit_, _whiten(x[:30], mu, W), atol=1e-10)
    assert cv.predict(x[200:205]).shape == (5,)


def test_estimators_apply_a_whitening_fitted_beforehand_as_it_is():
    """``zca=fit_zca(other images, ε)``: the estimator applies that whitening to training and new
    X alike (nothing refitted on X). Oracle: the same estimator without zca on the arrays
    whitened by the direct formula of the other images; CV selections and scores equal."""
    from sklearn.base import clone

    from cnngp.inference.estimator import CNNGPClassifier, CNNGPClassifierCV
    from cnngp.io.preprocess import fit_zca

    x, y = load_digits()
    other = x[1000:1300]  # unlabelled images outside the training and test sets
    zca = fit_zca(other, 0.3)
    mu, W, _ = _direct(other, 0.3)
    xtr, ytr, xte = x[:40], y[:40], x[600:630]
    options = dict(lengthscales=[1.0, 4.0, "inf"], noise_variances=[1e-3, 1e-2, 1e-1], cv=2)
    cv = CNNGPClassifierCV("cnngp1", zca=zca, **options).fit(xtr, ytr)
    ref = CNNGPClassifierCV("cnngp1", **options).fit(_whiten(xtr, mu, W), ytr)
    assert cv.zca_ is zca
    np.testing.assert_allclose(cv.X_fit_, _whiten(xtr, mu, W), atol=1e-10)
    np.testing.assert_array_equal(cv.cv_scores_, ref.cv_scores_)
    assert (cv.lengthscale_, cv.noise_variance_) == (ref.lengthscale_, ref.noise_variance_)
    np.testing.assert_allclose(cv.decision_function(xte), ref.decision_function(_whiten(xte, mu, W)),
                               rtol=1e-8, atol=1e-12)
    one = CNNGPClassifier("cnngp1", correlation="matern32", lengthscale=2.0, zca=zca).fit(xtr, ytr)
    np.testing.assert_allclose(one.predict_proba(xte), CNNGPClassifier(
        "cnngp1", correlation="matern32", lengthscale=2.0).fit(_whiten(xtr, mu, W), ytr).predict_proba(
        _whiten(xte, mu, W)), rtol=1e-7, atol=1e-12)
    assert repr(zca) == "ZCAWhitening(strength=0.3, n_fit=300, image_shape=(8, 8, 1), method='covariance')"
    assert "ZCAWhitening(strength=0.3" in repr(cv)
    # a grid search clones the estimator per candidate: the fitted whitening is shared, not
    # copied (its arrays are read-only, so sharing cannot leak a change from one to another)
    assert clone(cv).zca is zca and copy.deepcopy(zca) is zca
    with pytest.raises(ValueError, match="read-only"):
        zca.basis[0, 0] = 1.0
    np.testing.assert_array_equal(clone(cv).fit(xtr, ytr).cv_scores_, cv.cv_scores_)
    with pytest.raises(CNNGPError, match=r"image"):  # a whitening of other images' shape
        CNNGPClassifier("cnngp1", zca=fit_zca(np.random.default_rng(0).random((20, 4, 4, 1)), 0.3)).fit(xtr, ytr)


@pytest.mark.filterwarnings("ignore:max_iter")
def test_learn_records_and_applies_the_whitening():
    from cnngp.experiments.learned import run_learn

    common = dict(starts=(3.0,), max_iter=3, lengthscales=(1.0,), folds=2, progress=False)
    res = run_learn("cnngp1", _dataset(0), 20, zca=0.3, **common)
    plain = run_learn("cnngp1", _dataset(0), 20, **common)
    assert res["config"]["zca"] == 0.3 and res["config"]["zca_fit"]["fitted_on"] == 20
    assert plain["config"]["zca"] is None
    assert res["config"]["train_sha256"] == plain["config"]["train_sha256"]
    assert res["grid"][0]["objective"] != plain["grid"][0]["objective"]
    # zca_fit="rest": fitted on the other 180 training images; the n's own pixels do not enter it
    rest = run_learn("cnngp1", _dataset(0), 20, zca=0.3, zca_fit="rest", **common)["config"]["zca_fit"]
    assert (rest["fit"], rest["fitted_on"]) == ("rest", 180)
    assert rest["fitted_on_images"] == "the training images outside the n (unlabelled)"
    from cnngp.io.data import balanced_subset

    ds = _dataset(0)
    x = ds.x_train.copy()  # (a copy: the digits loader's arrays are shared)
    first = balanced_subset(ds.y_train, 20, seed=0, n_classes=10)[0]
    x[first] = x[first][::-1]
    changed = Dataset(x, ds.y_train, ds.x_test, ds.y_test, ds.name, ds.class_names)
    assert run_learn("cnngp1", changed, 20, zca=0.3, zca_fit="rest", **common)["config"]["zca_fit"] == rest
    with pytest.raises(CNNGPError, match=r"^zca_fit: 'rest' says where to fit a ZCA whitening"):
        run_learn("cnngp1", _dataset(0), 20, zca_fit="rest", **common)


@pytest.mark.parametrize("command", [["sweep"], ["learn"]])
def test_sweep_and_learn_commands_refuse_a_bad_zca(tmp_path, capsys, command):
    assert main(command + ["--out", str(tmp_path / "o"), "--zca", "-0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cnngp: error: --zca: expected a number >= 0, the regulariser as a fraction of the "
                   "mean eigenvalue (e.g. 0.1), got '-0.5'"]
    assert not (tmp_path / "o").exists()


def test_sweep_store_records_its_whitening(tmp_path):
    store = tmp_path / "K.zarr"
    res = run_sweep_zca(_dataset(0), store=store, test=False)
    from cnngp.engine.store import KernelStore

    assert KernelStore.open(store).info()["preprocessing"]["zca"] == {**res["config"]["zca_fit"]}
    with pytest.raises(CNNGPError, match=r"^zca: .*K\.zarr' holds kernels of images whitened by ZCA of strength "
                                         r"0\.25, not of unwhitened images"):
        run_sweep_zca(_dataset(0), zca=None, store=store, test=False)
    again = run_sweep_zca(_dataset(0), store=store, test=False)  # the same whitening: reused
    assert again["results"] == res["results"]
    # and the other way round: a store of unwhitened images (its train and test stores) records
    # that, and a whitened run on it is refused naming both, not as "different images"
    plain = tmp_path / "P.zarr"
    run_sweep_zca(_dataset(0), zca=None, store=plain)
    for path in (plain, tmp_path / "P-test.zarr"):
        assert KernelStore.open(path).attrs["preprocessing"] == {"zca": None}, path
    with pytest.raises(CNNGPError, match=r"^zca: .*P\.zarr' holds kernels of unwhitened images, not of images "
                                         r"whitened by ZCA of strength 0\.25; resume only with the same whitening"):
        run_sweep_zca(_dataset(0), store=plain)


def test_sweep_command_records_zca(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", "--arch", "cnngp1", "--n", "20", "--folds", "2", "--lengthscales", "1",
                 "--zca", "0.5", "--out", str(out), "--quiet", "--no-checkpoint"]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["zca"] == 0.5 and config["zca_fit"]["fitted_on"] == 20
    assert config["zca_fit"]["fitted_on_images"] == "the N_max training subset"
    assert "--zca 0.5" in config["command"]
    assert main(["sweep", "--arch", "cnngp1", "--n", "20", "--folds", "2", "--lengthscales", "1", "--zca", "0.5",
                 "--zca-fit", "rest", "--out", str(out), "--quiet", "--no-checkpoint"]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert (config["zca_fit"]["fit"], config["zca_fit"]["fitted_on"]) == ("rest", 1797 - 20)  # all of digits but 20
    assert "--zca-fit rest" in config["command"]


def test_zca_fit_outside_fits_outside_a_larger_balanced_subset_that_begins_with_the_n_max(tmp_path):
    """``zca_fit_outside=M``: the whitening is fitted on the training images outside the balanced
    M (which begins with the N_max subset). Oracle: the direct whitening of those images. Sweeps
    at N_max = 20 and 40 with M = 40 then share the fit, and the N = 20 kernels are the top-left
    block of the N = 40 ones; changing an image among the M changes nothing fitted."""
    from cnngp.io.data import balanced_subset

    ds = _dataset(0)
    a = run_sweep_zca(ds, zca_fit="rest", zca_fit_outside=40, kernel_cache=tmp_path / "a.npz", test=False)
    b = run_sweep_zca(ds, ns=(20, 40), zca_fit="rest", zca_fit_outside=40, kernel_cache=tmp_path / "b.npz",
                      test=False)
    held = balanced_subset(ds.y_train, 40, seed=0, n_classes=10)
    with np.load(tmp_path / "a.npz") as za, np.load(tmp_path / "b.npz") as zb:
        assert np.array_equal(zb["train_index"], held) and np.array_equal(za["train_index"], held[:20])
        np.testing.assert_array_equal(za["kernels"], zb["kernels"][:, :20, :20])
        K = za["kernels"]
    rest = np.setdiff1d(np.arange(len(ds.x_train)), held)
    mu, W, _ = _direct(ds.x_train[rest], 0.25)
    import cnngp
    from cnngp.experiments.sweep import split_network, sweep_readouts

    body, template, _ = split_network("cnngp1")
    net = cnngp.Serial(body, sweep_readouts(template, [1.0])[0][0])
    np.testing.assert_allclose(K[0], cnngp.kernel(net, _whiten(ds.x_train[held[:20]], mu, W)).numpy(),
                               rtol=1e-9, atol=1e-12)
    fit = a["config"]["zca_fit"]
    assert fit == b["config"]["zca_fit"]
    assert (fit["fit"], fit["fit_outside"], fit["fitted_on"]) == ("rest", 40, 160)
    assert fit["fitted_on_images"] == "the training images outside the balanced 40 (unlabelled)"
    x = ds.x_train.copy()
    x[held[-1]] = x[held[-1]][::-1]  # among the 40, not among the 20 the sweep trains on
    changed = Dataset(x, ds.y_train, ds.x_test, ds.y_test, ds.name, ds.class_names)
    assert run_sweep_zca(changed, zca_fit="rest", zca_fit_outside=40, test=False)["config"]["zca_fit"] == fit


def test_zca_fit_outside_is_checked():
    with pytest.raises(CNNGPError, match=r"^zca_fit_outside: 10 images is fewer than the N_max = 20 subset \(20\); "
                                         r"the whitening would be fitted on images it trains and validates on"):
        run_sweep_zca(_dataset(0), zca_fit="rest", zca_fit_outside=10, test=False)
    with pytest.raises(CNNGPError, match=r"^zca_fit_outside: says which training images a zca_fit 'rest' whitening "
                                         r"leaves out, but zca_fit is 'train'"):
        run_sweep_zca(_dataset(0), zca_fit_outside=40, test=False)
    for bad in (0, -40, 2.5, "40", True):
        with pytest.raises(CNNGPError, match=r"^zca_fit_outside: expected a positive integer \(a number of training "
                                             r"images\)"):
            run_sweep_zca(_dataset(0), zca_fit="rest", zca_fit_outside=bad, test=False)
    with pytest.raises(CNNGPError, match=r"^zca_fit_outside=400 needs 40 images per class but class \d has only"):
        run_sweep_zca(_dataset(0), zca_fit="rest", zca_fit_outside=400, test=False)
    x, y = load_digits()
    every = Dataset(x[:20], y[:20], None, None, "twenty", tuple(str(i) for i in range(10)))
    with pytest.raises(CNNGPError, match=r"^zca_fit: 'rest' fits the whitening on the training images outside the "
                                         r"balanced N = 20 subset, and there are 0"):
        run_sweep_zca(every, zca_fit="rest", zca_fit_outside=20, test=False)
    three = np.concatenate([np.flatnonzero(y == c)[:3] for c in range(10)])  # 3 images of each class
    thirty = Dataset(x[three], y[three], None, None, "thirty", tuple(str(i) for i in range(10)))
    with pytest.raises(CNNGPError, match=r"^zca_fit_outside: 'rest' fits the whitening on the training images outside "
                                         r"the balanced N = 30 subset, and there are 0; give a smaller "
                                         r"zca_fit_outside \(at least 20\)"):
        run_sweep_zca(thirty, zca_fit="rest", zca_fit_outside=30, test=False)


def test_a_kernel_cache_is_not_reused_for_a_whitening_fitted_on_other_images(tmp_path):
    """The cache is keyed on the images a whitening was fitted on: caches of another
    zca_fit_outside, or of zca_fit="train", are refused, not read as this whitening's kernels."""
    cache = tmp_path / "k.npz"
    run_sweep_zca(_dataset(0), zca_fit="rest", zca_fit_outside=40, kernel_cache=cache, test=False)
    for other in (dict(zca_fit="rest", zca_fit_outside=60), dict(zca_fit="rest"), dict()):
        with pytest.raises(CNNGPError, match=r"^kernel_cache: .*holds kernels of a different sweep \(differs in "
                                             r"zca_fit_sha256\)"):
            run_sweep_zca(_dataset(0), kernel_cache=cache, test=False, **other)
    again = run_sweep_zca(_dataset(0), zca_fit="rest", zca_fit_outside=40, kernel_cache=cache, test=False)
    assert again["config"]["zca_fit"]["fit_outside"] == 40


@pytest.mark.filterwarnings("ignore:max_iter")
def test_learn_stores_record_their_whitening_and_a_resume_with_another_is_refused_saying_so(tmp_path):
    """learn's stores of offset sums (train, test and, with params="internal", one per internal
    λ) record the whitening once complete; resuming one without it, or with a whitening fitted
    elsewhere, is refused naming the whitening (not the store's generic image-hash message),
    and nothing in the store changes. The same run again resumes."""
    from cnngp.engine.store import KernelStore
    from cnngp.experiments.learned import learn_store_paths, run_learn

    import cnngp

    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(4, stride=2, padding="same",
                       correlation=cnngp.Matern(1.5, 3.0)), cnngp.ReLU(), cnngp.Readout())
    common = dict(starts=(3.0,), max_iter=3, lengthscales=(1.0,), folds=2, progress=False, test=True,
                  n_test=20, params="internal", refine=0)
    store = tmp_path / "S.zarr"
    first = run_learn(net, _dataset(0), 20, zca=0.3, store=store, **common)
    paths = learn_store_paths(store, True, False)
    assert [p.name for p in paths[:2]] == ["S.zarr", "S-test.zarr"] and len(paths) > 2  # the internal λ's
    for path in paths:
        zca = KernelStore.open(path).attrs["preprocessing"]["zca"]
        assert (zca["strength"], zca["fit"], zca["fitted_on"]) == (0.3, "train", 20), path
    before = {p: p.stat().st_mtime_ns for path in paths for p in (path / "records").iterdir()}
    with pytest.raises(CNNGPError, match=r"^zca: .*S\.zarr' holds kernels of images whitened by ZCA of strength 0\.3, "
                                         r"not of unwhitened images; resume only with the same whitening"):
        run_learn(net, _dataset(0), 20, store=store, **common)
    with pytest.raises(CNNGPError, match=r"^zca: .*S\.zarr' holds kernels of images whitened by ZCA fitted on "
                                         r"the n training images, not on the training images outside the n"):
        run_learn(net, _dataset(0), 20, zca=0.3, zca_fit="rest", store=store, **common)
    assert {p: p.stat().st_mtime_ns for path in paths for p in (path / "records").iterdir()} == before
    again = run_learn(net, _dataset(0), 20, zca=0.3, store=store, **common)
    assert again["learned"] == first["learned"]


@pytest.mark.filterwarnings("ignore:max_iter")
def test_learn_zca_fit_outside_records_and_fits_outside_the_larger_subset():
    from cnngp.experiments.learned import run_learn

    common = dict(starts=(3.0,), max_iter=3, lengthscales=(1.0,), folds=2, progress=False, zca=0.3,
                  zca_fit="rest")
    fit = run_learn("cnngp1", _dataset(0), 20, zca_fit_outside=40, **common)["config"]["zca_fit"]
    assert (fit["fit"], fit["fit_outside"], fit["fitted_on"]) == ("rest", 40, 160)
    assert fit == run_learn("cnngp1", _dataset(0), 40, zca_fit_outside=40, **common)["config"]["zca_fit"]
    with pytest.raises(CNNGPError, match=r"^zca_fit_outside: 10 images is fewer than the n = 20 training images"):
        run_learn("cnngp1", _dataset(0), 20, zca_fit_outside=10, **common)
    # the seed and folds that draw the subsets are checked first, as the sweep's are
    for bad, message in [(dict(seed=None), r"^seed: expected an integer >= 0, got None"),
                         (dict(seed=-1), r"^seed: expected an integer >= 0, got -1"),
                         (dict(folds=1), r"^folds: expected an integer >= 2, got 1")]:
        with pytest.raises(CNNGPError, match=message):
            run_learn("cnngp1", _dataset(0), 20, zca_fit_outside=40, **{**common, **bad})


@pytest.mark.parametrize("command", [["sweep", "--n", "20", "--folds", "2"], ["learn", "--n", "20", "--folds", "2"]])
def test_zca_fit_outside_flag_is_refused_in_one_line_without_zca_fit_rest(tmp_path, capsys, command):
    out = tmp_path / "o"
    for extra, message in [
        (["--zca", "0.1", "--zca-fit-outside", "40"], "cnngp: error: --zca-fit-outside: says which training images "
                                                      "a --zca-fit rest whitening leaves out; add --zca-fit rest"),
        (["--zca", "0.1", "--zca-fit", "rest", "--zca-fit-outside", "x"],
         "cnngp: error: --zca-fit-outside: expected a positive integer (a number of training images), got 'x'"),
        (["--zca", "0.1", "--zca-fit", "rest", "--zca-fit-outside", "10"],
         "cnngp: error: --zca-fit-outside: 10 images is fewer than"),
    ]:
        assert main(command + ["--arch", "cnngp1", "--out", str(out), "--quiet"] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
        assert not out.exists()


@pytest.mark.filterwarnings("ignore:max_iter")
@pytest.mark.parametrize("fit", ["train", "rest"])
def test_learn_with_zca_is_learn_on_images_whitened_beforehand(fit):
    """Oracle for learn's whitening: the same run without ``zca`` on a data set whose images were
    whitened beforehand by the direct formula (fitted on the n training images, or on the other
    training images), test images included: the grid of objectives and the learned values agree."""
    from cnngp.experiments.learned import run_learn
    from cnngp.io.data import balanced_subset

    ds = _dataset(0)
    common = dict(starts=(3.0,), max_iter=3, lengthscales=(1.0, 10.0), folds=2, progress=False, test=True)
    whitened = run_learn("cnngp1", ds, 20, zca=0.3, zca_fit=fit, **common)
    order = balanced_subset(ds.y_train, 20, seed=0, n_classes=10)
    fit_on = order if fit == "train" else np.setdiff1d(np.arange(len(ds.x_train)), order)
    mu, W, _ = _direct(ds.x_train[fit_on], 0.3)
    before = Dataset(_whiten(ds.x_train, mu, W), ds.y_train, _whiten(ds.x_test, mu, W), ds.y_test, ds.name,
                     ds.class_names)
    plain = run_learn("cnngp1", before, 20, **common)
    np.testing.assert_allclose([g["objective"] for g in whitened["grid"]], [g["objective"] for g in plain["grid"]],
                               rtol=1e-7)
    for key in ("lengthscale", "amplitude", "noise_variance"):
        assert whitened["learned"][key] == pytest.approx(plain["learned"][key], rel=1e-5), key
    assert whitened["heldout_accuracy"] == plain["heldout_accuracy"]  # the test images whitened alike
    assert whitened["grid"][0]["objective"] != run_learn("cnngp1", ds, 20, **common)["grid"][0]["objective"]


def test_a_fitted_whitening_is_immutable_keeps_its_own_arrays_and_survives_pickling():
    """ZCAWhitening keeps read-only copies: the arrays it was built from stay the caller's (and
    writeable), a change to them changes nothing fitted, and a pickled copy (a joblib worker's)
    is read-only again and whitens to the bit as the original."""
    import dataclasses
    import pickle

    from cnngp.io.preprocess import ZCAWhitening, fit_zca

    zca = fit_zca(SMALL_N, 0.2)
    x = RNG.random((4, 4, 4, 3))
    want = zca.transform(x)
    mine = {f.name: getattr(zca, f.name) for f in dataclasses.fields(zca)}
    mine.update(mean=np.array(zca.mean), basis=zca.basis.tolist())  # a writeable array, a list
    built = ZCAWhitening(**mine)
    assert mine["mean"].flags.writeable and not built.mean.flags.writeable and not built.basis.flags.writeable
    mine["mean"][:] = 0.0  # the caller's array changes; the fitted one does not
    np.testing.assert_array_equal(built.transform(x), want)
    again = pickle.loads(pickle.dumps(zca))
    assert not again.basis.flags.writeable and repr(again) == repr(zca)
    np.testing.assert_array_equal(again.transform(x), want)


def test_provenance_records_the_covariance_rank_on_both_routes():
    """Digits have 8 pixels that never vary: the covariance of 500 images has rank 56, not 64,
    on the covariance route as on the Gram route (numpy's matrix_rank of the centred images)."""
    x, _ = load_digits()
    for images in (x[:500], x[:30]):
        X = images.reshape(len(images), -1)
        rank = np.linalg.matrix_rank(X - X.mean(axis=0))
        assert fit_zca(images, 0.1).provenance()["rank"] == rank
    assert fit_zca(x[:500], 0.1).provenance()["rank"] == 56

"""A ZCA whitening fitted mirror-symmetric (with the images' mirror images) commutes with
horizontal flips, so that a flip-averaged kernel of whitened images is invariant to mirroring
the images themselves (docs/maths.md §9, cnngp.io.preprocess)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cnngp.cli.main import main
from cnngp.errors import CNNGPError
from cnngp.io.data import Dataset, load_digits
from cnngp.io.preprocess import fit_zca

RNG = np.random.default_rng(11)
SMALL_N = RNG.random((30, 4, 5, 3)) + 0.3 * RNG.random((30, 1, 5, 1))   # N < D: the Gram route
LARGE_N = RNG.random((200, 3, 4, 2)) + 0.5 * RNG.random((200, 1, 4, 2))  # N > D: the covariance route


def _mirror(x):
    return x[:, :, ::-1]


@pytest.mark.parametrize("x, method", [(SMALL_N, "gram"), (LARGE_N, "covariance")])
def test_mirror_fit_commutes_with_flips_and_is_the_symmetrised_whitening(x, method):
    """z(P x) = P z(x) for any image; W is the closed form of the symmetrised statistics
    μ_s = ½(μ + Pμ), C_s = ½(C + P C P) + ¼(μ − Pμ)(μ − Pμ)ᵀ (the covariance of the images and
    their mirror images), δ = ε tr(C_s)/D; a fit on the images alone does not commute."""
    eps = 0.1
    zca = fit_zca(x, eps, method=method, mirror=True)
    assert zca.mirror and zca.n_fit == len(x) and zca.provenance()["mirror"] is True
    new = RNG.random((7,) + x.shape[1:])
    np.testing.assert_allclose(zca.transform(_mirror(new)), _mirror(zca.transform(new)), atol=1e-10)
    X = x.reshape(len(x), -1)
    P = np.arange(X.shape[1]).reshape(x.shape[1:])[:, ::-1].ravel()  # the mirror as a permutation
    mu, C = X.mean(0), np.cov(X.T, bias=True)
    d = mu - mu[P]
    mu_s, C_s = 0.5 * (mu + mu[P]), 0.5 * (C + C[np.ix_(P, P)]) + 0.25 * np.outer(d, d)
    lam, U = np.linalg.eigh(C_s)
    W = U @ np.diag((np.clip(lam, 0, None) + eps * np.trace(C_s) / len(C_s)) ** -0.5) @ U.T
    np.testing.assert_allclose(zca.transform(new).reshape(7, -1), (new.reshape(7, -1) - mu_s) @ W, atol=1e-9)
    plain = fit_zca(x, eps, method=method)
    gap = np.abs(plain.transform(_mirror(new)) - _mirror(plain.transform(new))).max()
    assert gap > 1e-3 * np.abs(plain.transform(new)).max()


def test_estimator_with_zca_and_flips_is_invariant_to_mirroring_the_images():
    """The flip-averaged classifier with whitening (zca_mirror follows flip): the same decision
    values for every mirrored test image; with zca_mirror=False only the whitened image's mirror
    is averaged, and mirroring the raw image moves the predictions."""
    from cnngp.inference.estimator import CNNGPClassifier

    x, y = load_digits()
    xtr, ytr, xte = x[:60], y[:60], x[100:130]
    clf = CNNGPClassifier("cnngp1", zca=0.1, flip=True).fit(xtr, ytr)
    assert clf.zca_.mirror
    np.testing.assert_allclose(clf.decision_function(_mirror(xte)), clf.decision_function(xte), atol=1e-10)
    off = CNNGPClassifier("cnngp1", zca=0.1, flip=True, zca_mirror=False).fit(xtr, ytr)
    assert not off.zca_.mirror
    moved = np.abs(off.decision_function(_mirror(xte)) - off.decision_function(xte)).max()
    assert moved > 1e-3 * np.abs(off.decision_function(xte)).max()
    with pytest.raises(CNNGPError, match="^zca_mirror: says how a ZCA whitening is fitted, but no strength"):
        CNNGPClassifier("cnngp1", zca_mirror=True).fit(xtr, ytr)
    with pytest.raises(CNNGPError, match="^zca_mirror: says how zca is fitted, but zca is a whitening fitted"):
        CNNGPClassifier("cnngp1", zca=fit_zca(x[500:600], 0.1), zca_mirror=True).fit(xtr, ytr)


def _dataset() -> Dataset:
    x, y = load_digits()
    return Dataset(x[:200], y[:200], x[1000:1040], y[1000:1040], "digits", tuple(str(i) for i in range(10)))


SWEEP = dict(ns=(20,), folds=2, lengthscales=[1.0], n_grid=20, progress=False, dtype="float64", zca=0.25, flip=True)


def test_sweep_with_flips_fits_mirror_symmetric_and_stores_keep_the_two_apart(tmp_path):
    from cnngp.experiments.sweep import run_sweep

    store = tmp_path / "K.zarr"
    res = run_sweep("cnngp1", _dataset(), store=store, **SWEEP)
    assert res["config"]["zca_fit"]["mirror"] is True
    off = run_sweep("cnngp1", _dataset(), zca_mirror=False, **SWEEP)
    assert off["config"]["zca_fit"]["mirror"] is False
    assert off["results"] != res["results"]  # another whitening, other kernels
    with pytest.raises(CNNGPError, match=r"^zca: .*K\.zarr' holds kernels of images whitened by ZCA fitted on the "
                                         r"images and their mirror images \(--zca-mirror\), not fitted on the images alone"):
        run_sweep("cnngp1", _dataset(), store=store, zca_mirror=False, **SWEEP)
    again = run_sweep("cnngp1", _dataset(), store=store, zca_mirror=True, **SWEEP)  # the same whitening
    assert again["results"] == res["results"]
    with pytest.raises(CNNGPError, match="^zca_mirror: says how a ZCA whitening is fitted, but no strength"):
        run_sweep("cnngp1", _dataset(), **{**SWEEP, "zca": None, "zca_mirror": False})
    with pytest.raises(CNNGPError, match="^zca_mirror: expected None"):
        run_sweep("cnngp1", _dataset(), **{**SWEEP, "zca_mirror": "yes"})
    from cnngp.io.preprocess import fit_zca

    with pytest.raises(CNNGPError, match="^zca: mirror must be True or False, got 'yes'"):
        fit_zca(np.zeros((4, 3, 3, 1)) + np.arange(4)[:, None, None, None], 0.1, mirror="yes")


def test_commands_record_and_check_zca_mirror(tmp_path, capsys):
    out = tmp_path / "sw"
    base = ["sweep", "--arch", "cnngp1", "--n", "20", "--folds", "2", "--lengthscales", "1", "--zca", "0.5",
            "--flip", "--out", str(out), "--quiet", "--no-checkpoint"]
    assert main(base + ["--no-zca-mirror"]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["zca_fit"]["mirror"] is False and "--no-zca-mirror" in config["command"]
    assert main(base) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["zca_fit"]["mirror"] is True and "zca-mirror" not in config["command"]  # the default
    capsys.readouterr()
    assert main(["sweep", "--arch", "cnngp1", "--n", "20", "--zca-mirror", "--out", str(out), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--zca-mirror: says how a ZCA whitening is fitted" in err


def test_learn_with_flips_fits_mirror_symmetric_and_its_stores_keep_the_two_apart(tmp_path):
    """`learn` resolves zca_mirror as the sweep does: with flip the whitening is fitted with the
    mirror images (recorded), and a store of the other kind is refused before any work."""
    from cnngp.experiments.learned import run_learn

    common = dict(starts=(3.0,), max_iter=3, lengthscales=(1.0,), folds=2, progress=False, zca=0.3, flip=True)
    store = tmp_path / "S.zarr"
    res = run_learn("cnngp1", _dataset(), 20, store=store, **common)
    assert res["config"]["zca_fit"]["mirror"] is True
    off = run_learn("cnngp1", _dataset(), 20, zca_mirror=False, **common)
    assert off["config"]["zca_fit"]["mirror"] is False
    with pytest.raises(CNNGPError, match=r"^zca: .*S\.zarr' holds kernels of images whitened by ZCA fitted on the "
                                         r"images and their mirror images"):
        run_learn("cnngp1", _dataset(), 20, store=store, zca_mirror=False, **common)
    assert run_learn("cnngp1", _dataset(), 20, store=store, **common)["learned"] == res["learned"]

"""Trained ensembles on a data set: test accuracy, NLL and ECE of the infinite ensembles of
networks trained by gradient descent for each training time, every layer trained (NTK
dynamics) or the readout alone (NNGP dynamics), from one kernel pass (docs/maths.md §11;
:func:`cnngp.inference.ensemble.trained_ensemble`). ``cnngp ensemble`` is its command line.

The class probabilities are those of the ensemble's own Gaussian outputs, independent class
scores f_c ~ N(mean_c, variance), P(c) = P(f_c is the largest)
(:func:`cnngp.inference.calibration.class_probabilities`, scale 1: no calibration, so the NLL
and ECE say how well the ensemble's own spread describes its errors).
"""

from __future__ import annotations

import math
import time

import numpy as np

from cnngp.errors import CNNGPError

__all__ = ["run_ensemble"]


def _check_times(times) -> list[float]:
    from cnngp.inference.ensemble import training_times

    return [float(t) for t in training_times(times)]


def _tie_shared_accuracy(mean: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the class scores' argmax, an exact tie of k classes counting 1/k when the label
    is among them: at t = 0 every mean is 0, which scores chance (1/C), not the frequency of
    whichever class an argmax takes first."""
    top = mean == mean.max(axis=1, keepdims=True)
    return float(np.mean(top[np.arange(len(y)), y] / top.sum(axis=1)))


def run_ensemble(network, dataset, n: int, *, n_test: int | None = None, times=(0.0, 10.0, 100.0, 1000.0, math.inf),
                 learning_rate: float = 1.0, noise_variance: float = 0.0, seed: int = 0, zca: float | None = None,
                 flip: bool = False, zca_mirror: bool | None = None, execution=None,
                 data_label: str | None = None) -> dict:
    """Score the trained ensembles of ``network`` on ``n`` class-balanced training images and the
    test split (or a class-balanced ``n_test`` of it) at every time of ``times``.

    Parameters
    ----------
    network : str, path-like or Serial
        A named architecture, a JSON spec or a network ending with a readout.
    dataset : Dataset or str
        A :class:`cnngp.io.data.Dataset` or a source for :func:`cnngp.io.data.load_dataset`.
        Without a test split (digits) the test images are the training split's images outside
        the ``n``.
    n : int
        Training images (a class-balanced subset drawn with ``seed``).
    n_test : int, optional
        A class-balanced subset of the test split (default: all of it).
    times, learning_rate, noise_variance
        As :func:`cnngp.inference.ensemble.trained_ensemble` (times in steps of the learning
        rate; ``inf``: converged).
    seed : int, default 0
        Seed of the class-balanced subsets.
    zca : float, optional
        Regularised ZCA whitening fitted on the ``n`` training images (mirror-symmetric with
        ``flip``), applied to train and test.
    flip : bool, default False
        Flip-averaged kernels (docs/maths.md §9).
    zca_mirror : bool, optional
        Fit the whitening with the images' mirror images (default: as ``flip``; see
        :func:`cnngp.io.preprocess.check_zca_mirror`).
    execution : Execution, optional
        How the kernels are computed.

    Returns
    -------
    dict
        ``config`` (everything that sets the numbers), ``versions``, ``rows`` (one per mode and
        time: ``mode``, ``time``, ``accuracy`` (an exact tie of k classes counts 1/k, so t = 0, where
        every mean is 0, scores chance), ``nll``, ``ece``, ``mean_variance``) and
        ``timing``.
    """
    from cnngp.engine.execution import Execution
    from cnngp.engine.gram import kernel, kernel_diagonal
    from cnngp.inference.calibration import class_probabilities, classification_metrics
    from cnngp.inference.ensemble import trained_ensemble
    from cnngp.io.architectures import resolve
    from cnngp.io.data import Dataset, balanced_subset, load_dataset
    from cnngp.io.preprocess import check_zca_mirror, check_zca_strength, fit_zca
    from cnngp.provenance import array_sha256, versions

    ex = execution if execution is not None else Execution()
    ds = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    times = _check_times(times)
    n_classes = int(ds.y_train.max()) + 1 if ds.y_test is None else int(max(ds.y_train.max(), ds.y_test.max())) + 1
    order = balanced_subset(ds.y_train, n, seed=seed, n_classes=n_classes, name="n")
    if ds.x_test is not None and len(ds.y_test):
        pool_x, pool_y, test_images = ds.x_test, ds.y_test, "the test split"
    else:  # no test split: the other training images, never one of the n
        rest = np.setdiff1d(np.arange(len(ds.y_train)), order)
        if len(rest) == 0:
            raise CNNGPError(f"n: {ds.name!r} has no test split and no image outside the n = {n} to test on; "
                             "use a smaller n")
        pool_x, pool_y, test_images = ds.x_train[rest], ds.y_train[rest], "the training split's images outside the n"
    t_order = (np.arange(len(pool_y)) if n_test is None else
               balanced_subset(pool_y, n_test, seed=seed, n_classes=n_classes, name="n_test"))
    x, y = ds.x_train[order], ds.y_train[order]
    x_test, y_test = pool_x[t_order], pool_y[t_order]
    net, name = resolve(network)
    whitening = None
    mirror = check_zca_mirror(zca_mirror, zca, flip)
    if zca is not None:
        whitening = fit_zca(x, check_zca_strength(zca, "zca"), name="the training set", mirror=mirror)
        x, x_test = whitening.transform(x, "the training images"), whitening.transform(x_test, "the test images")

    start = time.perf_counter()
    K, T = (k.double().numpy() for k in kernel(net, x, get="both", flip=flip, execution=ex))
    Ks, Ts = (k.double().numpy() for k in kernel(net, x_test, x, get="both", flip=flip, execution=ex))
    prior = kernel_diagonal(net, x_test, flip=flip, execution=ex).double().numpy()
    kernel_seconds = time.perf_counter() - start

    rows = []
    for mode in ("nngp", "ntk"):
        ntk = dict(ntk_train=T, ntk_test_train=Ts) if mode == "ntk" else {}
        pred = trained_ensemble(y, K, Ks, test_prior=prior, times=times, learning_rate=learning_rate,
                                noise_variance=noise_variance, n_classes=n_classes, **ntk)
        for i, t in enumerate(times):
            metrics = classification_metrics(class_probabilities(pred.mean[i], pred.variance[i]), y_test)
            rows.append({"mode": mode, "time": t, "accuracy": _tie_shared_accuracy(pred.mean[i], y_test),
                         "nll": metrics["nll"],
                         "ece": metrics["ece"], "mean_variance": float(np.mean(pred.variance[i]))})
    config = {
        "network": name, "spec": net.to_spec(), "data": data_label or ds.name, "n": int(n),
        "n_test": int(len(t_order)), "test_images": test_images, "seed": int(seed), "times": times, "learning_rate": float(learning_rate),
        "noise_variance": float(noise_variance), "loss": "½ mean over the N × C targets of (f − y)², "
        "targets one-hot minus 1/C (neural-tangents' convention)", "probabilities": "independent Gaussian class "
        "scores N(mean, variance) of the ensemble, no calibration", "accuracy": "argmax of the mean class "
        "scores, an exact tie of k classes counting 1/k (t = 0: chance)", "flip": bool(flip), "zca": zca,
        "zca_fit": None if whitening is None else {**whitening.provenance(), "fitted_on_images": "the n training images"},
        "dtype": str(ex.dtype), "train_sha256": array_sha256(ds.x_train[order]),
        "test_sha256": array_sha256(pool_x[t_order]),
    }
    return {"config": config, "versions": versions(), "rows": rows,
            # pairs of the two kernel passes (each twice with flip) and the test images' diagonal
            "timing": {"kernel_seconds": kernel_seconds,
                       "pairs": int((n * (n + 1) // 2 + len(t_order) * n) * (2 if flip else 1) + len(t_order))}}

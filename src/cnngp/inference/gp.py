"""Gaussian-process classification from precomputed kernel matrices.

The protocol of the paper (docs/maths.md §5): classification is done as regression
on one-hot targets minus ``1 / n_classes``; the predicted class is the argmax of the GP
posterior mean ``K_*X (K_XX + sigma^2 I)^-1 Y``. The observation noise ``sigma^2`` is
chosen from a grid of 1000 log-spaced values by k-fold cross-validation (or exact
leave-one-out). Each fold's training kernel is eigendecomposed once,
``K = U diag(s) U^T``, after which every ``sigma^2`` costs only a matrix product:

    K_*X (K + sigma^2 I)^-1 Y = (K_*X U) diag(1 / (s + sigma^2)) (U^T Y).

Everything here is float64 NumPy / SciPy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.linalg

from cnngp.errors import CNNGPError

__all__ = [
    "CVResult",
    "centered_one_hot",
    "noise_grid",
    "paper_folds",
    "stratified_folds",
    "cross_validate",
    "leave_one_out",
    "posterior_mean",
    "posterior_variance",
    "PosteriorFactor",
    "held_out_predictions",
    "fit_predict",
    "test_accuracy",
    "mean_and_2se",
    "small_problem_threads",
    "NOISE_LOG_MIN",
    "NOISE_LOG_MAX",
    "PD_MARGIN",
    "NOISE_RCOND",
    "IllConditionedWarning",
    "TIE_ATOL",
]

#: Natural logarithms of the ends of the paper's noise grid, ``[e^-36, e^5]``.
NOISE_LOG_MIN = -36.0
NOISE_LOG_MAX = 5.0
#: Relative safety margin on the positive-definiteness floor ``c`` (see :func:`noise_grid`).
PD_MARGIN = 1e-6
#: Smallest sigma^2 the grid offers, relative to the largest eigenvalue of the training
#: kernel: ``sigma^2 >= NOISE_RCOND * lambda_max`` bounds the condition number of
#: ``K + sigma^2 I`` by ``1 / NOISE_RCOND``. Below it, float64 rounding (relative 1e-16 of
#: ``lambda_max``) in the numerically null directions of a rank-deficient kernel (duplicate
#: images, few features) is amplified by ``1 / sigma^2`` into the posterior mean.
NOISE_RCOND = 1e-10
#: scores closer than this are tied (accuracies are ratios of counts: equal counts spread
#: differently over folds give means that differ in the last bits)
TIE_ATOL = 1e-12


class IllConditionedWarning(RuntimeWarning):
    """A noise variance so small, relative to the kernel's scale, that ``K + sigma^2 I`` has a
    condition number above ``1 / NOISE_RCOND``: predictions then depend on rounding."""


# Bound on the size (bytes) of the temporary arrays made when evaluating many sigma^2 at
# once; sigma^2 values are processed in chunks that fit in it.
_CHUNK_BYTES = 1 << 27

Fold = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _check_square(K, what: str) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise CNNGPError(f"{what} must be a square 2-D matrix; got shape {K.shape}")
    if K.shape[0] == 0:
        raise CNNGPError(f"{what} is empty")
    if not np.all(np.isfinite(K)):
        raise CNNGPError(f"{what} contains NaN or infinite values")
    return K


def _check_symmetric(K: np.ndarray, what: str, rtol: float = 1e-6) -> None:
    """Raise unless ``|K - K^T| <= rtol * max|K|`` (checked in row blocks)."""
    scale = float(np.max(np.abs(K))) or 1.0
    n = K.shape[0]
    step = max(1, (1 << 22) // n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        dev = float(np.max(np.abs(K[start:stop] - K[:, start:stop].T)))
        if dev > rtol * scale:
            raise CNNGPError(
                f"{what} is not symmetric (max |K - K^T| = {dev:.3g}, relative "
                f"{dev / scale:.3g} > {rtol:g}); pass a symmetric kernel matrix"
            )


def _check_labels(y, n: int | None, what: str = "y") -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise CNNGPError(f"{what} must be a 1-D label vector; got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise CNNGPError(f"{what} must hold integer class labels; got dtype {y.dtype}")
    if n is not None and len(y) != n:
        raise CNNGPError(f"{what} has {len(y)} labels but the kernel has {n} rows")
    if y.size and y.min() < 0:
        raise CNNGPError(f"{what} has a negative label ({y.min()}); labels must be >= 0")
    return y.astype(np.int64)


def _resolve_n_classes(y: np.ndarray, n_classes: int | None) -> int:
    k = int(y.max()) + 1 if n_classes is None else int(n_classes)
    if k < 2:
        raise CNNGPError(f"n_classes={k}: classification needs at least 2 classes")
    if y.max() >= k:
        raise CNNGPError(f"label {y.max()} is out of range for n_classes={k}")
    return k


def _check_noise(noise_variances, what: str = "noise_variances") -> np.ndarray:
    s2 = np.atleast_1d(np.asarray(noise_variances, dtype=np.float64))
    if s2.ndim != 1 or s2.size == 0:
        raise CNNGPError(f"{what} must be a non-empty scalar or 1-D array; got shape {s2.shape}")
    if not np.all(np.isfinite(s2)) or np.any(s2 < 0):
        raise CNNGPError(f"{what} must be finite and >= 0")
    return s2


def centered_one_hot(y: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """Regression targets of the paper: one-hot minus ``1 / n_classes``.

    Parameters
    ----------
    y : numpy.ndarray, shape (N,), int
        Labels in ``0..n_classes-1``.
    n_classes : int, optional
        Number of classes; default ``max(y) + 1``.

    Returns
    -------
    numpy.ndarray, shape (N, n_classes), float64

    Examples
    --------
    >>> centered_one_hot(np.array([1, 0]), 2)
    array([[-0.5,  0.5],
           [ 0.5, -0.5]])
    """
    y = _check_labels(y, None)
    k = _resolve_n_classes(y, n_classes)
    return np.eye(k)[y] - 1.0 / k


# --------------------------------------------------------------------------------------
# Noise grid
# --------------------------------------------------------------------------------------


def _pd_floor(min_eig: float, max_eig: float = 0.0) -> float:
    """Smallest usable sigma^2: ``K + sigma^2 I`` positive definite (relative margin
    ``PD_MARGIN``) and with condition number at most ``1 / NOISE_RCOND``."""
    definite = (1.0 + PD_MARGIN) * max(0.0, -float(min_eig))
    return max(definite, NOISE_RCOND * max(0.0, float(max_eig)))


def _grid_from_floor(c: float, n: int) -> np.ndarray:
    n = int(n)
    if n < 1:
        raise CNNGPError(f"n={n}: the noise grid needs at least one value")
    lo = max(np.log(c) if c > 0 else -np.inf, NOISE_LOG_MIN)
    if lo >= NOISE_LOG_MAX:
        raise CNNGPError(
            f"the kernel needs sigma^2 >= {c:.3g} to be positive definite and well "
            f"conditioned, above e^{NOISE_LOG_MAX:g}, the top of the grid: the matrix is "
            "either not a valid covariance or on a scale the grid does not cover (rescale "
            "it, or pass noise_variances)"
        )
    grid = np.exp(np.linspace(lo, NOISE_LOG_MAX, n))
    return np.maximum(grid, c)  # exp(log(c)) may round below c


def noise_grid(K_folds, n: int = 1000) -> np.ndarray:
    """The paper's grid of observation-noise variances ``sigma^2``.

    ``n`` values log-spaced in ``[max(c, e^-36), e^5]``, where ``c`` is the smallest
    value making every fold's training kernel positive definite *and* well conditioned.
    With ``lambda_min`` and ``lambda_max`` the smallest and largest eigenvalues over all
    the fold kernels,
    ``c = max((1 + PD_MARGIN) * max(0, -lambda_min), NOISE_RCOND * lambda_max)`` with
    ``PD_MARGIN = 1e-6`` and ``NOISE_RCOND = 1e-10``. The first term keeps ``K + c I``
    strictly positive definite, ``lambda_min(K + c I) = 1e-6 * |lambda_min| > 0``,
    instead of singular at the computed ``lambda_min``. The second bounds the condition
    number of ``K + sigma^2 I`` by ``1e10``: this departs from the paper's grid (which
    starts at ``e^-36`` whatever the kernel's scale) only where the paper's choice is
    numerically meaningless. On a rank-deficient kernel (duplicate images, fewer
    features than points) a smaller sigma^2 turns float64 rounding in the null
    directions, about ``1e-16 * lambda_max``, into posterior means of order
    ``1e-16 * lambda_max / sigma^2``: different on every subset of test points, and
    garbage once ``sigma^2`` nears ``1e-16 * lambda_max``.

    Parameters
    ----------
    K_folds : numpy.ndarray, shape (n_i, n_i), or sequence of them
        The training kernel of each fold (or a single kernel matrix).
    n : int, default 1000
        Number of grid values.

    Returns
    -------
    numpy.ndarray, shape (n,), float64
        Increasing noise variances.

    Raises
    ------
    ValueError
        If a kernel is not square, symmetric and finite, or so indefinite that ``c``
        exceeds ``e^5``.

    Examples
    --------
    >>> g = noise_grid(1e-9 * np.eye(3), n=5)       # floor 1e-19 < e^-36: the paper's grid
    >>> np.allclose(np.log(g), np.linspace(-36, 5, 5))
    True
    >>> float(noise_grid(np.eye(3), n=5)[0])         # conditioning floor 1e-10 * lambda_max
    1e-10
    """
    if isinstance(K_folds, np.ndarray) and K_folds.ndim == 2:
        K_folds = [K_folds]
    min_eig, max_eig = np.inf, 0.0
    for i, K in enumerate(K_folds):
        K = _check_square(K, f"K_folds[{i}]")
        _check_symmetric(K, f"K_folds[{i}]")
        ev = scipy.linalg.eigh(K, eigvals_only=True)
        min_eig = min(min_eig, float(ev[0]))
        max_eig = max(max_eig, float(ev[-1]))
    if not np.isfinite(min_eig):
        raise CNNGPError("K_folds is empty; give at least one kernel matrix")
    return _grid_from_floor(_pd_floor(min_eig, max_eig), n)


# --------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------


def paper_folds(n: int, k: int = 4) -> list[Fold]:
    """k contiguous folds of a class-interleaved order, without shuffling.

    Parameters
    ----------
    n : int
        Number of training points, in the class-interleaved order of
        :func:`cnngp.io.data.balanced_subset`.
    k : int, default 4
        Number of folds.

    Returns
    -------
    list of (train_idx, val_idx)
        ``k`` pairs of int64 index arrays. Fold ``i`` validates on the contiguous range
        ``[i*n/k, (i+1)*n/k)`` (sizes differ by at most one when k does not divide n)
        and trains on the rest. The validation sets are disjoint and cover ``0..n-1``.
        They are class-balanced when ``n`` is a multiple of ``k * n_classes``.

    Notes
    -----
    The paper's research code validates on ``slice(i, n, k)`` of a class-*sorted*
    order instead; on the interleaved order that strided split would be unbalanced
    whenever ``gcd(k, n_classes) > 1`` (e.g. k=4, 10 classes: fold 0 would hold only
    even classes), so it is not offered.

    Examples
    --------
    >>> [v.tolist() for _, v in paper_folds(6, 3)]
    [[0, 1], [2, 3], [4, 5]]
    """
    n, k = int(n), int(k)
    if k < 2:
        raise CNNGPError(f"k={k}: cross-validation needs at least 2 folds")
    if n < k:
        raise CNNGPError(f"n={n} points cannot be split into k={k} non-empty folds")
    idx = np.arange(n, dtype=np.int64)
    return [(np.setdiff1d(idx, v, assume_unique=True), v) for v in np.array_split(idx, k)]


def stratified_folds(y: np.ndarray, k: int = 4, seed: int | None = 0) -> list[Fold]:
    """Shuffled, stratified k folds (scikit-learn ``StratifiedKFold``).

    Parameters
    ----------
    y : numpy.ndarray, shape (N,), int
        Labels.
    k : int, default 4
        Number of folds.
    seed : int or None, default 0
        ``random_state`` of the shuffle.

    Returns
    -------
    list of (train_idx, val_idx)
        ``k`` pairs of sorted int64 index arrays.

    Raises
    ------
    ValueError
        If some class has fewer than `k` samples, or a training fold lacks a class.
    """
    from sklearn.model_selection import StratifiedKFold

    y = _check_labels(y, None)
    k = int(k)
    if k < 2:
        raise CNNGPError(f"k={k}: cross-validation needs at least 2 folds")
    classes, counts = np.unique(y, return_counts=True)
    if counts.min() < k:
        c = classes[np.argmin(counts)]
        raise CNNGPError(
            f"class {c} has only {counts.min()} samples, fewer than the k={k} folds; "
            "every class needs at least k samples"
        )
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = [
        (np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64))
        for tr, va in skf.split(np.zeros(len(y)), y)
    ]
    _check_folds(folds, y, len(y))
    return folds


def _check_folds(folds, y: np.ndarray, n: int) -> list[Fold]:
    out = []
    all_classes = np.unique(y)
    for i, fold in enumerate(folds):
        try:
            tr, va = fold
        except (TypeError, ValueError):
            raise CNNGPError(
                f"folds[{i}] must be a (train_idx, val_idx) pair of index arrays"
            ) from None
        tr, va = np.asarray(tr), np.asarray(va)
        for arr, name in ((tr, "train"), (va, "validation")):
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise CNNGPError(
                    f"folds[{i}] {name} indices must be a non-empty 1-D integer array"
                )
            if arr.min() < 0 or arr.max() >= n:
                raise CNNGPError(
                    f"folds[{i}] {name} indices out of range for {n} points"
                )
        if np.intersect1d(tr, va).size:
            raise CNNGPError(f"folds[{i}]: training and validation indices overlap")
        missing = np.setdiff1d(all_classes, y[tr])
        if missing.size:
            raise CNNGPError(
                f"folds[{i}]: class(es) {missing.tolist()} missing from the training "
                "fold; use more points per class or fewer folds"
            )
        out.append((tr.astype(np.int64), va.astype(np.int64)))
    if not out:
        raise CNNGPError("folds is empty")
    return out


# --------------------------------------------------------------------------------------
# Core: predictions for many sigma^2 from one eigendecomposition
# --------------------------------------------------------------------------------------


#: problems up to this many points run their factorisations with one BLAS thread
SINGLE_THREAD_MAX_N = 2048


def small_problem_threads(n: int):
    """A context with one BLAS thread for the many small eigendecompositions of a problem
    of ``n`` points (``n <= SINGLE_THREAD_MAX_N``); nothing changes for larger ones.

    For matrices of a few hundred rows a multi-threaded BLAS gains nothing and, on a busy
    machine, its spinning threads can make each call hundreds of times slower.
    """
    from contextlib import nullcontext

    if n > SINGLE_THREAD_MAX_N:
        return nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _chunks(n_noise: int, per_noise_bytes: int):
    step = max(1, _CHUNK_BYTES // max(1, per_noise_bytes))
    for start in range(0, n_noise, step):
        yield slice(start, min(n_noise, start + step))


def _eig_means(s: np.ndarray, A: np.ndarray, B: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Posterior means ``A diag(1/(s+sigma^2)) B`` for several sigma^2, class by class.

    Parameters
    ----------
    s : (n,) eigenvalues of the training kernel; A : (m, n) ``K_*X U``;
    B : (n, C) ``U^T Y``; noise : (J,) variances.

    Returns
    -------
    (C, m, J): entry ``[c, i, j]`` is the mean of class c at test point i for
    ``noise[j]``. One (m, n) @ (n, J) matrix product per class.
    """
    Wt = 1.0 / (s[:, None] + noise[None, :])  # (n, J)
    out = np.empty((B.shape[1], A.shape[0], len(noise)))
    for c in range(B.shape[1]):
        np.matmul(A * B[:, c], Wt, out=out[c])
    return out


def _accuracies_eig(
    s: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    y_true: np.ndarray,
    noise: np.ndarray,
) -> np.ndarray:
    """Accuracy of ``argmax A diag(1/(s+sigma^2)) B`` for every sigma^2.

    Parameters
    ----------
    s : (n,) eigenvalues; A : (m, n) ``K_*X U``; B : (n, C) ``U^T Y``;
    y_true : (m,) labels; noise : (J,) variances.

    Returns
    -------
    (J,) accuracies, sigma^2 processed in chunks of bounded memory.
    """
    m, n = A.shape
    C = B.shape[1]
    acc = np.empty(len(noise))
    for sl in _chunks(len(noise), 8 * (n + (C + 2) * m)):
        pred = _eig_means(s, A, B, noise[sl])
        acc[sl] = (pred.argmax(axis=0) == y_true[:, None]).mean(axis=0)
    return acc


def _eigh(K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return scipy.linalg.eigh(K, check_finite=False)


def _largest_eigenvalue(K: np.ndarray, steps: int = 30) -> float:
    """lambda_max of a symmetric K by power iteration (O(n^2) a step, not a factorisation).

    A lower bound that converges fast on NNGP kernels, whose top eigenvector is close to
    constant; within a few per cent is all the conditioning check needs.
    """
    v = np.ones(K.shape[0]) / np.sqrt(K.shape[0])
    value = 0.0
    for _ in range(steps):
        w = K @ v
        norm = float(np.linalg.norm(w))
        if norm == 0.0:
            return 0.0
        value, v = norm, w / norm
    return value


@dataclass(frozen=True)
class CVResult:
    """Accuracy of GP classification over a grid of noise variances.

    Attributes
    ----------
    noise_variances : numpy.ndarray, shape (J,)
        The sigma^2 grid.
    accuracy : numpy.ndarray, shape (J,)
        Mean validation accuracy over folds at each sigma^2 (for leave-one-out: the
        fraction of points predicted correctly).
    fold_accuracies : numpy.ndarray, shape (n_folds, J)
        Accuracy of each fold at each sigma^2 (one row for leave-one-out).
    best_index : int
        Index of the best sigma^2 (the first, i.e. smallest, among ties: means within
        ``TIE_ATOL``). A sigma^2 below a training kernel's floor (only a grid passed in can
        hold one) has accuracy NaN and is never chosen.
    """

    noise_variances: np.ndarray
    accuracy: np.ndarray
    fold_accuracies: np.ndarray
    best_index: int

    @property
    def best_noise_variance(self) -> float:
        """The sigma^2 with the highest mean accuracy."""
        return float(self.noise_variances[self.best_index])

    @property
    def best_accuracy(self) -> float:
        """The highest mean accuracy over the grid."""
        return float(self.accuracy[self.best_index])

    @property
    def tied_noise_variances(self) -> np.ndarray:
        """Every sigma^2 whose mean accuracy ties the best (within ``TIE_ATOL``), ascending: how
        much the choice of the smallest rests on the tie-break."""
        acc = np.where(np.isfinite(self.accuracy), self.accuracy, -np.inf)
        return np.sort(self.noise_variances[acc >= self.best_accuracy - TIE_ATOL])

    @property
    def best_fold_accuracies(self) -> np.ndarray:
        """Per-fold accuracies at the best sigma^2, shape (n_folds,)."""
        return self.fold_accuracies[:, self.best_index]


def _make_result(noise: np.ndarray, fold_acc: np.ndarray) -> CVResult:
    """The mean over folds, and the best σ²: the first (smallest) of those within ``TIE_ATOL``
    of the highest mean (equal counts of correct predictions are a tie, whatever their last
    bits); NaN (σ² below a fold's floor) is never chosen."""
    acc = fold_acc.mean(axis=0)
    ok = np.isfinite(acc)
    if not ok.any():
        raise CNNGPError(
            "every noise variance is below the floor that makes K + sigma^2 I positive definite "
            f"and well conditioned (at least {NOISE_RCOND:g} x the largest eigenvalue of each "
            "training kernel); pass larger noise_variances, or None for the default grid")
    top = acc[ok].max()
    return CVResult(noise, acc, fold_acc, int(np.flatnonzero(ok & (acc >= top - TIE_ATOL))[0]))


def _below_floor(noise: np.ndarray, s: np.ndarray, what: str) -> np.ndarray:
    """Which σ² lie below the floor of a kernel with eigenvalues ``s`` (:func:`_pd_floor`):
    there 1/(s + σ²) is infinite, negative or rounding, so predictions are garbage. Warned
    once; the callers score them NaN, which no selection chooses."""
    floor = _pd_floor(float(s[0]), float(s[-1]))
    below = noise < floor * (1.0 - 1e-9)  # the default grid starts at the floor, up to rounding
    if below.any():
        warnings.warn(
            f"{int(below.sum())} of the noise_variances (down to {float(noise.min()):.3g}) are below "
            f"{floor:.3g}, the floor of {what} (K + sigma^2 I positive definite, condition number "
            f"at most {1 / NOISE_RCOND:g}): their accuracies depend on rounding and are reported "
            "as NaN", IllConditionedWarning, stacklevel=3)
    return below


def cross_validate(
    K: np.ndarray,
    y: np.ndarray,
    folds: Sequence[Fold] | int = 4,
    noise_variances: np.ndarray | None = None,
    n_classes: int | None = None,
    n_grid: int = 1000,
) -> CVResult:
    """k-fold cross-validated accuracy of GP classification for every sigma^2.

    Each fold's training kernel is eigendecomposed once (``scipy.linalg.eigh``); the
    posterior mean for all sigma^2 then follows from matrix products, evaluated in
    chunks of sigma^2 to bound memory.

    Parameters
    ----------
    K : numpy.ndarray, shape (N, N)
        Symmetric kernel matrix of the training set.
    y : numpy.ndarray, shape (N,), int
        Labels.
    folds : sequence of (train_idx, val_idx) or int, default 4
        The folds (see :func:`paper_folds`, :func:`stratified_folds`); an int ``k``
        means ``paper_folds(N, k)``.
    noise_variances : array_like, shape (J,), optional
        sigma^2 values; default the paper's grid over these folds,
        ``noise_grid([K[tr][:, tr] for tr, _ in folds], n_grid)``.
    n_classes : int, optional
        Number of classes; default ``max(y) + 1``.
    n_grid : int, default 1000
        Size of the default grid.

    Returns
    -------
    CVResult
        ``accuracy`` (J,) mean over folds, ``fold_accuracies`` (k, J),
        ``best_noise_variance``, ``best_accuracy``.

    Raises
    ------
    ValueError
        For a non-square, non-symmetric or non-finite `K`, labels of the wrong length,
        folds out of range or overlapping, or a training fold that lacks a class.
    """
    K = _check_square(K, "K")
    n = K.shape[0]
    _check_symmetric(K, "K")
    y = _check_labels(y, n)
    k_cls = _resolve_n_classes(y, n_classes)
    if isinstance(folds, (int, np.integer)):
        folds = paper_folds(n, int(folds))
    folds = _check_folds(folds, y, n)
    Y = centered_one_hot(y, k_cls)

    eigs = [_eigh(K[np.ix_(tr, tr)]) for tr, _ in folds]
    if noise_variances is None:
        c = _pd_floor(min(float(s[0]) for s, _ in eigs), max(float(s[-1]) for s, _ in eigs))
        noise = _grid_from_floor(c, n_grid)
    else:
        noise = _check_noise(noise_variances)

    fold_acc = np.full((len(folds), len(noise)), np.nan)
    for i, ((tr, va), (s, U)) in enumerate(zip(folds, eigs)):
        ok = ~_below_floor(noise, s, f"fold {i}'s training kernel")
        A = K[np.ix_(va, tr)] @ U
        B = U.T @ Y[tr]
        fold_acc[i, ok] = _accuracies_eig(s, A, B, y[va], noise[ok])
    return _make_result(noise, fold_acc)


def leave_one_out(
    K: np.ndarray,
    y: np.ndarray,
    noise_variances: np.ndarray | None = None,
    n_classes: int | None = None,
    n_grid: int = 1000,
) -> CVResult:
    """Exact leave-one-out accuracy for every sigma^2, from one eigendecomposition.

    With ``G = (K + sigma^2 I)^-1`` the leave-one-out residual of point i is
    ``(G Y)_i / G_ii`` and its leave-one-out prediction is ``Y_i - (G Y)_i / G_ii``,
    identical to refitting without point i. ``G = U diag(1/(s+sigma^2)) U^T`` from one
    ``eigh`` of K, so all sigma^2 cost matrix products.

    Parameters
    ----------
    K : numpy.ndarray, shape (N, N)
        Symmetric kernel matrix.
    y : numpy.ndarray, shape (N,), int
        Labels.
    noise_variances : array_like, shape (J,), optional
        sigma^2 values; default ``noise_grid(K, n_grid)`` (computed from the same
        eigendecomposition).
    n_classes : int, optional
        Number of classes; default ``max(y) + 1``.
    n_grid : int, default 1000
        Size of the default grid.

    Returns
    -------
    CVResult
        ``accuracy`` (J,) leave-one-out accuracy; ``fold_accuracies`` has one row.
    """
    K = _check_square(K, "K")
    n = K.shape[0]
    _check_symmetric(K, "K")
    y = _check_labels(y, n)
    k_cls = _resolve_n_classes(y, n_classes)
    if n < 2:
        raise CNNGPError("leave-one-out needs at least 2 points")
    Y = centered_one_hot(y, k_cls)
    s, U = _eigh(K)
    if noise_variances is None:
        noise = _grid_from_floor(_pd_floor(s[0], s[-1]), n_grid)
    else:
        noise = _check_noise(noise_variances)

    C = Y.shape[1]
    acc = np.full(len(noise), np.nan)
    ok = np.flatnonzero(~_below_floor(noise, s, "K"))
    for sl in _chunks(len(ok), 8 * (C + 4) * n):
        pred = _loo_means(s, U, Y, noise[ok[sl]])
        acc[ok[sl]] = (pred.argmax(axis=0) == y[:, None]).mean(axis=0)
    return _make_result(noise, acc[None, :])


def _loo_means(s: np.ndarray, U: np.ndarray, Y: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Leave-one-out posterior means for several sigma^2, from ``K = U diag(s) U^T``.

    With ``G = (K + sigma^2 I)^-1 = U diag(w) U^T``, ``w = 1/(s + sigma^2)``, the
    leave-one-out mean at point i is ``Y_i - (G Y)_i / G_ii``.

    Parameters
    ----------
    s : (n,) eigenvalues; U : (n, n) eigenvectors; Y : (n, C) targets;
    noise : (J,) variances.

    Returns
    -------
    (C, n, J): entry ``[c, i, j]`` is the class-c posterior mean at point i of the GP
    fitted to all other points with noise ``noise[j]``.
    """
    Wt = 1.0 / (s[:, None] + noise[None, :])  # (n, J)
    diag = (U * U) @ Wt  # (n, J): G_ii
    GY = _eig_means(s, U, U.T @ Y, noise)  # (C, n, J)
    with np.errstate(divide="ignore", invalid="ignore"):
        return Y.T[:, :, None] - GY / diag[None]


# --------------------------------------------------------------------------------------
# Final fit and test
# --------------------------------------------------------------------------------------


def posterior_mean(
    K_train: np.ndarray,
    y_train: np.ndarray,
    K_test_train: np.ndarray,
    noise_variance: float,
    n_classes: int | None = None,
) -> np.ndarray:
    """GP posterior mean ``K_*X (K + sigma^2 I)^-1 Y`` on centred one-hot targets.

    Solved by Cholesky when ``K + sigma^2 I`` is positive definite; otherwise (sigma^2
    chosen on fold kernels can lie below the full kernel's floor) by an
    eigendecomposition, as the paper's research code does, with a ``RuntimeWarning``.
    A sigma^2 below ``0.1 * NOISE_RCOND * lambda_max(K_train)`` (condition number above
    ``1e11``, which the CV grid never offers) is computed but reported with an
    :class:`IllConditionedWarning`: such predictions depend on rounding.

    Parameters
    ----------
    K_train : numpy.ndarray, shape (N, N)
        Training kernel.
    y_train : numpy.ndarray, shape (N,), int
        Training labels.
    K_test_train : numpy.ndarray, shape (M, N)
        Kernel between test and training points.
    noise_variance : float
        sigma^2 >= 0.
    n_classes : int, optional
        Number of classes; default ``max(y_train) + 1``.

    Returns
    -------
    numpy.ndarray, shape (M, n_classes), float64
    """
    K = _check_square(K_train, "K_train")
    n = K.shape[0]
    _check_symmetric(K, "K_train")
    y = _check_labels(y_train, n, "y_train")
    k_cls = _resolve_n_classes(y, n_classes)
    Ks = np.asarray(K_test_train, dtype=np.float64)
    if Ks.ndim != 2 or Ks.shape[1] != n:
        raise CNNGPError(
            f"K_test_train must have shape (M, {n}) to match K_train; got {Ks.shape}"
        )
    if not np.all(np.isfinite(Ks)):
        raise CNNGPError("K_test_train contains NaN or infinite values")
    s2 = float(_check_noise(noise_variance, "noise_variance")[0])
    Y = centered_one_hot(y, k_cls)
    top = _largest_eigenvalue(K)
    if s2 < 0.1 * NOISE_RCOND * top:  # 0.1: CV picks sigma^2 on fold kernels, a bit smaller
        warnings.warn(
            f"noise_variance={s2:.3g} is below {NOISE_RCOND:g} x the kernel's largest "
            f"eigenvalue ({top:.3g}): K_train + sigma^2 I has a condition number of about "
            f"{top / max(s2, 1e-300):.2g}, so the posterior mean depends on rounding; use "
            f"noise_variance >= {NOISE_RCOND * top:.3g}",
            IllConditionedWarning,
            stacklevel=2,
        )
    try:
        factor = scipy.linalg.cho_factor(K + s2 * np.eye(n), lower=True, check_finite=False)
        alpha = scipy.linalg.cho_solve(factor, Y, check_finite=False)
    except np.linalg.LinAlgError:
        s, U = _eigh(K)
        d = s + s2
        if np.any(d == 0):
            raise CNNGPError(
                f"K_train + noise_variance*I is singular at noise_variance={s2:g}; use a "
                "larger noise_variance"
            ) from None
        warnings.warn(
            f"K_train + {s2:g} I is not positive definite (smallest eigenvalue "
            f"{d[0]:.3g}); solving through the eigendecomposition instead",
            RuntimeWarning,
            stacklevel=2,
        )
        alpha = U @ ((U.T @ Y) / d[:, None])
    return Ks @ alpha


class PosteriorFactor:
    """``K_train + sigma^2 I`` factorised once, for the posterior variances of many test points.

    Cholesky when it is positive definite. Otherwise (sigma^2 chosen on fold kernels can lie
    below the full kernel's floor, and a float32 kernel has eigenvalues of order -1e-7 x its
    largest) an eigendecomposition in which K's negative eigenvalues, rounding of a positive
    semi-definite kernel, are set to 0 (the nearest positive semi-definite matrix), with a
    ``RuntimeWarning``; directions where ``s + sigma^2`` is still 0 (sigma^2 = 0 on a singular
    kernel) are left out (a pseudo-inverse).

    Parameters
    ----------
    K_train : numpy.ndarray, shape (N, N)
        Symmetric training kernel.
    noise_variance : float
        sigma^2 >= 0.

    Examples
    --------
    >>> f = PosteriorFactor(np.eye(2), 1.0)
    >>> f.explained(np.array([[1.0, 0.0]])).round(12).tolist()   # k_*^T (K + I)^-1 k_* = 1/2
    [0.5]
    """

    def __init__(self, K_train, noise_variance):
        K = _check_square(K_train, "K_train")
        _check_symmetric(K, "K_train")
        self.n = K.shape[0]
        self.noise_variance = float(_check_noise(noise_variance, "noise_variance")[0])
        try:
            self._cho = scipy.linalg.cho_factor(K + self.noise_variance * np.eye(self.n), lower=True,
                                                check_finite=False)
            self._eig = None
        except np.linalg.LinAlgError:
            s, U = _eigh(K)
            self._cho, self._eig = None, (_psd_shifted(s, self.noise_variance, "K_train"), U)

    def _check_cross(self, K_test_train) -> np.ndarray:
        Ks = np.asarray(K_test_train, dtype=np.float64)
        if Ks.ndim != 2 or Ks.shape[1] != self.n:
            raise CNNGPError(
                f"K_test_train must have shape (M, {self.n}) to match K_train; got {Ks.shape}"
            )
        if not np.all(np.isfinite(Ks)):
            raise CNNGPError("K_test_train contains NaN or infinite values")
        return Ks

    def solve(self, B: np.ndarray) -> np.ndarray:
        """``(K + sigma^2 I)^-1 B`` for B of shape (N, ...)."""
        if self._eig is None:
            return scipy.linalg.cho_solve(self._cho, B, check_finite=False)
        d, U = self._eig
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
        return U @ ((U.T @ B) * inv.reshape((-1,) + (1,) * (np.ndim(B) - 1)))

    def _whitened(self, Ks: np.ndarray) -> np.ndarray:
        """W (N, M) with ``W^T W = K_* (K + sigma^2 I)^-1 K_*^T``: ``L^-1 K_*^T`` (Cholesky
        L L^T) or ``diag(d^-1/2) U^T K_*^T`` (eigendecomposition)."""
        if self._eig is None:
            return scipy.linalg.solve_triangular(self._cho[0], Ks.T, lower=True, check_finite=False)
        d, U = self._eig
        root = np.divide(1.0, np.sqrt(d), out=np.zeros_like(d), where=d > 0)
        return (U.T @ Ks.T) * root[:, None]

    def explained(self, K_test_train, full: bool = False) -> np.ndarray:
        """The variance the training data explain: the diagonal (M,), or with ``full`` the
        matrix (M, M), of ``K_* (K + sigma^2 I)^-1 K_*^T``."""
        W = self._whitened(self._check_cross(K_test_train))
        return W.T @ W if full else np.einsum("nm,nm->m", W, W)

    def variance(self, K_test_train, test_prior, full_covariance: bool = False) -> np.ndarray:
        """The posterior variances (M,), or covariance (M, M): :func:`posterior_variance`."""
        Ks = self._check_cross(K_test_train)
        P = _check_prior(test_prior, Ks.shape[0], bool(full_covariance))
        explained = self.explained(Ks, full=bool(full_covariance))
        prior = np.diagonal(P) if P.ndim == 2 else P
        if full_covariance:
            cov = P - explained
            cov = 0.5 * (cov + cov.T)
            np.fill_diagonal(cov, _clip_variances(np.diagonal(cov).copy(), prior, "test_prior"))
            return cov
        return _clip_variances(prior - explained, prior, "test_prior")


def _psd_shifted(s: np.ndarray, s2: float, what: str) -> np.ndarray:
    """``max(s, 0) + sigma^2`` for the eigenvalues s of a kernel whose ``K + sigma^2 I`` is not
    positive definite, with a warning naming the negative eigenvalues set to 0."""
    if s[0] < 0:
        warnings.warn(
            f"{what} has negative eigenvalues (down to {s[0]:.3g}, largest {s[-1]:.3g}) that "
            f"noise_variance={s2:.3g} does not cover; for the posterior variance they are taken "
            "as 0 (rounding of a positive semi-definite kernel)",
            RuntimeWarning,
            stacklevel=4,
        )
    return np.maximum(s, 0.0) + s2


def _check_prior(test_prior, m: int, full: bool) -> np.ndarray:
    """``test_prior``: the (M,) prior variances k(x*, x*), or the (M, M) matrix K_test_test."""
    P = np.asarray(test_prior, dtype=np.float64)
    if P.ndim == 2 and P.shape == (m, m):
        if not np.all(np.isfinite(P)):
            raise CNNGPError("test_prior contains NaN or infinite values")
        _check_symmetric(P, "test_prior")
        diag = np.diagonal(P)
    elif P.ndim == 1 and P.shape == (m,):
        if full:
            raise CNNGPError(
                f"test_prior: full_covariance=True needs the ({m}, {m}) matrix K_test_test, "
                f"got the shape {P.shape} of its diagonal"
            )
        diag = P
    else:
        raise CNNGPError(
            f"test_prior must be the ({m},) prior variances k(x*, x*) of the test points or their "
            f"({m}, {m}) kernel matrix, to match K_test_train's {m} rows; got shape {P.shape}"
        )
    _check_variances(diag, "test_prior", "test point",
                     " (pass k(x*, x*), e.g. cnngp.engine.gram.kernel_diagonal)")
    return P


def _check_variances(v: np.ndarray, name: str, item: str, hint: str = "") -> None:
    """Refuse variances (a 1-D array ``name``) that are NaN, infinite or negative."""
    if not np.all(np.isfinite(v)):
        raise CNNGPError(f"{name} contains NaN or infinite values")
    if np.any(v < 0):
        i = int(np.argmin(v))
        raise CNNGPError(f"{name}: variances must be >= 0; {item} {i} has {v[i]:.3g}{hint}")


#: posterior variances more negative than this, relative to the prior variance, are reported
#: (smaller negative values are float rounding and are set to 0)
VARIANCE_RTOL = 1e-6


def posterior_variance(
    K_train: np.ndarray,
    K_test_train: np.ndarray,
    test_prior: np.ndarray,
    noise_variance: float,
    full_covariance: bool = False,
) -> np.ndarray:
    """GP posterior variance of the latent function at test points (docs/maths.md §5.1).

    ``s^2(x*) = k(x*, x*) - k_*^T (K + sigma^2 I)^-1 k_*``: the variance of each class score
    f_c(x*) given the training targets, the same for every class (the classes are independent
    GPs with one kernel). With ``full_covariance``, the (M, M) posterior covariance
    ``K_** - K_*X (K + sigma^2 I)^-1 K_X*``. It is the variance of the noise-free score, not of
    a noisy observation (add ``noise_variance`` for that).

    Parameters
    ----------
    K_train : numpy.ndarray, shape (N, N)
        Training kernel.
    K_test_train : numpy.ndarray, shape (M, N)
        Kernel between test and training points.
    test_prior : numpy.ndarray, shape (M,) or (M, M)
        The test points' prior variances k(x*, x*) (the diagonal of K_test_test, e.g. from
        :func:`cnngp.engine.gram.kernel_diagonal`), or the whole K_test_test.
    noise_variance : float
        sigma^2 >= 0.
    full_covariance : bool, default False
        Return the (M, M) covariance (needs the (M, M) ``test_prior``).

    Returns
    -------
    numpy.ndarray, shape (M,) or (M, M), float64
        Variances >= 0: negative values within float rounding
        (``VARIANCE_RTOL`` of the prior variance) are set to 0; larger ones (a ``test_prior``
        that is not the kernel of these points) raise a ``RuntimeWarning`` and are set to 0 too.

    Examples
    --------
    >>> K = np.array([[1.0, 0.5], [0.5, 1.0]])
    >>> posterior_variance(K, np.array([[1.0, 0.5]]), np.array([1.0]), 0.0).round(12).tolist()
    [0.0]
    """
    return PosteriorFactor(K_train, noise_variance).variance(K_test_train, test_prior, full_covariance)


def _clip_variances(v: np.ndarray, prior: np.ndarray, what: str) -> np.ndarray:
    """Set rounding-negative variances to 0; warn when they are negative beyond rounding."""
    bad = v < -VARIANCE_RTOL * np.maximum(np.abs(prior), np.finfo(float).tiny)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        warnings.warn(
            f"{what}: {int(bad.sum())} posterior variance(s) are negative beyond rounding (point {i}: "
            f"{v[i]:.3g} with prior variance {prior[i]:.3g}); is {what} the kernel of these points, "
            "from the same network and precision? Set to 0",
            RuntimeWarning,
            stacklevel=4,
        )
    return np.maximum(v, 0.0)


def held_out_predictions(
    K: np.ndarray,
    y: np.ndarray,
    noise_variance: float,
    folds: Sequence[Fold] | int | None = None,
    n_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every training point's posterior mean and variance from the model that did not see it.

    With ``folds``, each point is predicted by the GP fitted to the other folds (the folds of
    :func:`cross_validate`); with ``folds=None`` by exact leave-one-out: with
    ``G = (K + sigma^2 I)^-1``, the mean is ``Y_i - (G Y)_i / G_ii`` and the latent variance
    ``1 / G_ii - sigma^2`` (Rasmussen & Williams §5.4.2), identical to refitting without point i.

    Parameters
    ----------
    K : numpy.ndarray, shape (N, N)
        Symmetric kernel of the training set.
    y : numpy.ndarray, shape (N,), int
        Labels.
    noise_variance : float
        sigma^2 >= 0.
    folds : sequence of (train_idx, val_idx), int or None, default None
        As for :func:`cross_validate` (an int k: ``paper_folds(N, k)``); None: leave-one-out.
        A point in no validation set gets NaN.
    n_classes : int, optional
        Number of classes; default ``max(y) + 1``.

    Returns
    -------
    mean : numpy.ndarray, shape (N, n_classes)
    variance : numpy.ndarray, shape (N,)
        Latent posterior variances (>= 0, as :func:`posterior_variance`).
    """
    K = _check_square(K, "K")
    n = K.shape[0]
    _check_symmetric(K, "K")
    y = _check_labels(y, n)
    k_cls = _resolve_n_classes(y, n_classes)
    s2 = float(_check_noise(noise_variance, "noise_variance")[0])
    Y = centered_one_hot(y, k_cls)
    prior = np.diagonal(K).copy()
    if folds is None:
        if n < 2:
            raise CNNGPError("leave-one-out needs at least 2 points")
        s, U = _eigh(K)
        if s[0] + s2 <= 0:
            s = _psd_shifted(s, s2, "K") - s2
        d = s + s2
        if np.any(d <= 0):
            raise CNNGPError(
                f"K + noise_variance*I is singular at noise_variance={s2:g}, so leave-one-out "
                "predictions are undefined; use a noise_variance > 0"
            )
        mean = _loo_means(s, U, Y, np.array([s2]))[:, :, 0].T
        g_ii = (U * U) @ (1.0 / d)
        return mean, _clip_variances(1.0 / g_ii - s2, prior, "K")
    if isinstance(folds, (int, np.integer)):
        folds = paper_folds(n, int(folds))
    folds = _check_folds(folds, y, n)
    mean = np.full((n, k_cls), np.nan)
    var = np.full(n, np.nan)
    for tr, va in folds:
        factor = PosteriorFactor(K[np.ix_(tr, tr)], s2)
        Kvt = K[np.ix_(va, tr)]
        mean[va] = Kvt @ factor.solve(Y[tr])
        var[va] = _clip_variances(prior[va] - factor.explained(Kvt), prior[va], "K")
    return mean, var


def fit_predict(
    K_train: np.ndarray,
    y_train: np.ndarray,
    K_test_train: np.ndarray,
    noise_variance: float,
    n_classes: int | None = None,
) -> np.ndarray:
    """Predicted labels: argmax of :func:`posterior_mean`.

    Parameters
    ----------
    K_train : numpy.ndarray, shape (N, N)
    y_train : numpy.ndarray, shape (N,), int
    K_test_train : numpy.ndarray, shape (M, N)
    noise_variance : float
    n_classes : int, optional

    Returns
    -------
    numpy.ndarray, shape (M,), int64

    Examples
    --------
    >>> K = np.array([[1.0, 0.0], [0.0, 1.0]])
    >>> fit_predict(K, np.array([0, 1]), np.array([[0.9, 0.1]]), 0.1).tolist()
    [0]
    """
    mean = posterior_mean(K_train, y_train, K_test_train, noise_variance, n_classes)
    return mean.argmax(axis=1).astype(np.int64)


def test_accuracy(
    K_train: np.ndarray,
    y_train: np.ndarray,
    K_test_train: np.ndarray,
    y_test: np.ndarray,
    noise_variance: float,
    n_classes: int | None = None,
) -> float:
    """Fraction of test points whose :func:`fit_predict` label equals `y_test`.

    Parameters
    ----------
    K_train : numpy.ndarray, shape (N, N)
    y_train : numpy.ndarray, shape (N,), int
    K_test_train : numpy.ndarray, shape (M, N)
    y_test : numpy.ndarray, shape (M,), int
    noise_variance : float
    n_classes : int, optional

    Returns
    -------
    float in [0, 1]
    """
    y_test = _check_labels(y_test, None, "y_test")
    if len(y_test) != np.shape(K_test_train)[0]:
        raise CNNGPError(
            f"y_test has {len(y_test)} labels but K_test_train has "
            f"{np.shape(K_test_train)[0]} rows"
        )
    pred = fit_predict(K_train, y_train, K_test_train, noise_variance, n_classes)
    return float(np.mean(pred == y_test))


test_accuracy.__test__ = False  # not a pytest test despite the name


def mean_and_2se(values, axis: int = 0) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Mean and two standard errors over repeats (e.g. disjoint data blocks).

    Parameters
    ----------
    values : array_like, shape (B, ...)
        One value (or array of values) per block along `axis`.
    axis : int, default 0
        The block axis.

    Returns
    -------
    mean : float or numpy.ndarray, shape (...)
    two_se : float or numpy.ndarray, shape (...)
        ``2 * std(ddof=1) / sqrt(B)``; 0 when there is a single block.

    Examples
    --------
    >>> mean_and_2se([1.0, 3.0])
    (2.0, 2.0)
    >>> mean_and_2se([0.5])
    (0.5, 0.0)
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0 or v.shape[axis] == 0:
        raise CNNGPError("values must hold at least one value along the block axis")
    b = v.shape[axis]
    mean = v.mean(axis=axis)
    if b == 1:
        se2 = np.zeros_like(mean)
    else:
        se2 = 2.0 * v.std(axis=axis, ddof=1) / np.sqrt(b)
    if np.ndim(mean) == 0:
        return float(mean), float(se2)
    return mean, se2

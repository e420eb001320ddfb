"""Infinite ensembles of infinitely wide networks trained by gradient descent (docs/maths.md §11).

A network in the NTK parameterisation trained by gradient flow on squared loss stays, in the
infinite-width limit, a linear model in its parameters (Lee et al. 2019, "Wide neural networks
of any depth evolve as linear models under gradient descent", §2.3 and eqs. (15)-(16)). Over
random initialisations its outputs at training time t are then Gaussian, with

    mean   μ_t(X*) = Θ_*X A_t Y,                      A_t = Θ_r⁻¹ (I − exp(−c t Θ_r)),
    cov    Σ_t(X*) = K_** + Θ_*X A_t K A_t Θ_X* − (Θ_*X A_t K_X* + transpose),

with K the NNGP (the outputs' covariance at initialisation), Θ the NTK, Θ_r = Θ_XX + σ² I the
training NTK with a ridge σ² ≥ 0, and c = learning_rate / (N · C) for the loss
½ · mean over the N × C targets of (f − y)² (the convention of neural-tangents'
``predict.gradient_descent_mse_ensemble``, so its learning rates and times carry over; its
``diag_reg`` with ``diag_reg_absolute_scale=True`` is σ²). The ridge acts like one extra
trainable offset per training image, starting at 0: it enters the dynamics, not K.

Training only the readout layer gives the same with Θ replaced by the NNGP (``mode="nngp"``);
there σ² is also the variance of the offsets at initialisation (observation noise), so that

    Σ_t(X*) = K_** − K_*X K_r⁻¹ (I − exp(−2 c t K_r)) K_X*,        K_r = K_XX + σ² I,

which at t = ∞ is the GP posterior of :func:`cnngp.inference.gp.posterior_variance` with
noise σ², and its mean the posterior mean of :func:`cnngp.inference.gp.posterior_mean`.

Everything is computed in the eigenbasis of the training kernel that drives the dynamics
(Θ_r, or K_r), once for all times: ``Θ_r = V diag(λ) Vᵀ`` and ``A_t = V diag(g_t(λ)) Vᵀ`` with
``g_t(λ) = (1 − e^{−c t λ}) / λ`` (at t = ∞, 1/λ), and 0 at every time on the numerically null
directions, λ ≤ 1e-10 λ_max (the test points' kernel has no component there: a pseudo-inverse,
and finite times approach t = ∞ continuously). Float64 NumPy throughout.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from cnngp.errors import CNNGPError
from cnngp.inference.gp import (
    NOISE_RCOND,
    IllConditionedWarning,
    _check_noise,
    _check_prior,
    _check_square,
    _check_symmetric,
    _clip_variances,
    _eigh,
    _resolve_n_classes,
    centered_one_hot,
)
from cnngp.validation import non_negative_real

__all__ = ["EnsemblePrediction", "trained_ensemble", "training_times"]


@dataclass(frozen=True)
class EnsemblePrediction:
    """The Gaussian outputs of the trained ensemble at the test points, at each training time.

    Attributes
    ----------
    mode : {"ntk", "nngp"}
        Every layer trained (NTK dynamics) or the readout only (NNGP dynamics).
    times : numpy.ndarray, shape (T,)
        The training times (``inf``: converged).
    mean : numpy.ndarray, shape (T, M, C)
        The ensemble's mean output for each time, test point and target column (class).
    variance : numpy.ndarray or None, shape (T, M)
        Each output's variance over the ensemble (the same for every class); None without
        ``test_prior``.
    covariance : numpy.ndarray or None, shape (T, M, M)
        The covariance between test points, with ``full_covariance=True``; else None.
    """

    mode: str
    times: np.ndarray
    mean: np.ndarray
    variance: np.ndarray | None = None
    covariance: np.ndarray | None = None


def _targets(y_train, n: int, n_classes: int | None) -> np.ndarray:
    """Integer labels -> centred one-hot (the paper's targets); a float (N, C) array as given."""
    y = np.asarray(y_train)
    if y.ndim == 1 and (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        if len(y) != n:
            raise CNNGPError(f"y_train has {len(y)} labels but the training kernel has {n} rows")
        if y.size and y.min() < 0:
            raise CNNGPError(f"y_train has a negative label ({y.min()}); labels must be >= 0")
        y = y.astype(np.int64)
        return centered_one_hot(y, _resolve_n_classes(y, n_classes))
    if y.ndim == 2 and np.issubdtype(y.dtype, np.floating):
        if n_classes is not None and int(n_classes) != y.shape[1]:
            raise CNNGPError(f"n_classes={n_classes} does not match the {y.shape[1]} columns of the float "
                             "targets y_train (n_classes is for integer labels)")
        if y.shape[0] != n or y.shape[1] == 0:
            raise CNNGPError(f"y_train: regression targets must have shape ({n}, C) with C >= 1 to "
                             f"match the training kernel; got {y.shape}")
        if not np.all(np.isfinite(y)):
            raise CNNGPError("y_train contains NaN or infinite values")
        return y.astype(np.float64)
    raise CNNGPError(f"y_train must be integer class labels of shape ({n},) or float regression "
                     f"targets of shape ({n}, C); got shape {y.shape}, dtype {y.dtype}")


def _cross(K, n: int, what: str) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.ndim != 2 or K.shape[1] != n or K.shape[0] == 0:
        raise CNNGPError(f"{what} must have shape (M, {n}) to match the training kernel; got {K.shape}")
    if not np.all(np.isfinite(K)):
        raise CNNGPError(f"{what} contains NaN or infinite values")
    return K


def training_times(times) -> np.ndarray:
    """``times`` checked and as a 1-D float64 array: one number or a 1-D array of numbers >= 0
    (``np.inf``: trained to convergence), in any order; ``-0.0`` becomes 0. The check
    :func:`trained_ensemble` makes, for callers that record the times before computing."""
    if isinstance(times, (bool, np.bool_, str, bytes)):
        raise CNNGPError(f"times must be a number or a 1-D array of numbers >= 0; got {times!r}")
    t = np.atleast_1d(np.asarray(times, dtype=np.float64)) + 0.0  # (+ 0.0: -0.0 is 0)
    if t.ndim != 1 or t.size == 0:
        raise CNNGPError(f"times must be a number or a 1-D array of them; got shape {t.shape}")
    if np.any(np.isnan(t)) or np.any(t < 0):
        raise CNNGPError("times must be >= 0 (np.inf: trained to convergence); got "
                         f"{t[np.isnan(t) | (t < 0)][0]}")
    return t


def _gains(lam: np.ndarray, times: np.ndarray, rate: float, null: np.ndarray) -> np.ndarray:
    """g_t(λ) = (1 − e^{−rate t λ}) / λ for each time (rows) and eigenvalue (columns), and 0 on
    the numerically null directions at every time: the test points' kernel has no component
    there (exactly, for a PSD joint kernel), so that only rounding would be amplified, and
    finite times then approach t = ∞ continuously. rate · t may overflow to ∞: the limit 1/λ."""
    g = np.zeros((len(times), len(lam)))
    keep = ~null
    kept = lam[keep]
    for i, t in enumerate(times):
        with np.errstate(over="ignore"):
            x = rate * t
        g[i, keep] = 1.0 / kept if np.isinf(x) else -np.expm1(-x * kept) / kept
    return g


def trained_ensemble(
    y_train,
    nngp_train,
    nngp_test_train,
    *,
    ntk_train=None,
    ntk_test_train=None,
    test_prior=None,
    times=np.inf,
    learning_rate: float = 1.0,
    noise_variance: float = 0.0,
    n_classes: int | None = None,
    full_covariance: bool = False,
) -> EnsemblePrediction:
    """Mean and (co)variance of an infinite ensemble of trained infinitely wide networks.

    The outputs at the test points of networks trained by gradient flow on squared loss for
    time t (module docstring; docs/maths.md §11), over random initialisations: with
    ``ntk_train`` and ``ntk_test_train``, every layer trained (NTK dynamics, Lee et al. 2019
    eqs. (15)-(16)); without, the readout only (NNGP dynamics, whose t = ∞ limit is the GP
    posterior). Equal to neural-tangents' ``gradient_descent_mse_ensemble`` on the same
    matrices (``diag_reg=noise_variance, diag_reg_absolute_scale=True``; t = None there is
    ``times=np.inf`` here).

    Parameters
    ----------
    y_train : numpy.ndarray, shape (N,) int or (N, C) float
        Class labels (targets: one-hot minus 1/C, as the rest of cnngp) or regression targets.
    nngp_train : numpy.ndarray, shape (N, N)
        The NNGP of the training images.
    nngp_test_train : numpy.ndarray, shape (M, N)
        The NNGP between test and training images.
    ntk_train, ntk_test_train : numpy.ndarray, shapes (N, N) and (M, N), optional
        The NTKs, both or neither (e.g. ``cnngp.kernel(net, x, get="both")``).
    test_prior : numpy.ndarray, shape (M,) or (M, M), optional
        The test images' NNGP prior variances k(x*, x*) (or the whole NNGP test kernel, needed
        with ``full_covariance``). Without it only the means are computed.
    times : float or sequence of float, default inf
        Training times t ≥ 0 in steps of the learning rate; ``np.inf`` is the converged network.
    learning_rate : float, default 1.0
        Gradient-flow rate η > 0 (the dynamics depend on η t only).
    noise_variance : float, default 0.0
        σ² ≥ 0: the ridge added to the training kernel that drives the dynamics (and, for the
        NNGP dynamics, the observation noise).
    n_classes : int, optional
        With integer labels: the number of classes (default ``max(y_train) + 1``).
    full_covariance : bool, default False
        Also return the (T, M, M) covariances between test points (needs the (M, M) prior).

    Returns
    -------
    EnsemblePrediction
        ``mean`` (T, M, C); ``variance`` (T, M) and, with ``full_covariance``, ``covariance``.
    """
    K = _check_square(nngp_train, "nngp_train")
    n = K.shape[0]
    _check_symmetric(K, "nngp_train")
    Y = _targets(y_train, n, n_classes)
    K_star = _cross(nngp_test_train, n, "nngp_test_train")
    m = K_star.shape[0]
    if (ntk_train is None) != (ntk_test_train is None):
        raise CNNGPError("ntk_train and ntk_test_train go together: pass both (NTK dynamics, every "
                         "layer trained) or neither (NNGP dynamics, the readout trained)")
    mode = "nngp" if ntk_train is None else "ntk"
    if mode == "ntk":
        T = _check_square(ntk_train, "ntk_train")
        if T.shape != K.shape:
            raise CNNGPError(f"ntk_train has shape {T.shape} but nngp_train has {K.shape}")
        _check_symmetric(T, "ntk_train")
        T_star = _cross(ntk_test_train, n, "ntk_test_train")
        if T_star.shape[0] != m:
            raise CNNGPError(f"ntk_test_train has {T_star.shape[0]} rows but nngp_test_train has {m}")
    else:
        T, T_star = K, K_star
    times = training_times(times)
    rate = non_negative_real(learning_rate, "learning_rate", positive=True)
    s2 = float(_check_noise(noise_variance, "noise_variance")[0])
    P = None if test_prior is None else _check_prior(test_prior, m, bool(full_covariance))
    if full_covariance and P is None:
        raise CNNGPError(f"full_covariance=True needs test_prior, the ({m}, {m}) NNGP kernel of "
                         "the test points")

    # the kernel that drives the dynamics, with its ridge, in its eigenbasis (negative
    # eigenvalues are rounding of a PSD kernel: 0)
    lam, V = _eigh(T + s2 * np.eye(n))
    lam = np.maximum(lam, 0.0)
    null = lam <= NOISE_RCOND * lam[-1]
    if np.any(null):
        warnings.warn(
            f"the training {mode.upper()}{' + noise_variance' if s2 else ''} has {int(null.sum())} eigenvalue(s) "
            f"below {NOISE_RCOND:g} x its largest: those directions are left out at every time (a "
            "pseudo-inverse at t = inf); a larger noise_variance regularises them instead",
            IllConditionedWarning, stacklevel=2)
    c = rate / Y.size  # the loss is ½ mean over the N × C targets
    g = _gains(lam, times, c, null)

    B = V.T @ T_star.T          # (N, M): the test points' dynamics kernel, eigenbasis
    VY = V.T @ Y                # (N, C)
    mean = np.einsum("nm,tn,nc->tmc", B, g, VY)  # Θ_*X A_t Y
    if P is None:
        return EnsemblePrediction(mode, times, mean)

    prior_diag = np.diagonal(P) if P.ndim == 2 else P
    if mode == "nngp":
        # Σ_t = K_** − K_*X A_2t K_X*  (K_r's eigenbasis: B is Vᵀ K_X*)
        with np.errstate(over="ignore"):  # 2t may overflow to ∞: the converged limit
            g2 = _gains(lam, 2.0 * times, c, null)
        explained = (np.einsum("nm,tn,nk->tmk", B, g2, B) if full_covariance
                     else np.einsum("nm,tn,nm->tm", B, g2, B))
    else:
        # Σ_t = K_** + Θ_*X A_t K A_t Θ_X* − (Θ_*X A_t K_X* + transpose)
        C = V.T @ K_star.T      # (N, M)
        Kv = V.T @ K @ V        # (N, N): the initial outputs' covariance, unregularised
        explained = []
        for gt in g:
            gB = gt[:, None] * B
            if full_covariance:
                cross = gB.T @ C
                explained.append(cross + cross.T - gB.T @ Kv @ gB)
            else:
                explained.append(2.0 * np.einsum("nm,nm->m", gB, C)
                                 - np.einsum("nm,nk,km->m", gB, Kv, gB))
        explained = np.asarray(explained)
    variance = np.asarray([_clip_variances(prior_diag - e if e.ndim == 1 else prior_diag - np.diagonal(e),
                                           prior_diag, "test_prior") for e in explained])
    covariance = None
    if full_covariance:
        covariance = P[None] - explained
        covariance = 0.5 * (covariance + np.swapaxes(covariance, 1, 2))
    return EnsemblePrediction(mode, times, mean, variance, covariance)

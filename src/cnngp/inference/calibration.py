"""Class probabilities from the GP posterior, their calibration, and how good they are.

The GP classifier (docs/maths.md §5) regresses each class c's centred one-hot target with an
independent GP of one kernel, so at a test point x* the class scores have posterior means
``mu_c`` (:func:`cnngp.inference.gp.posterior_mean`) and one shared posterior variance ``s^2``
(:func:`cnngp.inference.gp.posterior_variance`). Probabilities (docs/maths.md §5.1):

    f_c ~ N(mu_c, tau * s^2) independently,    P(c) = P(f_c is the largest of the f_k)
         = ∫ phi(z) prod_{k != c} Phi(z + (mu_c - mu_k) / sqrt(tau s^2)) dz.

The 1-D integral is computed deterministically by adaptive Gauss–Hermite quadrature (the
integrand is log-concave; the nodes are centred on its mode and scaled by its curvature there)
in log space, and the C values are normalised to sum to 1. ``tau`` is a calibration scale: the
GP's variance is on the kernel's scale, not the targets' (the kernel's amplitude is not fitted),
so tau is chosen on the training set alone, by minimising the negative log likelihood of the
held-out predictions of the same cross-validation folds that chose sigma^2 (or exact
leave-one-out) — never on the test set. tau = 1 is the GP's own posterior.

Since every class shares the variance, P(c) increases with mu_c: the most probable class is the
class of the largest posterior mean (the GP's prediction), so the accuracy is unchanged.

Quality: accuracy, mean negative log likelihood (NLL) of the true labels, and expected
calibration error (ECE) over ``ECE_BINS`` = 15 equal-width bins of the top-label confidence
``max_c P(c)``, with the data for a reliability diagram (:func:`reliability`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.optimize
from scipy.special import log_ndtr, logsumexp

from cnngp.errors import CNNGPError
from cnngp.inference import gp

__all__ = [
    "class_probabilities",
    "log_class_probabilities",
    "fit_calibration_scale",
    "calibrate",
    "negative_log_likelihood",
    "expected_calibration_error",
    "reliability",
    "classification_metrics",
    "test_scores",
    "ECE_BINS",
    "QUADRATURE_NODES",
    "LOG_FLOOR",
    "PROBABILITY_METHOD",
    "CalibrationWarning",
]

#: equal-width bins of the top-label confidence in the expected calibration error
ECE_BINS = 15
#: Gauss–Hermite nodes of the adaptive quadrature
QUADRATURE_NODES = 24
#: log of the smallest normal float64: probabilities below it count as it in the NLL
LOG_FLOOR = math.log(np.finfo(np.float64).tiny)
#: standardised score differences are clipped to ±this: the probabilities beyond it are
#: below ``exp(LOG_FLOOR)`` either way (P(c) <= Phi(d / sqrt 2) and Phi(-80 / sqrt 2) < 1e-690)
_D_MAX = 80.0
#: rows of a probability computation at once (memory: rows × C × (C - 1) × nodes floats)
_ROWS = 1024
#: a one-line description recorded with results
PROBABILITY_METHOD = (
    "P(c) = P(f_c is the largest), class scores f_c ~ N(posterior mean_c, tau * posterior "
    "variance) independently, by adaptive Gauss-Hermite quadrature; tau minimises the held-out "
    "NLL of the training folds that chose sigma^2"
)


class CalibrationWarning(RuntimeWarning):
    """The held-out predictions do not determine the calibration scale (every one of them is
    right, so their NLL falls on as tau -> 0): tau = 1, the GP's own variance, is used."""


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_mean_variance(mean, variance) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mean, dtype=np.float64)
    if mu.ndim != 2 or mu.shape[1] < 2:
        raise CNNGPError(f"mean must be a 2-D array (M, n_classes >= 2) of class scores; got shape {mu.shape}")
    if not np.all(np.isfinite(mu)):
        raise CNNGPError("mean contains NaN or infinite values")
    v = np.asarray(variance, dtype=np.float64)
    if v.shape != (mu.shape[0],):
        raise CNNGPError(
            f"variance must have shape ({mu.shape[0]},), one posterior variance per row of mean; "
            f"got {v.shape}"
        )
    gp._check_variances(v, "variance", "row")
    return mu, v


def _check_scale(scale) -> float:
    try:
        tau = float(scale)
    except (TypeError, ValueError):
        raise CNNGPError(f"scale must be a finite number > 0; got {scale!r}") from None
    if isinstance(scale, bool) or not math.isfinite(tau) or tau <= 0:
        raise CNNGPError(f"scale must be a finite number > 0; got {scale!r}")
    return tau


def _check_probabilities(probabilities, y) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2 or p.shape[0] == 0:
        raise CNNGPError(
            f"probabilities must be a non-empty 2-D array (M, n_classes >= 2); got shape {p.shape}"
        )
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise CNNGPError("probabilities must be finite and in [0, 1]")
    if np.any(np.abs(p.sum(axis=1) - 1.0) > 1e-6):
        raise CNNGPError("probabilities: every row must sum to 1 (within 1e-6)")
    labels = np.asarray(y)
    if labels.shape != (p.shape[0],):
        raise CNNGPError(f"y must have shape ({p.shape[0]},), one label per row of probabilities; got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise CNNGPError(f"y must hold integer class indices; got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= p.shape[1]):
        raise CNNGPError(f"y: labels must be in 0..{p.shape[1] - 1} (the columns of probabilities)")
    return p, labels.astype(np.int64)


# --------------------------------------------------------------------------------------
# Probabilities
# --------------------------------------------------------------------------------------


def _mills(u: np.ndarray) -> np.ndarray:
    """phi(u) / Phi(u), stable for any u (log space)."""
    return np.exp(-0.5 * u * u - 0.5 * math.log(2 * math.pi) - log_ndtr(u))


def _log_integral(d: np.ndarray, nodes: int) -> np.ndarray:
    """``log ∫ phi(z) prod_k Phi(z + d_k) dz`` for each row of d (R, K).

    The integrand exp(h), ``h(z) = log phi(z) + sum_k log Phi(z + d_k)``, is log-concave:
    ``h' = -z + sum_k r(z + d_k)`` with r the inverse Mills ratio, ``h'' = -1 - sum_k
    r(u)(u + r(u)) <= -1``. Its mode z* (h' = 0) lies in ``[0, max(0, -min d) + 0.8 K + 1]``
    (r > 0, and r(u) <= max(-u, 0) + 0.8), found by Newton steps kept inside a shrinking
    bracket. Then Gauss–Hermite with nodes ``z* + sqrt(2) sigma x_i``,
    ``sigma = (-h''(z*))^-1/2``.
    """
    x, w = np.polynomial.hermite.hermgauss(nodes)
    lo = np.zeros(d.shape[0])
    hi = np.maximum(0.0, -d.min(axis=1)) + 0.8 * d.shape[1] + 1.0
    z = np.clip(-d.min(axis=1), lo, hi)
    for _ in range(40):
        u = z[:, None] + d
        r = _mills(u)
        grad = -z + r.sum(axis=1)
        curv = -1.0 - (r * (u + r)).sum(axis=1)
        lo = np.where(grad >= 0, z, lo)  # h' decreases: the mode is above z where h'(z) > 0
        hi = np.where(grad <= 0, z, hi)
        step = z - grad / curv  # Newton, or bisection where it would leave the bracket
        z_new = np.where((step >= lo) & (step <= hi), step, 0.5 * (lo + hi))
        done = np.all(np.abs(z_new - z) <= 1e-10 * (1.0 + np.abs(z)))
        z = z_new
        if done:
            break
    u = z[:, None] + d
    r = _mills(u)
    sigma = 1.0 / np.sqrt(1.0 + (r * (u + r)).sum(axis=1))
    zi = z[:, None] + math.sqrt(2.0) * sigma[:, None] * x[None, :]  # (R, nodes)
    h = (-0.5 * zi * zi - 0.5 * math.log(2 * math.pi)
         + log_ndtr(zi[:, None, :] + d[:, :, None]).sum(axis=1))
    return np.log(math.sqrt(2.0) * sigma) + logsumexp(h + (np.log(w) + x * x)[None, :], axis=1)


def log_class_probabilities(mean, variance, scale: float = 1.0, nodes: int = QUADRATURE_NODES) -> np.ndarray:
    """Natural logarithms of :func:`class_probabilities` (accurate where they underflow).

    Parameters and returns as for :func:`class_probabilities`.
    """
    mu, v = _check_mean_variance(mean, variance)
    tau = _check_scale(scale)
    m, c = mu.shape
    s = np.sqrt(tau * v)
    out = np.empty((m, c))
    others = np.array([[k for k in range(c) if k != j] for j in range(c)])  # (C, C-1)
    for start in range(0, m, _ROWS):
        sl = slice(start, min(m, start + _ROWS))
        diff = mu[sl, :, None] - mu[sl][:, others]  # (R, C, C-1): mu_c - mu_k
        sd = s[sl, None, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(sd > 0, diff / np.where(sd > 0, sd, 1.0), np.sign(diff) * _D_MAX)
        d = np.sort(np.clip(d, -_D_MAX, _D_MAX), axis=2)  # sorted: equal means, equal sums
        logp = _log_integral(d.reshape(-1, c - 1), int(nodes)).reshape(-1, c)
        out[sl] = logp - logsumexp(logp, axis=1, keepdims=True)
    return out


def class_probabilities(mean, variance, scale: float = 1.0, nodes: int = QUADRATURE_NODES) -> np.ndarray:
    """P(class c) from the GP posterior: ``P(f_c = max_k f_k)``, ``f_k ~ N(mean_k, scale·variance)``.

    Independent Gaussian class scores with the shared posterior variance (module docstring),
    integrated by adaptive Gauss–Hermite quadrature and normalised to sum to 1. Zero variance
    gives the one-hot argmax (shared equally among exactly tied means).

    Parameters
    ----------
    mean : numpy.ndarray, shape (M, n_classes)
        Posterior means of the class scores.
    variance : numpy.ndarray, shape (M,)
        Posterior variance of each row's scores (>= 0).
    scale : float, default 1.0
        The calibration scale tau multiplying the variance (:func:`fit_calibration_scale`).
    nodes : int, default ``QUADRATURE_NODES``
        Gauss–Hermite nodes.

    Returns
    -------
    numpy.ndarray, shape (M, n_classes)
        Rows sum to 1.

    Examples
    --------
    >>> p = class_probabilities(np.array([[0.0, 1.0]]), np.array([0.5]))
    >>> bool(np.isclose(p[0, 1], 0.8413447460685429))       # two classes: Phi(1 / sqrt(2 * 0.5))
    True
    """
    return np.exp(log_class_probabilities(mean, variance, scale, nodes))


def _nll_of_logs(logp: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.maximum(logp[np.arange(len(y)), y], LOG_FLOOR)))


def fit_calibration_scale(mean, variance, y, bounds: tuple[float, float] = (-25.0, 25.0)) -> tuple[float, float]:
    """The scale tau minimising the NLL of held-out predictions: ``(tau, nll)``.

    A grid of ``log tau`` from ``bounds[0]`` to ``bounds[1]`` (natural logs, step 2) around
    ``log tau0``, ``tau0 = mean_i Var_c(mean_ic) / mean_i variance_i`` (the scale at which the
    spread of the scores matches their variance), refined by a bounded Brent search between the
    grid neighbours of the best point. Deterministic.

    Parameters
    ----------
    mean : numpy.ndarray, shape (N, n_classes)
        Held-out posterior means (:func:`cnngp.inference.gp.held_out_predictions`).
    variance : numpy.ndarray, shape (N,)
        Their posterior variances.
    y : numpy.ndarray, shape (N,), int
        True labels.
    bounds : (float, float), default (-25, 25)
        The searched range of ``log(tau / tau0)``.

    Returns
    -------
    tau : float
        1.0 when every variance is 0 (tau has no effect), and 1.0 with a
        :class:`CalibrationWarning` when the NLL is smallest at the grid's lower end: the
        held-out predictions are all right (separable), so the NLL falls towards 0 as tau -> 0
        and the data set no scale (the limit would make every probability one-hot, and each
        wrong test prediction cost -LOG_FLOOR ~ 708 nats).
    nll : float
        The held-out mean NLL at tau.
    """
    tau, nll, _ = _fit_scale(mean, variance, y, bounds)
    return tau, nll


def _fit_scale(mean, variance, y, bounds=(-25.0, 25.0)) -> tuple[float, float, bool]:
    """:func:`fit_calibration_scale`, and whether it fell back to tau = 1 (separable)."""
    mu, v = _check_mean_variance(mean, variance)
    labels = np.asarray(y)
    if labels.shape != (mu.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise CNNGPError(f"y must be an integer label vector of shape ({mu.shape[0]},); got {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= mu.shape[1]):
        raise CNNGPError(f"y: labels must be in 0..{mu.shape[1] - 1}")

    def nll(log_tau: float) -> float:
        return _nll_of_logs(log_class_probabilities(mu, v, math.exp(log_tau)), labels)

    if not np.any(v > 0):
        return 1.0, nll(0.0), False
    spread = float(np.mean(np.var(mu, axis=1)))
    centre = math.log(spread / float(np.mean(v))) if spread > 0 else 0.0
    grid = centre + np.arange(float(bounds[0]), float(bounds[1]) + 1.0, 2.0)
    values = np.array([nll(u) for u in grid])
    i = int(np.argmin(values))
    if i == 0:  # no minimum: the held-out predictions are separable (all right)
        warnings.warn(
            f"calibration: the held-out NLL keeps falling as tau -> 0 ({labels.size} held-out predictions, "
            f"{int(np.sum(np.argmax(mu, axis=1) == labels))} right), so they do not determine tau; using tau = 1, "
            "the GP's own posterior variance", CalibrationWarning, stacklevel=3)
        return 1.0, nll(0.0), True
    if i == len(grid) - 1:  # probabilities as flat as the grid allows: the held-out data's verdict
        return math.exp(grid[i]), float(values[i]), False
    res = scipy.optimize.minimize_scalar(nll, bounds=(grid[i - 1], grid[i + 1]), method="bounded",
                                         options={"xatol": 1e-3})
    if res.fun <= values[i]:
        return math.exp(float(res.x)), float(res.fun), False
    return math.exp(grid[i]), float(values[i]), False


def calibrate(K, y, noise_variance: float, folds=None, n_classes: int | None = None) -> tuple[float, float]:
    """The calibration scale of a training set: :func:`fit_calibration_scale` on the held-out
    predictions of ``folds`` (None: exact leave-one-out) at ``noise_variance``.

    Parameters
    ----------
    K : numpy.ndarray, shape (N, N)
        Training kernel.
    y : numpy.ndarray, shape (N,), int
        Training labels (the only labels it sees).
    noise_variance : float
        The sigma^2 of the model.
    folds : sequence of (train_idx, val_idx), int or None
        As for :func:`cnngp.inference.gp.held_out_predictions`.
    n_classes : int, optional

    Returns
    -------
    (tau, held-out NLL at tau)
    """
    tau, nll, _ = _calibrate(K, y, noise_variance, folds, n_classes)
    return tau, nll


def _calibrate(K, y, noise_variance, folds, n_classes) -> tuple[float, float, bool]:
    mean, var = gp.held_out_predictions(K, y, noise_variance, folds, n_classes)
    seen = np.isfinite(var)
    return _fit_scale(mean[seen], var[seen], np.asarray(y)[seen])


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def negative_log_likelihood(probabilities, y) -> float:
    """Mean ``-log P(true class)``; probabilities below the smallest normal float64 count as it.

    >>> negative_log_likelihood(np.array([[0.5, 0.5], [0.25, 0.75]]), np.array([0, 1]))  # (ln 2 + ln 4/3)/2
    0.4904146265058631
    """
    p, labels = _check_probabilities(probabilities, y)
    with np.errstate(divide="ignore"):
        return _nll_of_logs(np.log(p), labels)


def reliability(probabilities, y, n_bins: int = ECE_BINS) -> dict:
    """The data of a reliability diagram (top-label): per equal-width confidence bin.

    Bin b of ``n_bins`` holds the points whose confidence ``max_c P(c)`` lies in
    ``(b / n_bins, (b + 1) / n_bins]`` (the first bin also holds 0).

    Returns
    -------
    dict of lists, one entry per bin
        ``edges`` (n_bins + 1), ``count``, ``confidence`` (mean confidence in the bin, None
        when empty), ``accuracy`` (fraction whose most probable class is the true one, None
        when empty); and ``n_bins``, ``n``.
    """
    p, labels = _check_probabilities(probabilities, y)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise CNNGPError(f"n_bins must be an integer >= 1; got {n_bins!r}")
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == labels
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    conf_sum = np.bincount(b, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(b, weights=correct.astype(np.float64), minlength=n_bins)
    return {
        "n_bins": int(n_bins),
        "n": int(len(labels)),
        "edges": [float(e) for e in np.linspace(0.0, 1.0, n_bins + 1)],
        "count": [int(k) for k in count],
        "confidence": [float(s / k) if k else None for s, k in zip(conf_sum, count)],
        "accuracy": [float(s / k) if k else None for s, k in zip(acc_sum, count)],
    }


def expected_calibration_error(probabilities, y, n_bins: int = ECE_BINS) -> float:
    """``ECE = sum_b (n_b / n) |accuracy_b - confidence_b|`` over the bins of :func:`reliability`.

    >>> expected_calibration_error(np.array([[0.9, 0.1], [0.6, 0.4]]), np.array([0, 1]), n_bins=2)
    0.25
    """
    r = reliability(probabilities, y, n_bins)
    return float(sum(k * abs(a - c) for k, a, c in zip(r["count"], r["accuracy"], r["confidence"]) if k)
                 / r["n"])


def classification_metrics(probabilities, y, n_bins: int = ECE_BINS) -> dict:
    """``accuracy`` (of the most probable class), ``nll``, ``ece`` and ``reliability``."""
    p, labels = _check_probabilities(probabilities, y)
    return {
        "accuracy": float(np.mean(p.argmax(axis=1) == labels)),
        "nll": negative_log_likelihood(p, labels),
        "ece": expected_calibration_error(p, labels, n_bins),
        "reliability": reliability(p, labels, n_bins),
    }


def test_scores(K_train, y_train, K_test_train, test_prior, y_test, noise_variance: float,
                folds=None, n_classes: int | None = None) -> dict:
    """A GP classifier's test accuracy, NLL and ECE, its probabilities calibrated on the
    training set alone.

    tau from :func:`calibrate` (``K_train``, ``y_train``, ``folds``, ``noise_variance``), then
    the test points' posterior means and variances and :func:`class_probabilities`.

    Parameters
    ----------
    K_train : (N, N); y_train : (N,) int; K_test_train : (M, N)
    test_prior : (M,) the test points' prior variances k(x*, x*)
    y_test : (M,) int, used only for the scores
    noise_variance : float
    folds : as for :func:`calibrate` (None: leave-one-out)
    n_classes : int, optional

    Returns
    -------
    dict
        :func:`classification_metrics` plus ``calibration_scale``, ``calibration_nll`` (the
        held-out NLL on the training set at that scale), ``calibration_separable`` (True: every
        held-out prediction was right, so tau fell back to 1, :func:`fit_calibration_scale`) and ``mean_posterior_variance``; and per
        test point (arrays, for paired comparisons): ``predicted`` (M,) the most probable class
        and ``log_prob_true`` (M,) the log probability of its label (at least ``LOG_FLOOR``, as
        in the NLL).
    """
    K_train = np.asarray(K_train, dtype=np.float64)
    y_train = np.asarray(y_train)
    k_cls = int(np.max(y_train)) + 1 if n_classes is None else int(n_classes)
    tau, cal_nll, separable = _calibrate(K_train, y_train, noise_variance, folds, k_cls)
    mean = gp.posterior_mean(K_train, y_train, K_test_train, noise_variance, k_cls)
    var = gp.posterior_variance(K_train, K_test_train, test_prior, noise_variance)
    labels = np.asarray(y_test)
    if labels.shape != (mean.shape[0],):
        raise CNNGPError(f"y_test has shape {labels.shape} but K_test_train has {mean.shape[0]} rows")
    log_p = log_class_probabilities(mean, var, tau)
    out = classification_metrics(np.exp(log_p), labels)
    out.update(calibration_scale=float(tau), calibration_nll=float(cal_nll), calibration_separable=separable,
               mean_posterior_variance=float(np.mean(var)),
               # per test point, for paired comparisons of models on the same points
               predicted=np.argmax(mean, axis=1),
               log_prob_true=np.maximum(log_p[np.arange(len(labels)), labels], LOG_FLOOR))
    return out


test_scores.__test__ = False  # not a pytest test despite the name

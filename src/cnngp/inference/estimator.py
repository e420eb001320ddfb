"""scikit-learn classifiers: GP classification with the NNGP kernel of an infinite CNN.

:class:`CNNGPClassifier` is the paper's classifier (docs/maths.md §5) with fixed readout
correlation and noise variance σ²: regression on one-hot targets minus ``1/n_classes``,
prediction by the argmax of the posterior mean ``K_*X (K_XX + σ² I)⁻¹ Y``.
:class:`CNNGPClassifierCV` chooses the readout lengthscale λ and σ² by cross-validation
(exact leave-one-out by default, like ``RidgeCV``): one kernel pass serves every λ
(:func:`cnngp.readout_sweep`) and one eigendecomposition per kernel serves every σ².

Inputs
------
Images are arrays ``(n_samples, *spatial, channels)``, channels last (1, 2 or 3 spatial
dimensions), e.g. ``(N, 8, 8, 1)`` digits or ``(N, 32, 32, 3)`` CIFAR-10. A 2-D array
``(n_samples, n_features)`` — what most scikit-learn tools pass — is reshaped to
``(n_samples, *image_shape)``; with the default ``image_shape=None`` each row is a 1-D
signal of ``n_features`` positions and one channel, ``(n_samples, n_features, 1)``. For
flattened images pass their shape, e.g. ``image_shape=(8, 8, 1)`` for ``load_digits().data``.
``image_shape="channels"`` makes each row a single position with ``n_features`` channels,
``(n_samples, 1, n_features)``: with 1×1 convolutions this is the NNGP of a fully connected
network, usable for tabular data of any width (the 3-tap convolutions of the named
architectures need signals of at least 3 positions). Pixel values are used as given (the
paper scales pixels to [0, 1]). ``zca=ε`` whitens them first by regularised ZCA
(:mod:`cnngp.io.preprocess`), fitted in ``fit`` on the training X only (``zca_``) and applied
to every X that ``predict`` and ``decision_function`` see; ``zca=`` a whitening fitted
beforehand (:func:`cnngp.io.preprocess.fit_zca`, e.g. on other, unlabelled images) is applied
as it is, to training and new X alike.

Notes
-----
The estimators pass ``sklearn.utils.estimator_checks`` (see ``tests/test_estimator.py``).
``decision_function`` returns the posterior means (for two classes, the difference
``mean[:, 1] - mean[:, 0]``, positive for ``classes_[1]``). ``predict_proba`` gives class
probabilities that use the GP posterior variance s² of each test point (docs/maths.md §5.1,
:mod:`cnngp.inference.calibration`): independent Gaussian class scores
``f_c ~ N(mean_c, τ s²)``, ``P(c) = P(f_c is the largest)`` by quadrature, where the calibration
scale τ (``calibration_scale_``) minimises the negative log likelihood of the training set's
held-out predictions (leave-one-out, or the folds of ``cv``) at the fitted σ². Their most probable
class is ``predict``'s. ``predict(X, return_std=True)`` also returns the posterior standard
deviation s of the class scores (the GP's own, without τ). Because s differs between test points,
``predict_proba`` does not rank points as ``decision_function`` does (scikit-learn's
``check_decision_proba_consistency`` is an expected failure).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from cnngp.inference import gp
from cnngp.inference.calibration import calibrate, class_probabilities
from cnngp.inference.selection import TIE_ATOL, first_best
from cnngp.kernels.correlations import ENDS, FAMILIES, Correlation, parse_lengthscale
from cnngp.kernels.correlations import family as correlation_family
from cnngp.errors import CNNGPError
from cnngp.kernels.layers import Readout, Serial
from cnngp.validation import as_images, non_negative_real

__all__ = ["CNNGPClassifier", "CNNGPClassifierCV"]

def _correlation(correlation, lengthscale, template: Readout) -> Correlation:
    """A Correlation from the estimator's ``correlation`` / ``lengthscale`` parameters."""
    if correlation is None:
        if lengthscale is not None:
            raise CNNGPError(
                "lengthscale is set but correlation is None; give a family as well, e.g. "
                "correlation='matern32'"
            )
        return template.correlation
    if isinstance(correlation, Correlation):
        if lengthscale is not None:
            raise CNNGPError("lengthscale cannot be combined with a Correlation instance")
        return correlation
    names = sorted(ENDS) + sorted(FAMILIES)
    if not isinstance(correlation, str):
        raise CNNGPError(
            f"correlation must be None, a cnngp Correlation or one of {names}; got {correlation!r}"
        )
    key = correlation.strip().lower()
    if key in ENDS:
        return ENDS[key]()
    if key not in FAMILIES:
        raise CNNGPError(
            f"correlation={correlation!r} is unknown; expected one of {names} or a cnngp Correlation"
        )
    if lengthscale is None:
        raise CNNGPError(f"correlation={correlation!r} needs a lengthscale, e.g. lengthscale=2.0")
    return correlation_family(key, parse_lengthscale(lengthscale))


def _split(arch) -> tuple[Serial, Readout]:
    from cnngp.io.architectures import split_network

    body, template, _ = split_network(arch)
    return body, template


def _check_scale(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(float(value)) and float(value) > 0):
        raise CNNGPError(f"calibration_scale must be None or a finite number > 0; got {value!r}")
    return float(value)


class _CNNGPBase(ClassifierMixin, BaseEstimator):
    """Shared input handling, prediction and tags."""

    # -- inputs ---------------------------------------------------------------------
    def _images(self, X: np.ndarray) -> np.ndarray:
        shape = self.image_shape
        if isinstance(shape, str):
            if shape != "channels":
                raise CNNGPError(
                    f"image_shape must be None, 'channels' or a tuple (*spatial, channels); "
                    f"got {shape!r}"
                )
            if X.ndim != 2:
                raise CNNGPError("image_shape='channels' applies to 2-D X (n_samples, n_features)")
            return self._writable(X.reshape(X.shape[0], 1, X.shape[1]))
        if X.ndim == 2:
            if shape is None:
                return self._writable(X.reshape(X.shape[0], X.shape[1], 1))
            try:
                shape = tuple(int(s) for s in shape)
            except TypeError:
                raise CNNGPError(
                    f"image_shape must be a tuple (*spatial, channels); got {shape!r}"
                ) from None
            if len(shape) < 2 or math.prod(shape) != X.shape[1] or min(shape) < 1:
                raise CNNGPError(
                    f"image_shape={shape} does not fit {X.shape[1]} features per sample; "
                    "give (*spatial, channels) whose product is n_features, e.g. (8, 8, 1)"
                )
            return self._writable(X.reshape((X.shape[0],) + shape))
        if shape is not None and tuple(X.shape[1:]) != tuple(int(s) for s in shape):
            raise CNNGPError(
                f"X has images of shape {X.shape[1:]} but image_shape={tuple(shape)}"
            )
        return self._writable(X)

    @staticmethod
    def _writable(x: np.ndarray) -> np.ndarray:
        # the package's one image-array policy (uint8 scaled by 1/255, bool 0/1, finite and
        # bounded values, any strides), as in cnngp.kernel and the command line
        return as_images(x, "X")

    def _validate_fit(self, X, y):
        X, y = validate_data(self, X, y, allow_nd=True, dtype="numeric")
        self._fit_sample_shape = tuple(int(s) for s in X.shape[1:])
        check_classification_targets(y)
        classes, y_enc = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise CNNGPError(
                f"{type(self).__name__} needs at least 2 classes to fit; got 1 class "
                f"({classes[0]!r}) in y"
            )
        self.classes_ = classes
        return self._images(X), y_enc.astype(np.int64)

    def _execution(self):
        """The :class:`cnngp.Execution` of the estimator's kernel computations, from its
        sklearn-style parameters."""
        from cnngp.engine.execution import Execution

        return Execution(dtype=self.dtype, device=self.device, engine=getattr(self, "engine", "auto"),
                         batch_size=self.batch_size, memory_budget=self.memory_budget,
                         progress=bool(self.verbose))

    def _kernel(self, network, x1, x2=None) -> np.ndarray:
        from cnngp.engine.gram import kernel

        return kernel(network, x1, x2, flip=self._flip(), execution=self._execution()).double().numpy()

    def _flip(self) -> bool:
        """The ``flip`` parameter, checked: the flip-averaged kernel (docs/maths.md §9)."""
        if not isinstance(self.flip, (bool, np.bool_)):
            raise CNNGPError(f"flip must be True or False; got {self.flip!r}")
        return bool(self.flip)

    def _whiten_fit(self, images: np.ndarray) -> np.ndarray:
        """Fit the ZCA whitening (``zca``) on the training images, or take the one given;
        ``zca_`` (None without)."""
        from cnngp.io.preprocess import ZCAWhitening, check_zca_mirror, check_zca_strength, fit_zca

        if self.zca is None:
            if self.zca_mirror is not None:
                check_zca_mirror(self.zca_mirror, None, self.flip)  # refused: no whitening to fit
            self.zca_ = None
            return images
        if isinstance(self.zca, ZCAWhitening):  # fitted beforehand (other images): applied as it is
            if self.zca_mirror is not None:
                raise CNNGPError("zca_mirror: says how zca is fitted, but zca is a whitening fitted beforehand; "
                                 "fit it with fit_zca(..., mirror=True) instead")
            self.zca_ = self.zca
        else:
            mirror = check_zca_mirror(self.zca_mirror, self.zca, self._flip())
            self.zca_ = fit_zca(images, check_zca_strength(self.zca, "zca"), name="X", mirror=mirror)
        return self.zca_.transform(images, "X")

    def _set_fit(self, images, network, K, y_enc, noise, folds=None):
        # dual coefficients (K + σ² I)⁻¹ Y: the posterior mean at the training inputs'
        # unit vectors, so the solve (Cholesky, or eigh fallback) is the one of gp.posterior_mean
        n = K.shape[0]
        self.dual_coef_ = gp.posterior_mean(K, y_enc, np.eye(n), noise, len(self.classes_))
        self.X_fit_ = images
        self.network_ = network
        # the posterior variance's factor, and the calibration scale τ from held-out predictions
        # of the training set alone (folds=None: leave-one-out), docs/maths.md §5.1
        with gp.small_problem_threads(n):
            self._posterior = gp.PosteriorFactor(K, noise)
            if self.calibration_scale is None:
                try:
                    tau, nll = calibrate(K, y_enc, noise, folds, len(self.classes_))
                except CNNGPError as e:  # say which step needs the held-out predictions
                    raise CNNGPError(
                        f"calibration_scale: choosing it (calibration_scale=None) needs the training set's "
                        f"held-out predictions at noise_variance={noise:g}, and {e}; or give calibration_scale "
                        "(1.0: the GP's own posterior variance)") from None
                self.calibration_scale_, self.calibration_nll_ = float(tau), float(nll)
            else:
                self.calibration_scale_ = _check_scale(self.calibration_scale)
                self.calibration_nll_ = None

    def _prior_variances(self, network, images) -> np.ndarray:
        """k(x, x) of every image: the test points' prior variances (N pairs, not N²)."""
        from cnngp.engine.gram import kernel_diagonal

        return kernel_diagonal(network, images, flip=self._flip(), execution=self._execution()).double().numpy()

    # -- prediction -----------------------------------------------------------------
    def _posterior_mean(self, X, variance: bool = False):
        check_is_fitted(self, "dual_coef_")
        self._check_sample_shape(X)
        X = validate_data(self, X, reset=False, allow_nd=True, dtype="numeric")
        images = self._images(X)
        if getattr(self, "zca_", None) is not None:  # the training images' whitening
            images = self.zca_.transform(images, "X")
        Ks = self._kernel(self.network_, images, self.X_fit_)
        if not variance:
            return Ks @ self.dual_coef_
        prior = self._prior_variances(self.network_, images)
        return Ks @ self.dual_coef_, self._posterior.variance(Ks, prior)

    def _check_sample_shape(self, X) -> None:
        """Images of another shape than fit's: said in image terms (scikit-learn's own message
        counts only the second axis, "X has 64 features, but ... is expecting 8"). 2-D against
        2-D, and anything but an array of at least 2 dimensions, is left to scikit-learn."""
        fitted, shape = getattr(self, "_fit_sample_shape", None), getattr(X, "shape", None)
        if fitted is None or not isinstance(shape, tuple) or len(shape) < 2:
            return  # lists and 1-D arrays: scikit-learn's own checks
        given = tuple(int(s) for s in shape[1:])
        if given == fitted or (len(fitted) == 1 and len(given) == 1):
            return
        hint = (f"; it holds as many values per sample, so reshape it to (n_samples, {', '.join(map(str, fitted))})"
                if math.prod(given) == math.prod(fitted) else "")
        what = " (*spatial, channels)" if len(fitted) > 1 else ""
        raise CNNGPError(f"X: the estimator was fitted on samples of shape {fitted}{what}, got {given}{hint}")

    def decision_function(self, X) -> np.ndarray:
        """GP posterior means of the centred one-hot targets.

        Parameters
        ----------
        X : array, shape (n_samples, *spatial, channels) or (n_samples, n_features)

        Returns
        -------
        numpy.ndarray, shape (n_samples, n_classes), or (n_samples,) for two classes
            (``mean[:, 1] - mean[:, 0]``, positive means ``classes_[1]``).
        """
        mean = self._posterior_mean(X)
        if len(self.classes_) == 2:
            return mean[:, 1] - mean[:, 0]
        return mean

    def predict(self, X, return_std: bool = False):
        """Class of the largest posterior mean (also the most probable class of
        :meth:`predict_proba`).

        Parameters
        ----------
        X : array, shape (n_samples, *spatial, channels) or (n_samples, n_features)
        return_std : bool, default False
            Also return the GP posterior standard deviation of the class scores at each point,
            ``sqrt(k(x, x) - k_x^T (K + σ² I)⁻¹ k_x)`` (shared by every class; without the
            calibration scale, which :meth:`predict_proba` multiplies the variance by).

        Returns
        -------
        labels : numpy.ndarray, shape (n_samples,)
        std : numpy.ndarray, shape (n_samples,)
            Only with ``return_std``.
        """
        if not return_std:
            mean = self._posterior_mean(X)
            return self.classes_[np.argmax(mean, axis=1)]
        mean, var = self._posterior_mean(X, variance=True)
        return self.classes_[np.argmax(mean, axis=1)], np.sqrt(var)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities from the GP posterior (module notes, docs/maths.md §5.1).

        ``P(c) = P(f_c = max_k f_k)`` for independent scores ``f_k ~ N(mean_k, τ s²)``: the
        posterior means, the posterior variance s² of the point, and the calibration scale
        τ = ``calibration_scale_`` fitted on the training set.

        Parameters
        ----------
        X : array, shape (n_samples, *spatial, channels) or (n_samples, n_features)

        Returns
        -------
        numpy.ndarray, shape (n_samples, n_classes)
            Columns in the order of ``classes_``; rows sum to 1.
        """
        mean, var = self._posterior_mean(X, variance=True)
        return class_probabilities(mean, var, self.calibration_scale_)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True  # images (N, H, W, C) are accepted as they are
        tags.non_deterministic = False
        return tags


class CNNGPClassifier(_CNNGPBase):
    """GP classifier with the NNGP kernel of an infinitely wide CNN (docs/maths.md §5).

    Parameters
    ----------
    arch : str, dict or cnngp.Serial, default "cnngp2"
        Named architecture (``"cnngp4"``, ``"myrtle10-paper"``, …), JSON spec file, spec
        dict, or network. Its readout's weight/bias variances are kept.
    correlation : None, str or cnngp.Correlation, default None
        Readout correlation over the last grid: None keeps the architecture's own readout;
        ``"independent"``, ``"constant"`` (mean pooling), or a family ``"matern12"``,
        ``"matern32"``, ``"matern52"``, ``"rbf"`` with ``lengthscale``.
    lengthscale : float or "inf", optional
        λ of a family correlation, in index units of the readout's grid.
    noise_variance : float, default 1e-3
        Observation noise σ² added to the kernel diagonal.
    image_shape : None, "channels" or tuple, optional
        Shape ``(*spatial, channels)`` of one sample when X is 2-D; default: each row
        is a 1-D signal with one channel; ``"channels"``: one position with
        ``n_features`` channels (see the module notes).
    dtype, device, batch_size, memory_budget, engine
        The execution options of the kernel computations (:class:`cnngp.Execution`, README
        "Execution options"); the solve is always float64.
    verbose : bool, default False
        Progress bars over kernel computations (the execution option ``progress``).
    zca : float or cnngp.io.preprocess.ZCAWhitening, optional
        Regularised ZCA whitening of strength ε >= 0 (a fraction of the mean eigenvalue,
        :mod:`cnngp.io.preprocess`), fitted on the training X in ``fit`` and applied to the X
        of ``predict``/``decision_function``; or a whitening fitted beforehand
        (:func:`cnngp.io.preprocess.fit_zca` on other images), applied as it is. Default None:
        no whitening.
    flip : bool, default False
        Use the flip-averaged kernel ½[K(x, x') + K(x, flip x')] (horizontal flips,
        docs/maths.md §9) for training and prediction alike; refused in ``fit`` for a network or
        readout that is not flip-symmetric. About twice the kernel work. With ``zca`` the
        whitening is then fitted mirror-symmetric (``zca_mirror``), so that predictions are
        invariant to mirroring the images.
    calibration_scale : float, optional
        The scale τ of the posterior variance in :meth:`predict_proba`. Default None: chosen in
        ``fit`` by minimising the negative log likelihood of the training set's held-out
        predictions (exact leave-one-out; the folds of ``cv`` for :class:`CNNGPClassifierCV`);
        ``1.0`` is the GP's own posterior.
    zca_mirror : bool, optional
        With a ``zca`` strength: fit the whitening on the training X and their mirror images,
        so that it commutes with horizontal flips (:func:`cnngp.io.preprocess.fit_zca`).
        Default None: as ``flip``.

    Attributes
    ----------
    classes_ : numpy.ndarray, shape (n_classes,)
    X_fit_ : numpy.ndarray, shape (n_samples, *spatial, channels)
        The training images (whitened with ``zca``).
    zca_ : cnngp.io.preprocess.ZCAWhitening or None
        The whitening fitted on the training X (None without ``zca``).
    dual_coef_ : numpy.ndarray, shape (n_samples, n_classes)
        ``(K + σ² I)⁻¹ Y`` for the centred one-hot targets Y.
    network_ : cnngp.Serial
        The network with the chosen readout.
    calibration_scale_ : float
        τ of :meth:`predict_proba` (``calibration_scale``, or fitted).
    calibration_nll_ : float or None
        The held-out negative log likelihood at the fitted τ (None when τ was given).
    n_features_in_ : int

    Examples
    --------
    >>> from cnngp.io.data import load_digits
    >>> x, y = load_digits()
    >>> clf = CNNGPClassifier("cnngp1", correlation="matern32", lengthscale=3.0)
    >>> clf.fit(x[:100], y[:100]).score(x[100:150], y[100:150]) > 0.8   # doctest: +SKIP
    True
    """

    def __init__(
        self,
        arch="cnngp2",
        correlation=None,
        lengthscale=None,
        noise_variance=1e-3,
        image_shape=None,
        dtype="float64",
        device="cpu",
        batch_size=None,
        memory_budget=None,
        verbose=False,
        engine="auto",
        zca=None,
        flip=False,
        calibration_scale=None,
        zca_mirror=None,
    ):
        self.arch = arch
        self.calibration_scale = calibration_scale
        self.correlation = correlation
        self.lengthscale = lengthscale
        self.noise_variance = noise_variance
        self.image_shape = image_shape
        self.dtype = dtype
        self.device = device
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.verbose = verbose
        self.engine = engine
        self.zca = zca
        self.flip = flip
        self.zca_mirror = zca_mirror

    def fit(self, X, y):
        """Compute the training kernel and solve for the dual coefficients.

        Parameters
        ----------
        X : array, shape (n_samples, *spatial, channels) or (n_samples, n_features)
        y : array, shape (n_samples,)

        Returns
        -------
        self
        """
        noise = non_negative_real(self.noise_variance, "noise_variance")
        images, y_enc = self._validate_fit(X, y)
        images = self._whiten_fit(images)
        body, template = _split(self.arch)
        corr = _correlation(self.correlation, self.lengthscale, template)
        network = Serial(body, template.with_correlation(corr))
        K = self._kernel(network, images)
        self._set_fit(images, network, K, y_enc, noise)
        return self


class CNNGPClassifierCV(_CNNGPBase):
    """GP classifier whose readout lengthscale λ and noise σ² are chosen by cross-validation.

    Every λ's kernel comes from one pass of the kernel engine to the last hidden layer
    (:func:`cnngp.readout_sweep`); every σ² from one eigendecomposition per kernel (and
    fold). The selected (λ, σ²) maximises the cross-validated accuracy; among ties (scores
    within :data:`cnngp.inference.selection.TIE_ATOL`, as the sweep's) the first λ of
    ``lengthscales`` wins, the others listed in ``tied_lengthscales_``, and, for it, the
    largest tied σ² (the best-conditioned solve). The final model is refitted on all data.

    Parameters
    ----------
    arch : str, dict or cnngp.Serial, default "cnngp2"
        As for :class:`CNNGPClassifier`.
    correlation : {"matern32", "matern12", "matern52", "rbf"}, default "matern32"
        Family of the readout correlation.
    lengthscales : sequence of float, optional
        Candidate λ (index units of the readout's grid; ``0`` = independent, ``inf`` =
        mean pooling, both exact). Default: ``0``, the paper's
        ``10^linspace(-1.5, 4.5, 25)`` and ``inf``.
    noise_variances : sequence of float, optional
        Candidate σ². Default: the paper's 1000 log-spaced values in
        ``[max(c, e^-36), e^5]``, ``c`` making every kernel that is eigendecomposed
        positive definite (one grid shared by all λ).
    cv : None, int or CV splitter, default None
        None: exact leave-one-out (as ``RidgeCV``); int k: shuffled stratified k-fold
        (seeded by ``random_state``); or an object with ``split(X, y)`` / an iterable of
        (train, validation) index arrays.
    random_state : int, default 0
        Seed of the stratified folds.
    search : {"grid", "gradient"}, default "grid"
        ``"grid"``: every λ of ``lengthscales`` and σ² of ``noise_variances`` by CV accuracy.
        ``"gradient"``: λ, the readout amplitude and σ² maximise ``objective`` by L-BFGS-B on
        the exact offset-sum readout (docs/maths.md §8; ``lengthscales`` then gives the
        starting λ, default 0.3, 3, 30); ``best_score_`` is the CV accuracy (``cv``) at
        the learned values, and ``cv_results_`` holds the one learned candidate.
    objective : {"mll", "loo"}, default "mll"
        With ``search="gradient"``: the GP log marginal likelihood or the leave-one-out log
        predictive density.
    image_shape, dtype, device, batch_size, memory_budget, verbose, engine
        As for :class:`CNNGPClassifier`.
    zca : float or cnngp.io.preprocess.ZCAWhitening, optional
        As for :class:`CNNGPClassifier`. A strength is fitted on all of the training X before
        the cross-validation (every fold shares it; unlabelled statistics of training images).
        Its held-out folds are thus whitened in sample and new images out of sample, which for
        fewer images than pixels differ (README, "Regularised ZCA whitening"): to select on
        images whitened as new ones are, pass a whitening fitted on other, unlabelled images,
        ``zca=fit_zca(other_images, 0.1)`` (:func:`cnngp.io.preprocess.fit_zca`), as the
        sweep's ``zca_fit="rest"`` does.
    flip : bool, default False
        As for :class:`CNNGPClassifier`: every λ's kernel flip-averaged (with
        ``search="gradient"``, learned from the flip-averaged offset sums).
    calibration_scale : float, optional
        As for :class:`CNNGPClassifier`; fitted on the folds of ``cv`` (leave-one-out by default)
        at the selected λ and σ².
    zca_mirror : bool, optional
        As for :class:`CNNGPClassifier` (default: as ``flip``).

    Attributes
    ----------
    lengthscale_ : float
        Selected λ (``0.0`` or ``inf`` for the exact ends).
    amplitude_ : float
        The readout's weight_var of the final model (the template's for ``search="grid"``,
        learned for ``"gradient"``).
    noise_variance_ : float
        Selected σ².
    best_score_ : float
        Cross-validated accuracy of the selection.
    best_index_ : int
        Index of ``lengthscale_`` in ``cv_results_["lengthscale"]``.
    tied_lengthscales_ : numpy.ndarray
        Every λ whose score ties the best (``lengthscale_`` first): how much the choice
        rests on the tie-break.
    cv_results_ : dict of numpy arrays, one entry per candidate λ
        ``"lengthscale"``, ``"mean_test_score"`` (best over σ²), ``"std_test_score"``
        (over folds), ``"split{i}_test_score"``, ``"noise_variance"`` (the largest σ²
        reaching that score), ``"rank_test_score"``. Leave-one-out counts as one split
        (``split0_test_score`` is the leave-one-out accuracy, ``std_test_score`` 0).
    noise_variances_ : numpy.ndarray, shape (n_noise,)
        The σ² grid.
    cv_scores_ : numpy.ndarray, shape (n_lengthscales, n_noise)
        Mean cross-validated accuracy of every (λ, σ²).
    calibration_scale_, calibration_nll_
        As for :class:`CNNGPClassifier`, on the folds of ``cv``.
    classes_, X_fit_, zca_, dual_coef_, network_, n_features_in_
        As for :class:`CNNGPClassifier`.
    """

    def __init__(
        self,
        arch="cnngp2",
        correlation="matern32",
        lengthscales=None,
        noise_variances=None,
        cv=None,
        random_state=0,
        search="grid",
        objective="mll",
        image_shape=None,
        dtype="float64",
        device="cpu",
        batch_size=None,
        memory_budget=None,
        verbose=False,
        engine="auto",
        zca=None,
        flip=False,
        calibration_scale=None,
        zca_mirror=None,
    ):
        self.arch = arch
        self.calibration_scale = calibration_scale
        self.correlation = correlation
        self.lengthscales = lengthscales
        self.noise_variances = noise_variances
        self.cv = cv
        self.random_state = random_state
        self.search = search
        self.objective = objective
        self.image_shape = image_shape
        self.dtype = dtype
        self.device = device
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.verbose = verbose
        self.engine = engine
        self.zca = zca
        self.flip = flip
        self.zca_mirror = zca_mirror

    def _candidate_lengthscales(self) -> list[float]:
        from cnngp.kernels.correlations import PAPER_LENGTHSCALES

        if self.lengthscales is None:
            return [0.0, *PAPER_LENGTHSCALES, math.inf]
        values = np.atleast_1d(np.asarray(self.lengthscales, dtype=object))
        if values.ndim != 1 or values.size == 0:
            raise CNNGPError(f"lengthscales must be a non-empty 1-D sequence; got {self.lengthscales!r}")
        return [parse_lengthscale(v, "lengthscales") for v in values.tolist()]

    def _folds(self, X, y_enc):
        n = len(y_enc)
        if self.cv is None:
            return None
        if isinstance(self.cv, numbers.Integral) and not isinstance(self.cv, bool):
            return gp.stratified_folds(y_enc, int(self.cv), self.random_state)
        if hasattr(self.cv, "split"):
            splits = self.cv.split(np.zeros((n, 1)), y_enc)
        else:
            try:
                splits = iter(self.cv)
            except TypeError:
                raise CNNGPError(
                    f"cv must be None (leave-one-out), an int, a CV splitter or an iterable of "
                    f"(train, validation) index arrays; got {self.cv!r}"
                ) from None
        return [(np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64)) for tr, va in splits]

    @staticmethod
    def _cross_validate(Ks, y_enc, folds, noise, n_classes):
        if noise is None:  # one grid for every λ, so their scores are comparable
            if folds is None:
                mats = list(Ks)
            else:
                mats = [K[np.ix_(tr, tr)] for K in Ks for tr, _ in folds]
            noise = gp.noise_grid(mats)
        results = []
        for K in Ks:
            if folds is None:
                results.append(gp.leave_one_out(K, y_enc, noise, n_classes))
            else:
                results.append(gp.cross_validate(K, y_enc, folds, noise, n_classes))
        return results, noise

    def fit(self, X, y):
        """Compute one kernel per λ, cross-validate every (λ, σ²), refit the best.

        Parameters
        ----------
        X : array, shape (n_samples, *spatial, channels) or (n_samples, n_features)
        y : array, shape (n_samples,)

        Returns
        -------
        self
        """
        from cnngp.engine.gram import readout_sweep
        family = self.correlation
        if not isinstance(family, str) or family.strip().lower() not in FAMILIES:
            raise CNNGPError(
                f"correlation must be one of {sorted(FAMILIES)} for {type(self).__name__}; "
                f"got {family!r}"
            )
        family = family.strip().lower()
        if self.search not in ("grid", "gradient"):
            raise CNNGPError(f"search must be 'grid' or 'gradient'; got {self.search!r}")
        if self.search == "gradient":
            return self._fit_gradient(X, y, family)
        lams = self._candidate_lengthscales()
        noise = None
        if self.noise_variances is not None:
            noise = np.atleast_1d(np.asarray(self.noise_variances, dtype=np.float64))
            if noise.ndim != 1 or noise.size == 0 or not np.all(np.isfinite(noise)) or np.any(noise < 0):
                raise CNNGPError(
                    "noise_variances must be a non-empty 1-D sequence of finite numbers >= 0; "
                    f"got {self.noise_variances!r}"
                )
        images, y_enc = self._validate_fit(X, y)
        images = self._whiten_fit(images)
        n_classes = len(self.classes_)
        folds = self._folds(images, y_enc)

        body, template = _split(self.arch)
        readouts = [
            template.with_correlation(correlation_family(family, v))
            for v in lams
        ]
        Ks = readout_sweep(body, readouts, images, flip=self._flip(), execution=self._execution()).double().numpy()

        with gp.small_problem_threads(len(y_enc)):
            results, noise = self._cross_validate(Ks, y_enc, folds, noise, n_classes)
        scores = np.stack([r.accuracy for r in results])  # (L, J)
        # the first λ reaching the best score, with the largest σ² that reaches it there:
        # ties are common (accuracy is discrete) and the largest tied σ² is the best
        # conditioned, so predictions do not hinge on rounding in the kernel
        # (a σ² below a kernel's conditioning floor, only in a grid passed in, scores NaN)
        mean = np.nanmax(scores, axis=1)
        best_j = [int(np.flatnonzero(row >= top - TIE_ATOL)[-1]) for row, top in zip(scores, mean)]
        i, tied = first_best(mean)  # the first λ among ties, as the sweep chooses
        j = best_j[i]

        cv_results = {
            "lengthscale": np.array(lams, dtype=np.float64),
            "noise_variance": np.array([noise[k] for k in best_j]),
            "mean_test_score": mean,
            "std_test_score": np.array(
                [r.fold_accuracies[:, k].std() for r, k in zip(results, best_j)]
            ),
        }
        n_splits = results[0].fold_accuracies.shape[0]
        for s in range(n_splits):
            cv_results[f"split{s}_test_score"] = np.array(
                [r.fold_accuracies[s, k] for r, k in zip(results, best_j)]
            )
        order = np.argsort(-mean, kind="stable")
        rank = np.empty(len(lams), dtype=np.int32)
        rank[order] = np.arange(1, len(lams) + 1)
        # equal scores share the better rank, as in GridSearchCV
        for a in range(1, len(order)):
            if mean[order[a]] >= mean[order[a - 1]] - TIE_ATOL:
                rank[order[a]] = rank[order[a - 1]]
        cv_results["rank_test_score"] = rank

        self.cv_results_ = cv_results
        self.cv_scores_ = scores
        self.noise_variances_ = np.asarray(noise)
        self.best_index_ = int(i)
        self.tied_lengthscales_ = np.array([lams[k] for k in tied], dtype=np.float64)
        self.best_score_ = float(scores[i, j])
        self.lengthscale_ = float(lams[i])
        self.noise_variance_ = float(noise[j])
        self.amplitude_ = float(template.weight_var)
        network = Serial(body, readouts[i])
        self._set_fit(images, network, Ks[i], y_enc, self.noise_variance_, folds)
        return self

    def _fit_gradient(self, X, y, family):
        """search="gradient": offset sums once, then L-BFGS-B on (λ, amplitude, σ²)."""
        from cnngp.engine.gram import offset_sums
        from cnngp.inference.learn import OBJECTIVES, OffsetReadout, learn_readout

        if self.objective not in OBJECTIVES:
            raise CNNGPError(f"objective must be one of {OBJECTIVES}; got {self.objective!r}")
        starts = (0.3, 3.0, 30.0) if self.lengthscales is None else [
            v for v in self._candidate_lengthscales() if 0 < v < math.inf]
        if not starts:
            raise CNNGPError("lengthscales: search='gradient' needs starting values with 0 < λ < inf")
        images, y_enc = self._validate_fit(X, y)
        images = self._whiten_fit(images)
        n_classes = len(self.classes_)
        body, template = _split(self.arch)
        grid = body.grids(tuple(images.shape[1:-1]))[-1]
        if not grid:
            raise CNNGPError(f"arch: its last hidden layer has no spatial grid, so {type(self).__name__} "
                             "has no readout λ to learn")
        S = offset_sums(body, images, flip=self._flip(), execution=self._execution()).double()
        readout = OffsetReadout(S, grid, family, template.bias_var)
        with gp.small_problem_threads(len(y_enc)):
            result = learn_readout(readout, y_enc, objective=self.objective, n_classes=n_classes, starts=starts)
            lam, amp = result.learned["lengthscale"], result.learned["amplitude"]
            noise = result.learned["noise_variance"]
            K = readout.kernel(lam, amp).detach().numpy()
            folds = self._folds(images, y_enc)
            score = (gp.leave_one_out(K, y_enc, [noise], n_classes) if folds is None
                     else gp.cross_validate(K, y_enc, folds, [noise], n_classes))
        self.lengthscale_, self.amplitude_, self.noise_variance_ = float(lam), float(amp), float(noise)
        self.best_score_ = float(score.accuracy[0])
        self.best_index_ = 0
        self.tied_lengthscales_ = np.array([float(lam)])  # one learned candidate
        self.noise_variances_ = np.array([noise])
        self.cv_scores_ = score.accuracy[None, :]
        self.cv_results_ = {"lengthscale": np.array([lam]), "noise_variance": np.array([noise]),
                            "mean_test_score": score.accuracy.copy(),
                            "std_test_score": np.array([score.fold_accuracies[:, 0].std()]),
                            "rank_test_score": np.array([1], dtype=np.int32),
                            "objective": np.array([result.objective])}
        for s_, acc in enumerate(score.fold_accuracies[:, 0]):
            self.cv_results_[f"split{s_}_test_score"] = np.array([acc])
        self.learn_result_ = result
        readout_layer = Readout(amp, template.bias_var, correlation_family(family, lam), template.parameterization)
        self._set_fit(images, Serial(body, readout_layer), K, y_enc, noise, folds)
        return self

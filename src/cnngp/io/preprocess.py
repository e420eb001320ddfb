"""Preprocessing of images before the kernel: regularised ZCA whitening.

What :func:`fit_zca` computes (the "regularised ZCA" of Shankar et al. 2020, "Neural Kernels
Without Tangents", and Lee et al. 2020, "Finite versus infinite neural networks", §ZCA), on
training images ``x`` of shape ``(N, *spatial, C)``, each flattened to a row of
``D = prod(*spatial, C)`` features (all positions and channels together, so the whitening
mixes pixels across the image):

1. **Centring**: subtract the per-feature mean of the *training* images,
   ``μ = (1/N) Σ_n x_n`` (a ``D``-vector). Images are **not** normalised one by one first
   (Lee et al.'s code also divides each image by its own norm after removing its own mean;
   cnngp keeps the pixels' scale and leaves that to the user).
2. **Covariance** of the centred training images over all ``D`` features,
   ``C = (1/N) X_cᵀ X_c = U Λ Uᵀ`` (eigendecomposition, ``Λ = diag(λ_1 … λ_D) >= 0``).
3. **Regulariser**: ``δ = ε · mean(Λ)``, ``mean(Λ) = tr C / D`` (the mean of all ``D``
   eigenvalues, zeros included: the mean variance of a feature). The strength ``ε`` is
   therefore unit-free, a fraction of the mean eigenvalue, comparable across data sets.
4. **Whitening matrix** ``W = U (Λ + δ I)^{-1/2} Uᵀ`` (symmetric: ZCA, the whitening closest
   to the identity, so whitened images stay images on the same grid), applied as
   ``z = (x − μ) W`` to training *and* test images, with the training ``μ`` and ``W``.

The whitened training images have covariance ``W C W = U Λ (Λ + δ I)^{-1} Uᵀ``: the identity
along directions whose variance is well above δ, shrunk by ``λ / (λ + δ)`` below it (no
direction of tiny variance is blown up). ``ε → ∞`` approaches ``(x − μ) / √δ``: centred,
uniformly scaled images. Lee et al. find that the best ε grows as N shrinks.

Positive strengths are accepted in ``[1e-12, 1e6]`` (:data:`ZCA_STRENGTH_RANGE`): below, the
factor ``δ^{-1/2}`` of the directions the images do not span turns their rounding noise into
pixels; above, ``W`` is ``(x − μ)/√δ`` to rounding and a larger ε only shrinks the images
towards underflow. ``ε = 0`` (exact whitening) is accepted only where the training covariance is full rank,
which needs ``N > D`` (the centred images span at most ``N − 1`` directions); otherwise it is
refused, as is a strength that is negative, NaN, infinite or not a number. With ``N <= D``
(40 CIFAR-10 images, ``D = 3072``) any ``ε > 0`` makes ``W`` well defined: the
``D − rank`` directions the images do not span get the factor ``δ^{-1/2}``.

**Mirror-symmetric fit** (``mirror=True``; the default of a protocol with horizontal flips,
docs/maths.md §9): fitted on the images and their mirror images (width reversed) together, so
that μ and C, and with them W, commute with the mirror P exactly: ``z(P x) = P z(x)``. A
flip-averaged kernel of whitened images, ½[K(z(x), z(x')) + K(z(x), P z(x'))], is then the
flip-averaged kernel of the images themselves, and its predictions do not change when an
image is mirrored. A whitening fitted on the images alone does not commute with P (on the
CIFAR-10 subset, ‖P z(x) − z(P x)‖ is about a third of ‖z(x)‖), so there the flip average
mirrors whitened images: still a valid kernel, invariant to mirroring the whitened image, not
the raw one.

Computation: never a ``D × D`` eigendecomposition when ``N <= D``. The nonzero eigenvalues of
``C`` are those of the ``N × N`` Gram matrix ``G = (1/N) X_c X_cᵀ = V Λ_r Vᵀ``, with
eigenvectors ``U_r = X_cᵀ V Λ_r^{-1/2} / √N``, so (``P = I − U_r U_rᵀ`` projects on the
unspanned directions)

    W = U_r (Λ_r + δ)^{-1/2} U_rᵀ + δ^{-1/2} P
    z = δ^{-1/2} x_c + (x_c U_r) [(Λ_r + δ)^{-1/2} − δ^{-1/2}] U_rᵀ,

``O(N² D + N³)`` to fit and ``O(M D r)`` to apply to M images. With ``N > D`` the ``D × D``
covariance is decomposed instead (``O(N D² + D³)``). Both in float64.

>>> import numpy as np
>>> x = np.random.default_rng(0).random((40, 8, 8, 1))
>>> zca = fit_zca(x, 0.1)
>>> zca.method, zca.rank, zca.transform(x).shape
('gram', 39, (40, 8, 8, 1))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from cnngp.errors import CNNGPError
from cnngp.validation import as_images, non_negative_real

__all__ = ["ZCAWhitening", "fit_zca", "check_zca_strength", "check_zca_fit", "check_zca_mirror", "zca_fit_images",
           "zca_held_out", "zca_fit_words",
           "zca_fit_record", "ZCA_FITS",
           "ZCA_METHODS", "ZCA_STRENGTH_RANGE"]

#: how :func:`fit_zca` eigendecomposes: "auto" (the Gram matrix when N <= D, else the
#: covariance), or either one by name
ZCA_METHODS = ("auto", "gram", "covariance")

_STRENGTH = "a number >= 0, the regulariser as a fraction of the mean eigenvalue (e.g. 0.1)"

#: the accepted positive strengths ε (0 is accepted too): below, the unspanned directions'
#: factor δ^(-1/2) turns rounding noise into pixels; above, W is (x − μ)/√δ to rounding
#: (its departure from it is about λ_max / (2 δ), λ_max / mean(Λ) <= D) and ε only scales
ZCA_STRENGTH_RANGE = (1e-12, 1e6)


def check_zca_strength(value, name: str = "zca") -> float:
    """The ZCA strength ε as a float: a real number, finite and >= 0 (messages name ``name``).

    >>> check_zca_strength(0.1)
    0.1
    """
    eps = non_negative_real(value, name, _STRENGTH)
    if 0 < eps < ZCA_STRENGTH_RANGE[0]:
        raise CNNGPError(
            f"{name}: {eps:g} is below {ZCA_STRENGTH_RANGE[0]:g}: the directions the training images do not span "
            f"would be scaled by δ^(-1/2), enough to blow their rounding noise up into the images; give 0 "
            f"(exact whitening, full-rank training covariance) or a strength in "
            f"[{ZCA_STRENGTH_RANGE[0]:g}, {ZCA_STRENGTH_RANGE[1]:g}] (e.g. 0.1)")
    if eps > ZCA_STRENGTH_RANGE[1]:
        raise CNNGPError(
            f"{name}: {eps:g} is above {ZCA_STRENGTH_RANGE[1]:g}: beyond that the whitening is, to rounding, the "
            f"uniform scaling (x - mean)/√δ, which only shrinks the images towards underflow; give a strength in "
            f"[{ZCA_STRENGTH_RANGE[0]:g}, {ZCA_STRENGTH_RANGE[1]:g}] (e.g. 0.1), or leave ZCA out")
    return eps


@dataclass(frozen=True, eq=False, repr=False)
class ZCAWhitening:
    """A fitted regularised ZCA whitening (module docstring); make one with :func:`fit_zca`.
    Immutable: its arrays are read-only copies (``torch.tensor(z.basis)`` for a tensor).

    Attributes
    ----------
    strength : float
        ε, the regulariser as a fraction of the mean eigenvalue.
    regulariser : float
        δ = ε · mean(Λ), added to every eigenvalue.
    mean_eigenvalue : float
        mean(Λ) = tr C / D over all D eigenvalues.
    mean : numpy.ndarray, shape (D,)
        μ, the training images' per-feature mean.
    basis : numpy.ndarray, shape (D, r)
        Orthonormal eigenvectors U_r of C (all D with the covariance method).
    eigenvalues : numpy.ndarray, shape (r,)
        Their eigenvalues λ (descending).
    image_shape : tuple
        ``(*spatial, C)`` of the images it was fitted on (and accepts).
    n_fit : int
        N, the number of training images (without their mirror images).
    method : {"gram", "covariance"}
    mirror : bool
        Fitted on the images and their mirror images (module docstring): W commutes with
        horizontal flips.
    """

    strength: float
    regulariser: float
    mean_eigenvalue: float
    mean: np.ndarray
    basis: np.ndarray
    eigenvalues: np.ndarray
    image_shape: tuple
    n_fit: int
    method: str
    mirror: bool = False

    def __post_init__(self):
        for name in ("mean", "basis", "eigenvalues"):  # its own read-only copies: a fitted
            array = np.array(getattr(self, name), dtype=np.float64)  # transform never changes,
            array.setflags(write=False)  # so copies of it may share them (__deepcopy__)
            object.__setattr__(self, name, array)

    def __deepcopy__(self, memo):
        """The object itself: it is immutable (frozen, its arrays read-only copies), and
        scikit-learn's ``clone`` deep-copies an estimator's ``zca=`` for every candidate of a
        grid search, which would copy a D × D basis (75 MB for CIFAR-10) each time."""
        return self

    def __reduce__(self):
        # unpickled through __init__ (and so __post_init__): read-only again in a joblib worker
        return (type(self), tuple(getattr(self, f.name) for f in fields(self)))

    @property
    def features(self) -> int:
        """D, the features of one image."""
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        """r, the directions kept in ``basis`` (nonzero eigenvalues; D with the covariance method)."""
        return int(self.eigenvalues.shape[0])

    def _scales(self) -> tuple[np.ndarray, float]:
        """(Λ_r + δ)^{-1/2} and δ^{-1/2}, the factor of the unspanned directions (0 when the
        basis is complete: there are none)."""
        with np.errstate(divide="ignore"):
            spanned = 1.0 / np.sqrt(self.eigenvalues + self.regulariser)
        rest = 0.0 if self.rank == self.features else 1.0 / math.sqrt(self.regulariser)
        return spanned, rest

    def transform(self, x, name: str = "x") -> np.ndarray:
        """Whiten images with the training statistics: ``z = (x − μ) W``.

        Parameters
        ----------
        x : array-like, shape (M, *spatial, C)
            Images of the fitted ``image_shape`` (the package's image-array policy,
            :func:`cnngp.validation.as_images`; messages name ``name``).

        Returns
        -------
        numpy.ndarray, float64, shape (M, *spatial, C)
        """
        if getattr(x, "shape", None) is None:  # a list: read (and checked) as an array first
            x = as_images(x, name)
        shape = tuple(int(s) for s in x.shape[1:])
        if shape != tuple(self.image_shape):
            raise CNNGPError(f"zca: {name} has images of shape {shape}, but the whitening was fitted on "
                             f"images of shape {tuple(self.image_shape)}; whiten images of the training "
                             "images' shape (N, *spatial, C)")
        # the image-array policy; the fitted channel count settles a layout that looks ambiguous
        images = as_images(x, name, channels=int(self.image_shape[-1]))
        xc = images.reshape(len(images), -1) - self.mean
        spanned, rest = self._scales()
        # z = δ^{-1/2} x_c + (x_c U_r) [(Λ_r + δ)^{-1/2} − δ^{-1/2}] U_rᵀ   (module docstring)
        z = ((xc @ self.basis) * (spanned - rest)) @ self.basis.T
        if rest:
            z += rest * xc
        return np.ascontiguousarray(z.reshape(images.shape))

    def matrix(self) -> np.ndarray:
        """The whitening matrix ``W`` (D, D), written out (for checks on small images)."""
        spanned, rest = self._scales()
        return rest * np.eye(self.features) + (self.basis * (spanned - rest)) @ self.basis.T

    def whitened_covariance(self) -> np.ndarray:
        """``W C W = U Λ (Λ + δ I)^{-1} Uᵀ`` (D, D): the covariance of the whitened training
        images in closed form."""
        return (self.basis * (self.eigenvalues / (self.eigenvalues + self.regulariser))) @ self.basis.T

    def __repr__(self) -> str:  # short: it is also an estimator parameter (zca=), shown in its repr
        return (f"ZCAWhitening(strength={self.strength:g}, n_fit={int(self.n_fit)}, "
                f"image_shape={tuple(self.image_shape)}, method={self.method!r}"
                + (", mirror=True)" if self.mirror else ")"))

    def provenance(self) -> dict:
        """What a result records about the whitening (JSON-ready)."""
        return {
            "strength": self.strength,
            "strength_units": "fraction of the mean eigenvalue of the training covariance",
            "regulariser": self.regulariser,
            "mean_eigenvalue": self.mean_eigenvalue,
            "fitted_on": int(self.n_fit),
            "features": self.features,
            # the covariance's rank (its eigenvalues above rounding), not the basis size, which
            # the covariance route keeps at D
            "rank": int(np.count_nonzero(self.eigenvalues > _rank_tolerance(
                self.eigenvalues, int(self.n_fit) * (2 if self.mirror else 1), self.features))),
            "method": self.method,
            "mirror": bool(self.mirror),
            "centring": ("per-feature mean of the training images and their mirror images" if self.mirror
                         else "per-feature mean of the training images"),
            "per_image_normalisation": None,
        }


#: where a protocol's ZCA whitening is fitted (``zca_fit``; ``--zca-fit``), of its data set's
#: training split: the training subset itself, or the rest of the split (unlabelled)
ZCA_FITS = ("train", "rest")


def check_zca_fit(fit, zca, outside=None) -> str:
    """``fit`` checked as a ``zca_fit`` (:data:`ZCA_FITS`; other than ``"train"`` only with a
    strength ``zca``), and ``outside`` as a ``zca_fit_outside`` (None, or a positive integer
    with ``fit="rest"``: :func:`zca_held_out`)."""
    if fit not in ZCA_FITS:
        raise CNNGPError(f"zca_fit: expected one of {', '.join(ZCA_FITS)}, got {fit!r}")
    if fit != "train" and zca is None:
        raise CNNGPError(f"zca_fit: {fit!r} says where to fit a ZCA whitening, but no strength is given; "
                         "add zca (--zca EPS)")
    if outside is not None:
        if isinstance(outside, bool) or not isinstance(outside, (int, np.integer)) or outside <= 0:
            raise CNNGPError(f"zca_fit_outside: expected a positive integer (a number of training images), "
                             f"got {outside!r}")
        if fit != "rest":
            raise CNNGPError(f"zca_fit_outside: says which training images a zca_fit 'rest' whitening leaves "
                             f"out, but zca_fit is {fit!r}; add zca_fit 'rest' (--zca-fit rest)")
    return fit


def check_zca_mirror(mirror, zca, flip) -> bool:
    """A protocol's ``zca_mirror`` resolved: None (the default) is ``flip`` — with horizontal
    flips the whitening is fitted mirror-symmetric, so that predictions are invariant to
    mirroring the images themselves — else a bool, which needs a whitening (``zca``)."""
    if mirror is None:
        return bool(flip) and zca is not None
    if not isinstance(mirror, (bool, np.bool_)):
        raise CNNGPError(f"zca_mirror: expected None (the same as flip), True or False, got {mirror!r}")
    if zca is None:
        raise CNNGPError("zca_mirror: says how a ZCA whitening is fitted, but no strength is given; add zca "
                         "(--zca EPS)")
    return bool(mirror)


def zca_fit_words(fit: str, outside: int | None, words: dict) -> str:
    """Which training images a whitening is fitted on, in words: ``words[fit]`` (a protocol's
    names for ``"train"`` and ``"rest"``), or the images outside the balanced ``outside``."""
    if outside is None:
        return words.get(fit, fit)
    return f"the training images outside the balanced {int(outside):,} (unlabelled)"


def zca_fit_record(whitening, fit: str, outside: int | None, words: dict) -> dict:
    """What a result and a kernel store record of a protocol's whitening: its provenance,
    ``fit``, ``fit_outside`` (only when given) and ``fitted_on_images`` (:func:`zca_fit_words`)."""
    record = {**whitening.provenance(), "fit": fit}
    if outside is not None:
        record["fit_outside"] = int(outside)
    return {**record, "fitted_on_images": zca_fit_words(fit, outside, words)}


def zca_held_out(y_train, subset, outside, *, seed, n_classes, what: str = "the training subset") -> np.ndarray:
    """The training images a ``zca_fit="rest"`` whitening leaves out (indices): ``subset``
    itself (``outside`` None), or the class-balanced subset of ``outside`` images drawn as the
    subset was (:func:`cnngp.io.data.balanced_subset`, the same ``seed``), which begins with
    it — so that every training set of a learning curve up to ``outside`` images is whitened
    by one and the same fit, and the kernels of the smaller ones are those of the larger.

    Refused: fewer than ``len(subset)`` (the fit would see images the subset validates on),
    more than the balanced split holds, or a subset it does not contain (named ``what``).
    """
    subset = np.asarray(subset)
    if outside is None:
        return subset
    outside = int(outside)
    if outside < len(subset):
        raise CNNGPError(f"zca_fit_outside: {outside} images is fewer than {what} ({len(subset)}); the whitening "
                         f"would be fitted on images it trains and validates on; give at least {len(subset)}")
    from cnngp.io.data import balanced_subset

    held = balanced_subset(y_train, outside, seed=seed, n_classes=n_classes, name="zca_fit_outside")
    if not np.isin(subset, held).all():  # balanced_subset draws nested subsets: a bug if not
        raise CNNGPError(f"zca_fit_outside: the balanced {outside} training images do not contain {what}")
    return held


def zca_fit_images(x_train, subset, fit: str, what: str = "the training subset", held_out=None) -> np.ndarray:
    """The images a protocol fits its whitening on: ``x_train[subset]`` (``fit="train"``), or
    every other image of the training split (``"rest"``, used unlabelled): then the images the
    subset's cross-validation validates on, and the test images, are whitened alike, out of
    sample. ``held_out`` (with ``"rest"``; default ``subset``): the images left out, a superset
    of the subset (:func:`zca_held_out`). ``what`` names them in the refusal of a split with
    nothing left."""
    subset = np.asarray(subset)
    if fit == "train":
        return x_train[subset]
    rest = np.setdiff1d(np.arange(len(x_train)), subset if held_out is None else np.asarray(held_out))
    if len(rest) < 2:
        if held_out is not None and len(held_out) > len(subset):
            raise CNNGPError(f"zca_fit_outside: 'rest' fits the whitening on the training images outside {what}, "
                             f"and there are {len(rest)}; give a smaller zca_fit_outside (at least {len(subset)})")
        raise CNNGPError(f"zca_fit: 'rest' fits the whitening on the training images outside {what}, and "
                         f"there are {len(rest)}; use a smaller training set or zca_fit 'train'")
    return x_train[rest]


def _rank_tolerance(eigenvalues: np.ndarray, n: int, d: int) -> float:
    """Eigenvalues at or below this are rounding noise (the usual matrix-rank tolerance)."""
    top = float(eigenvalues.max()) if eigenvalues.size else 0.0
    return max(n, d) * np.finfo(np.float64).eps * top


def fit_zca(x, strength, name: str = "x_train", method: str = "auto", mirror: bool = False) -> ZCAWhitening:
    """Fit regularised ZCA whitening on training images (module docstring).

    Parameters
    ----------
    x : array-like, shape (N, *spatial, C)
        The training images only (never test images): the package's image-array policy
        (:func:`cnngp.validation.as_images`), messages naming ``name``.
    strength : float
        ε >= 0, the regulariser as a fraction of the mean eigenvalue (``0`` only when the
        training covariance is full rank, i.e. N > D and no direction without variance).
    method : {"auto", "gram", "covariance"}, default "auto"
        Eigendecompose the N × N Gram matrix (``"auto"`` when N <= D) or the D × D
        covariance (``"auto"`` when N > D); both give the same whitening.
    mirror : bool, default False
        Fit on the images and their mirror images (the last spatial axis reversed), 2N in
        all: the whitening then commutes with horizontal flips (module docstring).

    Returns
    -------
    ZCAWhitening
        ``.transform(images)`` whitens training or test images.

    Raises
    ------
    CNNGPError
        A strength that is not a finite number >= 0 (naming ``zca``), ``0`` for a covariance
        that is not full rank, fewer than 2 images, identical images (no variance), bad images.
    """
    eps = check_zca_strength(strength, "zca")
    if method not in ZCA_METHODS:
        raise CNNGPError(f"zca: method must be one of {', '.join(ZCA_METHODS)}, got {method!r}")
    images = as_images(x, name)
    n, shape = int(images.shape[0]), tuple(int(s) for s in images.shape[1:])
    d = math.prod(shape)
    if n < 2:
        raise CNNGPError(f"zca: {name} holds {n} image; whitening is fitted on at least 2 training images")
    n_given = n
    if not isinstance(mirror, (bool, np.bool_)):
        raise CNNGPError(f"zca: mirror must be True or False, got {mirror!r}")
    if mirror:  # the images and their mirror images: μ = Pμ and C = P C P, so W P = P W
        images = np.concatenate([images, np.flip(images, -2)])
        n = 2 * n
    X = images.reshape(n, d)
    mu = X.mean(axis=0)
    Xc = X - mu  # centring with the training mean (step 1)
    mean_eig = float(np.einsum("ij,ij->", Xc, Xc)) / (n * d)  # tr C / D (step 3)
    if not mean_eig > 0:
        raise CNNGPError(f"zca: the {n} images of {name} are all identical (zero covariance); "
                         "there is nothing to whiten")
    if method == "auto":
        method = "gram" if n <= d else "covariance"
    if method == "gram":
        # the nonzero spectrum of C from G = X_c X_cᵀ / N = V Λ_r Vᵀ; U_r = X_cᵀ V Λ_r^{-1/2} / √N
        lam, V = np.linalg.eigh(Xc @ Xc.T / n)
        keep = lam > _rank_tolerance(lam, n, d)
        lam, V = lam[keep][::-1], V[:, keep][:, ::-1]
        U = (Xc.T @ V) / np.sqrt(n * lam)
    else:
        # C = X_cᵀ X_c / N = U Λ Uᵀ over all D features (step 2)
        lam, U = np.linalg.eigh(Xc.T @ Xc / n)
        lam, U = np.clip(lam[::-1], 0.0, None), np.ascontiguousarray(U[:, ::-1])
    delta = eps * mean_eig
    if eps == 0:
        full = lam.size == d and lam.min() > _rank_tolerance(lam, n, d)
        if not full:
            rank = int(np.count_nonzero(lam > _rank_tolerance(lam, n, d)))
            raise CNNGPError(
                f"zca: 0 (no regulariser) needs a full-rank training covariance, but the {n} images of "
                f"{name} span {rank} of their {d} features' directions"
                + (f" (with N <= D = {d} at most N - 1)" if n <= d else "")
                + "; give a positive strength such as 0.1 (a fraction of the mean eigenvalue)")
    return ZCAWhitening(strength=eps, regulariser=float(delta), mean_eigenvalue=mean_eig, mean=mu,
                        basis=np.ascontiguousarray(U), eigenvalues=np.ascontiguousarray(lam),
                        image_shape=shape, n_fit=n_given, method=method, mirror=bool(mirror))

"""Weight correlations over filter positions (docs/maths.md §1–2).

A correlation describes the prior covariance Σ of one filter's weights across its spatial
taps, ``W[i, j, :] ~ N(0, Σ / C_in)``. Every correlation is normalised so that its entries sum
to 1 (docs/maths.md §1): the independent case becomes ``I/|P|`` (an ordinary
convolution, or a flatten readout) and the constant case ``11ᵀ/|P|²`` (average pooling, or a
global-average-pooling readout). Stationary families interpolate between the two with a
lengthscale λ measured in index units of the grid the filter spans; ``λ = 0`` and ``λ = ∞``
return the two extremes *exactly*.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import numpy as np
import torch

from cnngp.errors import CNNGPError

__all__ = [
    "PAPER_LENGTHSCALES",
    "FAMILIES", "ENDS", "family", "by_name",
    "Correlation",
    "Independent",
    "Constant",
    "Matern",
    "RBF",
    "UserCorrelation",
    "parse_lengthscale",
]


def parse_lengthscale(value, name: str = "lengthscale") -> float:
    """Validate a lengthscale: a number ≥ 0, ``0`` or ``inf`` (also the string ``"inf"``)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("inf", "infinity", "+inf"):
            return math.inf
        try:
            number = float(text)
        except ValueError:
            raise CNNGPError(
                f"{name}: expected a number >= 0, 0 or 'inf', got {value!r}"
            ) from None
        # a number written out that floats cannot hold is not silently one of the two ends
        # (λ = ∞: mean pooling; λ = 0: the independent readout): they are written inf and 0
        if math.isinf(number) and "inf" not in text:
            raise CNNGPError(f"{name}: {value!r} is beyond float range (it would read as inf, mean "
                             "pooling); write inf for that end, or a number up to about 1.8e308")
        if number == 0 and any(c in "123456789" for c in text.split("e")[0]):
            raise CNNGPError(f"{name}: {value!r} is below float range (it would read as 0, the "
                             "independent readout); write 0 for that end, or a number from about 5e-324")
        value = number
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise CNNGPError(f"{name}: expected a number >= 0, 0 or 'inf', got {value!r}")
    value = float(value)
    if math.isnan(value) or value < 0:
        raise CNNGPError(f"{name}: expected a number >= 0, 0 or 'inf', got {value!r}")
    return value + 0.0  # -0.0 as 0.0


def tap_coordinates(shape: Sequence[int]) -> np.ndarray:
    """Integer index vectors of all positions of a grid, row-major: shape (|P|, D)."""
    if len(shape) == 0:
        return np.zeros((1, 0))
    return np.array(list(itertools.product(*[range(n) for n in shape])), dtype=np.float64)


@functools.lru_cache(maxsize=8)
def _distances(shape: Sequence[int]) -> np.ndarray:
    """Euclidean distances between all pairs of grid positions, (|P|, |P|), read-only and
    cached per shape (a sweep builds the same grid's Σ for every lengthscale)."""
    coords = tap_coordinates(shape)
    sq = np.zeros((len(coords), len(coords)))
    for k in range(coords.shape[1]):
        sq += np.square(coords[:, None, k] - coords[None, :, k])
    d = np.sqrt(sq)
    d.flags.writeable = False
    return d


def offsets(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The position offsets δ = p′ − p of a grid: (δ (M, D) row-major over the (2N_k − 1)
    values per axis, counts (M,) = ∏_k (N_k − |δ_k|), the position pairs at each offset)."""
    shape = tuple(int(s) for s in shape)
    axes = [np.arange(1 - n, n) for n in shape]
    if not axes:
        return np.zeros((1, 0)), np.ones(1)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape)).astype(np.float64)
    counts = np.prod([n - np.abs(grid[:, k]) for k, n in enumerate(shape)], axis=0)
    return grid, counts


def _exact(value):
    """A spec's values as plain, exact Python (for :meth:`Correlation.snapshot`): a tensor as
    its floats (its repr rounds them to 4 decimals)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach().cpu().double().reshape(-1).tolist())
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_exact(v) for v in value)
    return value


class Correlation:
    """Base class: a PSD correlation over the positions of a grid, normalised to sum 1.

    Subclasses implement :meth:`_unnormalised` (a PSD matrix over positions) and may declare
    themselves exactly independent or constant, which the kernel layers use to pick their
    cheap paths (diagonal sums and box sums instead of a dense filter).
    """

    #: the exact special case this correlation reduces to: "independent", "constant" or None
    kind: str | None = None

    def matrix(
        self, shape: Sequence[int], dtype=torch.float64, device="cpu"
    ) -> torch.Tensor:
        """Σ over the row-major positions of a grid of ``shape``, normalised to sum 1.

        Returns a tensor of shape (|P|, |P|) with |P| = prod(shape).
        """
        shape = tuple(int(s) for s in shape)
        size = int(np.prod(shape)) if shape else 1
        if self.kind == "independent":
            m = np.eye(size) / size
        elif self.kind == "constant":
            m = np.full((size, size), 1.0 / size**2)
        elif isinstance(getattr(self, "lengthscale", None), torch.Tensor):
            # a torch lengthscale (learning it, docs/maths.md §8): Σ differentiable in λ
            d = torch.tensor(_distances(shape), dtype=dtype, device=device)
            w = self._profile(d / self.lengthscale.to(dtype=dtype, device=device))
            return w / w.sum()
        else:
            m = np.asarray(self._unnormalised(shape), dtype=np.float64)
            total = m.sum()
            if not np.isfinite(total) or total <= 0:
                raise CNNGPError(
                    f"correlation {self!r}: entries must have a positive finite sum to be "
                    f"normalised, got sum {total!r}"
                )
            m = m / total
        return torch.as_tensor(m, dtype=dtype, device=device)

    def _unnormalised(self, shape) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_shape(self, shape: Sequence[int]) -> None:
        """Raise unless this correlation is defined on a grid of ``shape``. The families
        are defined on every grid; a user matrix only on grids of its size."""

    def to_spec(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def __eq__(self, other):
        return type(self) is type(other) and self.to_spec() == other.to_spec()

    def __hash__(self):
        return hash(self.snapshot())

    def snapshot(self) -> str:
        """This correlation's value as it is now (its spec, as text): the key of a cache of
        anything built from it. Not the object itself, whose hash follows its value: a cache
        keyed by the object finds an entry of the old value under the new one once the object
        is changed in place (``correlation.lengthscale = ...``) and the cache rehashed, as
        copying or pickling the layer that holds both does. Exact: a tensor value (a
        lengthscale learned by autograd) by its floats, not its rounded repr."""
        return repr(_exact(self.to_spec()))


class Independent(Correlation):
    """Independent weights: Σ = I/|P| (ordinary convolution; flatten readout)."""

    kind = "independent"

    def to_spec(self):
        return {"type": "independent"}

    def __repr__(self):
        return "Independent()"


class Constant(Correlation):
    """Fully shared weights: Σ = 11ᵀ/|P|² (average pooling; global-average-pool readout)."""

    kind = "constant"

    def to_spec(self):
        return {"type": "constant"}

    def __repr__(self):
        return "Constant()"


def _underflows(corr, lam: float) -> bool:
    """Whether ``corr``'s profile at distance 1 (the nearest other position) is exactly 0 in
    float64 for lengthscale ``lam`` (e.g. Matérn-3/2 at λ <= 0.0023): then so is every
    off-diagonal weight (the profiles decrease with distance)."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        w = float(corr._profile(np.float64(1.0) / np.float64(lam)))
    return not w > 0.0  # 0 (underflow) or NaN (inf·0 when 1/λ overflows)


class _Stationary(Correlation):
    """A stationary correlation k(r/λ) with exact limits at λ = 0 and λ = ∞."""

    def __init__(self, lengthscale):
        self.lengthscale = parse_lengthscale(lengthscale)

    @property
    def kind(self):  # type: ignore[override]
        lam = float(self.lengthscale.detach()) if isinstance(self.lengthscale, torch.Tensor) else self.lengthscale
        if lam == 0:
            return "independent"
        if math.isinf(lam):
            return "constant"
        if not isinstance(self.lengthscale, torch.Tensor) and _underflows(self, lam):
            # every off-diagonal weight (distance >= 1) is exactly 0 in float64: Σ = I/|P|
            # exactly, the independent end (not a dense Σ whose band has radius 0)
            return "independent"
        return None

    def _unnormalised(self, shape):
        return self._profile(_distances(tuple(shape)) / self.lengthscale)

    def offset_weights(self, shape, lengthscale=None, dtype=torch.float64) -> torch.Tensor:
        """Σ as a function of the offset, (M,) over :func:`offsets` of ``shape``: Σ[p, p′] =
        w[δ(p′ − p)], normalised to sum 1 over all position pairs (Σ_δ count(δ)·w[δ] = 1).

        ``lengthscale`` (default this correlation's) may be a torch scalar that requires
        grad: w is then differentiable in it (docs/maths.md §8). λ = 0 and λ = ∞ give the
        independent and constant ends exactly."""
        delta, counts = offsets(shape)
        counts_t = torch.as_tensor(counts, dtype=dtype)
        lam = self.lengthscale if lengthscale is None else lengthscale
        if not isinstance(lam, torch.Tensor):
            lam = float(lam)
            if lam == 0 or _underflows(self, lam):  # the independent end: w = 1{δ = 0}/|P|
                return torch.as_tensor((np.abs(delta).sum(1) == 0) / counts.max(), dtype=dtype)
            if math.isinf(lam):
                return torch.full((len(counts),), 1.0 / counts.sum(), dtype=dtype)
            lam = torch.tensor(lam, dtype=dtype)
        r = torch.as_tensor(np.sqrt((delta**2).sum(1)), dtype=dtype) / lam
        w = self._profile(r)
        return w / (counts_t * w).sum()

    def _lengthscale_spec(self):
        lam = self.lengthscale  # a tensor while autograd learns it: read without its graph
        return "inf" if math.isinf(float(lam.detach()) if isinstance(lam, torch.Tensor) else lam) else lam


class Matern(_Stationary):
    """Matérn-ν correlation, ν ∈ {1/2, 3/2, 5/2}, lengthscale λ in grid index units.

    Σ[p, p'] ∝ (1 + √3 r/λ) exp(−√3 r/λ) for ν = 3/2 (docs/maths.md §2), r = ‖p − p'‖₂.
    """

    NUS = (0.5, 1.5, 2.5)

    def __init__(self, nu=1.5, lengthscale=1.0):
        try:
            nu = float(nu)
        except (TypeError, ValueError):
            nu = None
        if nu not in self.NUS:
            raise CNNGPError(f"nu: expected one of 0.5, 1.5, 2.5 for a Matérn correlation, got {nu!r}")
        self.nu = nu
        super().__init__(lengthscale)

    def _profile(self, d):
        exp = torch.exp if isinstance(d, torch.Tensor) else np.exp  # numpy, or torch (autograd)
        if self.nu == 0.5:
            return exp(-d)
        if self.nu == 1.5:
            s = math.sqrt(3.0) * d
            return (1.0 + s) * exp(-s)
        s = math.sqrt(5.0) * d
        return (1.0 + s + s * s / 3.0) * exp(-s)

    def to_spec(self):
        return {"type": "matern", "nu": self.nu, "lengthscale": self._lengthscale_spec()}

    def __repr__(self):
        return f"Matern(nu={self.nu}, lengthscale={self._lengthscale_spec()!r})"


class RBF(_Stationary):
    """Squared-exponential correlation exp(−r²/(2λ²)), lengthscale λ in grid index units."""

    def _profile(self, d):
        exp = torch.exp if isinstance(d, torch.Tensor) else np.exp
        return exp(-0.5 * d * d)

    def to_spec(self):
        return {"type": "rbf", "lengthscale": self._lengthscale_spec()}

    def __repr__(self):
        return f"RBF(lengthscale={self._lengthscale_spec()!r})"


def _float_array(value, what: str) -> np.ndarray:
    """``value`` as a float64 array, or an error naming ``what`` (not numpy's own)."""
    if isinstance(value, (str, bytes)):
        raise CNNGPError(f"{what}: expected numbers, got {value!r}")
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CNNGPError(f"{what}: expected numbers (a list, or a list of lists), got {value!r}") from None


class SpectralMixture(Correlation):
    """A spectral-mixture stationary correlation over the grid (Wilson & Adams' kernel, per
    axis): Σ[p, p′] ∝ k(p′ − p) with

        k(δ) = Σ_q w_q ∏_k exp(−δ_k² / (2 ℓ_qk²)) · cos(2π μ_qk δ_k),

    a positive sum of products of PSD kernels, hence PSD on every grid (docs/maths.md §8).
    What ``cnngp learn --readout spectral-mixture`` learns from the offset sums; then usable
    as any readout or conv correlation (spec ``{"type": "spectral_mixture", ...}``).

    Parameters
    ----------
    weights : sequence of Q numbers > 0
    means : (Q, D) frequencies μ in cycles per grid step (finite; |μ| ≤ 1/2 is below the
        grid's Nyquist frequency, larger values alias)
    lengthscales : (Q, D) envelopes ℓ > 0 in grid steps
    """

    def __init__(self, weights, means, lengthscales):
        w, mu, ell = (_float_array(v, f"spectral_mixture {name}") for v, name in
                      ((weights, "weights"), (means, "means"), (lengthscales, "lengthscales")))
        if w.ndim != 1 or w.size == 0:
            raise CNNGPError(f"spectral_mixture weights: expected a non-empty list of Q numbers, got shape {w.shape}")
        q = w.size
        if mu.ndim != 2 or mu.shape[0] != q or ell.shape != mu.shape:
            raise CNNGPError(
                f"spectral_mixture: means and lengthscales must both be (Q, D) = ({q}, D) lists, "
                f"got {mu.shape} and {ell.shape}"
            )
        if not (np.all(np.isfinite(w)) and np.all(w > 0)):
            raise CNNGPError(f"spectral_mixture weights: expected finite numbers > 0, got {w.tolist()}")
        if not np.all(np.isfinite(mu)):
            raise CNNGPError(f"spectral_mixture means: expected finite frequencies, got {mu.tolist()}")
        if not (np.all(np.isfinite(ell)) and np.all(ell > 0)):
            raise CNNGPError(f"spectral_mixture lengthscales: expected finite numbers > 0, got {ell.tolist()}")
        self.weights, self.means, self.lengthscales = w, mu, ell

    @property
    def dims(self) -> int:
        return self.means.shape[1]

    def check_shape(self, shape):
        if len(tuple(shape)) != self.dims:
            raise CNNGPError(
                f"spectral_mixture: defined for {self.dims}-D grids (means and lengthscales have "
                f"{self.dims} columns), got the grid {tuple(shape)}"
            )

    def _unnormalised(self, shape):
        self.check_shape(shape)
        coords = tap_coordinates(tuple(shape))
        delta = coords[None, :, :] - coords[:, None, :]
        return spectral_mixture_profile(torch.as_tensor(delta.reshape(-1, self.dims)), self.weights,
                                        self.means, self.lengthscales).numpy().reshape(len(coords), len(coords))

    def offset_weights(self, shape, dtype=torch.float64) -> torch.Tensor:
        """Σ as a function of the offset over :func:`offsets` of ``shape``, normalised as
        every correlation (Σ_δ count(δ)·w[δ] = 1)."""
        self.check_shape(shape)
        return spectral_mixture_offset_weights(shape, self.weights, self.means, self.lengthscales, dtype)

    def to_spec(self):
        return {"type": "spectral_mixture", "weights": self.weights.tolist(), "means": self.means.tolist(),
                "lengthscales": self.lengthscales.tolist()}

    def __repr__(self):
        return f"SpectralMixture(Q={self.weights.size}, D={self.dims})"


def spectral_mixture_profile(delta, weights, means, lengthscales) -> torch.Tensor:
    """k(δ) of :class:`SpectralMixture` for offsets ``delta`` (M, D); the parameters may be
    torch tensors that require grad (the learned readout), or arrays."""
    t = torch.as_tensor(delta, dtype=torch.float64)
    w, mu, ell = (torch.as_tensor(a, dtype=torch.float64) for a in (weights, means, lengthscales))
    env = torch.exp(-0.5 * ((t[:, None, :] / ell[None]) ** 2).sum(-1))  # (M, Q)
    wave = torch.cos(2 * math.pi * t[:, None, :] * mu[None]).prod(-1)
    return (env * wave) @ w


def spectral_mixture_offset_weights(shape, weights, means, lengthscales, dtype=torch.float64) -> torch.Tensor:
    """The normalised offset weights w[δ] of a spectral mixture on a grid of ``shape``
    (differentiable in torch parameters). The sum Σ_δ count(δ) k(δ) = 1ᵀΣ1 is ≥ 0 (Σ is
    PSD); a mixture whose Σ sums to 0 on this grid cannot be normalised and is refused."""
    delta, counts = offsets(tuple(shape))
    k = spectral_mixture_profile(delta, weights, means, lengthscales)
    total = (torch.as_tensor(counts, dtype=torch.float64) * k).sum()
    if not float(total.detach()) > 1e-300:
        raise CNNGPError("spectral_mixture: its correlation sums to 0 over this grid (a pure "
                         "oscillation), so it cannot be normalised; lower the frequencies")
    return (k / total).to(dtype)


class UserCorrelation(Correlation):
    """A user-supplied PSD matrix over the row-major positions of the grid.

    Parameters
    ----------
    matrix : array (|P|, |P|)
        Symmetric positive semi-definite; checked (eigenvalues ≥ −1e-10·max|eig|).
    normalise : bool
        Rescale to sum 1 (default), like every built-in correlation.
    """

    def __init__(self, matrix, normalise: bool = True):
        try:
            m = np.asarray(matrix, dtype=np.float64)
        except (TypeError, ValueError, OverflowError) as e:  # ragged rows, strings, huge ints
            raise CNNGPError("correlation matrix: expected a square (|P|, |P|) matrix of numbers "
                             f"({' '.join(str(e).split())[:120]})") from None
        if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
            raise CNNGPError(
                f"correlation matrix: expected a square (|P|, |P|) matrix, got shape {m.shape}"
            )
        if not np.all(np.isfinite(m)):
            raise CNNGPError("correlation matrix: contains NaN or infinite entries")
        if not np.allclose(m, m.T, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(m).max())):
            raise CNNGPError("correlation matrix: must be symmetric")
        eig = np.linalg.eigvalsh(m)
        if eig.min() < -1e-10 * max(np.abs(eig).max(), 1e-300):
            raise CNNGPError(
                "correlation matrix: must be positive semi-definite, smallest eigenvalue "
                f"is {eig.min():.3g}"
            )
        if not isinstance(normalise, (bool, np.bool_)):  # "yes" or 0 would be coerced silently
            raise CNNGPError(f"normalise: expected true or false, got {normalise!r}")
        self._m = m
        self.normalise = bool(normalise)

    def check_shape(self, shape):
        self.matrix(shape)

    def matrix(self, shape, dtype=torch.float64, device="cpu"):
        size = int(np.prod(shape)) if len(shape) else 1
        if self._m.shape[0] != size:
            raise CNNGPError(
                f"correlation matrix: has shape {self._m.shape} but the grid {tuple(shape)} "
                f"has {size} positions; expected ({size}, {size})"
            )
        m = self._m
        if self.normalise:
            total = m.sum()
            if total <= 0:
                raise CNNGPError(
                    "correlation matrix: entries must have a positive sum to be normalised "
                    "(pass normalise=False to use it as is)"
                )
            m = m / total
        return torch.as_tensor(m, dtype=dtype, device=device)

    def to_spec(self):
        return {"type": "user", "matrix": self._m.tolist(), "normalise": self.normalise}

    def snapshot(self) -> str:
        # the matrix by its bytes' digest: its spec as text is slow for a large grid (1024²
        # entries: 0.5 s), and a cache looks this up every batch
        import hashlib

        m = np.ascontiguousarray(np.asarray(self._m, dtype=np.float64))
        return f"user {m.shape} {self.normalise} {hashlib.sha256(m.tobytes()).hexdigest()}"

    def __repr__(self):
        return f"UserCorrelation(<{self._m.shape[0]}x{self._m.shape[0]}>)"


# -- correlations by name (the command line, the sweep and the estimators) -------------------

#: the paper's readout lengthscales: 10^linspace(-1.5, 4.5, 25), in readout-grid units
PAPER_LENGTHSCALES: tuple[float, ...] = tuple(float(v) for v in 10 ** np.linspace(-1.5, 4.5, 25))

#: the stationary families by name: ν of the Matérn, or None for the RBF
FAMILIES = {"matern12": 0.5, "matern32": 1.5, "matern52": 2.5, "rbf": None}
#: the two ends by name: independent weights (λ = 0) and full sharing (λ = ∞, mean pooling)
ENDS = {"independent": Independent, "flatten": Independent, "constant": Constant,
        "mean": Constant, "gap": Constant}


def family(name: str, lengthscale, what: str = "family") -> Correlation:
    """The stationary correlation ``name`` (``matern12``, ``matern32``, ``matern52``,
    ``rbf``) at ``lengthscale``."""
    key = str(name).strip().lower()
    if key not in FAMILIES:
        raise CNNGPError(f"{what}: expected one of {sorted(FAMILIES)}, got {name!r}")
    lam = parse_lengthscale(lengthscale)
    nu = FAMILIES[key]
    return RBF(lam) if nu is None else Matern(nu, lam)


def by_name(text: str, lengthscale=None, what: str = "correlation") -> Correlation:
    """``independent``, ``constant`` (or ``flatten``, ``mean``, ``gap``), ``matern32:2.0``,
    ``rbf:4`` — or a family name with ``lengthscale`` given separately — → a Correlation."""
    kind, _, arg = str(text).partition(":")
    key = kind.strip().lower()
    if key in ENDS and not arg:
        return ENDS[key]()
    if key not in FAMILIES:
        raise CNNGPError(
            f"{what}: unknown correlation {text!r}; expected independent, constant, "
            "matern12:λ, matern32:λ, matern52:λ or rbf:λ"
        )
    if lengthscale is None:
        if not arg:
            raise CNNGPError(f"{what}: {key} needs a lengthscale, e.g. {key}:2.0")
        lengthscale = parse_lengthscale(arg, f"{what} lengthscale")
    return family(key, lengthscale, what)

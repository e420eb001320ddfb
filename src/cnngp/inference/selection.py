"""Choosing among readouts by cross-validation, and what that choice is worth (docs/maths.md §5).

The sweep picks the readout (λ) and the noise σ² with the highest k-fold CV accuracy, and reports
that accuracy. Because the same folds both choose and score, that number is optimistically
biased — the more so the more candidates are compared (27 readouts × 1,000 σ²). A **nested**
estimate removes the bias: each outer fold is held out while λ and σ² are chosen by an inner
k-fold CV on the remaining images alone; the chosen model, trained on those images, then
predicts the outer fold. The nested accuracy is the fraction of all images predicted correctly
that way (Varma & Simon 2006; Cawley & Talbot 2010).

Ties are exact on small data sets (accuracies are counts): among candidates with the same
score, :func:`first_best` takes the first in the caller's order — in the sweep: independent,
then λ ascending, then mean pooling, i.e. the least correlated of the tied readouts — and
reports every tied one, so that a tie is visible rather than reported as one λ.

>>> first_best([0.5, 0.75, 0.75, 0.25])
(1, [1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cnngp.errors import CNNGPError
from cnngp.inference import gp

__all__ = ["first_best", "NestedFolds", "nested_fold_scores", "nested_choice", "TIE_ATOL"]

#: scores closer than this are tied (accuracies are ratios of counts: equal counts give equal
#: floats up to the order of a mean's summation); the same tolerance picks σ² in gp
TIE_ATOL = gp.TIE_ATOL


def first_best(scores: Sequence[float], atol: float = TIE_ATOL) -> tuple[int, list[int]]:
    """The index of the highest score, the first among ties, and every tied index."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)):
        raise CNNGPError(f"scores: expected a non-empty 1-D array of finite numbers, got {s!r}")
    tied = np.flatnonzero(s >= s.max() - atol)
    return int(tied[0]), [int(i) for i in tied]


@dataclass(frozen=True)
class NestedFolds:
    """One candidate's scores in each outer fold of a nested cross-validation.

    Attributes
    ----------
    inner_accuracy : numpy.ndarray, shape (O,)
        The best inner-CV accuracy on outer fold o's training images (over the σ² grid).
    noise_variance : numpy.ndarray, shape (O,)
        The σ² that achieved it.
    outer_correct : numpy.ndarray, shape (O,), int
        Images of outer fold o predicted correctly by the model trained on its training
        images at that σ².
    outer_size : numpy.ndarray, shape (O,), int
        Images in outer fold o.
    """

    inner_accuracy: np.ndarray
    noise_variance: np.ndarray
    outer_correct: np.ndarray
    outer_size: np.ndarray


def nested_fold_scores(K: np.ndarray, y: np.ndarray, outer_folds, inner_folds, n_classes: int,
                       n_grid: int = 1000) -> NestedFolds:
    """Score one candidate kernel ``K`` (N, N) in every outer fold: σ² chosen by an inner CV
    on the outer training images (``inner_folds(train_index, y_train)`` gives its folds, in
    the positions of the training subset), then the outer fold predicted."""
    inner, noise, correct, size = [], [], [], []
    for tr, te in outer_folds:
        K_tr = K[np.ix_(tr, tr)]
        cv = gp.cross_validate(K_tr, y[tr], folds=inner_folds(tr, y[tr]), n_classes=n_classes,
                               n_grid=n_grid)
        pred = gp.fit_predict(K_tr, y[tr], K[np.ix_(te, tr)], cv.best_noise_variance, n_classes)
        inner.append(cv.best_accuracy)
        noise.append(cv.best_noise_variance)
        correct.append(int(np.sum(pred == y[te])))
        size.append(len(te))
    return NestedFolds(np.array(inner), np.array(noise), np.array(correct, dtype=np.int64),
                       np.array(size, dtype=np.int64))


@dataclass(frozen=True)
class NestedResult:
    """The nested estimate over candidates: in each outer fold the candidate with the best
    inner accuracy (:func:`first_best`), scored on that fold.

    Attributes
    ----------
    accuracy : float
        Images predicted correctly over all outer folds / all images.
    chosen : list of int
        The candidate chosen in each outer fold.
    tied : list of list of int
        The candidates tied for best in each outer fold.
    noise_variances : list of float
        The σ² of the chosen candidate in each outer fold.
    """

    accuracy: float
    chosen: list
    tied: list
    noise_variances: list


def nested_choice(per_candidate: Sequence[NestedFolds]) -> NestedResult:
    """Combine the candidates' :func:`nested_fold_scores` (in the caller's order) into the
    nested estimate."""
    if not per_candidate:
        raise CNNGPError("per_candidate: expected at least one candidate's scores")
    n_outer = len(per_candidate[0].outer_size)
    correct, chosen, tied, noise = 0, [], [], []
    for o in range(n_outer):
        best, ties = first_best([c.inner_accuracy[o] for c in per_candidate])
        correct += int(per_candidate[best].outer_correct[o])
        chosen.append(best)
        tied.append(ties)
        noise.append(float(per_candidate[best].noise_variance[o]))
    total = int(per_candidate[0].outer_size.sum())
    return NestedResult(correct / total, chosen, tied, noise)

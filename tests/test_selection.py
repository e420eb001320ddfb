"""Choosing among readouts (cnngp.inference.selection): ties, and the nested CV estimate against
brute-force loops and against the optimism it removes."""

from __future__ import annotations

import numpy as np
import pytest

from cnngp.errors import CNNGPError
from cnngp.inference import gp
from cnngp.inference.selection import NestedFolds, first_best, nested_choice, nested_fold_scores


def test_first_best_takes_the_first_of_exact_ties_and_reports_them_all():
    assert first_best([0.5, 0.75, 0.25, 0.75]) == (1, [1, 3])
    assert first_best([0.3]) == (0, [0])
    # accuracies are ratios of counts: a mean of the same counts in another order is a tie
    assert first_best([0.1 + 0.2, 0.3]) == (0, [0, 1])
    assert first_best([0.3, 0.3 + 1e-9]) == (1, [1])
    for bad in ([], [np.nan, 1.0], [[1.0]]):
        with pytest.raises(CNNGPError, match="^scores: "):
            first_best(bad)


def _problem(n=24, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    f = rng.normal(size=(n, 5)) + 1.5 * np.eye(n_classes, 5)[y]
    return f @ f.T / 5, y


def _solve_predict(K_tr, y_tr, K_te_tr, noise, n_classes):
    """GP posterior mean on centred one-hot targets by a direct solve (the oracle)."""
    Y = np.eye(n_classes)[y_tr] - 1.0 / n_classes
    alpha = np.linalg.solve(K_tr + noise * np.eye(len(K_tr)), Y)
    return np.argmax(K_te_tr @ alpha, axis=1)


def test_nested_fold_scores_equal_brute_force_loops():
    """Every outer fold: the inner CV's accuracy at every σ² of the grid by direct solves, its
    best σ² (the first of ties), and the outer fold's predictions at that σ²."""
    K, y = _problem()
    outer = gp.paper_folds(len(y), 3)
    inner = lambda tr, y_tr: gp.paper_folds(len(tr), 3)  # noqa: E731
    got = nested_fold_scores(K, y, outer, inner, n_classes=3, n_grid=40)
    for o, (tr, te) in enumerate(outer):
        K_tr, y_tr = K[np.ix_(tr, tr)], y[tr]
        grid = gp.cross_validate(K_tr, y_tr, folds=inner(tr, y_tr), n_classes=3, n_grid=40).noise_variances
        acc = np.zeros(len(grid))
        for itr, iva in inner(tr, y_tr):
            for j, s in enumerate(grid):
                pred = _solve_predict(K_tr[np.ix_(itr, itr)], y_tr[itr], K_tr[np.ix_(iva, itr)], s, 3)
                acc[j] += np.mean(pred == y_tr[iva]) / 3
        j = int(np.argmax(acc))
        assert got.inner_accuracy[o] == pytest.approx(acc[j], abs=1e-12)
        assert got.noise_variance[o] == grid[j]
        pred = _solve_predict(K_tr, y_tr, K[np.ix_(te, tr)], grid[j], 3)
        assert got.outer_correct[o] == int(np.sum(pred == y[te])) and got.outer_size[o] == len(te)


def test_nested_choice_counts_the_chosen_candidates_outer_predictions():
    a = NestedFolds(np.array([0.8, 0.5]), np.array([1.0, 2.0]), np.array([3, 1]), np.array([5, 5]))
    b = NestedFolds(np.array([0.8, 0.6]), np.array([3.0, 4.0]), np.array([5, 0]), np.array([5, 5]))
    r = nested_choice([a, b])
    # fold 0: a tie, the first (a) is taken; fold 1: b's inner accuracy is higher
    assert r.chosen == [0, 1] and r.tied == [[0, 1], [1]] and r.noise_variances == [1.0, 4.0]
    assert r.accuracy == (3 + 0) / 10


def test_nested_estimate_removes_the_optimism_of_picking_the_best_of_many():
    """Pure noise: labels unrelated to 30 random candidate kernels. The best candidate's plain
    CV accuracy is well above chance (it was picked on the folds that score it); the nested
    estimate, which never scores on images that chose, is not."""
    plain, nested = [], []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        n = 60
        y = np.arange(n) % 2
        kernels = []
        for _ in range(30):
            f = rng.normal(size=(n, 4))
            kernels.append(f @ f.T / 4)
        folds = gp.paper_folds(n, 4)
        plain.append(max(gp.cross_validate(K, y, folds=folds, n_classes=2, n_grid=50).best_accuracy
                         for K in kernels))
        scores = [nested_fold_scores(K, y, folds, lambda tr, y_tr: gp.paper_folds(len(tr), 4), 2, n_grid=50)
                  for K in kernels]
        nested.append(nested_choice(scores).accuracy)
    # 5 data sets of 60: the mean of 300 chance predictions is 0.5 ± 0.06 (2 SE)
    assert np.mean(plain) > 0.6 and abs(np.mean(nested) - 0.5) < 0.06, (plain, nested)
    assert np.mean(plain) - np.mean(nested) > 0.1, (plain, nested)

"""Paired comparisons of two sweeps' test predictions (``cnngp compare``).

Two models scored on the same test images are compared image by image, not by their two
accuracies: the difference of their accuracies is the mean of the per-image differences
d_i = [a right on i] − [b right on i], and its standard error is that of a mean of M paired
numbers, sd(d)/√M — much smaller than the two binomial SEs combined when the models agree on
most images (they share the images' difficulty). The same for the NLL, from each image's log
probability of its label. The exact McNemar test asks whether the images only one model gets
right split evenly between them: under "no difference" the count of those a gets right is
Binomial(discordant, ½).

The inputs are what ``cnngp sweep --test`` writes: ``DIR/results.json`` and
``DIR/test_predictions.npz`` (per scored readout and test image: the predicted class and the log
probability of the label). A readout is named as the sweep names it — ``chosen`` (the one the
cross-validation chose at N_max), ``independent``, ``mean-pool``, or ``FAMILY:λ`` (e.g.
``matern32:56.2``: λ as the tables print it, to 3 significant digits, is enough).
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnngp.errors import CNNGPError, MissingFileError
from cnngp.inference.calibration import LOG_FLOOR

__all__ = ["SweepPredictions", "load_predictions", "paired_comparison", "paired_differences"]


@dataclass(frozen=True)
class SweepPredictions:
    """One sweep's per-image test predictions (:func:`load_predictions`).

    Attributes
    ----------
    path : str
        The sweep's output folder.
    readouts : list of str
        ``"FAMILY:λ"`` of each scored readout, as the sweep labels them.
    predicted : numpy.ndarray, shape (R, M), int
    log_prob_true : numpy.ndarray, shape (R, M)
    y_test, test_index : numpy.ndarray, shape (M,)
    test_sha256 : str or None
        The test images as read (runs of cnngp before 2026-12-05 20:20 UTC lack it).
    chosen : str or None
        The label of the readout the cross-validation chose at N_max.
    config : dict
        ``results.json``'s configuration.
    """

    path: str
    readouts: list
    predicted: np.ndarray
    log_prob_true: np.ndarray
    y_test: np.ndarray
    test_index: np.ndarray
    test_sha256: str | None
    chosen: str | None
    config: dict

    def select(self, name: str) -> int:
        """The row of the readout ``name`` (module docstring), or a CNNGPError listing them."""
        wanted = str(name).strip()
        aliases = {"chosen": self.chosen, "mean-pool": "constant:inf", "mean_pool": "constant:inf",
                   "constant": "constant:inf", "independent": "independent:0.0"}
        label = aliases.get(wanted, wanted)
        if label is None:
            raise CNNGPError(f"readout: {self.path!r} records no CV-chosen readout (a sweep without --test); "
                             f"name one of {', '.join(self.readouts)}")
        if label in self.readouts:
            return self.readouts.index(label)
        family, _, lam = label.partition(":")
        try:
            value = float(lam)
        except ValueError:
            value = None
        close = []
        if value is not None and value > 0 and math.isfinite(value):
            # λ as the tables print it: equal to 3 significant digits (or given more exactly)
            close = [i for i, r in enumerate(self.readouts) if r.partition(":")[0] == family
                     and _finite(_lam(r)) and (f"{_lam(r):.3g}" == f"{value:.3g}"
                                               or abs(_lam(r) - value) <= 1e-9 * value)]
            if len(close) == 1:
                return close[0]
        names = ([] if self.chosen is None else ["chosen"]) + [_short(r) for r in self.readouts]
        if len(close) > 1:
            raise CNNGPError(f"readout: {name!r} matches {len(close)} readouts of {self.path!r}: "
                             f"{', '.join(self.readouts[i] for i in close)}; give one of these in full")
        raise CNNGPError(f"readout: {name!r} is not among the readouts {self.path!r} scored on its test images: "
                         f"{', '.join(names)}")


def _finite(v) -> bool:
    return v is not None and 0 < v < math.inf


def _short(label: str) -> str:
    """How :meth:`SweepPredictions.select` accepts a label: ``independent``, ``mean-pool``,
    ``FAMILY:λ`` to 3 significant digits."""
    family, lam = label.partition(":")[0], _lam(label)
    if family == "independent":
        return "independent"
    if family == "constant":
        return "mean-pool"
    return f"{family}:{lam:.3g}" if _finite(lam) else label


def _lam(label: str) -> float | None:
    try:
        return float(label.partition(":")[2])
    except ValueError:
        return None


def load_predictions(path) -> SweepPredictions:
    """The test predictions a ``cnngp sweep --test`` wrote to the folder ``path``."""
    folder = Path(path)
    results_file, npz_file = folder / "results.json", folder / "test_predictions.npz"
    for f in (results_file, npz_file):
        if not f.is_file():
            raise MissingFileError(f"{str(folder)!r}: no {f.name} (the folder of a `cnngp sweep --test` run "
                                   "holds results.json and test_predictions.npz)")
    try:
        results = json.loads(results_file.read_text())
        with np.load(npz_file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise CNNGPError(f"{str(folder)!r}: its results.json or test_predictions.npz cannot be read "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(results, dict):
        raise CNNGPError(f"{str(folder)!r}: results.json holds no sweep's results (a JSON object); "
                         "it is not a cnngp sweep's")
    missing = {"readouts", "predicted", "log_prob_true", "y_test", "test_index"} - set(arrays)
    if missing:
        raise CNNGPError(f"{str(folder)!r}: test_predictions.npz lacks {', '.join(sorted(missing))}; "
                         "it is not a cnngp sweep's")
    test = results.get("test") or {}
    chosen = None
    if "readout" in test:
        chosen = f"{test['readout']}:{test['lengthscale']}"
    return SweepPredictions(
        path=str(folder), readouts=[str(r) for r in arrays["readouts"]],
        predicted=np.asarray(arrays["predicted"]),
        # floored as the NLL of results.json (files before 2026-12-06 hold unfloored values)
        log_prob_true=np.maximum(np.asarray(arrays["log_prob_true"], dtype=np.float64), LOG_FLOOR),
        y_test=np.asarray(arrays["y_test"]), test_index=np.asarray(arrays["test_index"]),
        test_sha256=str(arrays["test_sha256"]) if "test_sha256" in arrays else None,
        chosen=chosen, config=results.get("config") or {})


def _mean_2se(x: np.ndarray) -> tuple[float, float | None]:
    """The mean and ±2 SE of paired differences (:func:`cnngp.inference.gp.mean_and_2se`; None
    for a single image, where it gives 0: there is no spread to measure)."""
    from cnngp.inference.gp import mean_and_2se

    x = np.asarray(x, dtype=np.float64)
    mean, two_se = mean_and_2se(x)
    return float(mean), (float(two_se) if len(x) > 1 else None)


def paired_differences(right_a, right_b, log_prob_a, log_prob_b) -> dict:
    """Model a against model b from their per-image results on the same test images.

    Parameters
    ----------
    right_a, right_b : array_like, shape (M,)
        1 where the model classifies image m correctly, else 0 (or, for an average over several
        tied models, the fraction of them that do).
    log_prob_a, log_prob_b : array_like, shape (M,)
        The log probability each gives image m's true class.

    Returns
    -------
    dict
        ``accuracy_difference`` (a − b) and ``nll_difference`` (a − b), each with the ±2 SE
        of its per-image differences (``*_2se``; None for a single image), ``only_a_right``,
        ``only_b_right`` and the exact two-sided McNemar ``mcnemar_p`` (the three None where
        either side is not 0/1: an average of models has no right/wrong per image).
    """
    from scipy.stats import binomtest

    arrays = {}
    for name, v in (("right_a", right_a), ("right_b", right_b), ("log_prob_a", log_prob_a),
                    ("log_prob_b", log_prob_b)):
        arrays[name] = np.asarray(v, dtype=np.float64)
        if arrays[name].ndim != 1 or not len(arrays[name]):
            raise CNNGPError(f"{name}: expected one value per test image (a 1-D array of at least one), "
                             f"got shape {arrays[name].shape}")
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) != 1:
        raise CNNGPError("right_a, right_b, log_prob_a, log_prob_b: expected one value per test image each, "
                         f"the same images, got lengths {[len(v) for v in arrays.values()]}")
    ra, rb, la, lb = arrays.values()
    d_acc, d_acc_2se = _mean_2se(ra - rb)
    d_nll, d_nll_2se = _mean_2se(lb - la)  # NLL(a) − NLL(b)
    out = {"accuracy_difference": d_acc, "accuracy_difference_2se": d_acc_2se,
           "nll_difference": d_nll, "nll_difference_2se": d_nll_2se,
           "only_a_right": None, "only_b_right": None, "mcnemar_p": None}
    if np.isin(ra, (0.0, 1.0)).all() and np.isin(rb, (0.0, 1.0)).all():
        only_a, only_b = int(np.sum((ra == 1) & (rb == 0))), int(np.sum((rb == 1) & (ra == 0)))
        p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
        out.update(only_a_right=only_a, only_b_right=only_b, mcnemar_p=p)
    return out


def paired_comparison(a: SweepPredictions, readout_a: str, b: SweepPredictions, readout_b: str) -> dict:
    """Model a (``readout_a`` of sweep a) against model b on the same test images.

    Returns
    -------
    dict
        ``n_test``; for each model its ``readout``, ``accuracy`` and ``nll``;
        ``accuracy_difference`` (a − b) and ``nll_difference`` (a − b) with their paired ±2 SE
        (``*_2se``; None for a single test image); ``only_a_right``, ``only_b_right`` and the exact two-sided McNemar
        ``mcnemar_p``.

    Raises
    ------
    CNNGPError
        Different test images (their hashes, or their indices and labels where a run predates
        the hash), or a readout that is not there.
    """
    if a.test_sha256 is not None and b.test_sha256 is not None and a.test_sha256 != b.test_sha256:
        raise CNNGPError(f"{a.path!r} and {b.path!r} were scored on different test images (their sha256 differ); "
                         "a paired comparison needs the same images")
    if not (np.array_equal(a.test_index, b.test_index) and np.array_equal(a.y_test, b.y_test)):
        raise CNNGPError(f"{a.path!r} and {b.path!r} were scored on different test images ({len(a.y_test)} and "
                         f"{len(b.y_test)}, or other indices or labels); a paired comparison needs the same images")
    i, j = a.select(readout_a), b.select(readout_b)
    right_a = a.predicted[i] == a.y_test
    right_b = b.predicted[j] == b.y_test
    return {
        "n_test": int(len(a.y_test)),
        "a": {"path": a.path, "readout": a.readouts[i], "accuracy": float(right_a.mean()),
              "nll": float(-a.log_prob_true[i].mean())},
        "b": {"path": b.path, "readout": b.readouts[j], "accuracy": float(right_b.mean()),
              "nll": float(-b.log_prob_true[j].mean())},
        **paired_differences(right_a, right_b, a.log_prob_true[i], b.log_prob_true[j]),
    }

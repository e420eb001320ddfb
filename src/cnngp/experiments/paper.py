"""What the paper reports (Garriga-Alonso & van der Wilk, UAI 2021; docs/maths.md §6): 4-fold CV
accuracy in %, decoded from its figures, to overlay on our own sweeps.

``CNNGP14[n]`` holds the independent readout, mean pooling, the best Matérn-3/2 lengthscale (in
grid units; ``math.inf`` where the best is mean pooling) and the best accuracy. Subset randomness
alone moves these by ±0.5–1 point. Figure 3 (N = 1,280): Myrtle10 with each pool + conv replaced
by a 6×6 stride-2 conv, independent filters ≈ 48.1 %, correlated ones recover the pooled
baseline ≈ 50.4–52.9 %.
"""

from __future__ import annotations

import math

__all__ = ["CNNGP14", "MYRTLE10", "FIGURE3"]

CNNGP14 = {
    160: {"independent": 28.8, "mean_pool": 34.9, "best_lengthscale": math.inf, "best": 35.3},
    320: {"independent": 32.5, "mean_pool": 40.2, "best_lengthscale": math.inf, "best": 40.5},
    640: {"independent": 37.0, "mean_pool": 46.0, "best_lengthscale": 100.0, "best": 46.3},
    1280: {"independent": 41.9, "mean_pool": 52.2, "best_lengthscale": 31.6, "best": 52.6},
    2560: {"independent": 46.9, "mean_pool": 58.1, "best_lengthscale": 31.6, "best": 59.1},
    5120: {"independent": 51.4, "mean_pool": 63.8, "best_lengthscale": 31.6, "best": 64.9},
    10240: {"independent": 56.3, "mean_pool": 68.4, "best_lengthscale": 31.6, "best": 69.7},
}

MYRTLE10 = {
    5120: {"independent": 58.6, "mean_pool": 62.6, "best_lengthscale": 16.9, "best": 63.2},
}

#: Figure 3, N = 1,280: accuracy (%) of the three Myrtle10 variants (ranges where the paper gives one)
FIGURE3 = {"pooled": (50.4, 52.9), "independent_6x6": 48.1, "correlated_6x6": (50.4, 52.9)}

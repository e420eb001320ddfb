"""The kernel maths: the kernel state, weight correlations Σ, the (*) map on position-pair
tensors, and the layers (docs/maths.md §1–3). Imports nothing of the engine, the finite networks
or the command line."""

from cnngp._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__, ("state", "correlations", "ops", "layers"))

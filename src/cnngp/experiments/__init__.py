"""The paper's experiments: the λ sweep (``sweep``) and its figures (``plots``)."""

from cnngp._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__, ("sweep", "plots"))

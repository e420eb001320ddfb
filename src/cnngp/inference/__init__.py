"""Uses of the kernels: GP classification and model selection (``gp``) and the scikit-learn
estimators (``estimator``)."""

from cnngp._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__, ("gp", "estimator"))

"""Uses of the kernels: GP classification and model selection (``gp``), the scikit-learn
estimators (``estimator``) and the trained ensembles of infinitely wide networks (``ensemble``)."""

from cnngp._lazy import submodule_getattr

__getattr__ = submodule_getattr(__name__, ("gp", "estimator", "ensemble"))

"""cnngp: infinitely wide CNNs with spatially correlated weight priors as Gaussian processes.

The names below are loaded on first use (PEP 562), so that ``import cnngp`` and the ``cnngp``
command start without importing torch until they need it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "finite_network": "finite", "monte_carlo_kernel": "finite",
    "RBF": "correlations", "Constant": "correlations", "Correlation": "correlations",
    "Independent": "correlations", "Matern": "correlations", "UserCorrelation": "correlations",
    "CNNGPError": "errors",
    "kernel": "gram", "readout_sweep": "gram",
    "ABReLU": "layers", "AvgPool": "layers", "Conv": "layers", "Erf": "layers",
    "Flatten": "layers", "GlobalAvgPool": "layers", "Identity": "layers", "Layer": "layers",
    "Readout": "layers", "ReLU": "layers", "Serial": "layers", "Sign": "layers", "Sin": "layers",
    "Nonlinearity": "layers",
    "from_spec": "spec", "load_spec": "spec",
    "KernelState": "state",
}
_SUBMODULES = {"testing", "architectures", "data", "gp", "sweep", "estimator", "plots", "validation",
               "resources", "storage", "finite", "gram", "layers", "spec", "correlations"}

__all__ = sorted([*_EXPORTS, "architectures"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'cnngp' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)

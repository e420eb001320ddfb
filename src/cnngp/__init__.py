"""cnngp: infinitely wide CNNs with spatially correlated weight priors as Gaussian processes.

The names below are loaded on first use (PEP 562), so that ``import cnngp`` and the ``cnngp``
command start without importing torch until they need it.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "finite_network": "finite", "monte_carlo_kernel": "finite",
    "RBF": "kernels.correlations", "Constant": "kernels.correlations",
    "Correlation": "kernels.correlations", "Independent": "kernels.correlations",
    "Matern": "kernels.correlations", "UserCorrelation": "kernels.correlations",
    "SpectralMixture": "kernels.correlations",
    "CNNGPError": "errors",
    "kernel": "engine.gram", "readout_sweep": "engine.gram", "offset_sums": "engine.gram",
    "kernel_diagonal": "engine.gram",
    "Execution": "engine.execution",
    **{name: "kernels.layers" for name in (
        "ABReLU", "AvgPool", "Conv", "Erf", "Flatten", "GlobalAvgPool", "Identity", "Layer",
        "Nonlinearity", "Readout", "ReLU", "Serial", "Sign", "Sin", "standard_parameterization")},
    "from_spec": "io.spec", "load_spec": "io.spec",
    "KernelState": "kernels.state",
}
#: subpackages and modules reachable as attributes of ``cnngp``
_SUBMODULES = {"kernels", "engine", "inference", "experiments", "io", "cli",
               "errors", "finite", "provenance", "settings", "testing", "validation"}

__all__ = sorted(_EXPORTS)


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

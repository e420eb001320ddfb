"""cnngp: infinitely wide CNNs with spatially correlated weight priors as Gaussian processes."""

from . import architectures
from .finite import finite_network, monte_carlo_kernel
from .correlations import RBF, Constant, Correlation, Independent, Matern, UserCorrelation
from .errors import CNNGPError
from .gram import kernel, readout_sweep
from .layers import (
    ABReLU,
    AvgPool,
    Conv,
    Erf,
    Flatten,
    GlobalAvgPool,
    Identity,
    Layer,
    Readout,
    ReLU,
    Serial,
)
from .spec import from_spec, load_spec
from .state import KernelState

__version__ = "0.1.0"

__all__ = [
    "ABReLU", "AvgPool", "CNNGPError", "Constant", "Conv", "Correlation", "Erf", "Flatten",
    "GlobalAvgPool", "Identity", "Independent", "KernelState", "Layer", "Matern", "RBF",
    "Readout", "ReLU", "Serial", "UserCorrelation", "architectures", "from_spec", "kernel",
    "load_spec", "readout_sweep", "finite_network", "monte_carlo_kernel",
]

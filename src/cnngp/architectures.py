"""Named architectures of the paper and of Shankar et al. (docs/maths.md §6).

``get("cnngp14")``, ``get("myrtle10", readout=Matern(1.5, 3.0))``… Every network here uses 3×3
convolutions with stride 1, SAME padding, no bias, independent weights (Σ = I/|P|), balanced
ReLU and 2×2 stride-2 VALID average pools, and ends with a :class:`~cnngp.Readout` over the
last grid whose correlation is a parameter.
"""

from __future__ import annotations

import re

from .correlations import Constant, Correlation, Independent, Matern
from .errors import CNNGPError
from .layers import AvgPool, Conv, Readout, ReLU
from .spec import Network

__all__ = ["get", "NAMES", "body"]

#: deepest cnngp<depth> offered (a depth is conv+ReLU pairs; the paper goes to 14)
MAX_DEPTH = 1000

NAMES = ("cnngp{depth}", "myrtle5", "myrtle7", "myrtle10", "myrtle10-paper", "myrtle10-correlated")

#: conv layers per block at 32×32, 16×16 and 8×8 (Shankar et al. 2020; the paper's 3/3/2)
_MYRTLE_BLOCKS = {
    "myrtle5": (2, 1, 1),
    "myrtle7": (2, 2, 2),
    "myrtle10": (3, 3, 3),
    "myrtle10-paper": (3, 3, 2),
}


def _conv_relu(n):
    return [layer for _ in range(n) for layer in (Conv(3), ReLU())]


def body(name: str, internal: Correlation | None = None) -> list:
    """The layers of a named architecture up to (not including) its readout."""
    m = re.fullmatch(r"cnngp(\d+)", name)
    if m:
        depth = int(m.group(1))
        if not 1 <= depth <= MAX_DEPTH:
            raise CNNGPError(
                f"arch: cnngp<depth> needs 1 <= depth <= {MAX_DEPTH}, got {name!r} (the "
                "paper's deepest is cnngp14)"
            )
        return _conv_relu(depth)
    if name in _MYRTLE_BLOCKS:
        a, b, c = _MYRTLE_BLOCKS[name]
        return _conv_relu(a) + [AvgPool(2)] + _conv_relu(b) + [AvgPool(2)] + _conv_relu(c)
    if name == "myrtle10-correlated":
        # docs/maths.md §6: each avgpool + the conv after it → one 6×6 stride-2 SAME correlated conv
        corr = Matern(1.5, 3.0) if internal is None else internal
        down = [Conv(6, stride=2, padding="same", correlation=corr), ReLU()]
        return _conv_relu(3) + down + _conv_relu(2) + down + _conv_relu(1)
    raise CNNGPError(
        f"arch: unknown architecture {name!r}; expected one of cnngp<depth> (e.g. cnngp14), "
        "myrtle5, myrtle7, myrtle10, myrtle10-paper, myrtle10-correlated, or a JSON spec file"
    )


def default_readout(name: str) -> Correlation:
    """Independent (flatten) for cnngp*, constant (global average pooling) for Myrtle nets."""
    return Independent() if name.startswith("cnngp") else Constant()


def get(
    name: str,
    readout: Correlation | None = None,
    internal: Correlation | None = None,
    readout_weight_var: float = 1.0,
) -> Network:
    """A named architecture with a readout of the given correlation.

    Parameters
    ----------
    name : str
        ``cnngp{depth}``, ``myrtle5``, ``myrtle7``, ``myrtle10`` (3/3/3), ``myrtle10-paper``
        (3/3/2), ``myrtle10-correlated`` (6×6 stride-2 correlated convs, docs/maths.md §6).
    readout : Correlation, optional
        Σ over the last grid; default :func:`default_readout`.
    internal : Correlation, optional
        For ``myrtle10-correlated``: Σ over the 6×6 taps (default Matérn-3/2, λ = 3).
    """
    layers = body(name, internal)
    corr = default_readout(name) if readout is None else readout
    return Network(*layers, Readout(readout_weight_var, 0.0, corr), name=name)

"""Named architectures of the paper and of Shankar et al. (docs/maths.md §6).

``get("cnngp14")``, ``get("myrtle10", readout=Matern(1.5, 3.0))``… Every network here uses 3×3
convolutions with stride 1, SAME padding, no bias, independent weights (Σ = I/|P|), balanced
ReLU and 2×2 stride-2 VALID average pools, and ends with a :class:`~cnngp.Readout` over the
last grid whose correlation is a parameter.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

from cnngp.kernels.correlations import Constant, Correlation, Independent, Matern
from cnngp.errors import CNNGPError
from cnngp.kernels.layers import AvgPool, Conv, Readout, ReLU, Serial
from cnngp.io.spec import Network, from_spec, load_spec

__all__ = ["get", "resolve", "split_network", "NAMES", "body"]

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


def resolve(network, readout: Correlation | None = None) -> tuple[Serial, str]:
    """Whatever a user may pass as a network, as a :class:`~cnngp.Serial` and a short name.

    Parameters
    ----------
    network : str, path-like, dict, Serial or list of layers
        A name of :data:`NAMES` (``"cnngp14"``, ``"myrtle10-paper"``…), a JSON spec file (a path
        ending in ``.json``, containing a separator, or naming an existing file), a spec dict,
        a network, or its layers.
    readout : Correlation, optional
        Replaces the readout's correlation (its variances are kept); the network must end with a
        :class:`~cnngp.Readout`.

    Errors are :class:`~cnngp.CNNGPError` naming ``network`` (or ``readout``).
    """
    if isinstance(network, (str, os.PathLike)):
        text = os.fspath(network)
        if not text.strip():
            raise CNNGPError("network: is empty; give a name such as cnngp14 or a SPEC.json file")
        if text.endswith(".json") or os.sep in text or Path(text).exists():
            path = Path(text)
            if not path.exists():
                raise CNNGPError(f"network: spec file {text!r} not found")
            if not path.is_file():
                raise CNNGPError(f"network: spec file {text!r} is not a regular file (a folder?)")
            net, name = load_spec(text), text
        else:
            return get(text, readout=readout), text
    elif isinstance(network, dict):
        net, name = from_spec(network), "network"
    elif isinstance(network, Serial):
        net, name = network, getattr(network, "name", None) or type(network).__name__
    elif isinstance(network, (list, tuple)):
        net, name = Serial(*network), "network"
    else:
        raise CNNGPError(
            f"network: expected an architecture name, a JSON spec path, a spec dict or a cnngp "
            f"Serial, got {type(network).__name__}"
        )
    if readout is not None:
        last = net.layers[-1] if len(net.layers) else None
        if not isinstance(last, Readout):
            raise CNNGPError("readout: the network does not end with a readout layer")
        net = Network(*list(net.layers)[:-1], last.with_correlation(readout),
                      input_channels=net.input_channels, name=getattr(net, "name", None))
    return net, str(name)


def split_network(network) -> tuple[Serial, Readout, str]:
    """Split a network into its body (up to the last hidden layer) and its readout.

    Parameters
    ----------
    network : str, path-like, :class:`cnngp.kernels.layers.Serial` or list of layers
        A named architecture (``"cnngp4"``, ``"myrtle10-paper"``, …), a JSON spec file,
        or a network. If it ends with a :class:`~cnngp.Readout`, that readout's weight and
        bias variances are kept for every swept readout; otherwise ``Readout(1.0, 0.0)``.

    Returns
    -------
    body : Serial
        The layers before the readout (``input_channels`` carried over from a spec).
    template : Readout
        The readout whose variances the sweep reuses.
    name : str
        A short name for reports.
    """
    net, name = resolve(network)
    body, template = net.split_readout()
    if template is None:
        template = Readout(1.0, 0.0)
    elif not isinstance(template.correlation, (Independent, Constant)):
        warnings.warn(f"network: its readout's correlation {template.correlation!r} is not used: each "
                      "swept or learned readout replaces it (the readout's variances are kept)",
                      UserWarning, stacklevel=2)
    if not len(body):
        raise CNNGPError("network: has no layers before its readout")
    return body, template, str(name)

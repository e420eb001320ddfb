"""Architecture files: a network as JSON (documented in the README, "Architecture files").

``{"input_channels": 3, "layers": [{"type": "conv", ...}, {"type": "relu"}, ...]}``

:func:`from_spec` builds layers from such a dict, :func:`load_spec` from a file, and every
layer's ``to_spec()`` writes the same format back, so specs round-trip.
"""

from __future__ import annotations

import json
from pathlib import Path

from cnngp.kernels.correlations import RBF, Constant, Independent, Matern, SpectralMixture, UserCorrelation
from cnngp.errors import CNNGPError
from cnngp.kernels.layers import (
    ABReLU,
    AvgPool,
    Conv,
    Erf,
    Flatten,
    GlobalAvgPool,
    Identity,
    Readout,
    ReLU,
    Serial,
    Sign,
    Sin,
)

__all__ = ["from_spec", "load_spec", "correlation_from_spec", "Network"]

_CORRELATIONS = {
    "independent": (lambda d: Independent(), set()),
    "constant": (lambda d: Constant(), set()),
    "matern": (lambda d: Matern(d.get("nu", 1.5), d.get("lengthscale", 1.0)), {"nu", "lengthscale"}),
    "rbf": (lambda d: RBF(d.get("lengthscale", 1.0)), {"lengthscale"}),
    "user": (lambda d: UserCorrelation(d["matrix"], d.get("normalise", True)), {"matrix", "normalise"}),
    "spectral_mixture": (lambda d: SpectralMixture(d.get("weights"), d.get("means"), d.get("lengthscales")),
                         {"weights", "means", "lengthscales"}),
}

#: keys a spec entry of that type must give (the others have defaults)
_REQUIRED = {"user": {"matrix"}, "spectral_mixture": {"weights", "means", "lengthscales"}}

_LAYERS = {
    "conv": (
        lambda d: Conv(
            filter=d.get("filter", 3),
            stride=d.get("stride", 1),
            dilation=d.get("dilation", 1),
            padding=d.get("padding", "same"),
            weight_var=d.get("weight_var", 1.0),
            bias_var=d.get("bias_var", 0.0),
            correlation=correlation_from_spec(d.get("correlation"), "correlation"),
            parameterization=d.get("parameterization", "ntk"),
            channels=d.get("channels"),
        ),
        {"filter", "stride", "dilation", "padding", "weight_var", "bias_var", "correlation",
         "parameterization", "channels"},
    ),
    "relu": (lambda d: ReLU(), set()),
    "abrelu": (lambda d: ABReLU(d.get("a", 0.0), d.get("b", 1.0)), {"a", "b"}),
    "erf": (lambda d: Erf(d.get("a", 1.0), d.get("b", 1.0), d.get("c", 0.0)), {"a", "b", "c"}),
    "identity": (lambda d: Identity(), set()),
    "sin": (lambda d: Sin(d.get("a", 1.0), d.get("b", 1.0), d.get("c", 0.0)), {"a", "b", "c"}),
    "sign": (lambda d: Sign(), set()),
    "avgpool": (
        lambda d: AvgPool(d.get("window", 2), d.get("stride"), d.get("padding", "valid")),
        {"window", "stride", "padding"},
    ),
    "global_avg_pool": (lambda d: GlobalAvgPool(), set()),
    "flatten": (lambda d: Flatten(), set()),
    "readout": (
        lambda d: Readout(
            d.get("weight_var", 1.0),
            d.get("bias_var", 0.0),
            correlation_from_spec(d.get("correlation"), "correlation"),
            d.get("parameterization", "ntk"),
        ),
        {"weight_var", "bias_var", "correlation", "parameterization"},
    ),
}


#: keys whose values must be JSON numbers (a string such as "1" is refused, not converted)
_NUMBERS = frozenset({"weight_var", "bias_var", "nu", "lengthscale", "a", "b", "c"})


def _build(table, d, what):
    if not isinstance(d, dict):
        raise CNNGPError(f"{what}: expected an object like {{\"type\": ...}}, got {d!r}")
    kind = d.get("type")
    if kind not in table:
        raise CNNGPError(f"{what}: unknown type {kind!r}; expected one of {sorted(table)}")
    factory, keys = table[kind]
    unknown = set(d) - keys - {"type"}
    if unknown:
        raise CNNGPError(
            f"{what} of type {kind!r}: unknown key(s) {sorted(unknown)}; accepted keys are "
            f"{sorted(keys | {'type'})}"
        )
    missing = sorted(_REQUIRED.get(kind, set()) - set(d))
    if missing:
        raise CNNGPError(f"{what} of type {kind!r}: missing key(s) {missing}")
    for key in sorted(_NUMBERS & set(d)):
        value = d[key]
        if key == "lengthscale" and isinstance(value, str) and value.strip().lower() in ("inf", "infinity", "+inf"):
            continue  # the spec's own spelling of λ = ∞ (JSON has no infinity)
        if isinstance(value, (str, bool)):  # "1" or true would be coerced silently
            raise CNNGPError(f"{what} of type {kind!r}: {key!r} must be a number (like 1.0, "
                             f"not in quotes), got {value!r}")
    try:
        return factory(d)
    except CNNGPError as e:
        raise CNNGPError(f"{what} of type {kind!r}: {e}") from None


def correlation_from_spec(d, what="correlation"):
    """A Correlation from ``{"type": "matern", "nu": 1.5, "lengthscale": 2.0}`` etc."""
    if d is None:
        return Independent()
    return _build(_CORRELATIONS, d, what)


class Network(Serial):
    """A :class:`Serial` that also knows its number of input channels (from a spec)."""

    def __init__(self, *layers, input_channels: int | None = None, name: str | None = None):
        super().__init__(*layers, input_channels=input_channels)
        self.name = name

    def to_spec(self):
        spec = {"layers": [layer.to_spec() for layer in self.layers]}
        if self.input_channels is not None:
            spec = {"input_channels": self.input_channels, **spec}
        return spec


def from_spec(spec: dict, name: str | None = None) -> Network:
    """Build a network from a spec dict ``{"input_channels": C, "layers": [...]}``."""
    if not isinstance(spec, dict):
        raise CNNGPError(f"spec: expected a JSON object with a 'layers' list, got {type(spec).__name__}")
    unknown = set(spec) - {"input_channels", "layers", "name", "description", "type"}
    if unknown:
        raise CNNGPError(
            f"spec: unknown key(s) {sorted(unknown)}; accepted keys are "
            "['description', 'input_channels', 'layers', 'name', 'type']"
        )
    if spec.get("type", "serial") != "serial":  # Serial.to_spec() writes "type": "serial"
        raise CNNGPError(f"spec: 'type' must be 'serial' for a whole network, got {spec['type']!r}")
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise CNNGPError("spec: 'layers' must be a non-empty list of layer objects")
    channels = spec.get("input_channels")
    if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
        raise CNNGPError(f"spec: 'input_channels' must be an int >= 1, got {channels!r}")
    built = [_build(_LAYERS, d, f"layer {i}") for i, d in enumerate(layers)]
    return Network(*built, input_channels=channels, name=name or spec.get("name"))


class _HugeInt(Exception):
    """An integer literal of a spec file beyond any sensible field value."""


def _spec_int(text: str) -> int:
    """JSON integers up to 18 digits (no field of a spec needs more): a 10**400 would otherwise
    reach float() as an OverflowError, and 5000 digits Python's int-parsing limit."""
    digits = text.lstrip("-")
    if len(digits) > 18:
        raise _HugeInt(f"{text[:12]}... ({len(digits)} digits)")
    return int(text)


def load_spec(path) -> Network:
    """Read a JSON architecture file."""
    p = Path(path)
    if not p.is_file():
        raise CNNGPError(f"spec file: {str(path)!r} does not exist or is not a file")
    try:
        spec = json.loads(p.read_text(), parse_int=_spec_int)
    except _HugeInt as e:
        raise CNNGPError(f"spec file: {str(path)!r} holds the integer {e}, too large for any "
                         "field of a network spec") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CNNGPError(f"spec file: {str(path)!r} is not valid JSON ({e})") from None
    except RecursionError:
        raise CNNGPError(f"spec file: {str(path)!r} nests too deeply to be a network spec") from None
    except OSError as e:
        raise CNNGPError(f"spec file: {str(path)!r} cannot be read ({e.strerror})") from None
    return from_spec(spec, name=p.stem)

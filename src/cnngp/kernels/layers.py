"""Kernel layers: each maps a :class:`~cnngp.kernels.state.KernelState` to the next (docs/maths.md §2).

Every layer has one job: given the second moments of its inputs over position pairs, return
those of its outputs. Layers also report their output grid (validating their geometry) and
which representation they need from below (full position-pair tensor or only its diagonal),
so :class:`Serial` can choose the cheapest representation automatically.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from cnngp.kernels import ops
from cnngp.kernels.ops import AxisGeometry, check_geometry
from cnngp.kernels.correlations import Constant, Correlation, Independent
from cnngp.errors import CNNGPError
from cnngp.settings import env_number
from cnngp.kernels.state import Band, KernelState
from cnngp.validation import non_negative_real

#: the name of the NTK's Θ among a kernel state's extra tensors (docs/maths.md §7)
TANGENT = "ntk"

__all__ = [
    "standard_parameterization",
    "Layer",
    "Conv",
    "AvgPool",
    "GlobalAvgPool",
    "Flatten",
    "Readout",
    "Nonlinearity",
    "Sin",
    "Sign",
    "ReLU",
    "ABReLU",
    "Erf",
    "Identity",
    "Serial",
]


def _check_ints(value, name, minimum=1):
    vals = value if isinstance(value, (list, tuple)) else (value,)
    out = []
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise CNNGPError(
                f"{name}: expected an int >= {minimum} or a list of them (one per spatial "
                f"dimension), got {value!r}"
            )
        out.append(int(v))
    if not out:
        raise CNNGPError(f"{name}: expected an int or a non-empty list, got {value!r}")
    return tuple(out)


def _per_dim(values: tuple, d: int, name: str) -> tuple:
    if len(values) == 1:
        return values * d
    if len(values) != d:
        raise CNNGPError(
            f"{name}: has {len(values)} entries but the input grid has {d} spatial dimensions"
        )
    return values


def _normalised(correlation) -> bool:
    return getattr(correlation, "normalise", True)


#: a band is used when it holds at most this fraction of the full tensor's entries
#: (environment CNNGP_BAND_FRACTION; 0 never uses bands)
BAND_FRACTION = env_number("CNNGP_BAND_FRACTION", 0.25)


def band_or_full(radius: tuple, spatial: tuple):
    """The representation for a needed radius: diagonal if 0, else a Band (each radius capped
    at grid size − 1, beyond which every partner is off the grid) when it holds at most
    BAND_FRACTION of the full tensor's entries, else the full tensor."""
    radius = tuple(min(int(r), n - 1) for r, n in zip(radius, spatial))
    if not any(radius):
        return False
    if math.prod(2 * r + 1 for r in radius) <= BAND_FRACTION * math.prod(spatial):
        return Band(radius)
    return True


PARAMETERIZATIONS = ("ntk", "standard")


def _check_parameterization(value) -> str:
    if value not in PARAMETERIZATIONS:
        raise CNNGPError(f"parameterization: expected one of {PARAMETERIZATIONS}, got {value!r}")
    return value


def _check_channels(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CNNGPError(f"channels: expected a positive integer or None, got {value!r}")
    return int(value)


def _parameterization_spec(layer) -> dict:
    """The spec keys of the NTK's parameterisation, only where they differ from the defaults
    (older specs, and the stores keyed by them, stay as they were)."""
    out = {}
    if layer.parameterization != "ntk":
        out["parameterization"] = layer.parameterization
    if getattr(layer, "channels", None) is not None:
        out["channels"] = layer.channels
    return out


def _check_correlation(correlation):
    """A layer's weight correlation: Independent() by default, else a cnngp Correlation."""
    if correlation is None:
        return Independent()
    if not isinstance(correlation, Correlation):
        raise CNNGPError(f"correlation: expected a cnngp Correlation, got {correlation!r}")
    return correlation


class Layer(nn.Module):
    """Base class. Subclasses implement the four methods below."""

    #: nonlinearities read the diagonals of each input's own covariance (var1, var2)
    needs_variances = False

    #: the layer has weights and biases of its own (conv, readout; not a pool): in the NTK
    #: their gradients add a term of their own to Θ (docs/maths.md §7)
    trainable = False

    #: "ntk" or "standard" (docs/maths.md §7): where σ_w/√fan_in sits, which only the NTK sees
    parameterization = "ntk"

    #: the engines' caches of plans built from this layer (fused, GPU): rebuilt on first use,
    #: never copied or pickled with it (a copy may be changed; a worker builds its own)
    ENGINE_CACHES = ("_fused_plans", "_gpu_plans", "_fused_offsets")

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in self.ENGINE_CACHES:
            state.pop(name, None)
        return state

    def tangent_coefficients(self, channels: int | None, spatial: tuple) -> tuple[float, float]:
        """(a, b) with this layer's own NTK term a·(Σ * V) + b, Σ * V its filtered input before
        weight_var and bias_var (docs/maths.md §7): (weight_var, bias_var) — the output NNGP —
        in the NTK parameterisation; (fan_in, 1) in the standard one, fan_in = C_in · taps with
        ``channels`` = C_in the input's channel count; (0, 0) for a layer without parameters."""
        if not self.trainable:
            return 0.0, 0.0
        if self.parameterization == "ntk":
            return float(self.weight_var), float(self.bias_var)
        if channels is None:
            raise CNNGPError(
                f"{self!r}: the standard parameterisation's NTK needs the channel count of this "
                "layer's input; give the conv before it channels=C (cnngp.standard_parameterization"
                "(model, width) sets every layer)"
            )
        return float(channels * self.fan_in_taps(spatial)), 1.0

    def fan_in_taps(self, spatial: tuple) -> int:
        """Weights per input channel of one output (the standard parameterisation's fan_in / C_in)."""
        raise NotImplementedError

    def output_channels(self, channels: int | None) -> int | None:
        """The channel count of the output given the input's (None: not tracked)."""
        return channels

    def _tangent_terms(self, extra: dict, filtered, channels=None, spatial=()) -> dict:
        """Θ_out = (linear part of Θ_in) + a·(Σ * V) + b for a trainable layer, ``filtered`` =
        Σ * V (docs/maths.md §7, :meth:`tangent_coefficients`)."""
        if self.trainable and TANGENT in extra:
            a, b = self.tangent_coefficients(channels, spatial)
            own = filtered * a if a != 1.0 else filtered
            extra = dict(extra)
            extra[TANGENT] = extra[TANGENT] + (own + b if b else own)
        return extra

    def output_spatial(self, spatial: tuple) -> tuple:
        """The output grid for an input grid; raises :class:`CNNGPError` if it cannot apply."""
        return spatial

    def requires_full_input(self, full_out: bool, spatial: tuple) -> bool:
        """Whether the full position-pair tensor is needed below to produce the output."""
        return full_out

    def input_representation(self, out, spatial: tuple):
        """The representation needed below (True full, False diagonal, or a
        :class:`~cnngp.kernels.state.Band`) to produce representation ``out``. The default suits
        position-wise layers: a band needs the same band."""
        if isinstance(out, Band):
            return out
        return bool(self.requires_full_input(out, spatial))

    def propagate(self, state: KernelState, full_out) -> KernelState:
        """The next state, in representation ``full_out`` (True, False or a Band)."""
        raise NotImplementedError

    def to_spec(self) -> dict:
        raise NotImplementedError

    def extra_repr(self):
        spec = self.to_spec()
        spec.pop("type")
        # a correlation by its own short repr (a user matrix as <P×P>, not its entries: this
        # repr is in one-line error messages)
        shown = {k: getattr(self, k) if isinstance(getattr(self, k, None), Correlation) else v
                 for k, v in spec.items()}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())


class Conv(Layer):
    """Convolution with weight prior N(0, weight_var · Σ / C_in) over filter taps, plus bias.

    K[q, q'] = weight_var · Σ_{p,p'} Σ[p, p'] V[i(q,p), i(q',p')] + bias_var   (docs/maths.md §2 (*))

    Parameters
    ----------
    filter, stride, dilation : int or sequence of int (one per spatial dimension)
    padding : {"same", "valid", "circular"}
        "same" splits like XLA/TensorFlow: the extra pixel goes after.
    weight_var, bias_var : float ≥ 0
        neural-tangents' ``W_std²`` and ``b_std²``.
    correlation : Correlation, default Independent()
        Σ over the filter taps; distances in tap index units.
    parameterization : {"ntk", "standard"}
        neural-tangents' ``parameterization``; only the NTK depends on it (docs/maths.md §7).
    channels : int, optional
        Output channels (neural-tangents' ``out_chan``): the fan-in of the next trainable
        layer in the standard parameterisation. Nothing else reads it.
    """

    trainable = True

    def __init__(
        self,
        filter=3,
        stride=1,
        dilation=1,
        padding: str = "same",
        weight_var: float = 1.0,
        bias_var: float = 0.0,
        correlation: Correlation | None = None,
        parameterization: str = "ntk",
        channels: int | None = None,
    ):
        super().__init__()
        self.parameterization = _check_parameterization(parameterization)
        self.channels = _check_channels(channels)
        self.filter = _check_ints(filter, "filter")
        self.stride = _check_ints(stride, "stride")
        self.dilation = _check_ints(dilation, "dilation")
        if padding not in ops.PADDINGS:
            raise CNNGPError(f"padding: expected one of {ops.PADDINGS}, got {padding!r}")
        self.padding = padding
        self.weight_var = non_negative_real(weight_var, "weight_var")
        self.bias_var = non_negative_real(bias_var, "bias_var")
        self.correlation = _check_correlation(correlation)

    # -- geometry ---------------------------------------------------------------------------
    def geometries(self, spatial) -> list[AxisGeometry]:
        d = len(spatial)
        if d == 0:
            raise CNNGPError(
                f"{type(self).__name__}: needs a spatial grid, but its input has none "
                "(it comes after a readout, flatten or global_avg_pool)"
            )
        f = _per_dim(self.filter, d, "filter")
        s = _per_dim(self.stride, d, "stride")
        h = _per_dim(self.dilation, d, "dilation")
        return [AxisGeometry(n, fi, si, hi, self.padding) for n, fi, si, hi in zip(spatial, f, s, h)]

    def output_spatial(self, spatial):
        geoms = self.geometries(spatial)
        for g in geoms:
            check_geometry(g, type(self).__name__)
        # a user correlation must match the filter size: check once, here
        self.correlation.check_shape(tuple(g.taps for g in geoms))
        return tuple(g.n_out for g in geoms)

    def affine_filter(self) -> bool:
        """Declares that this layer's kernel map is the correlated filter of docs/maths.md §2 (*),
        K[q,q'] = σ_w² Σ_{p,p'} Σ[p,p'] V[i(q,p), i(q',p')] + σ_b², with the geometry,
        correlation and variances it holds: true for Conv and AvgPool, false for a subclass
        that changes the maths (fast paths then leave it to its own propagate)."""
        cls = type(self)
        return cls.propagate is Conv.propagate and cls.geometries is Conv.geometries

    def correlation_kind(self, spatial) -> str | None:
        """What this conv's weight correlation amounts to on an input grid of ``spatial``:
        ``"independent"``, ``"constant"`` or None (a general Σ). Engines pick their paths
        from this declaration."""
        return self._kind(self.geometries(spatial))

    def _kind(self, geoms):
        if all(g.taps == 1 for g in geoms) and _normalised(self.correlation):
            return "independent"  # a single tap: every normalised correlation is [[1]]
        return self.correlation.kind

    def requires_full_input(self, full_out, spatial):
        return full_out if self._kind(self.geometries(spatial)) == "independent" else True

    def input_representation(self, out, spatial):
        if out is True:
            return True
        geoms = self.geometries(spatial)
        independent = self._kind(geoms) == "independent"
        if independent and not isinstance(out, Band):
            return False
        r_out = out.radius if isinstance(out, Band) else (0,) * len(geoms)
        if self.padding == "circular":  # wrap-around partners: only the full tensor
            return True
        return band_or_full(ops.band_radius_in(geoms, r_out, independent), spatial)

    # -- kernel ------------------------------------------------------------------------------
    def propagate(self, state, full_out):
        geoms = self.geometries(state.spatial)
        kind = self._kind(geoms)
        q_shape = tuple(g.n_out for g in geoms)
        if state.band is not None or (isinstance(full_out, Band) and not state.full):
            return self._propagate_band(state, full_out, geoms, kind, q_shape)
        if isinstance(full_out, Band):  # full below, band above: compute full, keep the band
            return self.propagate(state, True).to_band(full_out.radius)
        filtered, rep = self._filter(state, state.cross, full_out, geoms, kind)
        # extra tensors go through the linear part (σ_w² Σ * ·), without the bias
        extra = {k: self._filter(state, v, full_out, geoms, kind)[0] * self.weight_var
                 for k, v in state.extra.items()}
        x = self._affine(filtered)
        extra = self._tangent_terms(extra, filtered, state.channels, state.spatial)
        return state.evolve(x, spatial=q_shape, full=rep, extra=extra,
                            channels=self.output_channels(state.channels))

    def fan_in_taps(self, spatial):
        return math.prod(g.taps for g in self.geometries(spatial))

    def output_channels(self, channels):
        return self.channels

    def _filter(self, state, t, full_out, geoms, kind):
        """Σ * t (docs/maths.md §2 (*)) for ``t``, one of ``state``'s tensors, before the
        variances: (result, its representation)."""
        d = len(geoms)
        n = math.prod(g.taps for g in geoms)  # Σ = I/|P| or 11ᵀ/|P|²: sums, then one scale
        if kind == "independent":
            if state.full and full_out:  # one diagonal sum per axis pair (d, D + d)
                x = t
                for k, g in enumerate(geoms):
                    x = ops.shift_sum(x, (1 + k, 1 + d + k), g, scale=False)
                return ops.scaled(x, n), full_out
            x = state.diagonal(t)  # the spatial diagonal is an ordinary strided/dilated average
            for k, g in enumerate(geoms):
                x = ops.shift_sum(x, (1 + k,), g, scale=False)
            return ops.scaled(x, n), False
        if not state.full:
            raise CNNGPError(f"{self!r}: a correlated filter needs the full position-pair covariance")
        if kind == "constant" and full_out:  # box sums, each side and axis separately
            x = t
            for k, g in enumerate(geoms):
                x = ops.shift_sum(x, (1 + k,), g, scale=False)
                x = ops.shift_sum(x, (1 + d + k,), g, scale=False)
            return ops.scaled(x, n * n), full_out
        sigma = self.correlation.matrix(tuple(g.taps for g in geoms), t.dtype, t.device)
        if full_out:
            return ops.correlated_conv_full(t, sigma, geoms), full_out
        return ops.correlated_conv_diagonal(t, sigma, geoms), full_out

    def _affine(self, x):
        """weight_var · x + bias_var (docs/maths.md §2 (*)), skipping the identity parts (not for
        torch-scalar variances, which are being differentiated: docs/maths.md §8)."""
        if isinstance(self.weight_var, torch.Tensor) or self.weight_var != 1.0:
            x = x * self.weight_var
        if isinstance(self.bias_var, torch.Tensor) or self.bias_var:
            x = x + self.bias_var
        return x

    def _propagate_band(self, state, out, geoms, kind, q_shape):
        """Band (or diagonal) in, band or diagonal out: :func:`cnngp.kernels.ops.banded_conv`."""
        d = len(geoms)
        r_in = state.band if state.band is not None else (0,) * d
        r_out = out.radius if isinstance(out, Band) else (0,) * d
        if out is True:
            raise CNNGPError(f"{self!r}: a band input cannot give the full covariance")
        sigma = None
        if kind != "independent":
            sigma = self.correlation.matrix(
                tuple(g.taps for g in geoms), state.cross.dtype, state.cross.device
            )
        def banded(t):
            v = t if state.band is not None else t.reshape(t.shape + (1,) * d)
            return ops.banded_conv(v, sigma, geoms, r_in, r_out)

        filtered = banded(state.cross)
        x = self._affine(filtered)
        extra = {k: banded(v) * self.weight_var for k, v in state.extra.items()}
        channels = self.output_channels(state.channels)
        if any(r_out):
            mask = ops.band_mask(q_shape, r_out, x.dtype, x.device)
            x = x * mask
            extra = {k: v * mask for k, v in extra.items()}
            extra = self._tangent_terms(extra, filtered, state.channels, state.spatial)
            if TANGENT in extra and self.trainable:
                extra[TANGENT] = extra[TANGENT] * mask  # the own term's b off the grid
            return state.evolve(x, spatial=q_shape, full=Band(r_out), extra=extra, channels=channels)
        flat = lambda t: t.reshape(t.shape[: 1 + d])  # noqa: E731
        x = flat(x)
        extra = self._tangent_terms({k: flat(v) for k, v in extra.items()}, flat(filtered),
                                    state.channels, state.spatial)
        return state.evolve(x, spatial=q_shape, full=False, extra=extra, channels=channels)

    def to_spec(self):
        return {
            "type": "conv",
            "filter": list(self.filter),
            "stride": list(self.stride),
            "dilation": list(self.dilation),
            "padding": self.padding,
            "weight_var": self.weight_var,
            "bias_var": self.bias_var,
            "correlation": self.correlation.to_spec(),
            **_parameterization_spec(self),
        }


class AvgPool(Conv):
    """Average pooling: zero padding, divides by the window size (neural-tangents AvgPool).

    Exactly a convolution with constant correlation Σ = 11ᵀ/|P|², weight_var 1, no bias,
    and no parameters (nothing for the NTK to train).
    """

    trainable = False

    def output_channels(self, channels):
        return channels  # a pool keeps the channels

    def __init__(self, window=2, stride=None, padding: str = "valid"):
        super().__init__(
            filter=window,
            stride=window if stride is None else stride,
            padding=padding,
            correlation=Constant(),
        )

    def to_spec(self):
        return {
            "type": "avgpool",
            "window": list(self.filter),
            "stride": list(self.stride),
            "padding": self.padding,
        }


class _Collapse(Layer):
    """Layers after which no spatial grid remains."""

    def output_spatial(self, spatial):
        return ()

    def requires_full_input(self, full_out, spatial):
        return False


class GlobalAvgPool(_Collapse):
    """Mean over all positions: K = mean_{p,p'} V[p, p'] (needs the full covariance)."""

    def requires_full_input(self, full_out, spatial):
        return len(spatial) > 0

    def propagate(self, state, full_out):
        if state.ndim == 0:
            return state.evolve(state.cross, extra=state.extra)
        if not state.full:
            raise CNNGPError("GlobalAvgPool needs the full position-pair covariance")
        mean = lambda t: t.reshape(state.batch, -1).mean(1)  # noqa: E731
        return state.evolve(mean(state.cross), spatial=(), full=False,
                            extra={k: mean(v) for k, v in state.extra.items()})

    def to_spec(self):
        return {"type": "global_avg_pool"}


class Flatten(_Collapse):
    """neural-tangents Flatten: K = mean_p V[p, p] (only the spatial diagonal is needed)."""

    def propagate(self, state, full_out):
        if state.ndim == 0:
            return state.evolve(state.cross, extra=state.extra)
        mean = lambda t: state.diagonal(t).reshape(state.batch, -1).mean(1)  # noqa: E731
        # C channels on |F| positions become C·|F| features (a dense layer's fan-in after it)
        channels = None if state.channels is None else state.channels * math.prod(state.spatial)
        return state.evolve(mean(state.cross), spatial=(), full=False,
                            extra={k: mean(v) for k, v in state.extra.items()}, channels=channels)

    def to_spec(self):
        return {"type": "flatten"}


class Readout(Layer):
    """The last layer: a dense layer whose filter covers the whole grid (docs/maths.md §2).

    k = weight_var · Σ_{p,p'} Σ[p, p'] V[p, p'] + bias_var, Σ over the positions of the last
    grid (distances in its index units). Independent = flatten, Constant = global average
    pooling, Matérn/RBF in between.
    """

    trainable = True

    def __init__(self, weight_var: float = 1.0, bias_var: float = 0.0, correlation=None,
                 parameterization: str = "ntk"):
        super().__init__()
        self.parameterization = _check_parameterization(parameterization)
        self.weight_var = non_negative_real(weight_var, "weight_var")
        self.bias_var = non_negative_real(bias_var, "bias_var")
        self.correlation = _check_correlation(correlation)

    def output_spatial(self, spatial):
        if spatial:
            self.correlation.check_shape(spatial)  # a user matrix must fit the grid
        return ()

    def affine_readout(self) -> bool:
        """Declares that this readout's kernel is σ_w² Σ_{p,p'} Σ[p,p'] V[p,p'] + σ_b² with the
        Σ of :meth:`weights`: true for Readout, false for a subclass that changes the maths."""
        cls = type(self)
        return cls.propagate is Readout.propagate and cls.weights is Readout.weights

    def correlation_kind(self, spatial) -> str | None:
        """What this readout's correlation amounts to over a last grid of ``spatial``:
        ``"independent"`` (flatten), ``"constant"`` (global mean pooling) or None."""
        return self._kind(spatial)

    def _kind(self, spatial):
        if math.prod(spatial) == 1 and _normalised(self.correlation):
            return "independent"
        return self.correlation.kind

    def requires_full_input(self, full_out, spatial):
        return self._kind(spatial) != "independent"

    def input_representation(self, out, spatial):
        kind = self._kind(spatial) if spatial else "independent"
        if kind == "independent":
            return False
        if kind == "constant":
            return True
        # a Σ with compact support (exact zeros far from its diagonal) reads only a band
        d = len(spatial)
        if hasattr(self.correlation, "offset_weights"):
            # stationary: the support read from the offset table, O(|P|), not the |P|×|P| Σ
            from cnngp.kernels.correlations import offsets

            delta, _ = offsets(tuple(spatial))
            w = self.correlation.offset_weights(tuple(spatial)).detach().numpy()
            support = np.abs(delta[w != 0])
            radius = tuple(int(support[:, k].max()) if support.size else 0 for k in range(d))
            return band_or_full(radius, spatial)
        m = self.correlation.matrix(spatial).reshape(tuple(spatial) * 2).detach().numpy()
        coords = np.nonzero(m)
        radius = tuple(
            int(np.abs(coords[k] - coords[d + k]).max()) if coords[0].size else 0 for k in range(d)
        )
        return band_or_full(radius, spatial)

    def weights(self, spatial, dtype, device, band=None):
        """Σ over the grid, flattened to shape (|F|·|F|,), or, for a band of radius ``band``,
        in the band layout (|F|·W,) with zeros for partners off the grid."""
        m = self.correlation.matrix(spatial, dtype, device)
        if band is None:
            return m.reshape(-1)
        return ops.band_from_full(m.reshape((1,) + tuple(spatial) * 2), spatial, band).reshape(-1)

    def propagate(self, state, full_out):
        filtered = self._sum(state, state.cross)
        value = (filtered * self.weight_var + self.bias_var).to(state.cross.dtype)
        # extra tensors go through the linear part, without the bias
        extra = {k: self._sum(state, v) * self.weight_var for k, v in state.extra.items()}
        extra = self._tangent_terms(extra, filtered, state.channels, state.spatial)
        extra = {k: v.to(state.cross.dtype) for k, v in extra.items()}
        return state.evolve(value, spatial=(), full=False, extra=extra, channels=None)

    def fan_in_taps(self, spatial):
        return math.prod(spatial)  # one weight per position and channel (1 on a grid-less input)

    def with_correlation(self, correlation) -> "Readout":
        """This readout (variances, parameterisation) with another weight correlation."""
        return Readout(self.weight_var, self.bias_var, correlation, self.parameterization)

    def _sum(self, state, t):
        """Σ_{p,p'} Σ[p, p'] t[p, p'] for ``t``, one of ``state``'s tensors (float64 sums)."""
        kind = self._kind(state.spatial)
        if state.ndim == 0:
            if kind != "independent":  # a 1×1 user matrix that is not normalised
                return t * self.weights((), t.dtype, t.device)[0]
            return t
        if kind == "independent":  # sums of 10⁶ terms accumulate in float64
            return state.diagonal(t).reshape(state.batch, -1).mean(1, dtype=torch.float64)
        if state.band is not None:  # Σ gathered into the band layout
            w = self.weights(state.spatial, torch.float64, t.device, state.band)
            return weighted_sums(t, w[:, None])[:, 0]
        if not state.full:
            raise CNNGPError(f"{self!r} needs the full position-pair covariance")
        if kind == "constant":
            return t.reshape(state.batch, -1).mean(1, dtype=torch.float64)
        w = self.weights(state.spatial, torch.float64, t.device)
        return weighted_sums(t, w[:, None])[:, 0]

    def to_spec(self):
        return {
            "type": "readout",
            "weight_var": self.weight_var,
            "bias_var": self.bias_var,
            "correlation": self.correlation.to_spec(),
            **_parameterization_spec(self),
        }


def weighted_sums(cross: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_{p,p'} W_l[p,p'] V_b[p,p'] for every pair b and readout l, accumulated in float64.

    cross: (B, *F, *F); weights: (|F|², L) float64. Returns (B, L) float64. One pair at a time
    is converted, so the float64 copy stays small.
    """
    flat = cross.reshape(cross.shape[0], -1)
    if flat.dtype == torch.float64:
        return flat @ weights
    return torch.stack([row.double() @ weights for row in flat])


# -- nonlinearities ----------------------------------------------------------------------------


class Nonlinearity(Layer):
    """Elementwise φ: V[p, p'] = E[φ(u) φ(v)] under the bivariate Gaussian of docs/maths.md §2."""

    needs_variances = True

    def expectation(self, c, vx, vy):  # pragma: no cover - abstract
        """E[φ(u)φ(v)] for Var u = vx, Var v = vy, Cov(u, v) = c (broadcastable tensors)."""
        raise NotImplementedError

    def function(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """φ itself, elementwise: what the finite twin applies (and quadrature checks)."""
        raise NotImplementedError

    def relu_coefficients(self) -> tuple[float, float] | None:
        """Declares ``φ(x) = a·min(x, 0) + b·max(x, 0)`` *and* that :meth:`expectation` is that
        φ's closed form, by returning ``(a, b)``; None otherwise. Fast paths (the fused CPU
        kernels) compute only what a layer declares, and decline the rest."""
        return None

    def _pointwise(self, cross, vx, vy):
        """A faster evaluation of the expectation for large diagonal/band states: the first
        registered engine that accepts this layer (see :func:`register_pointwise`), or None."""
        if cross.numel() < POINTWISE_MIN:
            return None
        for engine in _POINTWISE_ENGINES:
            out = engine(self, cross, vx, vy)
            if out is not None:
                return out
        return None

    def propagate(self, state, full_out):
        if state.var1 is None or state.var2 is None:
            raise CNNGPError(f"{self!r}: the kernel state carries no variances")
        state = state.convert(full_out)
        extra = {k: self.carry_extra(k, v, state) for k, v in state.extra.items()}
        vx, vy = state.var1, state.var2
        if state.band is not None:  # partner q + j − R of each band slot: var2 shifted
            vy = ops.band_shift(vy, state.spatial, state.band)
            out = self._pointwise(state.cross, vx, vy)
            if out is None:
                out = self.expectation(state.cross, vx.reshape(vx.shape + (1,) * state.ndim), vy)
            mask = ops.band_mask(state.spatial, state.band, out.dtype, out.device)
            return state.evolve(out * mask, extra=extra)
        if not state.full:
            out = self._pointwise(state.cross, vx, vy)
            if out is not None:
                return state.evolve(out, extra=extra)
        if state.full:
            ones = (1,) * state.ndim
            vx = vx.reshape(vx.shape + ones)
            vy = vy.reshape((vy.shape[0],) + ones + vy.shape[1:])
        return state.evolve(self.expectation(state.cross, vx, vy), extra=extra)

    def derivative_expectation(self, c, vx, vy):
        """E[φ′(u)φ′(v)] under the same Gaussian as :meth:`expectation` (the NTK's V̇,
        docs/maths.md §7); finite where a variance is 0. None by default: no NTK."""
        raise CNNGPError(
            f"{self!r}: has no closed-form E[φ′(u)φ′(v)], so no neural tangent kernel; "
            "define derivative_expectation(c, vx, vy)"
        )

    def carry_extra(self, name: str, tensor: torch.Tensor, state) -> torch.Tensor:
        """How the extra tensor ``name`` (see :attr:`cnngp.kernels.state.KernelState.extra`) passes
        this nonlinearity, given the converted input ``state`` with its variances: the NTK's Θ
        is multiplied by V̇ = E[φ′ φ′] (docs/maths.md §7); other names have no rule."""
        if name != TANGENT:
            raise CNNGPError(
                f"{self!r}: no rule to carry the extra tensor {name!r} through this nonlinearity"
            )
        vx, vy = state.var1, state.var2
        if state.band is not None:
            vy = ops.band_shift(vy, state.spatial, state.band)
            vx = vx.reshape(vx.shape + (1,) * state.ndim)
            mask = ops.band_mask(state.spatial, state.band, tensor.dtype, tensor.device)
            return tensor * self.derivative_expectation(state.cross, vx, vy) * mask
        if state.full:
            ones = (1,) * state.ndim
            vx = vx.reshape(vx.shape + ones)
            vy = vy.reshape((vy.shape[0],) + ones + vy.shape[1:])
        return tensor * self.derivative_expectation(state.cross, vx, vy)


class _ReLUExpectation(torch.autograd.Function):
    """E[relu relu] with the closed-form derivatives (docs/maths.md §8): ∂/∂c = (π − θ)/2π,
    ∂/∂vx = s/(4π vx), ∂/∂vy = s/(4π vy), s = √(vx vy − c²) — finite where the formula's own
    parts are not (ρ = ±1, where s = 0, as for an image with itself), and 0 where a variance
    is 0 (a blank region whose variance no parameter moves)."""

    @staticmethod
    def forward(ctx, c, vx, vy):
        out = _relu_expectation_values(c, vx, vy)
        ctx.save_for_backward(c, vx, vy)
        return out

    @staticmethod
    def backward(ctx, grad):
        c, vx, vy = ctx.saved_tensors
        prod = vx * vy
        s = torch.sqrt(torch.clamp(prod - c * c, min=0))
        theta = torch.where(prod > 0, torch.atan2(s, c), torch.full_like(s, math.pi / 2))
        dc = (math.pi - theta) * (0.5 / math.pi)
        dvx = torch.where(vx > 0, s / (4 * math.pi * torch.where(vx > 0, vx, torch.ones_like(vx))), 0.0)
        dvy = torch.where(vy > 0, s / (4 * math.pi * torch.where(vy > 0, vy, torch.ones_like(vy))), 0.0)

        def reduce(g, like):  # sum the broadcast axes back to the input's shape
            while g.dim() > like.dim():
                g = g.sum(0)
            for k, n in enumerate(like.shape):
                if n == 1 and g.shape[k] != 1:
                    g = g.sum(k, keepdim=True)
            return g

        return grad * dc, reduce(grad * dvx, vx), reduce(grad * dvy, vy)


def _relu_expectation(c, vx, vy):
    """E[max(u,0) max(v,0)] (see :func:`_relu_expectation_values`); through
    :class:`_ReLUExpectation` when a gradient is wanted, for finite derivatives everywhere."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (c, vx, vy)):
        return _ReLUExpectation.apply(c, vx, vy)
    return _relu_expectation_values(c, vx, vy)


def _relu_expectation_values(c, vx, vy):
    """E[max(u,0) max(v,0)] = (sqrt(vx vy − c²) + (π − θ) c) / 2π, θ = arccos(c/√(vx vy)).

    Cho & Saul's arc-cosine kernel of degree 1. Written with atan2 so that zero-variance
    positions (blank image borders) give exactly 0 instead of 0/0.
    """
    prod = vx * vy
    tiny = prod < torch.finfo(prod.dtype).tiny
    if bool(tiny.any()) and bool((tiny & (vx > 0) & (vy > 0)).any()):
        # variances so small (float64: below ~1e-154) that vx·vy underflows, which would leave
        # max(c, 0), not a kernel: s = √(vx vy − c²) = n √(1 − ρ²) with n = √vx·√vy
        n = torch.sqrt(vx) * torch.sqrt(vy)
        rho = torch.clamp(c / torch.where(n > 0, n, torch.ones_like(n)), -1.0, 1.0)
        s = n * torch.sqrt(torch.clamp((1 - rho) * (1 + rho), min=0))
    else:
        s = torch.sqrt(torch.clamp(prod - c * c, min=0))
    theta = torch.atan2(s, c)
    return (s + (math.pi - theta) * c) * (0.5 / math.pi)


def _angle(c, vx, vy):
    """θ = arccos(c/√(vx vy)) in [0, π], π/2 where a variance is 0 (as neural-tangents).

    s = √(vx·vy − c²) from the product itself (exactly 0 when c² = vx·vy), as in
    :func:`_relu_expectation`; only where vx·vy underflows does it go through √vx·√vy.
    1 − ρ² below 16ε counts as 0 (θ = 0): θ ≈ sqrt(2(1 − |ρ|)) would turn the rounding of c
    and of the variances (summed in different orders) into a sqrt(ε) error in the NTK's V̇
    where an image meets itself; the fused CPU kernels use the same rule."""
    prod = vx * vy
    gap = prod - c * c
    s = torch.sqrt(torch.where(gap <= (16 * torch.finfo(prod.dtype).eps) * prod, 0.0, gap))
    tiny = prod < torch.finfo(prod.dtype).tiny
    n = torch.sqrt(vx) * torch.sqrt(vy)
    if bool(tiny.any()):
        rho = torch.clamp(c / torch.where(n > 0, n, torch.ones_like(n)), -1.0, 1.0)
        s = torch.where(tiny, n * torch.sqrt(torch.clamp((1 - rho) * (1 + rho), min=0)), s)
    return torch.where(n > 0, torch.atan2(s, c), torch.full_like(s, math.pi / 2))


#: fewest entries of a diagonal or band state for which ReLU-family layers use a registered
#: engine's kernel (the fused CPU engine's arccos-free one). Default 0, always: that kernel
#: gives each entry the same bits wherever it sits in its batch, whereas torch's vectorised
#: atan2 rounds its SIMD body and its scalar tail differently, so a pair's kernel would depend
#: in the last bit on the batch it was computed in (a tile against the whole matrix). It is
#: also faster from ~10³ entries.
POINTWISE_MIN = env_number("CNNGP_POINTWISE_MIN", 0, integer=True)

#: engines offering a faster pointwise expectation: ``engine(layer, cross, vx, vy)`` returns
#: the tensor, or None to decline (a layer it does not handle, a device it does not run on)
_POINTWISE_ENGINES: list = []


def register_pointwise(engine) -> None:
    """Offer ``engine`` to every nonlinearity's diagonal/band evaluation (the kernel maths
    imports no engine; engines register themselves here when they are imported)."""
    if engine not in _POINTWISE_ENGINES:
        _POINTWISE_ENGINES.append(engine)


#: the largest |a|, |b|, |c| a nonlinearity takes: their squares and products enter the
#: kernel in float64 (1e50² = 1e100), and far beyond it erf(b·x) is a step (Sign) anyway
NONLINEARITY_PARAMETER_BOUND = 1e50


def _finite_numbers(names_values):
    """A nonlinearity's parameters as floats: real numbers, finite, of magnitude at most
    :data:`NONLINEARITY_PARAMETER_BOUND`."""
    for name, v in names_values:
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                or abs(v) > NONLINEARITY_PARAMETER_BOUND):
            raise CNNGPError(f"{name}: expected a finite number of magnitude at most "
                             f"{NONLINEARITY_PARAMETER_BOUND:g}, got {v!r}")
    return [float(v) for _, v in names_values]


class ABReLU(Nonlinearity):
    """φ(x) = a·min(x, 0) + b·max(x, 0) (leaky ReLU for a = slope, b = 1).

    With φ(x) = a·x + (b − a)·max(x, 0): E[φ(u)φ(v)] = a·b·c + (b − a)²·E[relu(u) relu(v)].
    """

    def __init__(self, a: float = 0.0, b: float = 1.0):
        super().__init__()
        self.a, self.b = _finite_numbers((("a", a), ("b", b)))

    def relu_coefficients(self):
        # only while the expectation is still ABReLU's (or ReLU's) own: a subclass that
        # overrides it computes something else, which no ReLU fast path may assume
        if type(self).expectation not in (ABReLU.expectation, ReLU.expectation):
            return None
        return (self.a, self.b)

    def expectation(self, c, vx, vy):
        d2 = (self.b - self.a) ** 2
        out = _relu_expectation(c, vx, vy)
        if d2 != 1.0:
            out = out * d2
        if self.a != 0.0:
            out = out + (self.a * self.b) * c
        return out

    def derivative_expectation(self, c, vx, vy):
        # φ′ = a below 0, b above: V̇ = (a² + b²)(π − θ)/2π + 2ab·θ/2π (θ = π/2 at zero variance)
        if type(self).expectation not in (ABReLU.expectation, ReLU.expectation):
            return super().derivative_expectation(c, vx, vy)  # a subclass changed the maths
        theta = _angle(c, vx, vy)
        return ((self.a**2 + self.b**2) * (math.pi - theta) + (2.0 * self.a * self.b) * theta) * (0.5 / math.pi)

    def function(self, x):
        if self.a == 0.0:
            return torch.relu(x) * self.b  # not in place: the empirical NTK differentiates φ
        return torch.where(x > 0, x * self.b, x * self.a)

    def to_spec(self):
        return {"type": "abrelu", "a": self.a, "b": self.b}


class ReLU(ABReLU):
    """Balanced ReLU √2·max(0, x): V = (1/π)(sqrt(ΣxΣy − Σxy²) + (π − θ)Σxy) (docs/maths.md §2)."""

    def __init__(self):
        super().__init__(0.0, math.sqrt(2.0))

    def expectation(self, c, vx, vy):
        return 2.0 * _relu_expectation(c, vx, vy)

    def function(self, x):
        return torch.relu(x) * math.sqrt(2.0)

    def to_spec(self):
        return {"type": "relu"}


class Erf(Nonlinearity):
    """φ(x) = a·erf(b·x) + c (neural-tangents Erf).

    E[erf(bu) erf(bv)] = (2/π) arcsin(2b²c / sqrt((1 + 2b²vx)(1 + 2b²vy))); the constant adds c².
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        super().__init__()
        self.a, self.b, self.c = _finite_numbers((("a", a), ("b", b), ("c", c)))

    def expectation(self, c, vx, vy):
        t = 2.0 * self.b**2
        arg = (t * c) * torch.rsqrt((1.0 + t * vx) * (1.0 + t * vy))
        out = torch.asin(torch.clamp(arg, -1.0, 1.0)) * (2.0 / math.pi * self.a**2)
        if self.c:
            out = out + self.c**2
        return out

    def derivative_expectation(self, c, vx, vy):
        # φ′ = a·b·(2/√π)·exp(−b²x²): V̇ = (4a²b²/π) / √((1 + 2b²vx)(1 + 2b²vy) − 4b⁴c²)
        t = 2.0 * self.b**2
        det = torch.clamp((1.0 + t * vx) * (1.0 + t * vy) - (t * c) ** 2, min=torch.finfo(c.dtype).tiny)
        return torch.rsqrt(det) * (4.0 / math.pi * (self.a * self.b) ** 2)

    def function(self, x):
        return self.a * torch.erf(self.b * x) + self.c

    def to_spec(self):
        return {"type": "erf", "a": self.a, "b": self.b, "c": self.c}




class Sin(Nonlinearity):
    """φ(x) = a·sin(b·x + c) (neural-tangents Sin).

    From sin α sin β = ½[cos(α − β) − cos(α + β)] and E cos(t·w) = exp(−t² Var w / 2):
    E[φ(u)φ(v)] = a²/2 · [exp(−b²(vx + vy − 2k)/2) − cos 2c · exp(−b²(vx + vy + 2k)/2)].
    """

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        super().__init__()
        self.a, self.b, self.c = _finite_numbers((("a", a), ("b", b), ("c", c)))

    def expectation(self, c, vx, vy):
        half = 0.5 * self.b**2
        total = vx + vy
        return (0.5 * self.a**2) * (
            torch.exp(-half * (total - 2.0 * c)) - math.cos(2.0 * self.c) * torch.exp(-half * (total + 2.0 * c))
        )

    def derivative_expectation(self, c, vx, vy):
        # φ′ = a·b·cos(bx + c); cos α cos β = ½[cos(α − β) + cos(α + β)]
        half = 0.5 * self.b**2
        total = vx + vy
        return (0.5 * (self.a * self.b) ** 2) * (
            torch.exp(-half * (total - 2.0 * c)) + math.cos(2.0 * self.c) * torch.exp(-half * (total + 2.0 * c))
        )

    def function(self, x):
        return self.a * torch.sin(self.b * x + self.c)

    def to_spec(self):
        return {"type": "sin", "a": self.a, "b": self.b, "c": self.c}


class Sign(Nonlinearity):
    """φ(x) = sign(x), the step function ±1 (neural-tangents Sign; the arc-cosine kernel of
    degree 0 up to an affine map): E[φ(u)φ(v)] = (2/π)·arcsin(ρ), ρ = k / √(vx·vy), and 0
    where a variance is 0 (sign(0) = 0)."""

    def expectation(self, c, vx, vy):
        n = torch.sqrt(vx) * torch.sqrt(vy)  # not √(vx·vy): the product may underflow
        rho = torch.clamp(c / torch.where(n > 0, n, torch.ones_like(n)), -1.0, 1.0)
        return torch.where(n > 0, torch.asin(rho) * (2.0 / math.pi), torch.zeros_like(rho))

    def derivative_expectation(self, c, vx, vy):
        raise CNNGPError(f"{self!r}: φ′ is a Dirac delta (2δ(x)), so the NTK of a sign layer is infinite; "
                         "compute its NNGP (--get nngp), or give a network without sign layers (--arch)")

    def function(self, x):
        return torch.sign(x)

    def to_spec(self):
        return {"type": "sign"}


class Identity(Nonlinearity):
    """φ(x) = x."""

    needs_variances = False

    def propagate(self, state, full_out):
        state = state.convert(full_out)
        return state.evolve(state.cross, extra=state.extra)

    def expectation(self, c, vx, vy):
        return c

    def derivative_expectation(self, c, vx, vy):
        return torch.ones_like(c)

    def function(self, x):
        return x

    def to_spec(self):
        return {"type": "identity"}


# -- composition -------------------------------------------------------------------------------


class Serial(Layer):
    """Layers applied in order. Errors are re-raised naming the layer index and its repr."""

    def __init__(self, *layers: Layer, input_channels: int | None = None):
        super().__init__()
        flat = []
        for layer in layers:
            if isinstance(layer, Serial):
                flat.extend(layer.layers)
            elif isinstance(layer, Layer):
                flat.append(layer)
            else:
                raise CNNGPError(f"Serial: expected cnngp layers, got {layer!r}")
        self.layers = nn.ModuleList(flat)
        if input_channels is None and layers and isinstance(layers[0], Serial):
            input_channels = layers[0].input_channels  # Serial(body, readout) keeps it
        if input_channels is not None and (
            isinstance(input_channels, bool) or not isinstance(input_channels, int) or input_channels < 1
        ):
            raise CNNGPError(f"input_channels: expected an int >= 1 or None, got {input_channels!r}")
        #: channels the network's input must have (checked against images), or None
        self.input_channels = input_channels

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            keep = self.input_channels if (i.start or 0) == 0 else None
            return Serial(*list(self.layers)[i], input_channels=keep)
        return self.layers[i]

    def split_readout(self) -> tuple["Serial", "Readout | None"]:
        """(body, readout): the layers before a final :class:`Readout` (keeping
        ``input_channels``) and that readout, or (self's layers, None) without one."""
        layers = list(self.layers)
        head = layers.pop() if layers and isinstance(layers[-1], Readout) else None
        return Serial(*layers, input_channels=self.input_channels), head

    def grids(self, spatial: Sequence[int]) -> list[tuple]:
        """Grid before each layer and after the last: list of len(self) + 1 tuples."""
        grids = [tuple(spatial)]
        for i, layer in enumerate(self.layers):
            try:
                grids.append(layer.output_spatial(grids[-1]))
            except CNNGPError as e:
                raise CNNGPError(f"layer {i} ({layer!r}) on input grid {grids[-1]}: {e}") from None
        return grids

    def output_spatial(self, spatial):
        return self.grids(spatial)[-1]

    def representation(self, spatial, full_out=False, band: bool = True) -> list:
        """For each layer's input (and the output at the end): True (full tensor), False
        (spatial diagonal) or a :class:`~cnngp.kernels.state.Band`, chosen from the top down: each
        layer asks for the least its output needs. ``band=False`` never uses bands."""
        grids = self.grids(spatial)
        flags = [full_out]
        for layer, grid in zip(reversed(self.layers), reversed(grids[:-1])):
            if not grid:
                rep = False
            else:
                rep = layer.input_representation(flags[-1], grid)
                if isinstance(rep, Band) and not band:
                    rep = True
            flags.append(rep)
        return flags[::-1]

    def requires_full_input(self, full_out, spatial):
        return self.representation(spatial, full_out, band=False)[0]

    def input_representation(self, out, spatial):
        return self.representation(spatial, out)[0]

    def propagate(self, state, full_out):
        flags = self.representation(state.spatial, full_out)
        for i, layer in enumerate(self.layers):
            state = layer.propagate(state, flags[i + 1])
        return state

    def to_spec(self):
        return {"type": "serial", "layers": [layer.to_spec() for layer in self.layers]}

    def extra_repr(self):
        return ""


def standard_parameterization(model, width) -> "Serial":
    """A copy of ``model`` in neural-tangents' standard parameterisation (docs/maths.md §7):
    every conv and readout gets ``parameterization="standard"`` and every conv ``channels`` =
    ``width`` (one int for all, or one per trainable conv, in order). The NNGP is unchanged;
    the NTK then depends on the widths, as a finite network's does in this parameterisation.
    """
    import copy

    net = model if isinstance(model, Serial) else Serial(*model) if isinstance(model, (list, tuple)) else Serial(model)
    net = copy.deepcopy(net)
    convs = [layer for layer in net.layers if isinstance(layer, Conv) and layer.trainable]
    widths = [width] * len(convs) if not isinstance(width, (list, tuple)) else list(width)
    if len(widths) != len(convs):
        raise CNNGPError(f"width: expected one int or {len(convs)} (one per conv), got {width!r}")
    for layer, w in zip(convs, widths):
        layer.channels = _check_channels(w)
        if layer.channels is None:
            raise CNNGPError(f"width: expected positive integers, got {width!r}")
        layer.parameterization = "standard"
    for layer in net.layers:
        if isinstance(layer, Readout):
            layer.parameterization = "standard"
    return net

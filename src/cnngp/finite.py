"""Finite networks sampled from the prior of a kernel model, and Monte Carlo kernels.

Every kernel layer has a finite twin: a ``torch.nn`` module at a chosen width C whose weights
are drawn from the layer's prior (docs/maths.md §1):

* conv: ``W[i, j, :] ~ N(0, weight_var · Σ / C_in)`` over the filter taps (row-major), one
  independent draw per (output, input) channel pair, bias ``b[i] ~ N(0, bias_var)``. Σ is
  sampled through a factor ``L`` with ``L Lᵀ = Σ`` from an eigendecomposition with clipped
  eigenvalues, so PSD-but-singular Σ (the constant case) is fine. Padding, stride and dilation
  follow the kernel layers exactly: input index ``i = s·q + h·p − pad_before``, "same" puts the
  extra pad pixel after, "circular" wraps around; cross-correlation like ``torch.conv*d``;
* avgpool: the deterministic per-channel window average (zero padding counted in the divisor);
* global_avg_pool: the mean over positions; flatten: all positions × channels as features;
* readout: a dense layer over the whole last grid, ``W[o, j, :] ~ N(0, weight_var · Σ / C)``
  with Σ over the grid positions (independent Σ = I/|F| is a flatten + dense layer with
  variance ``weight_var / (C·|F|)``); after a flatten or global pool its fan-in is the number
  of features. The last readout has ``n_outputs`` independent outputs, an inner one ``width``;
* relu (balanced, √2·max(0, x)), abrelu, erf, identity: elementwise.

The first conv's fan-in is the image channel count C_in: its ``Σ / C_in`` matches the engine's
``V0 = (1/C) Σ_c x x'``.

Empirical NTK (docs/maths.md §7): :meth:`FiniteNetwork.ntk` contracts the networks' parameter
Jacobians in the NTK parameterisation — the trainable variables are the standard normals behind
every weight (a conv's z with W = √(weight_var/C_in) · z Lᵀ, a readout's z, a bias's β with
b = √bias_var · β), so a correlated layer contributes ∇_W f · (weight_var/C_in · Σ ⊗ I) · ∇_W f′;
each twin with parameters maps ∂f/∂parameter to ∂f/∂(its normals) in ``ntk_gradient``.
``monte_carlo_kernel(..., get="ntk")`` averages it over networks like the NNGP. φ is
differentiated by autograd, almost everywhere: a sign layer's gradient is 0, its infinite-width
NTK infinite (the analytic kernel refuses it).

Seeding: network ``k`` of :func:`monte_carlo_kernel` with ``seed`` is exactly
``finite_network(..., seed=network_seed(seed, k))``, whatever the batching, and each layer of
a network draws from its own stream (seeded by the network seed and the layer index), so
results do not depend on how many networks are drawn at once. Streams differ between devices
and dtypes (reproducible given seed, device and dtype).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnngp.errors import CNNGPError
from cnngp.engine.gram import parse_get
from cnngp.engine.resources import check_job
from cnngp.validation import as_images, resolve_device, resolve_dtype
from cnngp.kernels.layers import (
    AvgPool,
    Conv,
    Flatten,
    GlobalAvgPool,
    Layer,
    Nonlinearity,
    Readout,
    Serial,
)

__all__ = [
    "FiniteNetwork",
    "register_twin",
    "finite_network",
    "monte_carlo_kernel",
    "monte_carlo_estimates",
    "network_seed",
    "covariance_factor",
    "DEFAULT_MC_MEMORY_BUDGET",
]

#: bytes of weights and activations one batch of sampled networks may use by default
DEFAULT_MC_MEMORY_BUDGET = 256 * 1024**2

_MASK64 = (1 << 64) - 1
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# -- seeds --------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix(*values: int) -> int:
    """A 63-bit seed from a tuple of integers (splitmix64 chain)."""
    h = 0x6A09E667F3BCC909
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def network_seed(seed: int, index: int) -> int:
    """The seed of network ``index`` among those :func:`monte_carlo_kernel` draws for ``seed``."""
    return _mix(seed, index)


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise CNNGPError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# -- geometry (docs/maths.md §1 indexing, written out independently of the kernel engine) ------------


def _per_dim(values: tuple, d: int, name: str) -> tuple:
    if len(values) == 1:
        return tuple(values) * d
    if len(values) != d:
        raise CNNGPError(f"{name}: has {len(values)} entries but the input grid has {d} dimensions")
    return tuple(values)


def _axis_geometry(n: int, taps: int, stride: int, dilation: int, padding: str):
    """(n_out, pad_before, pad_after) of one axis; "same"/"circular" split like XLA."""
    extent = (taps - 1) * dilation + 1
    if padding == "valid":
        return (n - extent) // stride + 1, 0, 0
    n_out = -(-n // stride)
    total = max((n_out - 1) * stride + extent - n, 0)
    return n_out, total // 2, total - total // 2


def _pad(x: torch.Tensor, pads: Sequence[tuple], padding: str) -> torch.Tensor:
    """Pad the last len(pads) axes of x by (before, after) each: zeros, or wrap-around."""
    d = len(pads)
    if padding == "circular":
        for k, (before, after) in enumerate(pads):
            if before or after:
                axis = x.dim() - d + k
                n = x.shape[axis]
                idx = torch.remainder(torch.arange(-before, n + after, device=x.device), n)
                x = x.index_select(axis, idx)
        return x
    flat = [v for before, after in reversed(pads) for v in (before, after)]
    return F.pad(x, flat) if any(flat) else x


# -- Σ factors ----------------------------------------------------------------------------------


def covariance_factor(sigma: torch.Tensor) -> torch.Tensor:
    """A factor ``L`` (|P|, r) with ``L Lᵀ = Σ`` for a PSD ``Σ`` (|P|, |P|), in float64.

    From the eigendecomposition, negative round-off eigenvalues clipped to 0 and null
    directions dropped (r = numerical rank), so singular Σ (e.g. the constant 11ᵀ/|P|²) works.
    """
    s = sigma.detach().to(device="cpu", dtype=torch.float64)
    s = 0.5 * (s + s.T)
    evals, evecs = torch.linalg.eigh(s)
    keep = evals > evals.abs().max().clamp_min(1e-300) * 1e-12
    if not bool(keep.any()):
        return torch.zeros(s.shape[0], 1, dtype=torch.float64)
    return evecs[:, keep] * evals[keep].sqrt()


_FACTORS: dict = {}  # (id(correlation), shape) → (correlation, factor): eigh once per layer


def _factor(correlation, shape: tuple) -> torch.Tensor:
    """Factor of Σ over a grid of ``shape`` (|P|, r), exact for the independent/constant kinds.

    Cached per correlation object and grid (a 32×32 readout's eigendecomposition is not free
    and every batch of networks needs it).
    """
    key = (id(correlation), tuple(shape))
    hit = _FACTORS.get(key)
    if hit is not None and hit[0] is correlation:
        return hit[1]
    factor = _compute_factor(correlation, tuple(shape))
    if len(_FACTORS) >= 64:
        _FACTORS.pop(next(iter(_FACTORS)))
    _FACTORS[key] = (correlation, factor)
    return factor


def _compute_factor(correlation, shape: tuple) -> torch.Tensor:
    size = math.prod(shape) if shape else 1
    if size == 1:
        m = correlation.matrix(shape) if shape else torch.ones(1, 1, dtype=torch.float64)
        return covariance_factor(m)
    if correlation.kind == "independent":
        return torch.eye(size, dtype=torch.float64) / math.sqrt(size)
    if correlation.kind == "constant":
        return torch.full((size, 1), 1.0 / size, dtype=torch.float64)
    return covariance_factor(correlation.matrix(shape))


def _sample_normals(seeds, layer_index, shape, bias_shape, device, dtype):
    """Standard normals (G, *shape) and, if ``bias_shape``, (G, *bias_shape): one stream per
    (network, layer), so the draw does not depend on how many networks are drawn together."""
    z = torch.empty((len(seeds),) + tuple(shape), device=device, dtype=dtype)
    b = torch.empty((len(seeds),) + tuple(bias_shape), device=device, dtype=dtype) if bias_shape else None
    for i, s in enumerate(seeds):
        gen = _generator(_mix(s, layer_index), device)
        torch.randn(tuple(shape), generator=gen, out=z[i])
        if b is not None:
            torch.randn(tuple(bias_shape), generator=gen, out=b[i])
    return z, b


def _sample_filters(seeds, layer_index, c_out, c_in, factor, scale, bias_var, device, dtype):
    """Weights (G, c_out, c_in, |P|) = scale · Z Lᵀ and biases (G, c_out) or None, per network."""
    r = factor.shape[1]
    z, b = _sample_normals(seeds, layer_index, (c_out, c_in, r), (c_out,) if bias_var else None, device, dtype)
    if _is_scaled_identity(factor):
        w = z.mul_(scale * float(factor[0, 0]))
    else:
        lt = (factor.T * scale).to(device=device, dtype=dtype)
        w = (z.reshape(-1, r) @ lt).reshape(z.shape[:3] + (factor.shape[0],))
    if b is not None:
        b.mul_(math.sqrt(bias_var))
    return w, b


def _standard(layer) -> bool:
    """Whether ``layer`` trains in the standard parameterisation (docs/maths.md §7)."""
    if getattr(layer, "parameterization", "ntk") != "standard":
        return False
    if layer.weight_var <= 0:
        raise CNNGPError(f"{layer!r}: the standard parameterisation's finite twin needs weight_var > 0")
    return True


def _standard_scale(twin) -> float:
    """∂f/∂v over ∂f/∂z for a weight: the standard parameterisation trains v = √(σ_w²/fan_in)·z
    (W = √|P| · v Lᵀ), the NTK one z; 1 in the NTK parameterisation."""
    return math.sqrt(twin.fan_in / twin.weight_var) if twin.standard else 1.0


def _is_scaled_identity(factor: torch.Tensor) -> bool:
    n, r = factor.shape
    return n == r and bool(torch.equal(factor, torch.diag(torch.diagonal(factor)))) and bool(
        (torch.diagonal(factor) == factor[0, 0]).all()
    )


# -- finite layers --------------------------------------------------------------------------------
#
# Activations flow as (N, G, C, *S): N images, G independent networks (G = 1 broadcasts, e.g. the
# input images before the first random layer), C channels, spatial grid S (empty after a readout,
# flatten or global pool).


class _FiniteLayer(nn.Module):
    def __init__(self, in_shape: tuple):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(in_shape)

    def _window(self, layer, taps_name: str, channels_out: int) -> None:
        """The geometry of a layer that slides a window (a conv's filter, a pool's window) over
        the input grid: taps, stride, dilation, padding, the pads per axis and the out shape."""
        spatial = self.in_shape[1:]
        d = len(spatial)
        if d == 0:
            raise CNNGPError(f"{layer!r}: needs a spatial grid, but its input has none")
        self.taps = _per_dim(layer.filter, d, taps_name)
        self.stride = _per_dim(layer.stride, d, "stride")
        self.dilation = _per_dim(layer.dilation, d, "dilation")
        self.padding = layer.padding
        geoms = [
            _axis_geometry(n, p, s, h, layer.padding)
            for n, p, s, h in zip(spatial, self.taps, self.stride, self.dilation)
        ]
        self.pads = [(b, a) for _, b, a in geoms]
        self.out_shape = (channels_out,) + tuple(n for n, _, _ in geoms)


class _FiniteConv(_FiniteLayer):
    """Correlated-weight convolution for G networks at once (one grouped conv call)."""

    def __init__(self, layer: Conv, in_shape, width, seeds, index, device, dtype):
        super().__init__(in_shape)
        c_in = in_shape[0]
        self._window(layer, "filter", width)
        factor = _factor(layer.correlation, self.taps)
        scale = math.sqrt(layer.weight_var / c_in)
        w, b = _sample_filters(seeds, index, width, c_in, factor, scale, layer.bias_var, device, dtype)
        self.weight = nn.Parameter(w.reshape(w.shape[:3] + self.taps))
        self.standard = _standard(layer)
        if self.standard and layer.channels not in (None, width):
            raise CNNGPError(
                f"{layer!r}: channels={layer.channels}, but the finite network has width {width}; "
                "its NTK in the standard parameterisation depends on the width, so they must agree"
            )
        if b is None and self.standard:  # the standard parameterisation trains a bias from 0
            b = torch.zeros(w.shape[:2], device=device, dtype=dtype)
        self.bias = None if b is None else nn.Parameter(b)
        self.fan_in = c_in * math.prod(self.taps)
        self.weight_var = layer.weight_var
        # the NTK's trainable variables are z (W = scale · z Lᵀ) and β (b = √bias_var · β)
        identity = _is_scaled_identity(factor)
        self.tangent_scale = scale * float(factor[0, 0]) if identity else scale
        self.bias_scale = math.sqrt(layer.bias_var)
        self.register_buffer(
            "tangent_factor", None if identity else factor.to(device=device, dtype=dtype), persistent=False
        )

    def forward(self, x):
        n, gx, c_in = x.shape[:3]
        g, c_out = self.weight.shape[:2]
        xp = _pad(x, self.pads, self.padding)
        spatial = xp.shape[3:]
        if gx == g:
            inp, groups = xp.reshape((n, gx * c_in) + spatial), g
        elif gx == 1:  # the same input for every network: one ordinary conv, G·C_out filters
            inp, groups = xp.reshape((n, c_in) + spatial), 1
        else:
            raise CNNGPError(f"finite conv: input holds {gx} networks, the layer {g}")
        y = _CONV[len(self.taps)](
            inp,
            self.weight.reshape((g * c_out, c_in) + self.taps),
            stride=self.stride,
            dilation=self.dilation,
            groups=groups,
        )
        y = y.reshape((n, g, c_out) + tuple(y.shape[2:]))
        if self.bias is not None:
            y = y + self.bias.reshape((1, g, c_out) + (1,) * len(self.taps))
        return y

    def ntk_gradient(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """∂f/∂z from ∂f/∂W = grad (B, G, C_out, C_in, *taps): ``scale · grad L`` over the taps
        (W = scale · z Lᵀ); for the bias ∂f/∂β = √bias_var · grad. Returns (B, G, k)."""
        lead = tuple(grad.shape[:2])
        if name == "bias":
            return (grad * (1.0 if self.standard else self.bias_scale)).reshape(lead + (-1,))
        if name != "weight":  # pragma: no cover - no other parameters
            raise CNNGPError(f"finite conv: no parameter {name!r}")
        if self.tangent_factor is not None:
            grad = grad.reshape(lead + tuple(self.weight.shape[1:3]) + (-1,)) @ self.tangent_factor
        return (grad * (self.tangent_scale * _standard_scale(self))).reshape(lead + (-1,))


class _FiniteAvgPool(_FiniteLayer):
    """Per-channel window mean (zero padding counts in the divisor), no weights."""

    def __init__(self, layer: AvgPool, in_shape):
        super().__init__(in_shape)
        self._window(layer, "window", in_shape[0])

    def forward(self, x):
        lead = x.shape[:3]
        xp = _pad(x, self.pads, self.padding)
        flat = xp.reshape((-1, 1) + tuple(xp.shape[3:]))
        box = flat.new_full((1, 1) + self.taps, 1.0 / math.prod(self.taps))
        y = _CONV[len(self.taps)](flat, box, stride=self.stride, dilation=self.dilation)
        return y.reshape(lead + tuple(y.shape[2:]))


class _FiniteGlobalAvgPool(_FiniteLayer):
    def __init__(self, in_shape):
        super().__init__(in_shape)
        self.out_shape = (in_shape[0],)

    def forward(self, x):
        if x.dim() == 3:
            return x
        return x.mean(dim=tuple(range(3, x.dim())))


class _FiniteFlatten(_FiniteLayer):
    def __init__(self, in_shape):
        super().__init__(in_shape)
        self.out_shape = (math.prod(in_shape),)

    def forward(self, x):
        return x.reshape(x.shape[:2] + (-1,))


class _FiniteReadout(_FiniteLayer):
    """Dense layer over all positions × channels, weights correlated over positions by Σ.

    ``W[o, j, :] = √(weight_var / C) · L z[o, j]`` with ``L Lᵀ = Σ`` over the grid positions
    and z standard normal. Stored as z and L: the output Σ_{j,p} W[o,j,p] a[j,p] is computed as
    Σ_{j,k} z[o,j,k] (aL)[j,k], which avoids forming W (|F|² work per output and channel).
    """

    def __init__(self, layer: Readout, in_shape, n_out, seeds, index, device, dtype):
        super().__init__(in_shape)
        c, spatial = in_shape[0], tuple(in_shape[1:])
        self.out_shape = (n_out,)
        factor = _factor(layer.correlation, spatial)  # (|F|, r); [[1]] after a flatten/pool
        self.identity = _is_scaled_identity(factor)
        self.scale = math.sqrt(layer.weight_var / c)
        if self.identity:
            self.scale *= float(factor[0, 0])
        z, b = _sample_normals(
            seeds, index, (n_out, c, factor.shape[1]), (n_out,) if layer.bias_var else None, device, dtype
        )
        self.z = nn.Parameter(z)
        self.register_buffer("factor", None if self.identity else factor.to(device=device, dtype=dtype))
        self.standard = _standard(layer)
        if b is None and self.standard:  # the standard parameterisation trains a bias from 0
            b = torch.zeros(z.shape[:2], device=device, dtype=dtype)
        self.bias = None if b is None else nn.Parameter(b.mul_(math.sqrt(layer.bias_var)))
        self.bias_scale = math.sqrt(layer.bias_var)
        self.fan_in = c * math.prod(spatial)
        self.weight_var = layer.weight_var

    @property
    def weight(self) -> torch.Tensor:
        """The weights (G, n_out, C, |F|) (formed on demand)."""
        w = self.z * self.scale
        return w if self.factor is None else w @ self.factor.T

    def forward(self, x):
        n, gx = x.shape[:2]
        g, _, c, _ = self.z.shape
        a = x.reshape(n, gx, c, -1)
        if self.factor is not None:
            a = a @ self.factor  # (N, Gx, C, r)
        y = torch.einsum("ngck,gock->ngo", a.expand(n, g, -1, -1), self.z) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y

    def ntk_gradient(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """z is already the standard-normal variable: ∂f/∂z = grad; ∂f/∂β = √bias_var · grad.
        (B, G, *shape) → (B, G, k)."""
        lead = tuple(grad.shape[:2])
        if name == "bias":
            return (grad * (1.0 if self.standard else self.bias_scale)).reshape(lead + (-1,))
        if name != "z":  # pragma: no cover - no other parameters
            raise CNNGPError(f"finite readout: no parameter {name!r}")
        return (grad * _standard_scale(self)).reshape(lead + (-1,))


class _FiniteElementwise(_FiniteLayer):
    """A nonlinearity's finite twin: the φ it declares (:meth:`Nonlinearity.function`)."""

    def __init__(self, layer, in_shape):
        super().__init__(in_shape)
        self.layer_spec = layer.to_spec()
        self.fn = layer.function

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self):
        return repr(self.layer_spec)


def _flatten_layers(model) -> list:
    if isinstance(model, (list, tuple)):
        return [layer for m in model for layer in _flatten_layers(m)]
    if isinstance(model, Serial):
        return list(model.layers)
    if isinstance(model, Layer):
        return [model]
    raise CNNGPError(f"model: expected a cnngp layer or Serial, got {type(model).__name__}")


#: the finite twin of each layer class, found through the class's MRO (a subclass inherits
#: its parent's twin); nonlinearities all share one, which applies their declared φ
_TWINS: dict = {}


def register_twin(layer_class):
    """Register ``builder(layer, in_shape, width, seeds, index, device, dtype)`` as the finite
    twin of ``layer_class`` (and of its subclasses that register none of their own)."""

    def decorate(builder):
        _TWINS[layer_class] = builder
        return builder

    return decorate


#: for the memory estimate: ``rule(layer, in_shape (C, *grid), grid_out, channels_out)`` →
#: (weights, output shape) of each twin class (absent: no weights, shape kept)
_TWIN_SIZES: dict = {}


def _conv_sizes(layer, shape, grid_out, channels_out):
    taps = math.prod(_per_dim(layer.filter, len(shape) - 1, "filter"))
    return shape[0] * channels_out * taps, (channels_out,) + grid_out


register_twin(AvgPool)(lambda layer, in_shape, *_: _FiniteAvgPool(layer, in_shape))
register_twin(Conv)(lambda layer, in_shape, *rest: _FiniteConv(layer, in_shape, *rest))
register_twin(GlobalAvgPool)(lambda layer, in_shape, *_: _FiniteGlobalAvgPool(in_shape))
register_twin(Flatten)(lambda layer, in_shape, *_: _FiniteFlatten(in_shape))
register_twin(Readout)(lambda layer, in_shape, *rest: _FiniteReadout(layer, in_shape, *rest))
register_twin(Nonlinearity)(lambda layer, in_shape, *_: _FiniteElementwise(layer, in_shape))
_TWIN_SIZES.update({
    AvgPool: lambda layer, shape, grid_out, c: (0, (shape[0],) + grid_out),
    Conv: _conv_sizes,
    GlobalAvgPool: lambda layer, shape, grid_out, c: (0, (shape[0],)),
    Flatten: lambda layer, shape, grid_out, c: (0, (math.prod(shape),)),
    Readout: lambda layer, shape, grid_out, c: (c * math.prod(shape), (c,)),
})


def _make_layer(layer, in_shape, width, seeds, index, device, dtype):
    for cls in type(layer).__mro__:
        builder = _TWINS.get(cls)
        if builder is not None:
            return builder(layer, in_shape, width, seeds, index, device, dtype)
    raise CNNGPError(f"{layer!r}: this layer type has no finite twin (see cnngp.finite.register_twin)")


# -- the network ----------------------------------------------------------------------------------


class FiniteNetwork(nn.Module):
    """G ≥ 1 finite networks drawn from the prior of a kernel model, evaluated together.

    Build with :func:`finite_network` (one network). The weights are drawn when the input grid
    is first known: at construction if ``spatial`` was given, else at the first call. Each layer
    draws from its own stream, so the draw does not depend on when it happens. The weights are
    ordinary trainable parameters (a readout stores z with W = √(weight_var/C) · z Lᵀ, see its
    ``weight`` property).

    Attributes
    ----------
    seeds : list of int
        One seed per network.
    width, in_channels, n_outputs : int
    finite : nn.ModuleList
        The finite layers (empty until built).
    """

    def __init__(
        self,
        model,
        in_channels: int,
        width: int,
        seeds: Sequence[int],
        *,
        n_outputs: int = 1,
        spatial: Sequence[int] | None = None,
        device=None,
        dtype="float32",
    ):
        super().__init__()
        self.kernel_layers = tuple(_flatten_layers(model))  # plain tuple: not submodules
        self.in_channels = _check_int(in_channels, "in_channels", 1)
        self.width = _check_int(width, "width", 1)
        self.n_outputs = _check_int(n_outputs, "n_outputs", 1)
        expected = getattr(model, "input_channels", None)
        if expected is not None and expected != self.in_channels:
            raise CNNGPError(
                f"in_channels: the network expects {expected} input channels, got {in_channels}"
            )
        self.seeds = [int(s) for s in seeds]
        if not self.seeds:
            raise CNNGPError("seeds: expected at least one network seed")
        self.device = resolve_device("cpu" if device is None else device)
        self.dtype = resolve_dtype(dtype)
        self.finite = nn.ModuleList()
        self.spatial = None
        if spatial is not None:
            self.build(spatial)

    @property
    def n_networks(self) -> int:
        return len(self.seeds)

    def _channels_after(self, i: int) -> int:
        """Output channels of layer i: n_outputs for the last readout, else width."""
        last = i == len(self.kernel_layers) - 1
        return self.n_outputs if last and isinstance(self.kernel_layers[i], Readout) else self.width

    def build(self, spatial: Sequence[int]) -> None:
        """Draw the weights for inputs on grid ``spatial`` (validated like the kernel)."""
        spatial = tuple(int(s) for s in spatial)
        if self.spatial is not None:
            if spatial != self.spatial:
                raise CNNGPError(
                    f"x: images of spatial shape {spatial}, but this finite network was built "
                    f"for {self.spatial}; build a new one for another image size"
                )
            return
        if not 1 <= len(spatial) <= 3:
            raise CNNGPError(f"x: expected 1, 2 or 3 spatial dimensions, got grid {spatial}")
        grids = Serial(*self.kernel_layers).grids(spatial)  # the kernel's own validation
        shape = (self.in_channels,) + spatial
        layers = []
        for i, layer in enumerate(self.kernel_layers):
            try:
                f = _make_layer(
                    layer, shape, self._channels_after(i), self.seeds, i, self.device, self.dtype
                )
            except CNNGPError as e:
                raise CNNGPError(f"layer {i} ({layer!r}) on input grid {shape[1:]}: {e}") from None
            shape = f.out_shape
            if tuple(shape[1:]) != tuple(grids[i + 1]):  # pragma: no cover - engine mismatch
                raise CNNGPError(
                    f"layer {i} ({layer!r}): finite output grid {shape[1:]} differs from the "
                    f"kernel's {grids[i + 1]}"
                )
            layers.append(f)
        self.finite.extend(layers)
        self.spatial = spatial

    @property
    def output_shape(self) -> tuple:
        """(C,) for a network ending in a readout/flatten/pool, else (C, *grid)."""
        if self.spatial is None:
            raise CNNGPError("the network is not built yet: call build(spatial) or run it once")
        return self.finite[-1].out_shape if len(self.finite) else (self.in_channels,) + self.spatial

    def _prepare(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(as_images(x, "x", self.in_channels))
        if x.dim() not in (3, 4, 5):
            raise CNNGPError(
                f"x: expected images (N, *spatial, C) with 1 to 3 spatial dims, got shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[-1] != self.in_channels:
            raise CNNGPError(
                f"x: has {x.shape[-1]} channels (last axis) but the network expects "
                f"{self.in_channels}; images must be channels-last (N, *spatial, C)"
            )
        if x.dtype == torch.uint8:
            x = x.to(self.dtype) / 255.0
        self.build(tuple(x.shape[1:-1]))
        x = x.to(device=self.device, dtype=self.dtype)
        d = x.dim() - 2
        return x.permute((0, d + 1) + tuple(range(1, d + 1))).unsqueeze(1)  # (N, 1, C, *S)

    def run(self, x, upto: int | None = None) -> torch.Tensor:
        """All networks' outputs, grouped: (N, G, C) or (N, G, C, *grid) if spatial remains."""
        h = self._prepare(x)
        for f in list(self.finite)[:upto]:
            h = f(h)
        return h.expand((h.shape[0], self.n_networks) + tuple(h.shape[2:]))

    @staticmethod
    def _channels_last(h: torch.Tensor) -> torch.Tensor:
        if h.dim() <= 3:
            return h
        return h.permute((0, 1) + tuple(range(3, h.dim())) + (2,))

    def forward(self, x) -> torch.Tensor:
        """Outputs of the network: (N, n_outputs) (or (N, C) features after a flatten/pool,
        or channels-last (N, *grid, C) for a model that ends on a grid). For G > 1 networks the
        network axis comes second: (N, G, ...)."""
        h = self._channels_last(self.run(x))
        return h[:, 0] if self.n_networks == 1 else h

    def hidden(self, x) -> torch.Tensor:
        """The last hidden layer (the input of a final readout), channels-last (N, *grid, C)."""
        upto = len(self.finite)
        if self.kernel_layers and isinstance(self.kernel_layers[-1], Readout):
            upto -= 1
        h = self._channels_last(self.run(x, upto))
        return h[:, 0] if self.n_networks == 1 else h

    def tangent_parameters(self) -> list:
        """``[(layer, name, full_name, parameter)]`` of every trainable parameter, in layer
        order (``name`` within its finite layer, ``full_name`` within the network).

        Each finite layer holding parameters must map ∂f/∂parameter to the gradient with
        respect to the standard normals of the NTK parameterisation (docs/maths.md §7) by a
        method ``ntk_gradient(name, grad) -> (B, G, k)`` (grad: (B, G, *parameter shape)); a
        twin registered without one is refused here.
        """
        if self.spatial is None:
            raise CNNGPError("the network is not built yet: call build(spatial) or run it once")
        out = []
        for i, f in enumerate(self.finite):
            named = [(n, p) for n, p in f.named_parameters() if p.requires_grad]
            if named and not callable(getattr(f, "ntk_gradient", None)):
                raise CNNGPError(
                    f"layer {i} ({self.kernel_layers[i]!r}): its finite twin {type(f).__name__} "
                    "has parameters but no ntk_gradient(name, grad) method, so its NTK is unknown"
                )
            out += [(f, n, f"finite.{i}.{n}", p) for n, p in named]
        return out

    def _ntk(self, x: torch.Tensor, n1: int, symmetric: bool, outputs_per_pass: int | None):
        """(Θ̂ (G, n1, n2) float64, outputs (N, G, O) detached) for images x (N, *S, C) holding
        x1 then (unless ``symmetric``) x2.

        One graph per image (a backward pass then costs one image); for each output o a
        vector-Jacobian product seeded with 1 at output o of every network (the G networks
        share no parameters, so one pass gives each its own gradient), batched over the
        outputs with ``torch.func.vmap``; the gradients become tangents of the standard-normal
        variables (each layer's ``ntk_gradient``) and are contracted over the images in float64.
        """
        from torch.func import functional_call, vjp, vmap

        self._prepare(x[:1])  # validates the images and draws the weights if not yet drawn
        if len(self.output_shape) != 1:
            raise CNNGPError(
                f"model: ends on a spatial grid {self.output_shape[1:]}; finish it with a readout, "
                "flatten or global_avg_pool layer"
            )
        tangents = self.tangent_parameters()
        primals = {full: p.detach() for _, _, full, p in tangents}
        g = self.n_networks
        pullbacks, outs = [], []
        with torch.enable_grad():
            for i in range(x.shape[0]):
                xi = x[i : i + 1]

                def f(params, xi=xi):
                    return functional_call(self, params, (xi,)).reshape(1, g, -1)

                if primals:
                    out, pull = vjp(f, primals)
                    pullbacks.append(pull)
                else:
                    out = self.run(xi)
                outs.append(out.detach())
        outs = torch.cat(outs)
        n_img, _, n_out = outs.shape
        n2 = n1 if symmetric else n_img - n1
        theta = torch.zeros((g, n1, n2), dtype=torch.float64, device=outs.device)
        if not primals:
            return theta, outs
        m = n_out if outputs_per_pass is None else max(1, min(int(outputs_per_pass), n_out))
        for o0 in range(0, n_out, m):
            mm = min(m, n_out - o0)
            seeds = outs.new_zeros((mm, 1, g, n_out))
            seeds[torch.arange(mm), 0, :, o0 + torch.arange(mm)] = 1.0
            per_param = [[] for _ in tangents]
            for pull in pullbacks:
                (grads,) = vmap(pull)(seeds)  # {full name: (mm, G, *shape)}
                for k, (layer, name, full, _) in enumerate(tangents):
                    per_param[k].append(layer.ntk_gradient(name, grads[full]))
                del grads
            for k, t in enumerate(per_param):
                t = torch.stack(t).to(torch.float64)  # (N, mm, G, k)
                per_param[k] = None
                a = t[:n1]
                theta += torch.einsum("aogk,bogk->gab", a, a if symmetric else t[n1:])
                del t, a
        del pullbacks
        return theta / n_out, outs

    def ntk(self, x1, x2=None, *, outputs_per_pass: int | None = None) -> torch.Tensor:
        """The empirical NTK Θ̂(x1, x2) of these networks (docs/maths.md §7), float64.

        Θ̂(x, x') = (1/O) Σ_o Σ_θ ∂f_o(x)/∂θ · ∂f_o(x')/∂θ over every trainable variable θ of
        the NTK parameterisation — each weight a standard normal (a correlated filter's z with
        W = √(σ_w²/fan_in) · z Lᵀ, Σ = L Lᵀ; a bias β with b = σ_b β) — averaged over the O
        outputs (features, for a model ending in a flatten/pool). Equivalently
        Σ_layers ∇_W f · Cov(W) · ∇_W f'ᵀ with Cov(W) the layer's prior covariance.

        Parameters
        ----------
        x1, x2 : images (N1, *spatial, C), (N2, *spatial, C) channels-last; x2 defaults to x1.
        outputs_per_pass : int, optional
            Outputs differentiated together (one batched backward pass each); all by default.

        Returns
        -------
        torch.Tensor (N1, N2), or (G, N1, N2) for G > 1 networks, on the network's device.
        """
        a1 = self._prepare_images(x1)
        symmetric = x2 is None
        x = a1 if symmetric else torch.cat([a1, self._prepare_images(x2)])
        theta, _ = self._ntk(x, a1.shape[0], symmetric, outputs_per_pass)
        return theta[0] if self.n_networks == 1 else theta

    def _prepare_images(self, x) -> torch.Tensor:
        """Images as a tensor (N, *spatial, C) on the network's device and dtype."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(as_images(x, "x", self.in_channels))
        if x.dtype == torch.uint8:
            x = x.to(self.dtype) / 255.0
        return x.to(device=self.device, dtype=self.dtype)

    def extra_repr(self):
        return f"networks={self.n_networks}, width={self.width}, in_channels={self.in_channels}"


def finite_network(
    model,
    in_channels: int,
    width: int,
    seed: int | None = None,
    *,
    n_outputs: int = 1,
    spatial: Sequence[int] | None = None,
    device=None,
    dtype="float32",
) -> FiniteNetwork:
    """One finite network of width ``width`` drawn from the prior of a kernel ``model``.

    Parameters
    ----------
    model : Layer or Serial
        Any cnngp model (its readout, if last, gets ``n_outputs`` outputs).
    in_channels : int
        Image channels C_in (the first layer's fan-in).
    width : int
        Channels C of every hidden layer (and of an inner readout).
    seed : int, optional
        Seed of the draw; random if None (recorded in ``net.seeds``).
    n_outputs : int
        Independent outputs of a final readout (each a sample of the same GP).
    spatial : sequence of int, optional
        Input grid; draw the weights now instead of at the first call.
    device, dtype : torch device (default CPU) and "float32" (default) or "float64".

    Returns
    -------
    FiniteNetwork
        ``net(x)`` maps images (N, *spatial, C_in), channels-last, to (N, n_outputs).

    Examples
    --------
    >>> import torch, cnngp
    >>> model = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    >>> net = finite_network(model, in_channels=3, width=8, seed=0, n_outputs=2)
    >>> net(torch.rand(5, 4, 4, 3)).shape
    torch.Size([5, 2])
    """
    if seed is None:
        seed = int(np.random.SeedSequence().entropy) & ((1 << 63) - 1)
    seed = _check_int(seed, "seed", 0)
    return FiniteNetwork(
        model, in_channels, width, [seed], n_outputs=n_outputs, spatial=spatial, device=device, dtype=dtype
    )


# -- Monte Carlo kernel ---------------------------------------------------------------------------


def network_memory(model, image_shape, width: int, n_outputs: int = 1, dtype="float32", *,
                   get="nngp") -> int:
    """Bytes one finite network of ``width`` needs to run one image of ``image_shape``
    (``(*spatial, C)``): its weights plus one image's activations — and, when ``get`` asks for
    the NTK, that image's autograd graph and its parameter gradients for one output at a time
    (the least an empirical NTK can use). Nothing is allocated."""
    layers = _flatten_layers(model)
    itemsize = torch.finfo(resolve_dtype(dtype)).bits // 8
    spatial = tuple(int(s) for s in image_shape[:-1])
    w, act = _per_network_bytes(layers, int(image_shape[-1]), spatial, int(width), int(n_outputs), itemsize)
    if "ntk" in parse_get(get):
        return int(_ntk_network_bytes(layers, int(image_shape[-1]), spatial, int(width), int(n_outputs),
                                      itemsize, 1, 1))
    return int(w + act)


#: seconds of fixed cost per sampled network and layer (seeding, drawing, launching)
SECONDS_PER_SAMPLE_LAYER = 5e-5
#: floating-point operations per second assumed for one CPU core's share of a finite network
#: (measured once per process by :func:`_flops_per_second`)
_RATE: list = []


def _flops_per_second() -> float:
    """A quick measure of this machine's matmul rate (float32, a few ms), kept for the process."""
    if not _RATE:
        import time

        a = torch.ones(256, 256)
        torch.mm(a, a)  # warm up
        start, reps = time.perf_counter(), 8
        for _ in range(reps):
            torch.mm(a, a)
        elapsed = max(time.perf_counter() - start, 1e-6)
        _RATE.append(max(1e8, 2 * 256**3 * reps / elapsed))
    return _RATE[0]


def network_seconds(model, image_shape, width: int, n_images: int, n_samples: int, n_outputs: int = 1, *,
                    get="nngp") -> float:
    """Seconds, roughly, that ``n_samples`` finite networks of ``width`` take on ``n_images``
    images of ``image_shape`` (``(*spatial, C)``): each sample draws its weights and runs every
    image forward (2 flops per weight per output position; the empirical NTK also runs backward,
    once per output), at this machine's measured matmul rate. Nothing is allocated."""
    layers = _flatten_layers(model)
    spatial = tuple(int(s) for s in image_shape[:-1])
    grids = Serial(*layers).grids(spatial)
    shape = (int(image_shape[-1]),) + spatial
    params = flops = 0
    for i, layer in enumerate(layers):
        rule = _sizes_of(layer)
        channels_out = int(n_outputs) if i == len(layers) - 1 else int(width)
        p, out = (0, shape) if rule is None else rule(layer, shape, tuple(grids[i + 1]), channels_out)
        params += p
        flops += 2 * p * math.prod(out[1:]) + math.prod(out)
        shape = out
    if "ntk" in parse_get(get):
        flops *= 1 + 2 * int(n_outputs)
    total = float(n_samples) * (float(flops) * float(n_images) + 20.0 * params)
    # plus each sample's fixed cost per layer (seeding, drawing, launching), which dominates
    # small networks whatever the matmul rate
    return total / _flops_per_second() + float(n_samples) * len(layers) * SECONDS_PER_SAMPLE_LAYER


def _sizes_of(layer):
    """The size rule registered for ``layer``'s class (through its MRO), or None."""
    for cls in type(layer).__mro__:
        if cls in _TWIN_SIZES:
            return _TWIN_SIZES[cls]
    return None


def _layer_sizes(layers, in_channels, spatial, width, n_outputs) -> tuple[int, int, int]:
    """(weights, peak activation elements, all activation elements) of one network on one
    image, from each twin's registered size rule (elementwise layers keep the shape, hold no
    weights)."""
    grids = Serial(*layers).grids(spatial)
    shape = (in_channels,) + tuple(spatial)
    params, peak, total = 0, math.prod(shape), math.prod(shape)
    for i, layer in enumerate(layers):
        rule = _sizes_of(layer)
        channels_out = n_outputs if i == len(layers) - 1 else width
        p, out = (0, shape) if rule is None else rule(layer, shape, tuple(grids[i + 1]), channels_out)
        params += p
        peak = max(peak, 2 * math.prod(shape) + 2 * math.prod(out))  # padded input + output
        total += 2 * math.prod(out)
        shape = out
    return params, peak, total


def _per_network_bytes(layers, in_channels, spatial, width, n_outputs, itemsize) -> tuple[int, int]:
    """(weight bytes, activation bytes per image) of one network, generous estimates."""
    params, peak, _ = _layer_sizes(layers, in_channels, spatial, width, n_outputs)
    return 2 * params * itemsize, peak * itemsize  # Z and Z Lᵀ while sampling


def _ntk_network_bytes(layers, in_channels, spatial, width, n_outputs, itemsize, n_images,
                       outputs_per_pass) -> int:
    """Bytes of one network's empirical NTK over ``n_images`` images, ``outputs_per_pass``
    outputs differentiated together: weights, every image's autograd graph, the backward
    pass's working set, and the gradients of all images (stored, then contracted in float64)."""
    params, _, total = _layer_sizes(layers, in_channels, spatial, width, n_outputs)
    m = outputs_per_pass
    return (itemsize * (2 * params + 2 * n_images * total + 3 * m * total)
            + n_images * m * params * (itemsize + 8))


_MC_DOC_PARAMS = """
    Parameters
    ----------
    model : Layer or Serial
        Must end without a spatial grid (readout, flatten or global_avg_pool).
    x1 : array (N1, *spatial, C)
        Images, channels-last; uint8 is scaled to [0, 1].
    x2 : array (N2, *spatial, C), optional
        Defaults to x1.
    width : int >= 1
        Channels of every hidden layer.
    n_samples : int >= 2
        Networks drawn; network k is ``finite_network(..., seed=network_seed(seed, k))``.
    seed : int >= 0
    n_outputs : int >= 1
        Outputs of the final readout per network (more outputs, less readout noise). The
        NTK's estimate hardly depends on the readout's draw (its readout term does not at
        all), so ``n_outputs=1`` is nearly as good there and each output costs a backward pass.
    batch : int, optional
        Networks evaluated together; chosen from ``memory_budget`` bytes (default 256 MiB) if
        None. The result does not depend on it.
    get : "nngp" (default), "ntk", "both" or a tuple such as ("nngp", "ntk")
        Which kernel, as for :func:`cnngp.kernel`: the NNGP (the mean over the outputs of
        f(x) f(x')), the empirical NTK (:meth:`FiniteNetwork.ntk`, the mean over the outputs
        of ∇_θ f(x) · ∇_θ f(x') in the NTK parameterisation, docs/maths.md §7), or several,
        from the same networks.
    execution, **options
        The execution options (:class:`cnngp.Execution`) ``dtype`` (here "float32" by default;
        estimates accumulate in float64), ``device``, ``memory_budget`` (of one batch of
        networks, default 256 MiB) and ``progress``.
"""

#: the execution options the Monte Carlo functions take, and their own defaults
_MC_OPTIONS = ("dtype", "device", "memory_budget", "progress")
_MC_DEFAULTS = {"dtype": "float32"}


def _mc_execution(execution, options, where):
    from cnngp.engine.execution import Execution

    return Execution.build(execution, options, where=where, accepted=_MC_OPTIONS, defaults=_MC_DEFAULTS)


def _estimate_batches(model, x1, x2, width, n_samples, seed, n_outputs, batch, ex, get="nngp"):
    """Validate, then yield per-network estimates, one (G, N1, N2) float64 tensor per kernel
    named by ``get`` (a tuple of them), batch after batch (``ex``: the Execution)."""
    memory_budget, device, dtype, progress = ex.memory_budget, ex.device, ex.dtype, ex.progress
    names = parse_get(get)
    width = _check_int(width, "width", 1)
    n_samples = _check_int(n_samples, "n_samples", 2)
    seed = _check_int(seed, "seed", 0)
    n_outputs = _check_int(n_outputs, "n_outputs", 1)
    if batch is not None:
        batch = _check_int(batch, "batch", 1)
    memory_budget = _check_int(
        DEFAULT_MC_MEMORY_BUDGET if memory_budget is None else memory_budget, "memory_budget", 1
    )
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    channels = getattr(model, "input_channels", None)
    a1 = as_images(x1, "x1", channels)
    a2 = None if x2 is None else as_images(x2, "x2", channels)
    if a2 is not None and a2.shape[1:] != a1.shape[1:]:
        raise CNNGPError(
            f"x2: images of shape {a2.shape[1:]} do not match x1's {a1.shape[1:]}; both must be "
            "(N, *spatial, C) with the same spatial size and channels"
        )
    spatial = tuple(a1.shape[1:-1])
    layers = _flatten_layers(model)
    last_grid = Serial(*layers).grids(spatial)[-1]
    if last_grid:
        raise CNNGPError(
            f"model: ends on a spatial grid {last_grid}; finish it with a readout, flatten or "
            "global_avg_pool layer"
        )
    n1 = a1.shape[0]
    x = torch.as_tensor(a1 if a2 is None else np.concatenate([a1, a2])).to(device=dev, dtype=dt)
    n_img = x.shape[0]
    itemsize = torch.finfo(dt).bits // 8
    w_bytes, act_bytes = _per_network_bytes(layers, a1.shape[-1], spatial, width, n_outputs, itemsize)
    ntk = "ntk" in names
    if ntk:
        sizes = (layers, a1.shape[-1], spatial, width, n_outputs, itemsize, n_img)
        check_job(  # one network on these images, one output at a time, must fit
            f"width={width}", memory_bytes=_ntk_network_bytes(*sizes, 1),
            remedy="the empirical NTK of one network of this width on these images does not "
                   "fit; use a smaller width or fewer images",
        )
        # all outputs in one backward pass if a network can, else as many as fit, one network
        per_pass = n_outputs
        while per_pass > 1 and _ntk_network_bytes(*sizes, per_pass) > memory_budget:
            per_pass = max(1, per_pass // 2)
        if batch is None:
            batch = max(1, memory_budget // max(_ntk_network_bytes(*sizes, per_pass), 1))
        batch = min(batch, n_samples)
    else:
        check_job(  # one network on one image must fit, or nothing can run
            f"width={width}", memory_bytes=w_bytes + act_bytes,
            remedy="one network of this width on one image does not fit; use a smaller width",
        )
        if batch is None:
            per_net = w_bytes + min(n_img, 64) * act_bytes
            batch = max(1, memory_budget // max(per_net, 1))
        batch = min(batch, n_samples)
        chunk = max(1, min(n_img, (memory_budget - batch * w_bytes) // max(batch * act_bytes, 1)))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        what = "monte carlo" + (" NTK" if ntk else "")
        bar = tqdm(total=n_samples, unit="net", desc=f"{what} (width {width}, batch {batch})")
    try:
        with torch.no_grad():
            for start in range(0, n_samples, batch):
                seeds = [network_seed(seed, k) for k in range(start, min(start + batch, n_samples))]
                net = FiniteNetwork(layers, a1.shape[-1], width, seeds, n_outputs=n_outputs,
                                    device=dev, dtype=dt, spatial=spatial)
                theta = None
                if ntk:
                    theta, outs = net._ntk(x, n1, a2 is None, per_pass)
                else:
                    outs = torch.cat([net.run(x[i : i + chunk]) for i in range(0, n_img, chunk)])
                est = {"ntk": theta}
                if "nngp" in names:
                    outs = outs.to(torch.float64)  # (N, G, F)
                    f1 = outs[:n1]
                    f2 = f1 if a2 is None else outs[n1:]
                    # one estimate per network: the mean over its outputs of f(x) f(x')
                    est["nngp"] = torch.einsum("agf,bgf->gab", f1, f2) / outs.shape[-1]
                yield tuple(est[name] for name in names)
                del net, outs, theta, est
                if bar is not None:
                    bar.update(len(seeds))
    finally:
        if bar is not None:
            bar.close()


def monte_carlo_kernel(
    model,
    x1,
    x2=None,
    *,
    width: int,
    n_samples: int,
    seed: int = 0,
    n_outputs: int = 16,
    batch: int | None = None,
    get="nngp",
    execution=None,
    **options,
):
    """Empirical kernel of finite networks sampled from ``model``'s prior, with its MC error.

    Draws ``n_samples`` independent networks, evaluates them on x1 and x2 and averages
    ``f(x) f(x')`` over the networks and over their outputs (``get="ntk"``: the empirical
    NTK, ``∇_θ f(x) · ∇_θ f(x')``). Each network gives one estimate (the mean over its
    ``n_outputs`` readout outputs, or over its features for a model ending in a flatten/pool);
    these are i.i.d., so the standard error per entry is their standard deviation over
    √n_samples. Memory stays bounded: networks are drawn ``batch`` at a time (one grouped
    convolution per layer) and images are chunked if needed (for the NTK, outputs are
    differentiated a few at a time if needed).
    {params}
    Returns
    -------
    (empirical, standard_error) : two float64 CPU tensors (N1, N2); for ``get="both"`` or a
    tuple, one such pair per kernel, in order.

    Examples
    --------
    >>> import torch, cnngp
    >>> model = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    >>> x = torch.rand(3, 4, 4, 2, dtype=torch.float64)
    >>> emp, se = monte_carlo_kernel(model, x, width=16, n_samples=400, seed=0)
    >>> bool(((emp - cnngp.kernel(model, x)).abs() < 5 * se + 1e-12).all())
    True
    >>> emp, se = monte_carlo_kernel(model, x, width=16, n_samples=400, seed=0, get="ntk", n_outputs=1)
    >>> bool(((emp - cnngp.kernel(model, x, get="ntk")).abs() < 5 * se + 1e-12).all())
    True
    """
    ex = _mc_execution(execution, options, "monte_carlo_kernel")
    names = parse_get(get)
    stats = [[0, None, None] for _ in names]  # count, mean, sum of squared deviations
    for ests in _estimate_batches(model, x1, x2, width, n_samples, seed, n_outputs, batch, ex, names):
        for st, est in zip(stats, ests):
            count, mean, m2 = st
            g = est.shape[0]
            b_mean = est.mean(0)
            b_m2 = ((est - b_mean) ** 2).sum(0)
            if mean is None:
                st[:] = [g, b_mean, b_m2]
            else:  # Chan et al.'s pairwise update of the mean and the sum of squared deviations
                delta = b_mean - mean
                total = count + g
                st[:] = [total, mean + delta * (g / total), m2 + b_m2 + delta**2 * (count * g / total)]
    out = tuple((mean.cpu(), torch.sqrt(m2 / (count - 1) / count).cpu()) for count, mean, m2 in stats)
    return out[0] if isinstance(get, str) and get != "both" else out


def monte_carlo_estimates(
    model,
    x1,
    x2=None,
    *,
    width: int,
    n_samples: int,
    seed: int = 0,
    n_outputs: int = 16,
    batch: int | None = None,
    get="nngp",
    execution=None,
    **options,
):
    """The per-network estimates behind :func:`monte_carlo_kernel`: (n_samples, N1, N2).

    Row k is network k's mean over its outputs of ``f(x) f(x')`` (or of its empirical NTK);
    their mean is the empirical kernel. For statistics beyond the per-entry standard error
    (ratios, covariances between entries). Same arguments as :func:`monte_carlo_kernel`.
    {params}
    Returns
    -------
    torch.Tensor (n_samples, N1, N2), float64 on the CPU; for ``get="both"`` or a tuple, one
    per kernel, in order.
    """
    ex = _mc_execution(execution, options, "monte_carlo_estimates")
    names = parse_get(get)
    parts = [[] for _ in names]
    for ests in _estimate_batches(model, x1, x2, width, n_samples, seed, n_outputs, batch, ex, names):
        for part, est in zip(parts, ests):
            part.append(est.cpu())
    out = tuple(torch.cat(part) for part in parts)
    return out[0] if isinstance(get, str) and get != "both" else out


monte_carlo_kernel.__doc__ = monte_carlo_kernel.__doc__.replace("    {params}\n", _MC_DOC_PARAMS)
monte_carlo_estimates.__doc__ = monte_carlo_estimates.__doc__.replace("    {params}\n", _MC_DOC_PARAMS)

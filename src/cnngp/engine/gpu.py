"""The Triton engine (``engine="triton"``): fused conv + nonlinearity kernels for the GPU.

Each full → full convolution on a 1-D or 2-D grid (zero or no padding; any stride, dilation
and correlation Σ over the taps), together with a ReLU-family nonlinearity after it, runs as
one Triton kernel (:mod:`cnngp.engine.triton_kernels`) over the plain (B, *F, *F) position-pair
tensor: each output entry is computed once from the tap pairs of Σ and passed through the
nonlinearity in registers (docs/maths.md §2 (*) and the ReLU expectation), with the NTK's Θ
beside it when asked (docs/maths.md §7). Every other layer — pools that are not affine
filters, other nonlinearities, readouts, diagonal and band representations, circular padding,
3-D grids — runs its own torch ``propagate``; so does the self pass. :func:`step_hook` is the
seam: :func:`cnngp.engine.fused.run_layers` offers it every layer.

Triton is imported only when this engine is used (``import cnngp`` never imports it). It runs
on a CUDA device, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is first imported: how the tests run it).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import numpy as np
import torch

from cnngp.engine import fused
from cnngp.errors import CNNGPError
from cnngp.kernels.layers import TANGENT
from cnngp.kernels.state import Band, KernelState

__all__ = ["available", "interpreting", "require", "supports", "GpuConvPlan", "conv_plan",
           "conv_act", "step_hook"]

#: output entries per program: large under the interpreter (each program is a Python call of
#: numpy ops on whole blocks), a few warps' worth on the GPU
BLOCK_GPU = 256
BLOCK_INTERPRET = 1 << 16
#: tap pairs per step of the kernel's loop on the GPU (the table is re-read per block)
TAPS_GPU = 1
#: entries of one [block, taps] tile under the interpreter
TILE_INTERPRET = 1 << 17

_KERNELS = None
_IMPORT_ERROR: str | None = None


def interpreting() -> bool:
    """Whether triton runs (or will run, once imported) under its CPU interpreter."""
    if "triton" in sys.modules:
        try:
            from triton import knobs

            return bool(knobs.runtime.interpret)
        except Exception:  # older triton without knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def _kernels():
    """The Triton kernels, imported on first use; None (with the reason kept) if triton is missing."""
    global _KERNELS, _IMPORT_ERROR
    if _KERNELS is None and _IMPORT_ERROR is None:
        try:
            _KERNELS = importlib.import_module("cnngp.engine.triton_kernels")
        except Exception as e:  # triton missing or broken
            _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    return _KERNELS


def _kernels_interpreted() -> bool:
    """Whether the imported kernels are the interpreter's (fixed at their import)."""
    k = _kernels()
    return k is not None and type(k.conv_act_kernel).__name__ == "InterpretedFunction"


def available(device=None) -> bool:
    """Whether the Triton engine can run here: triton imports and either a CUDA device is
    there (``device`` a CUDA device, or None) or the kernels run under the interpreter."""
    if importlib.util.find_spec("triton") is None or _kernels() is None:
        return False
    if _kernels_interpreted():
        return True
    dev = torch.device(device) if device is not None else None
    return torch.cuda.is_available() and (dev is None or dev.type == "cuda")


def require(device) -> None:
    """Raise :class:`CNNGPError` unless ``engine="triton"`` can run on ``device``."""
    if importlib.util.find_spec("triton") is None or _kernels() is None:
        why = _IMPORT_ERROR or "triton is not installed"
        raise CNNGPError(
            f"engine: 'triton' needs the triton package ({why}); install it with "
            "pip install 'cnngp[gpu]' (Linux), or use engine 'torch' or 'fused'"
        )
    if available(device):
        return
    if torch.device(device).type != "cuda":
        raise CNNGPError(
            f"engine: 'triton' runs on a CUDA device, not {str(device)!r} (or on the CPU under "
            "Triton's interpreter, TRITON_INTERPRET=1 set before triton is imported, for tests); "
            "use engine 'fused' or 'torch' on the CPU"
        )
    raise CNNGPError("engine: 'triton' needs a CUDA device, and torch sees none; use engine 'torch'")


# -- plans ---------------------------------------------------------------------------------


def supports(layer, spatial) -> bool:
    """Whether the Triton conv handles ``layer`` on an input grid ``spatial``: exactly the
    layers of the CPU fused path (:func:`cnngp.engine.fused._supported`): an affine filter
    (:meth:`cnngp.kernels.layers.Conv.affine_filter`) on a 1-D or 2-D grid, not circular."""
    return fused._supported(layer, spatial)


def _relu_like(layer) -> bool:
    return fused._relu_like(layer)


def _act_coefficients(act) -> tuple[float, float]:
    """(c_lin, c_relu) of φ = a·min(x, 0) + b·max(x, 0): c_lin = ab, c_relu = (b − a)²/2
    (as :func:`cnngp.engine.fused._act_coefficients`; exactly (0, 1) for the balanced ReLU)."""
    a, b = act.relu_coefficients()
    if a == 0.0 and b == math.sqrt(2.0):
        return 0.0, 1.0
    return a * b, 0.5 * (b - a) ** 2


class GpuConvPlan:
    """One conv on one input grid: geometry per axis (a 1-D grid is (n, 1)) and Σ as the
    table of its non-zero tap pairs (p0, p1, p0', p1') with their coefficients."""

    def __init__(self, conv, spatial):
        from cnngp.kernels import ops

        geoms = conv.geometries(spatial)
        self.spatial_in = tuple(spatial)
        self.spatial_out = tuple(g.n_out for g in geoms)
        if len(geoms) == 1:
            geoms = geoms + [ops.AxisGeometry(1, 1)]
        self.geoms = geoms
        self.n = (geoms[0].n_in, geoms[1].n_in)
        self.q = (geoms[0].n_out, geoms[1].n_out)
        self.stride = (geoms[0].stride, geoms[1].stride)
        self.dilation = (geoms[0].dilation, geoms[1].dilation)
        self.pad = (geoms[0].pad_before, geoms[1].pad_before)
        taps = (geoms[0].taps, geoms[1].taps)
        kind = conv.correlation_kind(spatial)
        sigma = fused._sigma(conv, kind, taps)  # Σ over the taps, as the CPU engine builds it
        nz = np.argwhere(sigma != 0)
        if len(nz) == 0:  # Σ = 0: one tap pair with coefficient 0 keeps the kernel's loop simple
            nz = np.zeros((1, 4), np.int64)
        self.taps = np.ascontiguousarray(nz, np.int32)
        self.coef = sigma[tuple(nz.T)].astype(np.float64)
        self._device = {}

    def tables(self, dtype, device):
        """(taps, coefficients) on ``device``, the coefficients in ``dtype`` (cached)."""
        key = (dtype, str(device))
        if key not in self._device:
            dilated = self.taps * np.array(self.dilation * 2, np.int32)  # h·p per axis and side
            self._device[key] = (
                torch.as_tensor(np.ascontiguousarray(dilated.T).reshape(-1), device=device),
                torch.as_tensor(self.coef, dtype=dtype, device=device),
            )
        return self._device[key]


def conv_plan(conv, spatial) -> GpuConvPlan | None:
    """The plan for ``conv`` on ``spatial``, or None where the torch path runs it."""
    if not supports(conv, spatial):
        return None
    # by value (the layer is mutable: Correlation.snapshot)
    key = (tuple(spatial), conv.filter, conv.stride, conv.dilation, conv.padding, conv.correlation.snapshot())
    cache = conv.__dict__.setdefault("_gpu_plans", {})
    if key not in cache:
        cache[key] = GpuConvPlan(conv, spatial)
    return cache[key]


_POLY = {}


def _polys(dtype, device):
    """G and H of :mod:`cnngp.engine.fused_kernels` (highest degree first) in ``dtype``."""
    key = (dtype, str(device))
    if key not in _POLY:
        from cnngp.engine import fused_kernels as fk  # the coefficients (numba is a dependency)

        g, h = (fk._G64, fk._H64) if dtype == torch.float64 else (fk._G32, fk._H32)
        _POLY[key] = (torch.tensor(g, dtype=dtype, device=device), torch.tensor(h, dtype=dtype, device=device))
    return _POLY[key]


def _roots(var: torch.Tensor):
    """√var and 1/√var (0 where var = 0), as the fused nonlinearity reads them."""
    r = torch.sqrt(var)
    inv = torch.where(r > 0, 1.0 / torch.where(r > 0, r, torch.ones_like(r)), torch.zeros_like(r))
    return r.contiguous(), inv.contiguous()


def conv_act(v: torch.Tensor, plan: GpuConvPlan, weight_var: float, bias_var: float, act=None,
             var1=None, var2=None, theta=None, own=(0.0, 0.0)):
    """The conv (docs/maths.md §2 (*)) of a full (B, *F, *F) tensor, then ``act`` (a
    ReLU-family layer, with the conv output's variances var1 (B, *Q) of the first image and
    var2 of the second), in one Triton pass. With ``theta`` (Θ_in, same shape): also Θ_out
    (docs/maths.md §7), ``own`` = (a, b) of the layer's own term. Returns K_out (and Θ_out)
    as (B, *Q, *Q)."""
    k = _kernels()
    b = v.shape[0]
    dtype, device = v.dtype, v.device
    n0, n1 = plan.n
    q0, q1 = plan.q
    v5 = v.reshape(b, n0, n1, n0, n1).contiguous()
    out = torch.empty((b, q0, q1, q0, q1), dtype=dtype, device=device)
    ntk = theta is not None
    t5 = theta.reshape(b, n0, n1, n0, n1).contiguous() if ntk else v5
    tout = torch.empty_like(out) if ntk else out
    taps, coef = plan.tables(dtype, device)
    c_lin = c_relu = 0.0
    if act is not None:
        c_lin, c_relu = _act_coefficients(act)
        rx, ix = _roots(var1.reshape(b, q0, q1).to(dtype))
        ry, iy = _roots(var2.reshape(b, q0, q1).to(dtype))
    else:
        rx = ix = ry = iy = out  # not read
    snap = 8.0 * torch.finfo(dtype).eps
    par = torch.tensor(
        [float(weight_var), float(bias_var), c_lin, c_relu, float(own[0]), float(own[1]),
         math.pi, 1.0 / math.pi, snap], dtype=dtype, device=device,
    )
    g, h = _polys(dtype, device)
    total = b * q0 * q1 * q0 * q1
    n_taps = int(coef.numel())
    if _kernels_interpreted():  # few, large numpy steps: a [block, taps] tile of ~2^17 entries
        block = min(BLOCK_INTERPRET, _pow2(total))
        taps_step = min(_pow2(n_taps), max(1, TILE_INTERPRET // block))
    else:
        block, taps_step = BLOCK_GPU, TAPS_GPU
    grid = (triton_cdiv(total, block),)
    if total:
        k.conv_act_kernel[grid](
            v5, t5, out, tout, taps, coef, n_taps,
            rx, ix, ry, iy, par, g, h,
            b, n0, n1, q0, q1,
            plan.stride[0], plan.stride[1], plan.pad[0], plan.pad[1],
            ACT=act is not None, NTK=ntk, NG=int(g.numel()), NH=int(h.numel()), BLOCK=block,
            TAPS=taps_step,
        )
    shape = (b,) + plan.spatial_out + plan.spatial_out
    if ntk:
        return out.reshape(shape), tout.reshape(shape)
    return out.reshape(shape)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The least power of two >= n (at least 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


# -- the runner's seam ------------------------------------------------------------------------


def step_hook(layers, flags, variances):
    """A ``step`` for :func:`cnngp.engine.fused.run_layers` (pair mode): at layer i of a full
    torch state it runs a supported conv — with the ReLU-family nonlinearity after it when
    that keeps the full tensor — on the Triton kernel and returns (state, next index); None
    leaves the layer to its own ``propagate``. ``variances(i, False)`` gives the (var1, var2)
    of the nonlinearity at index i (the self pass's records)."""
    n = len(layers)

    def step(i, state: KernelState):
        layer = layers[i]
        if not (state.full and state.band is None and flags[i] is True and flags[i + 1] is True):
            return None
        if isinstance(flags[i + 1], Band) or state.cross.dtype not in (torch.float32, torch.float64):
            return None
        plan = conv_plan(layer, state.spatial)
        if plan is None:
            return None
        act = layers[i + 1] if i + 1 < n else None
        if not (_relu_like(act) and flags[i + 2] is True):
            act = None
        var1 = var2 = None
        if act is not None:
            var1, var2 = variances(i + 1, False)
        ntk = TANGENT in state.extra
        if set(state.extra) - {TANGENT}:
            return None  # an extra tensor without a rule here: the torch path
        own = layer.tangent_coefficients(state.channels, state.spatial) if ntk else (0.0, 0.0)
        result = conv_act(state.cross, plan, layer.weight_var, layer.bias_var, act, var1, var2,
                          state.extra[TANGENT] if ntk else None, own)
        k, t = result if ntk else (result, None)
        out = KernelState(k, plan.spatial_out, True, extra={TANGENT: t} if ntk else {},
                          channels=layer.output_channels(state.channels))
        return out, i + (2 if act is not None else 1)

    return step

"""Gram matrices: run a network's kernel recursion over many image pairs.

Two passes (docs/maths.md §3):

1. a **self pass** over every distinct image computes, for each nonlinearity, the diagonal
   K_xx[p, p] of that image's own covariance. It carries the full position-pair tensor only
   below layers whose output variances need off-diagonal entries (correlated convs, pooling);
2. a **pair pass** over image pairs — only i ≤ j when x2 is None, mirrored afterwards —
   carries K_xx' in the cheapest representation the layers above allow (spatial diagonal or
   full tensor) and reads the variances recorded by the self pass.

Pairs are processed in batches whose size is chosen from a memory budget.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from cnngp.engine import fused
from cnngp.kernels import ops
from cnngp.errors import CNNGPError
from cnngp.settings import env_number
from cnngp.kernels.layers import TANGENT, Layer, Readout, Serial, weighted_sums
from cnngp.kernels.state import Band, KernelState
from cnngp.kernels.correlations import Constant
from cnngp.engine.resources import check_job
from cnngp.engine.execution import COMPUTE, ENGINES, RESUME, Execution, resolve_engine  # noqa: F401
from cnngp.engine.storage import Checkpoint, fingerprint
from cnngp.validation import as_images, resolve_device, resolve_dtype

__all__ = [
    "kernel", "readout_sweep", "kernel_diagonal", "offset_sums", "differentiable_kernel", "Execution", "GramPlan", "SelfRecords", "write_tile", "estimate_cost",
    "GramCost", "gram_needs", "check_gram", "input_state", "Tile", "tile_plan",
    "flip_images", "check_flip_symmetric", "mirrored_offsets",
    "as_images", "resolve_dtype",
    "DEFAULT_MEMORY_BUDGET",
]

#: bytes of working memory a batch of pairs may use, unless told otherwise
DEFAULT_MEMORY_BUDGET = env_number("CNNGP_MEMORY_BUDGET", 2 * 1024**3, 1, integer=True)


@dataclass
class _Plan:
    body: Serial
    heads: list
    grids: list
    pair_flags: list
    self_flags: list
    self_depth: int
    var_layers: list
    #: the kernels computed, in output order: ("nngp",), ("ntk",) or ("nngp", "ntk")
    kernels: tuple = ("nngp",)
    #: stacked readout weights, see _head_weights
    head_weights: dict = field(default_factory=dict)
    #: outputs are the offset sums S[δ] of the last hidden layer (docs/maths.md §8), not readouts
    offsets: bool = False
    #: the engine that runs the layers (resolve_engine): "fused", "torch" or "triton"
    engine: str = "fused"

    @property
    def spatial_out(self):
        return self.grids[-1]


#: what ``get=`` accepts
KERNEL_TYPES = ("nngp", "ntk")


def parse_get(get) -> tuple:
    """``"nngp"``, ``"ntk"``, ``"both"`` or a sequence of those names → the kernels, in order."""
    if isinstance(get, str):
        names = ("nngp", "ntk") if get == "both" else (get,)
    elif isinstance(get, (list, tuple)) and get and all(isinstance(g, str) for g in get):
        names = tuple(get)
    else:
        names = None
    if names is None or any(n not in KERNEL_TYPES for n in names) or len(set(names)) != len(names):
        raise CNNGPError(f"get: expected 'nngp', 'ntk', 'both' or a tuple of distinct names from "
                         f"{KERNEL_TYPES}, got {get!r}")
    return names


def _split_model(model) -> tuple[Serial, list]:
    if isinstance(model, Readout):
        return Serial(), [model]
    if not isinstance(model, Layer):
        raise CNNGPError(f"model: expected a cnngp layer or Serial, got {type(model).__name__}")
    body, head = (model if isinstance(model, Serial) else Serial(model)).split_readout()
    return body, [] if head is None else [head]


def _make_plan(body: Serial, heads: list, spatial: tuple) -> _Plan:
    grids = body.grids(spatial)
    last = grids[-1]
    for h in heads:
        h.output_spatial(last)
    if not heads and last:
        raise CNNGPError(
            f"model: ends on a spatial grid {last}; finish it with a readout, flatten or "
            "global_avg_pool layer"
        )
    top = _merge([h.input_representation(False, last) for h in heads] if last else [])
    pair_flags = body.representation(spatial, top)
    var_layers = [i for i, layer in enumerate(body.layers) if layer.needs_variances]
    self_depth = (var_layers[-1] + 1) if var_layers else 0
    self_flags = body[:self_depth].representation(spatial, False) if self_depth else [False]
    return _Plan(body, heads, grids, pair_flags, self_flags, self_depth, var_layers)


#: bytes of one layer's state per batch on the diagonal/band paths (see _batch_size)
STREAM_BATCH_BYTES = env_number("CNNGP_STREAM_BATCH_BYTES", 16 * 1024**2, 1, integer=True)


def _merge(reps):
    """The least representation that serves every readout: full if any needs it, else the
    widest band, else the diagonal."""
    if any(r is True for r in reps):
        return True
    bands = [r.radius for r in reps if isinstance(r, Band)]
    if not bands:
        return False
    return Band(tuple(max(rs) for rs in zip(*bands)))


def _elements(grid, rep):
    n = math.prod(grid) if grid else 1
    if isinstance(rep, Band):
        return n * math.prod(rep.widths)
    return n * n if rep is True else n


def _bytes_per_item(plan: _Plan, flags, depth, itemsize) -> int:
    """Working memory of one pair (or one image in the self pass), a generous estimate."""
    peak = 1
    for i in range(depth):
        layer = plan.body.layers[i]
        g_in, g_out = plan.grids[i], plan.grids[i + 1]
        e_in, e_out = _elements(g_in, flags[i]), _elements(g_out, flags[i + 1])
        work = e_in + 3 * e_out
        if hasattr(layer, "geometries") and isinstance(flags[i], Band):
            # banded_conv gathers (output band slots) × (filter offsets) channels
            geoms = layer.geometries(g_in)
            slots = math.prod(flags[i + 1].widths) if isinstance(flags[i + 1], Band) else 1
            offsets = math.prod(2 * g.taps - 1 for g in geoms)
            padded = math.prod(g.n_in + g.extent for g in geoms)
            work += 2 * slots * offsets * padded
        elif hasattr(layer, "geometries") and flags[i] is True and layer.correlation_kind(
            g_in
        ) not in ("independent", "constant"):
            geoms = layer.geometries(g_in)
            taps = math.prod(g.taps for g in geoms)
            q = math.prod(g.n_out for g in geoms)
            padded = math.prod(g.n_in + g.extent for g in geoms)
            work += q * taps * (padded if flags[i + 1] is True else taps) * 2
        if layer.needs_variances:
            work = e_in + 5 * e_out
        peak = max(peak, work)
    peak = max(peak, _elements(plan.grids[depth], flags[depth]) * 2)
    return peak * itemsize


#: float64 |P|×|P| arrays a dense readout Σ holds while it is built and used (the cached
#: distances, the profile's temporaries, Σ itself and its band or flattened copy)
READOUT_MATRICES = 6


def readout_matrix_bytes(heads, last) -> int:
    """Memory the readouts' dense Σ (|P|×|P| over the last grid ``last``) take, built once per
    computation before any pair: 0 for the independent and constant ends (no matrix). With
    one dense readout, :data:`READOUT_MATRICES` arrays."""
    size = math.prod(last) if last else 1
    dense = sum(1 for h in heads if last and hasattr(h, "correlation_kind")
                and h.correlation_kind(last) not in ("independent", "constant"))
    if not dense:
        return 0
    # the temporaries once (readouts are built one at a time), and each readout's Σ kept
    return (READOUT_MATRICES - 1 + dense) * size * size * 8


def _batch_size(plan, flags, depth, itemsize, budget, requested) -> int:
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise CNNGPError(f"batch_size: expected an int >= 1, got {requested!r}")
        return requested
    per = _bytes_per_item(plan, flags, depth, itemsize)
    batch = max(1, min(4096, budget // max(per, 1)))
    if not any(f is True for f in flags[: depth + 1]):
        # diagonal/band states run as whole-batch torch ops: one layer's state should stay
        # in the last-level cache (docs/tuning.md, CNNGP_STREAM_BATCH_BYTES)
        largest = max(_elements(plan.grids[i], flags[i]) for i in range(depth + 1))
        batch = min(batch, max(1, STREAM_BATCH_BYTES // (largest * itemsize)))
    return int(batch)


#: seconds per elementary operation of the cost model below (float32 counts 0.7 of it);
#: calibrated in docs/tuning.md, good to a factor of ~3: enough to refuse absurd jobs
SECONDS_PER_OP = env_number("CNNGP_SECONDS_PER_OP", 6e-11, 0)
#: fixed cost of one layer for one pair (call overhead on the diagonal path)
SECONDS_PER_LAYER_PAIR = 5e-6


@dataclass(frozen=True)
class GramCost:
    """What a Gram computation will need, known before it allocates anything.

    Attributes
    ----------
    pairs : int
        Image pairs the pair pass computes (upper triangle only when x2 is x1); each twice
        (also against the mirrored image) for a flip-averaged kernel.
    seconds : float
        Estimated CPU time, from the cost model (``SECONDS_PER_OP``).
    output_bytes : int
        The result (n_readouts, N1, N2) in the working dtype.
    working_bytes : int
        One batch's working memory (at most the memory budget).
    """

    pairs: int
    seconds: float
    output_bytes: int
    working_bytes: int


def _ops_per_item(plan: _Plan, flags, depth) -> float:
    """Elementary operations for one pair: conv outputs × taps (× taps again for a
    correlated conv on the full tensor), nonlinearities ~10 per element, pools ~1."""
    n_ops = 0.0
    for i in range(depth):
        layer = plan.body.layers[i]
        e_in, e_out = _elements(plan.grids[i], flags[i]), _elements(plan.grids[i + 1], flags[i + 1])
        if hasattr(layer, "geometries") and plan.grids[i]:
            geoms = layer.geometries(plan.grids[i])
            taps = math.prod(g.taps for g in geoms)
            correlated = layer.correlation_kind(plan.grids[i]) not in ("independent", "constant")
            n_ops += e_out * taps * (taps if correlated and flags[i] is True else 1)
        elif layer.needs_variances:
            n_ops += 10.0 * e_out
        else:
            n_ops += e_in
    last = _elements(plan.grids[depth], flags[depth])
    return n_ops + last * max(1, len(plan.heads))


def estimate_cost(model, image_shape, n1: int, n2: int | None = None, *, readouts=None,
                  dtype="float64", memory_budget: int | None = None, flip: bool = False) -> GramCost:
    """The :class:`GramCost` of ``kernel(model, x1, x2)`` (or of ``readout_sweep(model,
    readouts, ...)``) for ``n1`` (and ``n2``) images of shape ``image_shape = (*spatial, C)``,
    computed from the network's plan alone: nothing is allocated. ``flip``: the flip-averaged
    kernel, whose pair pass runs every pair twice (docs/maths.md §9)."""
    if readouts is None:
        body, heads = _split_model(model)
    else:
        body, heads = _split_model(model)[0], list(readouts)
    spatial = tuple(int(s) for s in image_shape[:-1])
    plan = _make_plan(body, heads, spatial)
    itemsize = torch.finfo(resolve_dtype(dtype)).bits // 8
    symmetric = n2 is None
    pairs = n1 * (n1 + 1) // 2 if symmetric else n1 * n2
    images = n1 + (0 if symmetric else n2)
    evaluations = pairs * flip_evaluations(flip)  # flip: K(x, x') and K(x, flip x') per pair
    per_op = SECONDS_PER_OP * (0.7 if itemsize == 4 else 1.0)
    seconds = per_op * (
        evaluations * _ops_per_item(plan, plan.pair_flags, len(plan.body))
        + (images * _ops_per_item(plan, plan.self_flags, plan.self_depth) if plan.self_depth else 0)
    ) + SECONDS_PER_LAYER_PAIR * (len(plan.body) + 1) * (evaluations + images)
    n_out = max(1, len(heads))
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    per = _bytes_per_item(plan, plan.pair_flags, len(plan.body), itemsize)
    return GramCost(
        pairs=pairs,
        seconds=seconds,
        output_bytes=n_out * n1 * (n1 if symmetric else n2) * itemsize,
        working_bytes=int(min(max(per, budget), per * max(1, pairs)))
        + readout_matrix_bytes(plan.heads, plan.grids[-1]),
    )


def gram_needs(model, image_shape, n1: int, n2: int | None = None, *, readouts=None,
               dtype="float64", memory_budget: int | None = None,
               flip: bool = False) -> tuple[float, float, float]:
    """(memory bytes, CPU seconds, float64 result bytes) of one Gram computation, from
    :func:`cnngp.engine.gram.estimate_cost`: the result in its dtype, its float64 copy when that
    is float32 (what is written and analysed), and a batch's working memory. Checkpoints
    are saved from the result's own memory. ``flip`` as for :func:`estimate_cost`."""
    cost = estimate_cost(model, image_shape, n1, n2, readouts=readouts, dtype=dtype,
                         memory_budget=memory_budget, flip=flip)
    single = str(dtype).endswith("32")
    entries = cost.output_bytes / (4 if single else 8)
    memory = cost.output_bytes + (8 * entries if single else 0) + cost.working_bytes
    return float(memory), float(cost.seconds), float(8 * entries)


#: a job the operation count prices above this (seconds) is timed on this machine before it
#: starts (cnngp.engine.timing); below, the count's estimate stands and nothing is timed
MEASURE_ABOVE_SECONDS = env_number("CNNGP_MEASURE_ABOVE_SECONDS", 10.0, 0)


def check_gram(what: str, model, image_shape, n1: int, n2: int | None = None, *, readouts=None,
               disk_path=None, yes: bool = False, images=None, execution=None, **options):
    """:func:`check_job` for one Gram computation (time is gated on the CPU only); the
    execution options (:class:`Execution`) say how it runs. With ``images`` (the first images of
    ``x1``), a job the operation count prices over :data:`MEASURE_ABOVE_SECONDS` is timed here
    first (:func:`cnngp.engine.timing.measure`) and gated on that; returns the
    :class:`~cnngp.engine.timing.Estimate` (None when nothing was timed).

    ``model`` may be a :class:`GramPlan` (then ``readouts`` is None): what it computes is
    priced, a flip-averaged kernel's pairs twice (``GramPlan(..., flip=True)``)."""
    ex = Execution.build(execution, options, where="check_gram")
    dtype, device = ex.dtype, ex.device
    given, flip = None, False
    if isinstance(model, GramPlan):  # the plan says what is computed: its readouts and flip
        if readouts is not None:
            raise CNNGPError("readouts: not with a GramPlan, which holds its own")
        given, flip = model, model.flip
        model, readouts = model.body, (model.heads or None)
    memory, seconds, result = gram_needs(model, image_shape, n1, n2, readouts=readouts,
                                         dtype=dtype, memory_budget=ex.memory_budget, flip=flip)
    pairs = n1 * (n1 + 1) // 2 if n2 is None else n1 * n2
    label = (f"{what} ({n1}{'' if n2 is None else f' x {n2}'} images, {pairs} pairs"
             f"{', each twice: flip-averaged' if flip else ''})")
    check_job(label, memory_bytes=memory, yes=True)  # what cannot fit is refused before timing
    est = None
    if images is not None and seconds > MEASURE_ABOVE_SECONDS:
        from cnngp.engine import timing

        plan = given or GramPlan(model, image_shape, readouts=readouts, execution=ex.replace(progress=False))
        rates = timing.measure(plan, plan.images(np.asarray(images[:timing.MAX_SIDE]), "x1"))
        est = timing.estimate(rates, [timing.Stage("kernel", n1, n2, flip=flip)])
        seconds = est.seconds
    check_job(
        label,
        memory_bytes=memory,
        seconds=seconds if str(device).startswith("cpu") else None,
        disk_bytes=2 * result if disk_path is not None else 0,  # the output and its checkpoint
        disk_path=disk_path,
        yes=yes,
        remedy="use fewer images or readouts, or split the work (--x2 takes row blocks)",
    )
    return est


def input_state(x1: torch.Tensor, x2: torch.Tensor, full) -> KernelState:
    """V0[p, p'] = (1/C) Σ_c x[p, c] x'[p', c] (docs/maths.md §2), in representation ``full``."""
    b, c = x1.shape[0], x1.shape[-1]
    spatial = tuple(x1.shape[1:-1])
    if isinstance(full, Band):  # x' at each band slot's partner (zeros off the grid)
        cross = ops.band_products(x1, x2, spatial, full.radius)
        return KernelState(cross=cross, spatial=spatial, full=False, band=full.radius)
    if full:
        n = math.prod(spatial)
        cross = torch.bmm(x1.reshape(b, n, c), x2.reshape(b, n, c).transpose(1, 2)) / c
        cross = cross.reshape((b,) + spatial + spatial)
    else:
        cross = (x1 * x2).sum(-1) / c
    return KernelState(cross=cross, spatial=spatial, full=full, channels=c)


def _prefer_fused_self_pass(plan: _Plan, dtype) -> None:
    """On the fused CPU engine, run the self pass on full tensors where it would otherwise carry
    bands: bands run on the layers' torch path (unfold and shifted copies), the full tensor of an
    image with itself on the fused symmetric kernels — 14× cheaper per image for Myrtle10 on
    CIFAR (130 → 9 ms), where a band is needed under every pool. The diagonal variances agree
    to rounding; every tile of a store uses the same plan, so its records are the same."""
    if plan.engine != "fused" or not any(isinstance(f, Band) for f in plan.self_flags):
        return
    if not (fused.enabled() and fused.available(dtype)):
        return
    flags = [True if isinstance(f, Band) else f for f in plan.self_flags]
    layers = list(plan.body.layers)[: plan.self_depth]
    if fused.wanted(layers, plan.grids, flags):
        plan.self_flags = flags


def _fast_chunk(plan: _Plan, flags, depth, x: torch.Tensor, tensors: int = 1) -> int:
    """Pairs per call of the fused CPU path (cnngp.engine.fused), or 0 to use the layers' own torch
    propagate. Chunks are sized so one layer's input and output (``tensors`` of each: 2 when
    Θ travels too) stay in the L3 cache."""
    if getattr(plan, "engine", "fused") != "fused":
        return 0
    layers = list(plan.body.layers)[:depth]
    if not (fused.enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)):
        return 0
    if not fused.wanted(layers, plan.grids, flags) or not fused.available(x.dtype, x.device):
        return 0
    largest = max(_elements(plan.grids[i], flags[i]) for i in range(depth + 1))
    return fused.chunk_size(largest, x.element_size(), tensors)


@contextlib.contextmanager
def _workspace(plan: _Plan):
    """Buffers for one chunk of this plan, borrowed and given back: threads running chunks at
    once each hold their own, and a thread that comes later (a Dask worker runs its tasks on
    whichever thread its pool has) reuses a free one instead of allocating (and page-faulting)
    new buffers — never more sets than chunks ever ran at once."""
    if getattr(plan, "workspaces", None) is None:
        plan.workspaces = []
    try:
        ws = plan.workspaces.pop()  # atomic under the GIL
    except IndexError:
        ws = fused.Workspace()
    try:
        yield ws
    finally:
        plan.workspaces.append(ws)


#: images per call of the self pass: every call has exactly this many (the last is padded with
#: copies), so that an image's records never depend on which images share its call — BLAS and
#: convolution kernels pick their algorithm by shape, which would otherwise change the last bit
#: between a whole-N pass and a store's per-block passes
SELF_BATCH = 8


def _self_pass(plan: _Plan, x: torch.Tensor, batch: int, progress) -> dict:
    """Record each image's own variances K_xx[p, p] at every nonlinearity input."""
    records = {i: [] for i in plan.var_layers}
    if not plan.self_depth:
        return {}
    layers = list(plan.body.layers)[: plan.self_depth]
    chunk = _fast_chunk(plan, plan.self_flags, plan.self_depth, x)

    def one_batch(start):
        xb = x[start : start + batch]
        real = xb.shape[0]
        if real < batch:  # the same shapes in every call (see SELF_BATCH)
            xb = torch.cat([xb, xb[-1:].expand((batch - real,) + tuple(xb.shape[1:]))])
        part = {i: [] for i in plan.var_layers}
        if chunk:  # fused path: chunks of images, symmetric (self-covariance) kernels
            with _workspace(plan) as ws:
                for s in range(0, xb.shape[0], chunk):
                    xc = xb[s : s + chunk]
                    state = fused.input_state(xc, xc, plan.self_flags[0], ws, layers, plan.self_flags)
                    fused.run_layers(layers, state, plan.self_flags, None, records=part, ws=ws)
        else:  # the same runner, every layer on its own torch propagate
            state = input_state(xb, xb, plan.self_flags[0])
            fused.run_layers(layers, state, plan.self_flags, None, records=part, fast=False)
        return {i: torch.cat(v)[:real] for i, v in part.items()}, real

    # fused: whole batches of images on each thread (fused.map_chunks), a few rounds at a time
    # so that the progress bar moves
    n_threads = fused.threads() if chunk and PAIR_PARALLEL else 1
    starts = list(range(0, x.shape[0], batch))
    step = 4 * n_threads
    for group in range(0, len(starts), step):
        for part, real in fused.map_chunks(one_batch, starts[group : group + step], n_threads):
            for i, v in part.items():
                records[i].append(v)
            if progress is not None:
                progress.update(real)
    return {i: torch.cat(v) for i, v in records.items()}


#: run whole chunks of pairs on each thread (fused.map_chunks) rather than splitting each call's
#: rows over the threads; CNNGP_PAIR_PARALLEL=0 turns it off
PAIR_PARALLEL = env_number("CNNGP_PAIR_PARALLEL", 1, 0, integer=True) > 0


def _pair_values(plan: _Plan, x1b, x2b, rec1, rec2, idx1, idx2) -> torch.Tensor:
    """Kernel values (n_kernels × (n_heads or 1), B) for a batch of pairs."""
    ntk = TANGENT in plan.kernels  # Θ travels through the fused kernels too (docs/maths.md §7)
    chunk = _fast_chunk(plan, plan.pair_flags, len(plan.body), x1b, 2 if ntk else 1)
    if chunk:  # fused path, a few pairs at a time so each layer's tensors stay in cache
        layers = list(plan.body.layers)
        np1 = {i: r.numpy() for i, r in rec1.items()}  # views: numpy indexing is cheaper
        np2 = {i: r.numpy() for i, r in rec2.items()}
        i1, i2 = idx1.cpu().numpy(), idx2.cpu().numpy()
        n_threads = fused.threads()
        if PAIR_PARALLEL and n_threads > 1:  # whole chunks on each thread (fused.map_chunks)
            chunk = max(1, min(chunk, -(-x1b.shape[0] // n_threads)))

        def chunk_values(s):
            with _workspace(plan) as ws:
                return one_chunk(slice(s, s + chunk), ws)

        def one_chunk(sl, ws):
            def variances(i, as_roots):
                if as_roots:  # sqrt and 1/sqrt, what the fused ReLU reads
                    return fused.roots(np1[i][i1[sl]], np2[i][i2[sl]])
                return rec1[i][idx1[sl]], rec2[i][idx2[sl]]

            state = fused.input_state(x1b[sl], x2b[sl], plan.pair_flags[0], ws, layers, plan.pair_flags,
                                      ntk=ntk)
            state, fused_out = fused.run_layers(layers, state, plan.pair_flags, variances, ws=ws)
            if plan.offsets:
                return _offset_values(state, fused_out)
            if not plan.heads:
                return _kernel_parts(plan, state).clone()
            heads = fused.apply_heads(plan.heads, fused_out, plan.kernels)
            return heads if heads is not None else _apply_heads(plan, state)

        starts = list(range(0, x1b.shape[0], chunk))
        values = fused.map_chunks(chunk_values, starts, n_threads if PAIR_PARALLEL else 1)
        return torch.cat(values, dim=1)
    state = input_state(x1b, x2b, plan.pair_flags[0])
    if ntk:
        state = state.with_extra(**{TANGENT: torch.zeros_like(state.cross)})  # Θ(0) = 0
    layers = list(plan.body.layers)
    variances = lambda i, as_roots: (rec1[i][idx1], rec2[i][idx2])  # noqa: E731
    step = None
    if getattr(plan, "engine", "fused") == "triton":  # supported conv(+act) on the Triton kernels
        from cnngp.engine import gpu

        gpu.require(x1b.device)  # also where resolve_engine did not check
        step = gpu.step_hook(layers, plan.pair_flags, variances)
    state, _ = fused.run_layers(layers, state, plan.pair_flags, variances, fast=False, step=step)
    if plan.offsets:
        return _offset_values(state, None)
    if not plan.heads:
        return _kernel_parts(plan, state)
    return _apply_heads(plan, state)


def _offset_values(state: KernelState, fused_out) -> torch.Tensor:
    """The offset sums (M, B) of a full last-hidden-layer state, summed in float64, returned
    in the state's dtype (what the plan's output holds)."""
    sums = fused.offset_sums(fused_out) if fused_out is not None else None
    if sums is None and not state.full:  # a one-position grid: the one offset δ = 0
        sums = state.cross.reshape(state.batch, -1).to(torch.float64)
    if sums is None:
        sums = ops.offset_sums(state.cross, state.spatial)
    return sums.T.to(state.cross.dtype)


def _kernel_parts(plan: _Plan, state: KernelState) -> torch.Tensor:
    """The kernels of a network without readout heads, (n_kernels, B, ...)."""
    parts = {"nngp": state.cross[None], TANGENT: state.extra.get(TANGENT, state.cross)[None]}
    return torch.cat([parts[k] for k in plan.kernels])


def _head_weights(plan: _Plan, general: list, state: KernelState) -> torch.Tensor:
    """The general readouts' Σ stacked as (|F|·|F| or |F|·W, L) float64, built once per plan."""
    key = (tuple(general), state.band, str(state.cross.device))
    if key not in plan.head_weights:
        plan.head_weights[key] = torch.stack(
            [
                plan.heads[i].weights(state.spatial, torch.float64, state.cross.device, state.band)
                for i in general
            ],
            dim=1,
        )
    return plan.head_weights[key]


def _apply_heads(plan: _Plan, state: KernelState) -> torch.Tensor:
    """All readouts from one last-hidden-layer state; general Σ's share one matmul. With the
    NTK, Θ_out = weight_var · Σ_{p,p'} Σ[p,p'] Θ[p,p'] + K_out (docs/maths.md §7)."""
    heads = plan.heads
    tangent = TANGENT in plan.kernels
    out = [None] * len(heads)
    out_t = [None] * len(heads)
    general = [
        i
        for i, h in enumerate(heads)
        if (state.full or state.band is not None)
        and state.ndim
        and h.affine_readout()
        and h.correlation_kind(state.spatial) not in ("independent", "constant")
    ]
    if general:
        weights = _head_weights(plan, general, state)
        values = weighted_sums(state.cross, weights)  # (B, L), f64
        values_t = weighted_sums(state.extra[TANGENT], weights) if tangent else None
        for k, i in enumerate(general):
            value = values[:, k] * heads[i].weight_var + heads[i].bias_var
            out[i] = value.to(state.cross.dtype)
            if tangent:  # + the readout's own term a·(Σ * V) + b (docs/maths.md §7)
                a, b = heads[i].tangent_coefficients(state.channels, state.spatial)
                out_t[i] = (values_t[:, k] * heads[i].weight_var + a * values[:, k] + b).to(state.cross.dtype)
    for i, h in enumerate(heads):
        if out[i] is None:
            result = h.propagate(state, False)
            out[i] = result.cross
            out_t[i] = result.extra.get(TANGENT)
    parts = {"nngp": out, TANGENT: out_t}
    return torch.stack([v for k in plan.kernels for v in parts[k]])


# -- the tile seam ---------------------------------------------------------------------------
#
# A Gram computation is two kinds of work, and any scheduler (this module's single loop, the
# checkpointed command line, a Dask cluster) maps them:
#
# 1. GramPlan.self_records(x): per-image records of the self pass, each image's own variances
#    at every nonlinearity, computed once per image;
# 2. GramPlan.block(x_rows, records_rows, x_cols, records_cols): the kernel block for those
#    rows and columns, (n_outputs, R, C), from the images and their records alone.
#
# Every pair's value depends only on its two images and their records, not on which other
# pairs share its batch, so a matrix assembled tile by tile in any order equals the one-call
# result bit for bit (tests/test_tiles.py). write_tile puts a block into any array that takes
# slice assignment: a NumPy array, a torch tensor, a memory map, a Zarr or HDF5 array.


@dataclass(frozen=True)
class SelfRecords:
    """Each image's own variances K_xx[p, p] at the input of every nonlinearity.

    Attributes
    ----------
    variances : dict
        Layer index → tensor (N, *grid of that layer).
    n : int
        Number of images.
    """

    variances: dict
    n: int

    def take(self, index) -> "SelfRecords":
        """The records of a subset of the images (a slice or an index array)."""
        if isinstance(index, slice):
            n = len(range(*index.indices(self.n)))
        else:
            index = torch.as_tensor(index, dtype=torch.long)
            n = int(index.numel())
        return SelfRecords({i: v[index] for i, v in self.variances.items()}, n)

    def flipped(self) -> "SelfRecords":
        """The records of the mirrored images (:func:`flip_images`): each layer's grid reversed
        along its last axis. True for a flip-symmetric network only, whose every layer maps
        the mirrored grid onto itself (what :func:`check_flip_symmetric` verifies, these
        records included); a grid-less layer's record is one number per image, unchanged."""
        return SelfRecords({i: v.flip(-1) if v.ndim > 1 else v for i, v in self.variances.items()}, self.n)


class GramPlan:
    """The plan of a Gram computation for images of one shape: the unit of work that any
    scheduler maps (see the comment above :class:`SelfRecords`).

    Parameters
    ----------
    model : Layer or Serial
        Ending in a readout, flatten or pool; or the body when ``readouts`` are given.
    image_shape : tuple
        ``(*spatial, C)`` of one image.
    readouts : sequence of Readout, optional
        Many readouts from one pass (then ``model`` must not end in a readout).
    get : as for :func:`kernel`.
    offsets : bool
        Outputs are the offset sums of the body's last hidden layer (:func:`offset_sums`).
    flip : bool or "mirror"
        The flip-averaged kernels ½[K(x, x') + K(x, flip x')] (docs/maths.md §9): every
        :meth:`block` computes both terms for the same pairs and returns their average.
        ``"mirror"``: the mirror term K(x, flip x') alone (:data:`MIRROR`), so that a plain
        kernel already computed (a store) need not be computed again: ½[K + K_mirror] is the
        flip-averaged kernel, to the bit. Either is refused here for a network or readout
        that is not flip-symmetric (:func:`check_flip_symmetric`).
    execution, **options
        The execution options (:class:`Execution`) ``dtype``, ``device``, ``engine``,
        ``batch_size`` and ``memory_budget``.
    """

    def __init__(self, model, image_shape, *, readouts=None, get="nngp", offsets=False, flip=False,
                 execution=None, **options):
        ex = Execution.build(execution, options, where="GramPlan",
                             accepted=("dtype", "device", "engine", "batch_size", "memory_budget"))
        self.execution = ex
        dtype, device, engine = ex.dtype, ex.device, ex.engine
        batch_size, memory_budget = ex.batch_size, ex.memory_budget
        if offsets:  # the body's last full tensor, reduced to its offset sums (docs/maths.md §8)
            if readouts is not None:
                raise CNNGPError("offsets: the outputs are the offset sums, so no readouts may be given")
            readouts = [Readout(correlation=Constant())]  # stands for "needs the full tensor"
            if parse_get(get) != ("nngp",):
                raise CNNGPError("offsets: only for the NNGP (get='nngp')")
        if readouts is None:
            body, heads = _split_model(model)
        else:  # the body runs as given (it may hold readouts of its own: a dense head)
            if not isinstance(model, Layer):
                raise CNNGPError(f"model: expected a cnngp layer or Serial, got {type(model).__name__}")
            body = model if isinstance(model, Serial) else Serial(model)
            heads = list(readouts)
            if not heads or not all(isinstance(r, Readout) for r in heads):
                raise CNNGPError("readouts: expected a non-empty list of cnngp.Readout layers")
        self.body, self.heads = body, heads
        self.dtype = resolve_dtype(dtype)
        self.device = resolve_device(device)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.kernels = parse_get(get)
        self.flip = _check_flip_flag(flip, offsets)
        self.plan = _make_plan(body, heads, self.image_shape[:-1])
        self.plan.kernels = self.kernels
        self.plan.offsets = bool(offsets)
        self.engine = self.plan.engine = resolve_engine(engine, self.device, self.dtype)
        _prefer_fused_self_pass(self.plan, self.dtype)
        if offsets:
            grid = self.plan.spatial_out
            if not grid or (self.plan.pair_flags[-1] is not True and math.prod(grid) > 1):
                raise CNNGPError(f"offsets: the body must end on a spatial grid, got {grid}")
            self.offset_shape = tuple(2 * n - 1 for n in grid)
        itemsize = torch.finfo(self.dtype).bits // 8
        budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
        p = self.plan
        self.self_batch = min(SELF_BATCH, _batch_size(p, p.self_flags, p.self_depth, itemsize, budget, None))
        self.pair_batch = _batch_size(p, p.pair_flags, len(p.body), itemsize, budget, batch_size)
        if self.flip and offsets:  # the body's last hidden layer itself must be flip-symmetric
            check_flip_symmetric(body, self.image_shape, offsets=True)
        elif self.flip:  # refused before any work when the flip-averaged kernel is not valid
            check_flip_symmetric(body, self.image_shape, readouts=heads or None, get=self.kernels)

    @property
    def n_outputs(self) -> int:
        """Kernels computed per pair: the number of readouts (1 for a plain model) times the
        number of kernel types (``get``), kernel type first: [nngp readouts…, ntk readouts…];
        with ``offsets``, the number of offsets δ of the last grid."""
        if self.plan.offsets:
            return math.prod(self.offset_shape)
        return max(1, len(self.heads)) * len(self.kernels)

    def mirrored(self, values, term=False):
        """The outputs of pair (x', x) from those of (x, x') along the leading axis: the same
        kernels, or with ``offsets`` the offsets reversed, S_x'x[δ] = S_xx'[−δ] (the offsets
        of :func:`cnngp.kernels.correlations.offsets` are in C order over a grid symmetric
        about 0, so −δ sits at M − 1 − the index of δ).

        ``term=MIRROR``: those of the mirror term, S_x',flip x[δ] = S_x,flip x'[−Fδ] with F
        mirroring the width (a flip-symmetric body: V_a,b[q, q'] = V_flip a,flip b[Fq, Fq']),
        −Fδ = δ reversed along every offset axis but the width's (docs/maths.md §9)."""
        return mirrored_offsets(values, self.offset_shape, term) if self.plan.offsets else values

    def images(self, x, name: str = "x1") -> torch.Tensor:
        """Validated images (the package's image-array policy) on the plan's device and dtype."""
        a = as_images(x, name, getattr(self.body, "input_channels", None))
        if tuple(a.shape[1:]) != self.image_shape:
            raise CNNGPError(
                f"{name}: images of shape {tuple(a.shape[1:])} do not match the plan's "
                f"{self.image_shape}"
            )
        return torch.as_tensor(a, dtype=self.dtype, device=self.device)

    def self_records(self, x: torch.Tensor, progress=None) -> SelfRecords:
        """Stage 1: the self pass over images ``x`` (as returned by :meth:`images`)."""
        with torch.no_grad():
            return SelfRecords(_self_pass(self.plan, x, self.self_batch, progress), int(x.shape[0]))

    def pairs(self, n_rows: int, n_cols: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs a block computes, in their fixed order: (i, j) with i <= j for a
        symmetric (diagonal) block, else all of them row by row."""
        if symmetric:
            return torch.triu_indices(n_rows, n_rows)
        return (torch.arange(n_rows).repeat_interleave(n_cols), torch.arange(n_cols).repeat(n_rows))

    def block(self, x_rows, rec_rows: SelfRecords, x_cols=None, rec_cols: SelfRecords | None = None,
              *, out: torch.Tensor | None = None, start: int = 0, on_batch=None,
              progress=None) -> torch.Tensor:
        """Stage 2: the kernel block (n_outputs, R, C) for images ``x_rows`` × ``x_cols``.

        ``x_cols=None`` means a diagonal block (the rows against themselves): only pairs
        i <= j are computed, then mirrored. ``out`` (NaN where not yet computed) and
        ``start`` resume a block after its first ``start`` pairs (:meth:`pairs` order);
        ``on_batch(out, pairs_done)`` is called after every batch (checkpoints use it).

        With ``flip``, each pair's value is ½[K(x, x') + K(x, flip x')]: the second term from
        the mirrored column images and their mirrored records, in the same batch of pairs
        (``flip="mirror"``: that term alone). A diagonal block still computes only i <= j:
        B_ij = K(x_i, flip x_j) is symmetric for a flip-symmetric network (docs/maths.md §9).
        """
        symmetric = x_cols is None
        if symmetric:
            x_cols, rec_cols = x_rows, rec_rows
        n_r, n_c = int(x_rows.shape[0]), int(x_cols.shape[0])
        rows, cols = self.pairs(n_r, n_c, symmetric)
        if out is None:
            out = torch.full((self.n_outputs, n_r, n_c), math.nan, dtype=self.dtype)
        done = start
        if self.flip:  # the columns mirrored, and their records with them (SelfRecords.flipped)
            x_flip, rec_flip = flip_images(x_cols), rec_cols.flipped()
        with torch.no_grad():
            for begin in range(start, rows.numel(), self.pair_batch):
                r = rows[begin : begin + self.pair_batch]
                c = cols[begin : begin + self.pair_batch]
                rd, cd = r.to(self.device), c.to(self.device)
                if r.numel() == 1:
                    # a lone pair runs as two: BLAS takes another path (GEMV) for one row,
                    # which differs in the last bit from the batched one
                    rd, cd = rd.repeat(2), cd.repeat(2)
                if self.flip != MIRROR:
                    plain = _pair_values(self.plan, x_rows[rd], x_cols[cd], rec_rows.variances,
                                         rec_cols.variances, rd, cd).cpu()[:, : r.numel()]
                if self.flip:  # K_flip(x, x') = ½[K(x, x') + K(x, flip x')] (docs/maths.md §9)
                    mirror = _pair_values(self.plan, x_rows[rd], x_flip[cd], rec_rows.variances,
                                          rec_flip.variances, rd, cd).cpu()[:, : r.numel()]
                values = plain if not self.flip else mirror if self.flip == MIRROR else flip_average(plain, mirror)
                if not bool(torch.isfinite(values).all()):
                    _check_finite(values, self.body, self.heads, (x_rows, x_cols), self.dtype)
                out[:, r, c] = values
                if symmetric and self.flip is True and self.plan.offsets:  # pair (x', x): the
                    # offset sums of the two terms transpose differently (mirrored)
                    out[:, c, r] = flip_average(self.mirrored(plain), self.mirrored(mirror, MIRROR))
                elif symmetric:
                    out[:, c, r] = self.mirrored(values, self.flip)
                done = begin + r.numel()
                if progress is not None:
                    progress.update(r.numel())
                if on_batch is not None:
                    on_batch(out, done)
        return out

    def diagonal(self, x, rec: SelfRecords, progress=None) -> torch.Tensor:
        """The kernels of each image with itself, k(x_i, x_i): (n_outputs, N).

        The pair pass on the pairs (i, i) alone, reading the self pass's records ``rec``: N
        pairs, not the N(N + 1)/2 of a Gram matrix. (The self pass records the variances at
        the nonlinearities only; a readout that correlates positions needs the last hidden
        layer's full covariance of the image with itself, which only the pair pass carries.)
        With ``flip``, ½[k(x_i, x_i) + k(x_i, flip x_i)], the diagonal of the flip-averaged
        Gram matrix (docs/maths.md §9): 2N pairs.
        """
        every = torch.arange(int(x.shape[0]))
        return self.at_pairs(x, rec, x, rec, every, every, progress)

    def at_pairs(self, x_rows, rec_rows: SelfRecords, x_cols, rec_cols: SelfRecords, rows, cols,
                 progress=None) -> torch.Tensor:
        """The kernels of the listed pairs (x_rows[rows[p]], x_cols[cols[p]]) alone:
        (n_outputs, P), as :meth:`block` computes them (with ``flip``, the flip average or its
        mirror term), in batches of the plan's pairs: what checks a few scattered pairs of a
        large matrix (:func:`cnngp.engine.distributed.verify_archive_images`) without a block
        around each."""
        rows, cols = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
        n = int(rows.numel())
        out = torch.empty((self.n_outputs, n), dtype=self.dtype)
        if self.flip:
            x_flip, rec_flip = flip_images(x_cols), rec_cols.flipped()
        with torch.no_grad():
            for begin in range(0, n, self.pair_batch):
                r, c = rows[begin : begin + self.pair_batch], cols[begin : begin + self.pair_batch]
                rd, cd = r.to(self.device), c.to(self.device)
                if r.numel() == 1:  # a lone pair runs as two, as in block()
                    rd, cd = rd.repeat(2), cd.repeat(2)
                if self.flip != MIRROR:
                    values = _pair_values(self.plan, x_rows[rd], x_cols[cd], rec_rows.variances,
                                          rec_cols.variances, rd, cd).cpu()[:, : r.numel()]
                if self.flip:  # as in block()
                    mirrored = _pair_values(self.plan, x_rows[rd], x_flip[cd], rec_rows.variances,
                                            rec_flip.variances, rd, cd).cpu()[:, : r.numel()]
                    values = mirrored if self.flip == MIRROR else flip_average(values, mirrored)
                if not bool(torch.isfinite(values).all()):
                    _check_finite(values, self.body, self.heads, (x_rows, x_cols), self.dtype)
                out[:, begin : begin + r.numel()] = values
                if progress is not None:
                    progress.update(r.numel())
        return out

    def tiles(self, n_rows: int, n_cols: int | None = None, tile: int = 512):
        """Square tiles covering the (n_rows, n_cols) matrix: ``(rows, cols, diagonal)`` with
        slices (:func:`tile_plan`); with ``n_cols=None`` (a symmetric matrix) only tiles on or
        above the diagonal, the diagonal ones flagged. Edge tiles are ragged."""
        return [(t.rows, t.cols, t.diagonal) for t in tile_plan(n_rows, n_cols, tile)]


@dataclass(frozen=True)
class Tile:
    """One square tile of the matrix: block row ``i``, block column ``j``."""

    i: int
    j: int
    rows: slice
    cols: slice
    diagonal: bool  # on the diagonal of a symmetric matrix: only pairs r <= c are computed
    mirror: bool  # off the diagonal of a symmetric matrix: also written at (cols, rows)

    @property
    def name(self) -> str:
        return f"tile-{self.i}-{self.j}"

    @property
    def pairs(self) -> int:
        r, c = self.rows.stop - self.rows.start, self.cols.stop - self.cols.start
        return r * (r + 1) // 2 if self.diagonal else r * c


def tile_plan(n_rows: int, n_cols: int | None, tile: int) -> list[Tile]:
    """Square tiles of side ``tile`` covering an (n_rows, n_cols) matrix, ragged at the edges;
    with ``n_cols=None`` (x2 is x1) only the tiles on and above the diagonal.

    The order is chosen so that a run stopped part way has something whole:

    * symmetric (a Gram matrix): nested, every tile of the leading k×k block of tiles before
      any tile outside it (by ``max(i, j)``, then column, then row), so a stopped run has a
      complete leading block: with a sweep's class-interleaved images, the first data sets of
      every smaller N;
    * rectangular (x1 × x2, e.g. test × train): row by row, so each finished row of tiles is the
      final kernel of those x1 images against all of x2 (their test predictions).

    >>> [t.name for t in tile_plan(3, None, 1)]
    ['tile-0-0', 'tile-0-1', 'tile-1-1', 'tile-0-2', 'tile-1-2', 'tile-2-2']
    >>> [t.name for t in tile_plan(2, 3, 1)]
    ['tile-0-0', 'tile-0-1', 'tile-0-2', 'tile-1-0', 'tile-1-1', 'tile-1-2']
    """
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise CNNGPError(f"tile: expected an int >= 1, got {tile!r}")
    tile = int(tile)
    symmetric = n_cols is None
    n_cols = n_rows if symmetric else n_cols
    out = []
    for i, r0 in enumerate(range(0, n_rows, tile)):
        for j, c0 in enumerate(range(0, n_cols, tile)):
            if symmetric and j < i:
                continue
            out.append(Tile(i, j, slice(r0, min(r0 + tile, n_rows)), slice(c0, min(c0 + tile, n_cols)),
                            diagonal=symmetric and i == j, mirror=symmetric and i != j))
    if not symmetric:
        return out  # built row by row
    return sorted(out, key=lambda t: (max(t.i, t.j), t.j, t.i))


def write_tile(out, rows: slice, cols: slice, block, mirror: bool = False, plan: "GramPlan | None" = None) -> None:
    """Put ``block`` (n_outputs, R, C) at ``out[:, rows, cols]`` (and its transpose at
    ``out[:, cols, rows]`` when ``mirror``, for an off-diagonal tile of a symmetric matrix).
    ``out`` is anything that takes slice assignment of a NumPy array. The transpose of a plan
    of offset sums reverses its offsets (:meth:`GramPlan.mirrored`): give the ``plan`` then
    (a flip-averaged one is refused: its two terms transpose differently, so compute the
    plain sums and the mirror term, ``flip="mirror"``, as two matrices)."""
    data = block.numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
    out[:, rows, cols] = data
    if plan is not None and not isinstance(plan, GramPlan):
        raise CNNGPError(f"plan: expected a cnngp.engine.gram.GramPlan or None, got {type(plan).__name__}")
    if mirror:
        if plan is not None and plan.plan.offsets:
            if plan.flip is True:
                raise CNNGPError("plan: the transposed tile of flip-averaged offset sums needs its two "
                                 "terms apart; tile the plain sums and their mirror term (flip='mirror') apart")
            data = mirrored_offsets(data, plan.offset_shape, plan.flip)
        out[:, cols, rows] = np.swapaxes(data, 1, 2)


# -- flip-averaged kernels (docs/maths.md §9) ---------------------------------------------------

#: the flip-symmetry check's tolerance: K(flip a, flip b) and K(a, b) (and the mirrored
#: variances) may differ by this much relative to each output's largest entry (float64)
FLIP_TOLERANCE = 1e-9
#: seed of the check's two random images
FLIP_CHECK_SEED = 29
#: networks already checked in this process: fingerprint → None (symmetric) or the refusal
_FLIP_CHECKED: dict = {}


def flip_images(x):
    """Images ``(N, *spatial, C)`` mirrored along their width, the last spatial axis."""
    return x.flip(-2) if isinstance(x, torch.Tensor) else np.flip(np.asarray(x), -2)


#: ``flip=MIRROR``: the mirror term K(x, flip x') alone, the half of a flip-averaged kernel that
#: the plain one lacks (docs/maths.md §9): ½[K + K_mirror] is the flip-averaged kernel to the bit
MIRROR = "mirror"


def _check_flip_flag(flip, offsets) -> bool | str:
    if isinstance(flip, str) and flip == MIRROR:
        pass
    elif not isinstance(flip, (bool, np.bool_)):
        raise CNNGPError(f"flip: expected True, False or {MIRROR!r}, got {flip!r}")
    return flip if isinstance(flip, str) else bool(flip)


def flip_average(plain, mirror):
    """The flip average ½[plain + mirror] of a term and its mirror term (docs/maths.md §9),
    NumPy arrays or tensors, taken in their dtype: the one rounding rule of a flip plan's
    pass, of a flip-averaged store and of two stores read together, so that all three agree
    to the bit."""
    return (plain + mirror) * 0.5


def mirrored_offsets(values, offset_shape: tuple, term=False):
    """Offset sums (M, ...) of pairs (x, x') (NumPy or torch) as those of the pairs (x', x):
    reversed along the M = ∏ offset_shape offsets, S_x'x[δ] = S_xx'[−δ]; for the mirror term
    (``term=MIRROR``) reversed along every offset axis but the width's, S_x',flip x[δ] =
    S_x,flip x'[−Fδ] (:meth:`GramPlan.mirrored`)."""
    axes = tuple(range(len(offset_shape) - (1 if term == MIRROR else 0)))
    if not axes:
        return values
    shape = tuple(values.shape)
    grid = values.reshape(tuple(offset_shape) + shape[1:])
    flipped = grid.flip(axes) if isinstance(grid, torch.Tensor) else np.flip(grid, axes)
    return flipped.reshape(shape)


def flip_evaluations(flip) -> int:
    """Kernel evaluations per pair: 2 for the flip-averaged kernel (K and its mirror term), 1
    for a plain kernel or the mirror term alone."""
    return 2 if flip is True else 1


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = float(a.abs().max()) if a.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def check_flip_symmetric(model, image_shape, *, readouts=None, get="nngp", offsets: bool = False) -> None:
    """Refuse, with a :class:`CNNGPError` naming ``flip``, a network (or readout) whose kernel is
    not flip-symmetric on images of ``image_shape`` = ``(*spatial, C)``: the flip-averaged
    kernel ½[K(x, x') + K(x, flip x')] is a symmetric, positive semi-definite kernel only when
    K(flip x, flip x') = K(x, x') (docs/maths.md §9).

    A numerical check at the actual grid, not a rule per layer: two random images a, b (seeded)
    and their mirror images go through the network in float64, and every entry of the 2×2
    Gram matrices of (a, b) and (flip a, flip b) — every readout, every kernel type of ``get``
    — must agree, as must each image's variances at every nonlinearity with the mirrored
    variances of its mirror image (what :meth:`SelfRecords.flipped` relies on), to
    :data:`FLIP_TOLERANCE` relative. It sees every cause alike (a weight correlation that is not
    mirror-symmetric in a conv or readout, asymmetric padding, a stride whose windows do not
    cover the grid symmetrically, a layer of one's own) and only at the grid that is computed.

    It cannot pass a network that is not flip-symmetric: the difference K(flip a, flip b) −
    K(a, b) is an analytic function of the pixels wherever the variances are positive and the
    correlations inside (−1, 1) (the layers' expectations are analytic there), so unless it is
    zero everywhere — the network is then flip-symmetric — its zeros have measure zero, and two
    images drawn from a continuous distribution miss them with probability one. What it can let
    through is an asymmetry below the tolerance, which moves the averaged kernel by as little.
    A network that passes is remembered for the rest of the process.

    ``offsets=True``: ``model`` is a body whose offset sums (:func:`offset_sums`) are to be
    flip-averaged, for any readout mirror-symmetric along the width; then the last hidden
    layer's whole covariance must be flip-symmetric, and the check compares the offset sums,
    S_flip a,flip b[δ] = S_a,b[Fδ] (F mirrors δ's width component), instead of readouts.
    """
    body, heads = (model, []) if offsets else (_split_model(model) if readouts is None else (model, list(readouts)))
    kernels = parse_get(get)
    shape = tuple(int(s) for s in image_shape)
    try:
        key = fingerprint(body.to_spec(), [h.to_spec() for h in heads], list(shape), list(kernels),
                          *(("offsets",) if offsets else ()))
    except NotImplementedError:  # a layer of one's own without a spec: checked every time
        key = None
    if key is not None and key in _FLIP_CHECKED:
        if _FLIP_CHECKED[key] is not None:
            raise CNNGPError(_FLIP_CHECKED[key])
        return
    refusal = _flip_asymmetry(body, heads, shape, kernels, offsets)
    if key is not None:
        _FLIP_CHECKED[key] = refusal
    if refusal is not None:
        raise CNNGPError(refusal)


def _short(layer) -> str:
    """A layer's repr for a message, cut short (a user correlation's matrix is long)."""
    text = repr(layer)
    return text if len(text) <= 100 else text[:97] + "..."


def _flip_asymmetry(body, heads, shape, kernels, offsets=False) -> str | None:
    """The refusal of :func:`check_flip_symmetric`, or None for a flip-symmetric network."""
    ref = GramPlan(body, shape, readouts=heads or None, get=kernels, offsets=offsets, dtype="float64",
                   device="cpu", engine="auto")
    x = ref.images(np.random.default_rng(FLIP_CHECK_SEED).uniform(size=(2,) + shape), "x")
    fx = flip_images(x)
    rec, frec = ref.self_records(x), ref.self_records(fx)
    where = f"on {'×'.join(map(str, shape[:-1])) or 'grid-less'} images"
    remedy = ("the flip-averaged kernel ½[K(x, x') + K(x, flip x')] needs K(flip x, flip x') = K(x, x'): "
              "weight correlations mirror-symmetric along the width in every conv and readout, "
              "symmetric padding (valid, or same with an odd filter extent) and strides whose windows "
              "cover the width symmetrically; drop flip or change the network")
    for i in sorted(rec.variances):
        gap = _relative_gap(rec.flipped().variances[i], frec.variances[i])
        if not gap <= FLIP_TOLERANCE:  # NaN fails too
            return (f"flip: the network is not flip-symmetric {where}: the variances at the input of "
                    f"layer {i} ({_short(body.layers[i])}) of a mirrored random image are not the mirrored "
                    f"variances (relative difference {gap:.2g}), so a layer before it breaks the "
                    f"symmetry; {remedy}")
    k, fk = ref.block(x, rec), ref.block(fx, frec)
    if offsets:  # S_flip a,flip b[δ] = S_a,b[Fδ]: the offsets' width axis reversed
        k = k.reshape(ref.offset_shape + (2, 2)).flip(len(ref.offset_shape) - 1).reshape(k.shape)
        gap = _relative_gap(k, fk)
        if not gap <= FLIP_TOLERANCE:
            return (f"flip: the network is not flip-symmetric {where}: the offset sums of its last hidden "
                    f"layer for two mirrored random images are not the mirrored ones (relative difference "
                    f"{gap:.2g}); {remedy}")
        return None
    per = max(1, len(heads))
    for o in range(k.shape[0]):
        gap = _relative_gap(k[o], fk[o])
        if not gap <= FLIP_TOLERANCE:
            what = f"readout {o % per} ({_short(heads[o % per])})" if heads else "the network"
            return (f"flip: {what} is not flip-symmetric {where}: its {kernels[o // per].upper()} of two "
                    f"mirrored random images differs from that of the images (relative difference "
                    f"{gap:.2g}); {remedy}")
    return None


def _checkpoint_key(body, heads, a1, a2, dtype, kernels, offsets, flip) -> str:
    """What a checkpoint of one in-memory Gram computation is keyed on."""
    return fingerprint(
        "cnngp-gram-1", body.to_spec(), [h.to_spec() for h in heads], a1, a2, str(dtype),
        *(() if tuple(kernels) == ("nngp",) else (tuple(kernels),)),
        *(("offsets",) if offsets else ()), *(("flip",) if flip else ()),
    )


def checkpoint_pairs_done(path, model, x1, x2=None, *, readouts=None, get="nngp", flip=False,
                          dtype="float64") -> int:
    """Pairs already done by the checkpoint at ``path`` of this very computation (``kernel`` /
    ``readout_sweep`` with ``checkpoint=path``), 0 when there is none or it belongs to another
    one: what a resumed run still has to compute, for its time estimate. Only the key and the
    counter are read; the values are checked when the run loads them."""
    from cnngp.engine.storage import read_npz

    path = Path(path) if path is not None else None
    if path is None or not path.is_file():
        return 0
    body, heads = _split_model(model) if readouts is None else (model, list(readouts))
    channels = getattr(body, "input_channels", None)
    a1 = as_images(x1, "x1", channels)
    a2 = None if x2 is None else as_images(x2, "x2", channels)
    kernels = parse_get(get)
    key = _checkpoint_key(body, heads, a1, a2, resolve_dtype(dtype), kernels, False, flip)
    try:
        with read_npz(path) as z:
            if str(z["key"]) != key:
                return 0
            return max(0, int(z["pairs_done"]))
    except Exception:  # unreadable: the run itself says so
        return 0


def _compute(body, heads, x1, x2, ex: Execution, get="nngp", offsets=False, flip=False):
    """One call: the whole matrix as one block, with checkpoints between batches."""
    progress, checkpoint, keep_checkpoint = ex.progress, ex.checkpoint, ex.keep_checkpoint
    channels = getattr(body, "input_channels", None)
    a1 = as_images(x1, "x1", channels)
    symmetric = x2 is None
    a2 = a1 if symmetric else as_images(x2, "x2", channels)
    if not symmetric and a2.shape[1:] != a1.shape[1:]:
        raise CNNGPError(
            f"x2: images of shape {a2.shape[1:]} do not match x1's {a1.shape[1:]}; both "
            "must be (N, *spatial, C) with the same spatial size and channels"
        )
    gp = GramPlan(body, a1.shape[1:], readouts=heads or None, get=get, offsets=offsets, flip=flip,
                  execution=ex)
    dtype = gp.dtype
    t1 = torch.as_tensor(a1, dtype=dtype, device=gp.device)
    t2 = t1 if symmetric else torch.as_tensor(a2, dtype=dtype, device=gp.device)
    n1, n2 = t1.shape[0], t2.shape[0]
    rows, cols = gp.pairs(n1, n2, symmetric)
    n_pairs = rows.numel()
    n_out = gp.n_outputs
    # NaN until computed: an entry that is never written cannot pass the final check
    out, done, ckpt = torch.full((n_out, n1, n2), math.nan, dtype=dtype), 0, None
    if checkpoint is not None:
        key = _checkpoint_key(body, heads, a1, None if symmetric else a2, dtype, gp.kernels, offsets, gp.flip)
        ckpt = Checkpoint(checkpoint, key)
        resumed = ckpt.load((n_out, n1, n2), dtype, n_pairs)
        if resumed is not None:
            saved, done = resumed
            r, c = rows[:done], cols[:done]
            if not bool(torch.isfinite(saved[:, r, c]).all()):
                raise CNNGPError(
                    f"checkpoint: {str(checkpoint)!r} is corrupt (non-finite values among the "
                    f"{done} pairs it says are done); delete it to start over"
                )
            out[:, r, c] = saved[:, r, c]  # trust only the pairs it says are done
            if symmetric:
                out[:, c, r] = saved[:, r, c]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total_images = n1 + (0 if symmetric else n2) if gp.plan.self_depth else 0
        bar = tqdm(  # resumed: from what the interrupted run had shown (its self pass and pairs)
            total=n_pairs + total_images,
            initial=done + (total_images if done else 0),
            unit="pair",
            desc=f"kernel (batch {gp.pair_batch}{', resumed' if done else ''})",
            disable=progress is None,
        )
    progress_made = {"done": done, "save_failed": None}

    def on_batch(values, pairs_done):
        progress_made["done"] = pairs_done
        if ckpt is not None and ckpt.due() and pairs_done < n_pairs:
            try:
                ckpt.save(values, pairs_done)
            except CNNGPError as e:
                # a periodic save that fails (a full disk) must not cost the run or the last
                # good checkpoint: atomic_write left the previous file whole; warn once, go on
                if progress_made["save_failed"] is None:
                    warnings.warn(
                        f"checkpoint: saving progress failed ({' '.join(str(e).split())}); the computation "
                        f"goes on and the previous checkpoint {str(ckpt.path)!r} still resumes",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                progress_made["save_failed"] = str(e)
                ckpt.postpone()

    try:
        self_bar = None if done else bar  # a resumed bar already counts the self pass
        rec1 = gp.self_records(t1, self_bar)
        rec2 = rec1 if symmetric else gp.self_records(t2, self_bar)
        try:
            gp.block(t1, rec1, None if symmetric else t2, None if symmetric else rec2,
                     out=out, start=done, on_batch=on_batch, progress=bar)
        except KeyboardInterrupt as stop:
            done = progress_made["done"]
            if ckpt is not None and done:
                try:
                    ckpt.save(out, done)  # rerun the same call to resume from here
                except CNNGPError as e:  # a full disk: the previous checkpoint is whole
                    stop.checkpoint_error = str(e)
            raise
        except CNNGPError:
            # an overflow is deterministic: a checkpoint would repeat it. (A failed checkpoint
            # save never reaches here: on_batch keeps the previous checkpoint and goes on.)
            if ckpt is not None:
                ckpt.remove()
            raise
    finally:
        if bar is not None:
            bar.close()  # before any message about why it stopped
    _check_finite(out, body, heads, (a1,) if symmetric else (a1, a2), dtype)
    if ckpt is not None:
        if not keep_checkpoint:
            ckpt.remove()
        elif ckpt.path.exists():
            # a long run: keep all of it until the caller's output is in place, so a failed
            # final write (a full disk) costs a rerun seconds, not the work since the last save
            try:
                ckpt.save(out, n_pairs)
            except CNNGPError:
                pass
    return out


def _check_finite(out: torch.Tensor, body, heads, images, dtype) -> None:
    """Refuse to return a kernel with NaN or infinite entries (an overflow). ``images``: every
    input the kernel was computed from (a sequence of arrays or tensors), so the message's pixel
    maximum is the maximum over all of them."""
    finite = torch.isfinite(out)
    if bool(finite.all()):
        return
    bad = int(out.numel() - finite.sum())
    peak = max(float(torch.as_tensor(x).abs().max()) if x.shape[0] else 0.0 for x in images)
    remedies = ("" if dtype == torch.float64 else "use dtype float64, ") + "images scaled to about [0, 1], or smaller weight_var"
    raise CNNGPError(
        f"kernel: {bad} of {out.numel()} entries overflowed to NaN or infinity in "
        f"{str(dtype).removeprefix('torch.')} "
        f"(pixels up to {peak:.3g}, {len(body)} layers): the kernel grows with the pixel "
        f"scale squared and the weight variances (and nonlinearities' scales) layer by layer; {remedies} "
        "(the network: --arch)"
    )


#: the execution options the in-memory kernel functions take as keywords
_IN_MEMORY = COMPUTE + RESUME


def kernel(model, x1, x2=None, *, get="nngp", flip=False, execution=None, **options):
    """The NNGP kernel matrix k(x1, x2) of ``model`` (ending in a readout, flatten or pool),
    or its neural tangent kernel.

    Parameters
    ----------
    model : Layer or Serial
    x1 : array (N1, *spatial, C)
        Images, channels last; uint8 is scaled to [0, 1].
    x2 : array (N2, *spatial, C), optional
        Defaults to x1; then only the upper triangle is computed and mirrored.
    get : "nngp" (default), "ntk", "both" or a tuple such as ("nngp", "ntk")
        Which kernel: the NNGP, the neural tangent kernel of the same network in the NTK
        parameterisation (docs/maths.md §7), or both from one pass.
    flip : bool or "mirror", default False
        The flip-averaged kernel ½[K(x1, x2) + K(x1, flip x2)], flip = mirror the width
        (docs/maths.md §9): each pair also against the mirrored image, in the same pass (about
        twice the pair work; the self pass is not repeated). ``"mirror"``: the second term
        K(x1, flip x2) alone (averaged with the plain kernel, the flip-averaged one to the
        bit). Refused for a network or readout
        that is not flip-symmetric (:func:`check_flip_symmetric`). Like ``get`` it says which
        kernel is computed, not how: an argument of every kernel path and part of every
        checkpoint's and store's identity, not an execution option.
    execution : Execution, optional
        How to compute (:class:`cnngp.Execution`, README "Execution options"): ``dtype``,
        ``device``, ``engine``, ``batch_size``, ``memory_budget``, ``progress``,
        ``checkpoint``, ``keep_checkpoint``.
    **options
        The same execution options as keywords (they override ``execution``), e.g.
        ``kernel(net, x, dtype="float32")``.

    Raises
    ------
    CNNGPError
        For bad input or options, and for a kernel that overflowed (NaN or infinite entries
        are never returned).

    Returns
    -------
    torch.Tensor (N1, N2) on the CPU; a tuple of them, in the order asked, for several kernels.
    """
    ex = Execution.build(execution, options, where="kernel", accepted=_IN_MEMORY)
    body, heads = _split_model(model)
    kernels = parse_get(get)
    out = _compute(body, heads, x1, x2, ex, get=kernels, flip=flip)
    return out[0] if isinstance(get, str) and get != "both" else tuple(out)


def readout_sweep(body, readouts: Sequence[Readout], x1, x2=None, *, get="nngp", flip=False,
                  execution=None, **options):
    """Kernels for many readouts from one pass to the last hidden layer: (L, N1, N2).

    This is how a λ sweep costs one kernel computation (docs/maths.md §2, readout): every readout is a
    weighted sum of the same last-hidden-layer covariance. ``get``, ``flip`` (every readout
    flip-averaged), ``execution`` and the execution options as for :func:`kernel`: with several
    kernels, a tuple of (L, N1, N2) tensors in the order asked.
    """
    ex = Execution.build(execution, options, where="readout_sweep", accepted=_IN_MEMORY)
    body, tail = _split_model(body)
    if tail:
        raise CNNGPError("body: must not end with a readout; pass the readouts separately")
    readouts = list(readouts)
    if not readouts or not all(isinstance(r, Readout) for r in readouts):
        raise CNNGPError("readouts: expected a non-empty list of cnngp.Readout layers")
    kernels = parse_get(get)
    out = _compute(body, readouts, x1, x2, ex, get=kernels, flip=flip)
    if isinstance(get, str) and get != "both":
        return out
    L = len(readouts)
    return tuple(out[k * L:(k + 1) * L] for k in range(len(kernels)))


def kernel_diagonal(model, x, *, readouts=None, get="nngp", flip=False, execution=None,
                    **options) -> torch.Tensor:
    """Each image's kernel with itself, k(x_i, x_i): the diagonal of ``kernel(model, x)`` (or of
    ``readout_sweep(model, readouts, x)``) at the cost of N pairs, e.g. the prior variances of
    test points that a GP's posterior variance starts from (docs/maths.md §5).

    Parameters
    ----------
    model : Layer or Serial
        As for :func:`kernel`; with ``readouts``, the body (as for :func:`readout_sweep`).
    x : array (N, *spatial, C)
    readouts : sequence of Readout, optional
        Many readouts from one pass.
    get, flip, execution, **options
        As for :func:`kernel` (``dtype``, ``device``, ``engine``, ``batch_size``,
        ``memory_budget``, ``progress``); with ``flip``, the diagonal of the flip-averaged kernel.

    Returns
    -------
    torch.Tensor on the CPU: (N,) for a model and one kernel; (L, N) with ``readouts``; a tuple
    of them, in the order asked, for several kernels.

    Examples
    --------
    >>> import cnngp
    >>> net = cnngp.Serial(cnngp.Conv(filter=3), cnngp.ReLU(), cnngp.Readout())
    >>> x = np.random.default_rng(0).random((3, 5, 5, 1))
    >>> bool(torch.allclose(kernel_diagonal(net, x), cnngp.kernel(net, x).diagonal()))
    True
    """
    ex = Execution.build(execution, options, where="kernel_diagonal", accepted=COMPUTE)
    if readouts is None:
        body, heads = _split_model(model)
    else:
        body, tail = _split_model(model)
        heads = list(readouts)
        if tail:
            raise CNNGPError("model: must not end with a readout when readouts are given")
        if not heads or not all(isinstance(r, Readout) for r in heads):
            raise CNNGPError("readouts: expected a non-empty list of cnngp.Readout layers")
    kernels = parse_get(get)
    a = as_images(x, "x", getattr(body, "input_channels", None))
    plan = GramPlan(body, a.shape[1:], readouts=heads or None, get=kernels, flip=flip,
                    execution=ex.replace(progress=False))
    t = torch.as_tensor(a, dtype=plan.dtype, device=plan.device)
    bar = None
    if ex.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.shape[0] * (2 if plan.plan.self_depth else 1), unit="image",
                   desc="kernel diagonal")
    try:
        out = plan.diagonal(t, plan.self_records(t, bar), bar)
    finally:
        if bar is not None:
            bar.close()
    per = max(1, len(heads)) if readouts is not None else 1
    parts = tuple(out[k * per:(k + 1) * per] for k in range(len(kernels)))
    if readouts is None:
        parts = tuple(p[0] for p in parts)
    return parts[0] if isinstance(get, str) and get != "both" else parts


def offset_sums(body, x1, x2=None, *, flip=False, execution=None, **options) -> torch.Tensor:
    """The offset sums S_xx'[δ] = Σ_q V_xx'[q, q + δ] of the body's last hidden layer, for
    every image pair: (M, N1, N2), M = ∏_k (2N_k − 1) offsets of the last grid in the order of
    :func:`cnngp.kernels.correlations.offsets` (docs/maths.md §8).

    One pass, as a readout sweep; afterwards every stationary readout Σ[p, p'] = w[p' − p]
    (any family, any λ, or a freely learned w) is ``weight_var · Σ_δ w[δ] S[δ] + bias_var``:
    ``torch.tensordot(corr.offset_weights(grid), S, 1)``, exactly, and differentiably in w.
    ``execution`` and the execution options as for :func:`kernel`.

    ``flip=True``: the flip-averaged sums ½[S_xx' + S_x,flip x'] (docs/maths.md §9), whose
    readouts are the flip-averaged kernels for every readout w mirror-symmetric along the width
    (w[δ] = w[Fδ]: the stationary isotropic families); refused for a body whose last hidden
    layer is not flip-symmetric. ``"mirror"``: the second term alone.
    """
    ex = Execution.build(execution, options, where="offset_sums", accepted=_IN_MEMORY)
    body, tail = _split_model(body)
    if tail:
        raise CNNGPError("body: must not end with a readout; the offset sums replace it")
    return _compute(body, [], x1, x2, ex, offsets=True, flip=flip)


def differentiable_kernel(model, x1, x2=None, *, execution=None, **options):
    """``kernel(model, x1, x2)`` with autograd through every layer (docs/maths.md §8): the
    layers' torch code, the self pass included, outside ``torch.no_grad``, so the result is
    differentiable in any lengthscale, weight_var or bias_var the model holds as a torch
    scalar (:func:`cnngp.inference.learn.with_parameters`). Every image pair is computed (no
    symmetric saving, no fused kernels) and the graph of every pair is kept: for small N
    (:func:`cnngp.inference.learn.kernel_vjp` keeps one tile's graph at a time).
    Returns (N1, N2) for a model ending in a readout, flatten or pool. Of the execution
    options (:class:`Execution`) it takes ``dtype``, ``device`` and ``batch_size`` (default 64);
    the layers always run on their torch code."""
    ex = Execution.build(execution, options, where="differentiable_kernel",
                         accepted=("dtype", "device", "batch_size"), defaults={"batch_size": 64})
    batch_size = ex.batch_size or 64
    body, heads = _split_model(model)
    channels = getattr(body, "input_channels", None)
    a1 = as_images(x1, "x1", channels)
    a2 = a1 if x2 is None else as_images(x2, "x2", channels)
    dt, dev = ex.torch_dtype, torch.device(ex.device)
    t1 = torch.as_tensor(a1, dtype=dt, device=dev)
    t2 = t1 if x2 is None else torch.as_tensor(a2, dtype=dt, device=dev)
    plan = _make_plan(body, heads, tuple(t1.shape[1:-1]))
    layers = list(body.layers)

    def records(t):
        if not plan.self_depth:
            return {}
        part = {i: [] for i in plan.var_layers}
        state = input_state(t, t, plan.self_flags[0])
        fused.run_layers(layers[: plan.self_depth], state, plan.self_flags, None, records=part, fast=False)
        return {i: torch.cat(v) for i, v in part.items()}

    rec1 = records(t1)
    rec2 = rec1 if x2 is None else records(t2)
    n1, n2 = t1.shape[0], t2.shape[0]
    rows = torch.arange(n1).repeat_interleave(n2)
    cols = torch.arange(n2).repeat(n1)
    values = []
    for s in range(0, rows.numel(), batch_size):
        r, c = rows[s : s + batch_size], cols[s : s + batch_size]
        state = input_state(t1[r], t2[c], plan.pair_flags[0])
        state, _ = fused.run_layers(layers, state, plan.pair_flags,
                                    lambda i, as_roots, r=r, c=c: (rec1[i][r], rec2[i][c]), fast=False)
        values.append(_apply_heads(plan, state) if plan.heads else _kernel_parts(plan, state))
    out = torch.cat(values, dim=1)  # (n_outputs, B)
    return out.reshape((out.shape[0], n1, n2) + tuple(out.shape[2:]))[0]

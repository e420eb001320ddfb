"""Learned readout correlations: gradient-based model selection of λ (docs/maths.md §8).

A stationary readout Σ[p, p'] = w_λ[p' − p] makes the kernel linear in w:

    k(x, x') = a · Σ_δ w_λ[δ] · S_xx'[δ] + b,        S_xx'[δ] = Σ_q V_xx'[q, q + δ],

with S the offset sums of the last hidden layer (:func:`cnngp.engine.gram.offset_sums`, one
pass). Every λ, family and gradient then costs one matrix–vector product per image pair, and
the objectives below one Cholesky factorisation of the N×N training kernel, in float64.

Objectives (per training point, to be maximised), classes as independent GP outputs on the
centred one-hot targets Y (N, C), noise variance σ²:

- ``mll``: the log marginal likelihood log p(Y | K + σ²I) / N;
- ``loo``: the leave-one-out log predictive density Σ_i log p(y_i | Y_−i) / N, in closed form
  from (K + σ²I)⁻¹ (Rasmussen & Williams §5.4.2: μ_−i = y_i − [K⁻¹Y]_i / [K⁻¹]_ii,
  σ²_−i = 1 / [K⁻¹]_ii).

Both are exact (no mini-batching). Parameters are optimised in log space by L-BFGS-B within
:data:`BOUNDS`: λ in grid index units of the last hidden layer, the readout amplitude a
(its weight_var) and σ² relative to the mean diagonal of the kernel at a = 1.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from cnngp.errors import CNNGPError
from cnngp.inference.gp import centered_one_hot
from cnngp.kernels.correlations import FAMILIES, family as correlation_family

__all__ = ["OBJECTIVES", "BOUNDS", "OffsetReadout", "log_marginal_likelihood", "loo_log_predictive",
           "objective_value", "learn_readout", "learn_spectral_mixture", "LearnResult"]

OBJECTIVES = ("mll", "loo")

#: bounds of the learned parameters (log space inside): λ in last-grid index units (the
#: paper's grid spans 0.03–31,623), amplitude a, σ² as a multiple of the mean diagonal of
#: Σ_δ w S (the kernel at a = 1)
BOUNDS = {"lengthscale": (1e-2, 1e5), "amplitude": (1e-4, 1e4), "noise_variance": (1e-9, 1e1)}


def _cholesky(A: torch.Tensor) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        raise CNNGPError("the kernel plus noise is not positive definite (raise the noise variance bound)")
    return L


def log_marginal_likelihood(K: torch.Tensor, Y: torch.Tensor, noise) -> torch.Tensor:
    """log N(Y | 0, K + σ²I) summed over the C columns of Y, divided by N (float64)."""
    n, c = Y.shape
    L = _cholesky(K + noise * torch.eye(n, dtype=K.dtype))
    alpha = torch.cholesky_solve(Y, L)
    fit = (Y * alpha).sum()
    logdet = 2.0 * torch.log(torch.diagonal(L)).sum()
    return (-0.5 * fit - 0.5 * c * logdet - 0.5 * n * c * math.log(2 * math.pi)) / n


def loo_log_predictive(K: torch.Tensor, Y: torch.Tensor, noise) -> torch.Tensor:
    """Σ_i Σ_c log N(y_ic | μ_−i,c, σ²_−i) / N, leave-one-out, from one factorisation."""
    n, c = Y.shape
    L = _cholesky(K + noise * torch.eye(n, dtype=K.dtype))
    inv = torch.cholesky_inverse(L)
    alpha = inv @ Y
    d = torch.diagonal(inv)  # 1/σ²_−i
    # log N(y | μ, s²) with y − μ = α/d and s² = 1/d
    terms = 0.5 * torch.log(d / (2 * math.pi))[:, None] - 0.5 * alpha**2 / d[:, None]
    return terms.sum() / n


_OBJECTIVE_FNS = {"mll": log_marginal_likelihood, "loo": loo_log_predictive}


def objective_value(name: str, K, Y, noise) -> torch.Tensor:
    if name not in _OBJECTIVE_FNS:
        raise CNNGPError(f"objective: expected one of {OBJECTIVES}, got {name!r}")
    return _OBJECTIVE_FNS[name](K, Y, noise)


class OffsetReadout:
    """The readout kernel a · Σ_δ w_λ[δ] S[δ] + b of one stationary family from offset sums.

    Parameters
    ----------
    S : tensor (M, N1, N2)
        Offset sums (:func:`cnngp.engine.gram.offset_sums`), float64.
    grid : tuple
        The last hidden layer's grid (M = ∏ (2N_k − 1)).
    family : {"matern12", "matern32", "matern52", "rbf"}
    bias_var : float
        b, fixed.
    """

    def __init__(self, S, grid, family: str = "matern32", bias_var: float = 0.0):
        if family not in FAMILIES:
            raise CNNGPError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
        self.S = torch.as_tensor(S, dtype=torch.float64)
        self.grid = tuple(int(g) for g in grid)
        m = math.prod(2 * g - 1 for g in self.grid)
        if self.S.dim() != 3 or self.S.shape[0] != m:
            raise CNNGPError(f"S: expected offset sums of shape ({m}, N1, N2) for the grid {self.grid}, "
                             f"got {tuple(self.S.shape)}")
        self.family = family
        self.correlation = correlation_family(family, 1.0)
        self.bias_var = float(bias_var)
        self.evaluations = 0  # kernel matrices formed (each: one value per image pair)

    def weights(self, lengthscale) -> torch.Tensor:
        return self.correlation.offset_weights(self.grid, lengthscale)

    def kernel(self, lengthscale, amplitude=1.0) -> torch.Tensor:
        """(N1, N2): ``lengthscale`` and ``amplitude`` numbers, or torch scalars (autograd)."""
        self.evaluations += 1
        return amplitude * torch.tensordot(self.weights(lengthscale), self.S, 1) + self.bias_var


def _warn_at_limit(res, max_iter: int, what: str) -> None:
    """A warning when L-BFGS-B stopped because it ran out of iterations, not because it
    converged: the values it returns are where it stopped, not an optimum."""
    if not bool(res.success) and int(res.nit) >= int(max_iter):
        warnings.warn(
            f"max_iter: {what} stopped at its iteration limit ({int(max_iter)}) before converging "
            f"({' '.join(str(res.message).split())}); the values learned are where it stopped: raise "
            "max_iter (--max-iter)", RuntimeWarning, stacklevel=3)


@dataclass
class LearnResult:
    learned: dict
    objective: float
    trace: list = field(default_factory=list)
    kernel_evaluations: int = 0
    starts: list = field(default_factory=list)
    seconds: float = 0.0


def learn_readout(
    readout: OffsetReadout,
    y,
    *,
    objective: str = "mll",
    n_classes: int | None = None,
    starts=(0.3, 3.0, 30.0),
    max_iter: int = 100,
    progress=None,
) -> LearnResult:
    """Maximise ``objective`` over (λ, a, σ²) by L-BFGS-B in log space from each starting λ in
    ``starts`` (a = 1, σ² = 1e-2 × mean diagonal); return the best.

    ``trace`` records every accepted step of every start: ``start``, ``step``, ``objective``,
    ``lengthscale``, ``amplitude``, ``noise_variance``. ``progress(entry)`` is called on each.
    """
    from scipy.optimize import minimize

    if objective not in OBJECTIVES:
        raise CNNGPError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    S = readout.S
    if S.shape[1] != S.shape[2]:
        raise CNNGPError("learn_readout: needs the square training offset sums (x2 = x1)")
    y = np.asarray(y)
    Y = torch.as_tensor(centered_one_hot(y, n_classes), dtype=torch.float64)
    with torch.no_grad():
        scale = float(torch.diagonal(readout.kernel(1.0)).mean())
    if not (scale > 0 and math.isfinite(scale)):
        raise CNNGPError(f"learn_readout: the kernel's mean diagonal is {scale!r}; expected a positive number "
                         "(at 0 the network sees nothing in the images: all-zero images in a network "
                         "without biases, or pixels that underflow)")
    lo = np.log([BOUNDS["lengthscale"][0], BOUNDS["amplitude"][0], BOUNDS["noise_variance"][0] * scale])
    hi = np.log([BOUNDS["lengthscale"][1], BOUNDS["amplitude"][1], BOUNDS["noise_variance"][1] * scale])
    t0 = time.perf_counter()
    trace, best = [], None

    def unpack(theta):
        return torch.exp(torch.as_tensor(theta, dtype=torch.float64))

    seen = {}  # θ → objective, so that recording a step forms no kernel of its own

    def f(theta):
        t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        lam, amp, noise = torch.exp(t)
        value = objective_value(objective, readout.kernel(lam, amp), Y, noise)
        (-value).backward()
        seen[tuple(np.asarray(theta, dtype=np.float64))] = float(value.detach())
        return -float(value.detach()), t.grad.numpy().copy()

    results = []
    for k, lam0 in enumerate(starts):
        x0 = np.log([float(lam0), 1.0, 1e-2 * scale])
        step = [0]

        def record(theta, k=k, step=step):
            step[0] += 1
            lam, amp, noise = unpack(theta).tolist()
            value = seen.get(tuple(np.asarray(theta, dtype=np.float64)))
            if value is None:
                with torch.no_grad():
                    value = float(objective_value(objective, readout.kernel(lam, amp), Y, noise))
            entry = {"start": k, "step": step[0], "objective": value, "lengthscale": lam,
                     "amplitude": amp, "noise_variance": noise}
            trace.append(entry)
            if progress is not None:
                progress(entry)

        record(x0)
        res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=list(zip(lo, hi)),
                       callback=record, options={"maxiter": int(max_iter)})
        _warn_at_limit(res, max_iter, f"the readout's L-BFGS-B from λ = {float(lam0):g}")
        lam, amp, noise = unpack(res.x).tolist()
        results.append({"start_lengthscale": float(lam0), "lengthscale": lam, "amplitude": amp,
                        "noise_variance": noise, "objective": -float(res.fun), "converged": bool(res.success),
                        "iterations": int(res.nit), "message": str(res.message)})
        if best is None or results[-1]["objective"] > best["objective"]:
            best = results[-1]
    learned = {"lengthscale": best["lengthscale"], "amplitude": best["amplitude"],
               "noise_variance": best["noise_variance"]}
    return LearnResult(learned, best["objective"], trace, readout.evaluations, results,
                       time.perf_counter() - t0)


# -- a freely learned stationary readout: a spectral mixture over the offsets ------------------

#: bounds of a spectral mixture's parameters: relative weights (the first is 1: the
#: amplitude carries the scale), frequencies in cycles per grid step (0 to Nyquist; cos is
#: even, so the sign is immaterial), envelope lengthscales in grid steps
SPECTRAL_BOUNDS = {"weight": (1e-4, 1e4), "mean": (0.0, 0.5), "lengthscale": (0.1, 1e4)}
#: the most components a spectral mixture may have: each adds 2d + 1 parameters to L-BFGS-B and
#: a (|offsets|,) weight table to every evaluation (memory and time grow with Q), and far fewer
#: already describe any stationary readout of a CNN's grid
MAX_SPECTRAL_COMPONENTS = 64


def check_components(components, what: str = "components") -> int:
    """``components`` as an int in 1..MAX_SPECTRAL_COMPONENTS, else a one-line CNNGPError."""
    if isinstance(components, bool) or not isinstance(components, (int, np.integer)) or components < 1:
        raise CNNGPError(f"{what}: expected an integer >= 1, got {components!r}")
    if components > MAX_SPECTRAL_COMPONENTS:
        raise CNNGPError(f"{what}: {components} spectral-mixture components is too many (accepted: 1.."
                         f"{MAX_SPECTRAL_COMPONENTS}; each adds parameters and a weight table to every step)")
    return int(components)


def learn_spectral_mixture(
    S,
    grid,
    y,
    *,
    components: int = 2,
    objective: str = "mll",
    n_classes: int | None = None,
    bias_var: float = 0.0,
    starts=(1.0, 10.0),
    max_iter: int = 200,
    progress=None,
    warm: dict | None = None,
) -> LearnResult:
    """Maximise ``objective`` over a Q-component :class:`~cnngp.kernels.correlations.SpectralMixture`
    readout (weights, per-axis frequencies and envelopes), its amplitude and σ², by L-BFGS-B
    on exact gradients of k = a·Σ_δ w[δ] S[δ] + b — any stationary PSD readout, not one
    family's λ (docs/maths.md §8). Starts: every envelope at each value of ``starts``, the
    frequencies spread over [0, 1/4]; the best is returned. ``warm`` (a learned
    one-family readout: ``lengthscale``, ``amplitude``, ``noise_variance``) adds a start at its
    amplitude and σ² with every envelope at its λ — the mixture then cannot end below a
    degenerate optimum the family found (e.g. amplitude → 0, all noise), which the default
    starts may not reach. ``learned["correlation"]`` is the spec of the learned correlation
    (``cnngp.from_spec``-ready)."""
    from scipy.optimize import minimize

    from cnngp.kernels.correlations import SpectralMixture, spectral_mixture_offset_weights

    if objective not in OBJECTIVES:
        raise CNNGPError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    check_components(components)
    S = torch.as_tensor(S, dtype=torch.float64)
    grid = tuple(int(g) for g in grid)
    if S.dim() != 3 or S.shape[0] != math.prod(2 * g - 1 for g in grid) or S.shape[1] != S.shape[2]:
        raise CNNGPError(f"S: expected square training offset sums (M, N, N) for the grid {grid}, got {tuple(S.shape)}")
    q, d = int(components), len(grid)
    Y = torch.as_tensor(centered_one_hot(np.asarray(y), n_classes), dtype=torch.float64)
    scale = float(torch.diagonal(S[len(S) // 2]).mean()) / math.prod(grid)  # ≈ the independent readout's
    if not (scale > 0 and math.isfinite(scale)):
        raise CNNGPError(f"learn_spectral_mixture: the kernel's mean diagonal is {scale!r}; expected a positive number "
                         "(at 0 the network sees nothing in the images: all-zero images in a network "
                         "without biases, or pixels that underflow)")
    sb = SPECTRAL_BOUNDS

    def unpack(theta):
        t = torch.as_tensor(theta, dtype=torch.float64)
        i = 0
        logw = torch.cat([torch.zeros(1, dtype=torch.float64), t[i : i + q - 1]])
        i += q - 1
        mu = t[i : i + q * d].reshape(q, d)
        i += q * d
        ell = torch.exp(t[i : i + q * d].reshape(q, d))
        i += q * d
        return torch.exp(logw), mu, ell, torch.exp(t[i]), torch.exp(t[i + 1])

    bounds = ([tuple(np.log(sb["weight"]))] * (q - 1) + [sb["mean"]] * (q * d)
              + [tuple(np.log(sb["lengthscale"]))] * (q * d)
              + [tuple(np.log(BOUNDS["amplitude"])), tuple(np.log([BOUNDS["noise_variance"][0] * scale,
                                                                     BOUNDS["noise_variance"][1] * scale]))])
    evaluations = [0]

    def value_of(theta):
        w, mu, ell, amp, noise = unpack(theta)
        wd = spectral_mixture_offset_weights(grid, w, mu, ell)
        evaluations[0] += 1
        return objective_value(objective, amp * torch.tensordot(wd, S, 1) + bias_var, Y, noise)

    def f(theta):
        t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        try:
            value = value_of(t)
        except CNNGPError:  # not positive definite or not normalisable here: a wall, not a crash
            return 1e10, np.zeros_like(theta)
        (-value).backward()
        return -float(value.detach()), t.grad.numpy().copy()

    trace, results = [], []
    t0 = time.perf_counter()
    inits = [(float(ell0), 1.0, 1e-2 * scale) for ell0 in starts]
    if warm is not None:
        def clip(v, lo, hi):
            return min(max(float(v), lo), hi)

        inits.append((clip(warm["lengthscale"], *sb["lengthscale"]), clip(warm["amplitude"], *BOUNDS["amplitude"]),
                      clip(warm["noise_variance"], BOUNDS["noise_variance"][0] * scale,
                           BOUNDS["noise_variance"][1] * scale)))
    for k, (ell0, amp0, noise0) in enumerate(inits):
        x0 = np.concatenate([np.zeros(q - 1), np.repeat(np.linspace(0.0, 0.25, q), d),
                             np.full(q * d, math.log(ell0)), [math.log(amp0), math.log(noise0)]])
        step = [0]

        def record(theta, k=k, step=step):
            step[0] += 1
            with torch.no_grad():
                value = float(value_of(theta))
            evaluations[0] -= 1  # recording is not part of the optimisation's cost
            w, mu, ell, amp, noise = unpack(theta)
            entry = {"start": k, "step": step[0], "objective": value, "amplitude": float(amp),
                     "noise_variance": float(noise), "weights": w.tolist(), "means": mu.tolist(),
                     "lengthscales": ell.tolist()}
            trace.append(entry)
            if progress is not None:
                progress({kk: v for kk, v in entry.items() if not isinstance(v, list)})

        record(x0)
        res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=bounds, callback=record,
                       options={"maxiter": int(max_iter)})
        _warn_at_limit(res, max_iter, f"the spectral mixture's L-BFGS-B from envelope {ell0:g}")
        w, mu, ell, amp, noise = unpack(res.x)
        results.append({"start_lengthscale": ell0, "start_amplitude": amp0, "start_noise_variance": noise0,
                        "warm": warm is not None and k == len(inits) - 1, "objective": -float(res.fun),
                        "converged": bool(res.success), "iterations": int(res.nit), "message": str(res.message),
                        "correlation": SpectralMixture(w.numpy(), mu.numpy(), ell.numpy()).to_spec(),
                        "amplitude": float(amp), "noise_variance": float(noise)})
    best = max(results, key=lambda r: r["objective"])
    learned = {"correlation": best["correlation"], "amplitude": best["amplitude"],
               "noise_variance": best["noise_variance"]}
    return LearnResult(learned, best["objective"], trace, evaluations[0], results, time.perf_counter() - t0)


# -- every parameter of a network, by autograd (docs/maths.md §8) -----------------------------


def _layer_names(net) -> dict:
    """Layer index → the name its parameters carry: ``conv<i>`` for the conv at index i of
    the flattened Serial, ``readout`` for the readout (``readout<i>`` if there are several)."""
    from cnngp.kernels.layers import AvgPool, Conv, Readout

    readouts = [i for i, layer in enumerate(net.layers) if isinstance(layer, Readout)]
    out = {}
    for i, layer in enumerate(net.layers):
        if isinstance(layer, Readout):
            out[i] = "readout" if len(readouts) == 1 else f"readout{i}"
        elif isinstance(layer, Conv) and not isinstance(layer, AvgPool):
            out[i] = f"conv{i}"
    return out


def kernel_parameters(model) -> dict:
    """The positive parameters of ``model``'s kernel, by name: ``"<layer>.weight_var"``,
    ``"<layer>.bias_var"`` of every conv and readout and ``"<layer>.lengthscale"`` of every
    stationary correlation with 0 < λ < ∞ (the ends are exact special cases, not points of a
    continuum); ``<layer>`` says which layer: ``conv<i>`` (i its index in the flattened
    Serial, e.g. ``conv2.lengthscale``) or ``readout`` (``readout.lengthscale``). Values are
    floats."""
    from cnngp.kernels.layers import Serial

    net = model if isinstance(model, Serial) else Serial(model)
    out = {}
    for i, name in _layer_names(net).items():
        layer = net.layers[i]
        out[f"{name}.weight_var"] = float(layer.weight_var)
        out[f"{name}.bias_var"] = float(layer.bias_var)
        lam = getattr(layer.correlation, "lengthscale", None)
        if lam is not None and 0 < float(lam) < math.inf:
            out[f"{name}.lengthscale"] = float(lam)
    return out


def with_parameters(model, values: dict):
    """A copy of ``model`` with the named parameters (:func:`kernel_parameters`) set to
    ``values`` — numbers or torch scalars (then the kernel is differentiable in them through
    :func:`cnngp.engine.gram.differentiable_kernel`)."""
    import copy

    from cnngp.kernels.layers import Serial

    net = copy.deepcopy(model if isinstance(model, Serial) else Serial(model))
    known = kernel_parameters(net)
    index = {name: i for i, name in _layer_names(net).items()}
    for name, v in values.items():
        if name not in known:
            raise CNNGPError(f"parameter {name!r}: not a parameter of this network; expected one of {sorted(known)}")
        layer_name, attr = name.split(".")
        layer = net.layers[index[layer_name]]
        if attr == "lengthscale":  # a new correlation object, not the copy's changed in place
            layer.correlation = copy.copy(layer.correlation)
            layer.correlation.lengthscale = v
        else:
            setattr(layer, attr, v)
    return net


#: bounds of the learned parameters by kind (log space inside), see :data:`BOUNDS`
PARAMETER_BOUNDS = {"lengthscale": BOUNDS["lengthscale"], "weight_var": BOUNDS["amplitude"],
                    "bias_var": (1e-6, 1e2)}


def default_learnable(model) -> list[str]:
    """What ``params="all"`` learns: every lengthscale in the network (intermediate correlated
    convs and the readout) and the readout's weight_var (the kernel's amplitude); the noise
    variance is always learned. (In a ReLU network the earlier weight_vars only rescale the
    kernel, which the readout's amplitude already does.)"""
    from cnngp.kernels.layers import Readout, Serial

    net = model if isinstance(model, Serial) else Serial(model)
    names = [n for n in kernel_parameters(net) if n.endswith(".lengthscale")]
    last = len(net.layers) - 1
    if isinstance(net.layers[last], Readout):
        names.append(f"{_layer_names(net)[last]}.weight_var")
    return names


def kernel_vjp(model, names, values, x, G, *, tile: int = 8, flip: bool = False) -> np.ndarray:
    """Σ_ij G_ij ∂K_ij/∂θ for the parameters ``names`` at ``values`` (K = kernel(model, x),
    G symmetric), by recomputing K tile by tile with autograd
    (:func:`cnngp.engine.gram.differentiable_kernel`): memory of one tile's graph, whatever N;
    off-diagonal tiles count twice (K and G are symmetric). ``flip``: K is the flip-averaged
    kernel ½[K(x, x') + K(x, flip x')] (docs/maths.md §9; symmetric for a flip-symmetric
    network, which ``kernel(model, x, flip=True)`` has checked)."""
    from cnngp.engine.gram import differentiable_kernel, flip_images

    ts = {n: torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for n, v in zip(names, values)}
    net = with_parameters(model, ts)
    n = len(x)
    G = torch.as_tensor(G, dtype=torch.float64)
    for i0 in range(0, n, tile):
        for j0 in range(i0, n, tile):
            rows, cols = slice(i0, i0 + tile), slice(j0, j0 + tile)
            k = differentiable_kernel(net, x[rows], None if i0 == j0 else x[cols])
            if flip:
                k = 0.5 * (k + differentiable_kernel(net, x[rows], flip_images(x[cols])))
            w = 1.0 if i0 == j0 else 2.0
            (w * (k * G[rows, cols]).sum()).backward()
    return np.array([float(ts[n].grad) if ts[n].grad is not None else 0.0 for n in names])


def learn_network(
    model,
    x,
    y,
    *,
    names=None,
    objective: str = "mll",
    n_classes: int | None = None,
    max_iter: int = 50,
    progress=None,
    execution=None,
    starts=None,
    **options,
) -> LearnResult:
    """Maximise ``objective`` over the network's parameters ``names`` (default
    :func:`default_learnable`) and σ², by L-BFGS-B in log space from the model's own values,
    or, with ``starts`` (readout lengthscales), once from each with the readout's λ set to it
    (the best is kept; ``LearnResult.starts`` has one entry per start, ``trace`` entries carry
    ``start``). A run that stops at ``max_iter`` without converging warns.

    Each step: K = kernel(model) by the fast path (no graph), the objective and G = ∂obj/∂K
    from one factorisation, then Σ G ∂K/∂θ by :func:`kernel_vjp`. Cost per step: two kernel
    passes (N(N+1)/2 pairs each, the second with autograd and its backward). ``progress(entry)``
    is called on every step; ``execution`` and the execution options (:class:`cnngp.Execution`)
    compute the fast-path kernels, and their ``tile`` (default 8) is :func:`kernel_vjp`'s.
    Among ``options``, beside the execution options, ``flip=True``: the flip-averaged kernel
    ½[K(x, x') + K(x, flip x')] (docs/maths.md §9) throughout, gradients included."""
    from scipy.optimize import minimize

    from cnngp.engine.execution import COMPUTE, Execution
    from cnngp.engine.gram import kernel

    flip = options.pop("flip", False)
    if not isinstance(flip, (bool, np.bool_)):
        raise CNNGPError(f"flip: expected True or False, got {flip!r}")
    ex = Execution.build(execution, options, where="learn_network", accepted=COMPUTE + ("tile",))
    tile = ex.tile or 8

    if objective not in OBJECTIVES:
        raise CNNGPError(f"objective: expected one of {OBJECTIVES}, got {objective!r}")
    names = list(default_learnable(model) if names is None else names)
    start = kernel_parameters(model)
    for name in names:
        if name not in start:
            raise CNNGPError(f"names: {name!r} is not a learnable parameter of this network "
                             f"(0 < λ < ∞ lengthscales and variances: {sorted(start)})")
        if not start[name] > 0:
            raise CNNGPError(f"names: {name!r} starts at {start[name]}; a learned parameter must start > 0")
    Y = torch.as_tensor(centered_one_hot(np.asarray(y), n_classes), dtype=torch.float64)
    n = len(y)
    evaluations = [0]
    with torch.no_grad():
        scale = float(torch.diagonal(kernel(model, x, flip=flip, execution=ex)).double().mean())
    evaluations[0] += 1
    bounds = [PARAMETER_BOUNDS[nm.split(".")[1]] for nm in names] + [
        (BOUNDS["noise_variance"][0] * scale, BOUNDS["noise_variance"][1] * scale)]
    lo, hi = np.log([b[0] for b in bounds]), np.log([b[1] for b in bounds])
    readout_lam = next((nm for nm in names if nm.startswith("readout") and nm.endswith(".lengthscale")), None)
    if starts is not None and readout_lam is None:
        raise CNNGPError("starts: the network's readout has no learned lengthscale to start from")
    start_values = [None] if starts is None else [float(v) for v in starts]
    if not start_values:
        raise CNNGPError("starts: expected at least one starting lengthscale")
    trace, seen, t0 = [], {}, time.perf_counter()
    current = [0]

    def f(theta):
        vals = np.exp(theta)
        net = with_parameters(model, dict(zip(names, vals[:-1].tolist())))
        K = kernel(net, x, flip=flip, execution=ex).to(torch.float64).requires_grad_(True)
        noise = torch.tensor(vals[-1], dtype=torch.float64, requires_grad=True)
        value = objective_value(objective, K, Y, noise)
        value.backward()
        g = kernel_vjp(model, names, vals[:-1], x, K.grad, tile=tile, flip=flip)
        evaluations[0] += 2
        grad = np.concatenate([g, [float(noise.grad)]]) * vals  # d/dlog θ
        seen[tuple(theta)] = float(value.detach())
        return -float(value.detach()), -grad

    step = [0]

    def record(theta):
        vals = np.exp(theta)
        step[0] += 1
        entry = {"start": current[0], "step": step[0], "objective": seen.get(tuple(theta)),
                 **dict(zip(names, vals[:-1].tolist())), "noise_variance": float(vals[-1])}
        trace.append(entry)
        if progress is not None:
            progress(entry)

    info, best = [], None
    for k, lam0 in enumerate(start_values):
        current[0], step[0] = k, 0
        first = dict(start)
        if lam0 is not None:
            first[readout_lam] = lam0
        x0 = np.clip(np.log([first[nm] for nm in names] + [1e-2 * scale]), lo, hi)
        record(x0)
        res = minimize(f, x0, jac=True, method="L-BFGS-B", bounds=list(zip(lo, hi)), callback=record,
                       options={"maxiter": int(max_iter)})
        _warn_at_limit(res, max_iter, "the network's L-BFGS-B" + ("" if lam0 is None else f" from λ = {lam0:g}"))
        vals = np.exp(res.x)
        learned = dict(zip(names, vals[:-1].tolist()))
        learned["noise_variance"] = float(vals[-1])
        info.append({**({} if lam0 is None else {"start_lengthscale": lam0}), **learned,
                     "objective": -float(res.fun), "converged": bool(res.success), "iterations": int(res.nit),
                     "message": str(res.message)})
        if best is None or info[-1]["objective"] > best[1]:
            best = (learned, info[-1]["objective"])
    per_pass = (n * (n + 1) // 2) * (2 if flip else 1)  # flip: K and its mirror term per pair
    return LearnResult(best[0], best[1], trace, evaluations[0] * per_pass, info,
                       time.perf_counter() - t0)

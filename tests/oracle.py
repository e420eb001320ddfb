"""A deliberately naive brute-force oracle for the NNGP kernel recursion (PAPER.md section 2)
and the neural tangent kernel (NTK) carried alongside it.

Used by the test suite to check the fast torch engine. It must stay independent of ``cnngp``
(it never imports it) and obviously correct rather than fast: plain Python loops over output
position pairs ``(q, q')`` and filter-tap pairs ``(p, p')``, in float64, on tiny inputs.

For each pair of inputs ``(x, x')`` the oracle carries the full second-moment tensor over pairs
of positions, ``V[p, p']``, flattened to a ``(|F|, |F|)`` matrix with positions in row-major
order; a grid with no spatial dimensions (after ``flatten`` / ``global_avg_pool``) has
``|F| = 1``. The self tensors ``V_xx`` and ``V_x'x'`` are propagated alongside (each image once),
because a nonlinearity needs the variances ``K_xx[p, p]`` and ``K_x'x'[p', p']``.

Every linear layer (conv, avgpool, flatten, global_avg_pool, readout) is the same operation:

    K[q, q'] = weight_var * sum_{a, b} Sigma[a, b] * V[i(q, a), i(q', b)] + bias_var

where ``i(q, a)`` is the input position that output ``q`` reads through tap ``a`` (or "none",
meaning zero padding, whose contribution is 0) and ``Sigma`` the normalised tap correlation.

The NTK (NTK parameterisation, as neural-tangents) is a second tensor ``T[p, p']`` carried
through the same layers, ``T = 0`` at the input:

    linear layer with parameters (conv, readout):
        T_out[q, q'] = weight_var * sum_{a, b} Sigma[a, b] * T_in[i(q, a), i(q', b)] + K_out[q, q']
    parameter-free linear layer (avgpool, flatten, global_avg_pool; weight_var 1, bias 0):
        T_out[q, q'] = weight_var * sum_{a, b} Sigma[a, b] * T_in[i(q, a), i(q', b)]
    nonlinearity phi:
        T_out[p, p'] = T_in[p, p'] * E[phi'(u) phi'(v)]

with ``K_out`` the layer's own NNGP output (bias included) and the expectation under the same
bivariate Gaussian as the NNGP's (Var u = K_xx[p, p], Var v = K_x'x'[p', p'], Cov = K[p, p']).

Public API:
    brute_force_kernel(spec, x1, x2=None, get="nngp") -> (N1, N2) kernel
    brute_force_ntk(spec, x1, x2=None) -> (N1, N2) neural tangent kernel
    brute_force_hidden(spec, x1, x2=None, get="nngp") -> (N1, N2, *F, *F) tensor fed to the readout
    correlation_matrix(corr_spec, shape) -> (|P|, |P|) normalised tap correlation

``get`` is "nngp" (default), "ntk", or "both" for the tuple (nngp, ntk).
"""

from __future__ import annotations

import itertools
import math

import numpy as np

__all__ = ["brute_force_kernel", "brute_force_ntk", "brute_force_hidden", "correlation_matrix"]

_NONLINEARITIES = ("relu", "abrelu", "erf", "identity")


# --------------------------------------------------------------------------------------------
# Correlations over filter taps
# --------------------------------------------------------------------------------------------


def _lengthscale(value) -> float:
    if isinstance(value, str):
        if value.strip().lower() in ("inf", "infinity", "+inf"):
            return math.inf
        raise ValueError(f"lengthscale must be a number or 'inf', got {value!r}")
    lam = float(value)
    if math.isnan(lam) or lam < 0:
        raise ValueError(f"lengthscale must be >= 0 (or 'inf'), got {value!r}")
    return lam


def correlation_matrix(corr_spec: dict | None, shape: tuple[int, ...]) -> np.ndarray:
    """The (|P|, |P|) tap correlation for a filter of spatial ``shape``, entries summing to 1.

    Taps are flattened row-major over the dimensions; distances are Euclidean distances
    between tap index vectors (grid index units, not multiplied by any dilation).
    """
    corr_spec = {"type": "independent"} if corr_spec is None else corr_spec
    kind = corr_spec.get("type", "independent")
    taps = list(itertools.product(*(range(n) for n in shape)))
    n = len(taps)
    if kind == "independent":
        return np.eye(n) / n
    if kind == "constant":
        return np.ones((n, n)) / (n * n)
    if kind == "user":
        m = np.array(corr_spec["matrix"], dtype=np.float64)
        if m.shape != (n, n):
            raise ValueError(f"user correlation must be {n}x{n} for filter {shape}, got {m.shape}")
        total = m.sum()
        if not total > 0:
            raise ValueError("user correlation must have a positive sum")
        return m / total
    if kind in ("matern", "rbf"):
        lam = _lengthscale(corr_spec["lengthscale"])
        if lam == 0.0:
            return np.eye(n) / n
        if lam == math.inf:
            return np.ones((n, n)) / (n * n)
        t = np.array(taps, dtype=np.float64).reshape(n, len(shape))
        diff = t[:, None, :] - t[None, :, :]
        r = np.sqrt((diff**2).sum(axis=-1))
        if kind == "rbf":
            m = np.exp(-(r**2) / (2.0 * lam**2))
        else:
            nu = float(corr_spec["nu"])
            if nu == 0.5:
                m = np.exp(-r / lam)
            elif nu == 1.5:
                z = math.sqrt(3.0) * r / lam
                m = (1.0 + z) * np.exp(-z)
            elif nu == 2.5:
                z = math.sqrt(5.0) * r / lam
                m = (1.0 + z + z**2 / 3.0) * np.exp(-z)
            else:
                raise ValueError(f"matern nu must be 0.5, 1.5 or 2.5, got {nu}")
        return m / m.sum()
    raise ValueError(f"unknown correlation type {kind!r}")


# --------------------------------------------------------------------------------------------
# Nonlinearities: E[phi(u) phi(v)] for (u, v) ~ N(0, [[sx, c], [c, sy]])
# --------------------------------------------------------------------------------------------


def _arccos_terms(sx: float, sy: float, c: float) -> float:
    """sqrt(sx*sy - c^2) + (pi - theta) c, theta = arccos(c / sqrt(sx*sy)); = 2*pi*E[relu relu]."""
    # theta from the same sine as the first term (theta = atan2(sin, cos)): near perfect
    # correlation the rounding errors of the two terms then cancel, as they do analytically;
    # a separate arccos(c / sqrt(prod)) loses about half the digits there (1-channel inputs).
    sine = math.sqrt(max(sx * sy - c * c, 0.0))
    theta = math.atan2(sine, c)
    return sine + (math.pi - theta) * c


def _expect(layer: dict, sx: float, sy: float, c: float) -> float:
    kind = layer["type"]
    if kind == "identity":
        return c
    if kind == "relu":  # sqrt(2) * max(0, x)
        if sx * sy <= 0.0:
            return 0.0
        return _arccos_terms(sx, sy, c) / math.pi
    if kind == "abrelu":
        # phi(x) = a x + (b - a) max(x, 0);  E[u max(v, 0)] = c / 2, so
        # E[phi(u) phi(v)] = a^2 c + a (b - a) c + (b - a)^2 E[max(u,0) max(v,0)]
        #                  = a b c + (b - a)^2 / (2 pi) * (sqrt(sx sy - c^2) + (pi - theta) c)
        a = float(layer.get("a", 0.0))
        b = float(layer.get("b", 1.0))
        if sx * sy <= 0.0:
            return 0.0
        return a * b * c + (b - a) ** 2 / (2.0 * math.pi) * _arccos_terms(sx, sy, c)
    if kind == "erf":
        a = float(layer.get("a", 1.0))
        b = float(layer.get("b", 1.0))
        c0 = float(layer.get("c", 0.0))
        arg = 2.0 * b * b * c / math.sqrt((1.0 + 2.0 * b * b * sx) * (1.0 + 2.0 * b * b * sy))
        arg = min(1.0, max(-1.0, arg))
        return a * a * (2.0 / math.pi) * math.asin(arg) + c0 * c0
    raise ValueError(f"unknown nonlinearity {kind!r}")


# E[phi'(u) phi'(v)] for (u, v) ~ N(0, [[sx, c], [c, sy]]): what the NTK multiplies by.


def _angle(sx: float, sy: float, c: float) -> float:
    """theta = arccos(c / sqrt(sx*sy)) in [0, pi], and pi/2 when a variance is 0."""
    if sx * sy <= 0.0:
        return math.pi / 2.0
    # the atan2 form again: exactly 0 at perfect correlation, no digits lost near it
    return math.atan2(math.sqrt(max(sx * sy - c * c, 0.0)), c)


def _dexpect(layer: dict, sx: float, sy: float, c: float) -> float:
    kind = layer["type"]
    if kind == "identity":  # phi' = 1
        return 1.0
    if kind in ("relu", "abrelu"):
        # phi' = a for u < 0, b for u > 0; P(u > 0, v > 0) = P(u < 0, v < 0) = (pi - theta) / 2pi
        # and P(u > 0, v < 0) = P(u < 0, v > 0) = theta / 2pi
        if kind == "relu":
            a, b = 0.0, math.sqrt(2.0)
        else:
            a = float(layer.get("a", 0.0))
            b = float(layer.get("b", 1.0))
        theta = _angle(sx, sy, c)
        return ((a * a + b * b) * (math.pi - theta) + 2.0 * a * b * theta) / (2.0 * math.pi)
    if kind == "erf":
        # phi'(u) = a b (2 / sqrt(pi)) exp(-b^2 u^2): a Gaussian integral of exp(-b^2 (u^2 + v^2))
        a = float(layer.get("a", 1.0))
        b = float(layer.get("b", 1.0))
        det = (1.0 + 2.0 * b * b * sx) * (1.0 + 2.0 * b * b * sy) - 4.0 * b**4 * c * c
        return (4.0 * a * a * b * b / math.pi) / math.sqrt(det)
    raise ValueError(f"unknown nonlinearity {kind!r}")


# --------------------------------------------------------------------------------------------
# Compiling a spec into a list of operations on a known input grid
# --------------------------------------------------------------------------------------------


def _per_dim(value, ndim: int, name: str, where: str) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) != ndim:
            raise ValueError(f"{where}: {name} {list(value)} has {len(value)} entries, grid has {ndim} dims")
        out = tuple(int(v) for v in value)
    else:
        out = (int(value),) * ndim
    if any(v < 1 for v in out):
        raise ValueError(f"{where}: {name} must be >= 1, got {value!r}")
    return out


def _ravel(index: tuple[int, ...], shape: tuple[int, ...]) -> int:
    flat = 0
    for i, n in zip(index, shape):
        flat = flat * n + i
    return flat


def _conv_op(grid, filt, stride, dilation, padding, corr, weight_var, bias_var, trainable, where):
    """Index table and tap weights of a conv on ``grid``; returns (op, output grid).
    ``trainable``: the layer has weights and biases (a conv, not an avgpool)."""
    out_shape, pad_before = [], []
    for n, P, s, h in zip(grid, filt, stride, dilation):
        e = (P - 1) * h + 1
        if padding == "valid":
            out = (n - e) // s + 1 if n >= e else 0
            before = 0
        elif padding in ("same", "circular"):
            out = -(-n // s)
            before = max((out - 1) * s + e - n, 0) // 2
        else:
            raise ValueError(f"{where}: unknown padding {padding!r}")
        if out < 1:
            raise ValueError(f"{where}: filter of extent {e} does not fit a grid of size {n}")
        out_shape.append(out)
        pad_before.append(before)
    out_shape = tuple(out_shape)

    table = []  # table[q][a] = flat input position read by output q via tap a, or -1 (padding)
    for q in itertools.product(*(range(m) for m in out_shape)):
        row = []
        for p in itertools.product(*(range(P) for P in filt)):
            idx = []
            for d in range(len(grid)):
                i = stride[d] * q[d] + dilation[d] * p[d] - pad_before[d]
                if padding == "circular":
                    i %= grid[d]
                elif not 0 <= i < grid[d]:
                    idx = None
                    break
                idx.append(i)
            row.append(-1 if idx is None else _ravel(tuple(idx), grid))
        table.append(row)

    sigma = correlation_matrix(corr, filt)
    op = ("linear", table, _nonzero_taps(sigma), float(weight_var), float(bias_var), trainable)
    return op, out_shape


def _whole_grid_op(grid, sigma, weight_var, bias_var, trainable):
    """One output position reading every position of ``grid`` (flatten, pooling, readout).
    ``trainable``: the layer has parameters of its own (the readout), which the NTK counts."""
    n = math.prod(grid)
    table = [list(range(n))]
    return ("linear", table, _nonzero_taps(sigma), float(weight_var), float(bias_var), trainable)


def _nonzero_taps(sigma: np.ndarray) -> list[tuple[int, int, float]]:
    # Skipping exact zeros of Sigma changes nothing in the sum; it keeps loops affordable.
    n = sigma.shape[0]
    return [(a, b, float(sigma[a, b])) for a, b in itertools.product(range(n), repeat=2) if sigma[a, b] != 0.0]


def _compile(spec: dict, spatial: tuple[int, ...], channels: int):
    """Turn the JSON spec into operations; returns (ops, grids) with grids[k] = input grid of op k."""
    if "input_channels" in spec and int(spec["input_channels"]) != channels:
        raise ValueError(f"spec says input_channels={spec['input_channels']}, inputs have {channels}")
    layers = spec["layers"]
    if not layers or layers[-1].get("type") != "readout":
        raise ValueError("the last layer of the spec must be a readout")
    grid = tuple(spatial)
    ops, grids = [], []
    for k, layer in enumerate(layers):
        kind = layer.get("type")
        where = f"layer {k} ({kind})"
        grids.append(grid)
        if kind == "conv":
            if len(grid) == 0:
                raise ValueError(f"{where}: a conv needs spatial dimensions")
            D = len(grid)
            op, grid = _conv_op(
                grid,
                _per_dim(layer["filter"], D, "filter", where),
                _per_dim(layer.get("stride", 1), D, "stride", where),
                _per_dim(layer.get("dilation", 1), D, "dilation", where),
                layer.get("padding", "same"),
                layer.get("correlation"),
                layer.get("weight_var", 1.0),
                layer.get("bias_var", 0.0),
                True,
                where,
            )
        elif kind == "avgpool":
            if len(grid) == 0:
                raise ValueError(f"{where}: avgpool needs spatial dimensions")
            D = len(grid)
            window = _per_dim(layer["window"], D, "window", where)
            stride = _per_dim(layer.get("stride", layer["window"]), D, "stride", where)
            padding = layer.get("padding", "valid")
            if padding not in ("valid", "same"):
                raise ValueError(f"{where}: avgpool padding must be 'valid' or 'same', got {padding!r}")
            op, grid = _conv_op(grid, window, stride, (1,) * D, padding, {"type": "constant"}, 1.0, 0.0, False, where)
        elif kind == "global_avg_pool":
            n = math.prod(grid)
            op, grid = _whole_grid_op(grid, np.ones((n, n)) / (n * n), 1.0, 0.0, False), ()
        elif kind == "flatten":
            n = math.prod(grid)
            op, grid = _whole_grid_op(grid, np.eye(n) / n, 1.0, 0.0, False), ()
        elif kind == "readout":
            if k != len(layers) - 1:
                raise ValueError(f"{where}: a readout must be the last layer")
            sigma = correlation_matrix(layer.get("correlation"), grid)
            op, grid = _whole_grid_op(grid, sigma, layer.get("weight_var", 1.0), layer.get("bias_var", 0.0), True), ()
        elif kind in _NONLINEARITIES:
            op = ("nonlin", layer)
        else:
            raise ValueError(f"{where}: unknown layer type {kind!r}")
        ops.append(op)
    grids.append(grid)
    return ops, grids


# --------------------------------------------------------------------------------------------
# Propagation
# --------------------------------------------------------------------------------------------


def _input_tensor(x: np.ndarray, y: np.ndarray) -> list[list[float]]:
    """V0[p, p'] = (1/C) sum_c x[p, c] y[p', c], positions flattened row-major."""
    C = x.shape[-1]
    xs = x.reshape(-1, C).tolist()
    ys = y.reshape(-1, C).tolist()
    V = []
    for xp in xs:
        row = []
        for yp in ys:
            s = 0.0
            for c in range(C):
                s += xp[c] * yp[c]
            row.append(s / C)
        V.append(row)
    return V


def _linear(op, V: list[list[float]]) -> list[list[float]]:
    _, table, taps, weight_var, bias_var, _ = op
    K = []
    for ia in table:  # output position q
        row = []
        for ib in table:  # output position q'
            s = 0.0
            for a, b, w in taps:  # filter taps p, p'
                i, j = ia[a], ib[b]
                if i >= 0 and j >= 0:
                    s += w * V[i][j]
            row.append(weight_var * s + bias_var)
        K.append(row)
    return K


def _linear_tangent(op, T: list[list[float]], K_out: list[list[float]]) -> list[list[float]]:
    """The NTK through a linear layer: the same tap sum of T_in, times weight_var, no bias;
    plus the layer's own NNGP output K_out when it has parameters (their gradients)."""
    _, table, taps, weight_var, _, trainable = op
    out = []
    for q, ia in enumerate(table):
        row = []
        for qq, ib in enumerate(table):
            s = 0.0
            for a, b, w in taps:
                i, j = ia[a], ib[b]
                if i >= 0 and j >= 0:
                    s += w * T[i][j]
            t = weight_var * s
            if trainable:
                t += K_out[q][qq]
            row.append(t)
        out.append(row)
    return out


def _nonlin(layer: dict, K: list[list[float]], Kxx: list[list[float]], Kyy: list[list[float]]):
    n = len(K)
    V = []
    for p in range(n):
        row = []
        for pp in range(n):
            row.append(_expect(layer, Kxx[p][p], Kyy[pp][pp], K[p][pp]))
        V.append(row)
    return V


def _nonlin_tangent(layer: dict, T, K, Kxx, Kyy):
    n = len(K)
    out = []
    for p in range(n):
        row = []
        for pp in range(n):
            row.append(T[p][pp] * _dexpect(layer, Kxx[p][p], Kyy[pp][pp], K[p][pp]))
        out.append(row)
    return out


def _propagate(ops, V0, self_x=None, self_y=None):
    """States before every op and after the last. self_x/self_y: the images' own states (None
    when x is x', then the tensor's own diagonal gives the variances)."""
    states = [V0]
    V = V0
    for k, op in enumerate(ops):
        if op[0] == "linear":
            V = _linear(op, V)
        else:
            Kxx = V if self_x is None else self_x[k]
            Kyy = V if self_y is None else self_y[k]
            V = _nonlin(op[1], V, Kxx, Kyy)
        states.append(V)
    return states


def _propagate_tangent(ops, states, self_x=None, self_y=None):
    """The NTK tensors before every op and after the last, from the NNGP ``states`` of the same
    pair (and the images' own NNGP states, as in :func:`_propagate`)."""
    n = len(states[0])
    T = [[0.0] * len(states[0][0]) for _ in range(n)]  # no parameters below the input
    tangents = [T]
    for k, op in enumerate(ops):
        if op[0] == "linear":
            T = _linear_tangent(op, T, states[k + 1])
        else:
            Kxx = states[k] if self_x is None else self_x[k]
            Kyy = states[k] if self_y is None else self_y[k]
            T = _nonlin_tangent(op[1], T, states[k], Kxx, Kyy)
        tangents.append(T)
    return tangents


def _check_inputs(x1, x2):
    x1 = np.asarray(x1, dtype=np.float64)
    if x1.ndim < 2:
        raise ValueError(f"x1 must be (N, *spatial, C), got shape {x1.shape}")
    if x2 is not None:
        x2 = np.asarray(x2, dtype=np.float64)
        if x2.shape[1:] != x1.shape[1:]:
            raise ValueError(f"x2 has per-example shape {x2.shape[1:]}, x1 has {x1.shape[1:]}")
    return x1, x2


def _parse_get(get) -> tuple[str, ...]:
    names = {"nngp": ("nngp",), "ntk": ("ntk",), "both": ("nngp", "ntk")}
    if get not in names:
        raise ValueError(f"get must be 'nngp', 'ntk' or 'both', got {get!r}")
    return names[get]


def _all_pairs(spec, x1, x2, state_index, get="nngp"):
    """Run the recursion for every pair and pick states[state_index] (of the NNGP and/or the
    NTK, see ``get``); returns one array, or the tuple (nngp, ntk) for get="both"."""
    kinds = _parse_get(get)
    x1, x2 = _check_inputs(x1, x2)
    ops, grids = _compile(spec, x1.shape[1:-1], x1.shape[-1])
    grid = grids[state_index]
    traj1 = [_propagate(ops, _input_tensor(x, x)) for x in x1]
    traj2 = traj1 if x2 is None else [_propagate(ops, _input_tensor(y, y)) for y in x2]
    others = x1 if x2 is None else x2
    outs = {kind: np.zeros((len(x1), len(others)) + grid + grid) for kind in kinds}
    for i, j in itertools.product(range(len(x1)), range(len(others))):
        if x2 is None and j < i:
            # V_{x_i x_j}[p, p'] = V_{x_j x_i}[p', p] (and the same for the NTK's T)
            n = math.prod(grid)
            for out in outs.values():
                out[i, j] = out[j, i].reshape(n, n).T.reshape(grid + grid)
            continue
        if x2 is None and i == j:
            states = traj1[i]
            self_x = self_y = None
        else:
            self_x, self_y = traj1[i], traj2[j]
            states = _propagate(ops, _input_tensor(x1[i], others[j]), self_x, self_y)
        if "nngp" in outs:
            outs["nngp"][i, j] = np.array(states[state_index]).reshape(grid + grid)
        if "ntk" in outs:
            tangents = _propagate_tangent(ops, states, self_x, self_y)
            outs["ntk"][i, j] = np.array(tangents[state_index]).reshape(grid + grid)
    result = tuple(outs[kind] for kind in kinds)
    return result[0] if len(result) == 1 else result


def brute_force_kernel(spec: dict, x1: np.ndarray, x2: np.ndarray | None = None, get="nngp"):
    """The (N1, N2) NNGP kernel of ``spec`` (last layer: readout); ``x2=None`` means ``x1``.

    x1, x2: (N, *spatial, C) channels last. get: "nngp" (default), "ntk" (the neural tangent
    kernel, NTK parameterisation) or "both" for the tuple (nngp, ntk).
    """
    return _all_pairs(spec, x1, x2, -1, get)


def brute_force_ntk(spec: dict, x1: np.ndarray, x2: np.ndarray | None = None) -> np.ndarray:
    """The (N1, N2) neural tangent kernel of ``spec`` at the network output (NTK
    parameterisation, as neural-tangents); ``x2=None`` means ``x1``."""
    return _all_pairs(spec, x1, x2, -1, "ntk")


def brute_force_hidden(spec: dict, x1: np.ndarray, x2: np.ndarray | None = None, get="nngp"):
    """The (N1, N2, *F, *F) position-pair covariance V after the last layer before the readout
    (F = that layer's output grid; () after flatten / global_avg_pool, giving (N1, N2)).
    get: as for :func:`brute_force_kernel` ("ntk": the NTK's position-pair tensor T there)."""
    return _all_pairs(spec, x1, x2, -2, get)

"""Property-based test of cnngp.kernel over random architecture specs and random images.

The property: for any *valid-looking* spec (the keys of src/cnngp/spec.py, sensible values)
and any finite images, ``cnngp.kernel`` either

(a) returns a finite, symmetric, positive semi-definite (N, N) matrix — and, for x2 given, a
    finite (N1, N2) matrix equal to the off-diagonal block of the joint kernel of [x1; x2] —
or
(b) raises :class:`cnngp.CNNGPError` with a one-line message.

Any other exception, a multi-line message, NaN/inf, asymmetry or a negative eigenvalue is a
bug. The draws span 1-D and 2-D grids, every layer type of a spec, all three paddings,
strides, dilations, all built-in correlations (including the exact limits λ = 0 and λ = ∞),
pixel scales from 1e-6 to 1e6, blank images and duplicated images.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import cnngp

#: examples of the random property; ~15 s on 2 cores including numba's first compile
MAX_EXAMPLES = 600

PADDINGS = ["same", "valid", "circular"]
LENGTHSCALES = [0.0, 0.5, 2.0, math.inf, "inf"]
VARIANCES = st.one_of(
    st.sampled_from([0.0, 1.0, 2.0, 3.0]),
    st.floats(0.0, 3.0, allow_nan=False, allow_infinity=False),
)


# -- spec strategies ---------------------------------------------------------------------------


def correlations():
    return st.one_of(
        st.just({"type": "independent"}),
        st.just({"type": "constant"}),
        st.builds(
            lambda nu, ls: {"type": "matern", "nu": nu, "lengthscale": ls},
            st.sampled_from([0.5, 1.5, 2.5]),
            st.sampled_from(LENGTHSCALES),
        ),
        st.builds(
            lambda ls: {"type": "rbf", "lengthscale": ls},
            st.sampled_from(LENGTHSCALES),
        ),
    )


def per_dim(draw, d, values):
    """An int, or a list of one int per spatial dimension."""
    if draw(st.booleans()):
        return draw(values)
    return [draw(values) for _ in range(d)]


@st.composite
def layer_specs(draw, d, mid=True):
    kind = draw(
        st.sampled_from(
            ["conv"] * 4 + ["relu"] * 2 + ["abrelu", "erf", "identity", "avgpool"]
            + ["global_avg_pool", "flatten"] * (1 if mid else 0)
        )
    )
    if kind == "conv":
        layer = {"type": "conv"}
        # each key is sometimes left to its default
        if draw(st.integers(0, 4)):
            layer["filter"] = per_dim(draw, d, st.integers(1, 4))
        if draw(st.integers(0, 2)):
            layer["stride"] = per_dim(draw, d, st.integers(1, 2))
        if draw(st.integers(0, 2)):
            layer["dilation"] = per_dim(draw, d, st.integers(1, 2))
        if draw(st.integers(0, 4)):
            layer["padding"] = draw(st.sampled_from(PADDINGS))
        if draw(st.integers(0, 2)):
            layer["weight_var"] = draw(VARIANCES)
        if draw(st.integers(0, 2)):
            layer["bias_var"] = draw(VARIANCES)
        if draw(st.integers(0, 4)):
            layer["correlation"] = draw(correlations())
        return layer
    if kind == "abrelu":
        return {"type": "abrelu", "a": draw(st.floats(-1.0, 1.0)), "b": draw(st.floats(-2.0, 2.0))}
    if kind == "erf":
        return {
            "type": "erf",
            "a": draw(st.floats(-2.0, 2.0)),
            "b": draw(st.floats(0.0, 3.0)),
            "c": draw(st.floats(-1.0, 1.0)),
        }
    if kind == "avgpool":
        layer = {"type": "avgpool", "window": per_dim(draw, d, st.integers(1, 3))}
        if draw(st.booleans()):
            layer["stride"] = per_dim(draw, d, st.integers(1, 2))
        if draw(st.booleans()):
            layer["padding"] = draw(st.sampled_from(PADDINGS))
        return layer
    return {"type": kind}


@st.composite
def problems(draw):
    d = draw(st.integers(1, 2))
    # grid sizes 1..7, the larger ones more often (small grids reject most filters)
    spatial = tuple(draw(st.sampled_from([1, 2, 3, 4, 5, 5, 6, 6, 7, 7, 7])) for _ in range(d))
    channels = draw(st.integers(1, 3))
    # a global_avg_pool or flatten mid-network is legal only if no conv or pool follows: rarer
    layers = [draw(layer_specs(d, mid=draw(st.integers(0, 3)) == 0)) for _ in range(draw(st.integers(1, 4)))]
    if draw(st.integers(0, 7)):  # a readout most of the time
        readout = {"type": "readout"}
        if draw(st.booleans()):
            readout["weight_var"] = draw(VARIANCES)
        if draw(st.booleans()):
            readout["bias_var"] = draw(VARIANCES)
        if draw(st.integers(0, 3)):
            readout["correlation"] = draw(correlations())
        layers.append(readout)
    elif draw(st.integers(0, 2)):  # else mostly a collapsing last layer
        layers.append({"type": draw(st.sampled_from(["global_avg_pool", "flatten"]))})
    spec = {"layers": layers}
    if draw(st.booleans()):
        spec["input_channels"] = channels

    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    def images(n):
        # one scale for all images, or one per image; across 12 orders of magnitude
        if draw(st.booleans()):
            scales = [10.0 ** draw(st.integers(-6, 6))] * n
        else:
            scales = [10.0 ** draw(st.integers(-6, 6)) for _ in range(n)]
        x = np.stack([s * rng.standard_normal(spatial + (channels,)) for s in scales])
        if draw(st.integers(0, 4)) == 0:  # a blank (all-zero) image
            x[draw(st.integers(0, n - 1))] = 0.0
        if n > 1 and draw(st.integers(0, 2)) == 0:  # a duplicate image
            i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, n - 1))
            x[i] = x[j]
        if draw(st.integers(0, 5)) == 0:  # non-negative pixels, as after a ReLU or uint8
            x = np.abs(x)
        return x

    x1 = images(draw(st.integers(1, 4)))
    x2 = None
    if draw(st.booleans()):
        x2 = images(draw(st.integers(1, 4)))
        if draw(st.integers(0, 2)) == 0:  # an image shared with x1
            x2[draw(st.integers(0, len(x2) - 1))] = x1[draw(st.integers(0, len(x1) - 1))]
    return spec, x1, x2


# -- the property --------------------------------------------------------------------------------


def _check_gram(k: torch.Tensor, n: int, what: str) -> np.ndarray:
    assert isinstance(k, torch.Tensor), f"{what}: returned {type(k).__name__}, not a tensor"
    assert tuple(k.shape) == (n, n), f"{what}: shape {tuple(k.shape)}, expected {(n, n)}"
    assert k.dtype == torch.float64, f"{what}: dtype {k.dtype}"
    a = k.numpy()
    assert np.all(np.isfinite(a)), f"{what}: non-finite entries\n{a}"
    scale = np.abs(a).max()
    assert np.allclose(a, a.T, rtol=0, atol=1e-12 * scale), f"{what}: not symmetric\n{a}"
    eig = np.linalg.eigvalsh((a + a.T) / 2)
    assert eig.min() >= -1e-9 * np.abs(eig).max(), (
        f"{what}: not positive semi-definite, eigenvalues {eig}\n{a}"
    )
    return a


def _check_message(err: cnngp.CNNGPError):
    msg = str(err)
    assert msg.strip(), f"CNNGPError with an empty message: {err!r}"
    assert "\n" not in msg, f"CNNGPError message spans several lines:\n{msg}"


def check_kernel_property(spec, x1, x2) -> str:
    """The property for one problem; returns "a" (a kernel) or "b" (a clean CNNGPError)."""
    try:
        model = cnngp.from_spec(spec)
        k11 = cnngp.kernel(model, x1)
    except cnngp.CNNGPError as e:
        _check_message(e)
        return "b"
    _check_gram(k11, len(x1), "kernel(x1)")
    if x2 is None:
        return "a"
    # the same model on images of the same shape: no error is acceptable any more
    k12 = cnngp.kernel(model, x1, x2)
    n1, n2 = len(x1), len(x2)
    joint = _check_gram(cnngp.kernel(model, np.concatenate([x1, x2])), n1 + n2, "kernel([x1; x2])")
    assert isinstance(k12, torch.Tensor) and tuple(k12.shape) == (n1, n2), (
        f"kernel(x1, x2): shape {tuple(k12.shape)}, expected {(n1, n2)}"
    )
    b = k12.numpy()
    assert np.all(np.isfinite(b)), f"kernel(x1, x2): non-finite entries\n{b}"
    tol = 1e-9 * np.abs(joint).max()
    block = joint[:n1, n1:]
    assert np.allclose(b, block, rtol=1e-9, atol=tol), (
        f"kernel(x1, x2) differs from the block of kernel([x1; x2]):\n{b}\nvs\n{block}"
    )
    assert np.allclose(k11.numpy(), joint[:n1, :n1], rtol=1e-9, atol=tol), (
        "kernel(x1) differs from the block of kernel([x1; x2])"
    )
    return "a"


@settings(
    derandomize=True,
    deadline=None,
    max_examples=MAX_EXAMPLES,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
@given(problems())
def test_kernel_is_psd_or_clean_error(problem):
    case = check_kernel_property(*problem)
    # `pytest --hypothesis-show-statistics` shows the split (most draws should be case a)
    event("case (a): a kernel" if case == "a" else "case (b): CNNGPError")


# -- cases the random search found (kept explicit so that they always run) ----------------------

_X4 = np.array(
    [[0.22, -1.17, -0.25], [0.36, -1.24, 0.8], [-0.09, -1.04, -1.11], [0.68, -0.28, 1.59]]
).reshape(4, 1, 1, 3)

KNOWN = [
    pytest.param(
        # two full -> full convs run by the fused CPU path with an identity between them: the
        # second conv's layout buffer is the one the identity's output still lives in, and
        # fused.to_fused copies a tensor onto itself -> RuntimeError (memory overlap)
        {"layers": [{"type": "conv", "filter": 1, "stride": 2}, {"type": "identity"},
                    {"type": "conv", "filter": 1}, {"type": "global_avg_pool"}]},
        np.linspace(-1.0, 1.0, 8).reshape(2, 4, 1),
        None,
        id="fused-identity-between-convs",
    ),
    pytest.param(
        # the same in 2-D, through average pools, with x2 given
        {"layers": [{"type": "avgpool", "window": 1, "stride": 2, "padding": "same"},
                    {"type": "identity"}, {"type": "avgpool", "window": 1, "padding": "same"},
                    {"type": "global_avg_pool"}]},
        np.linspace(-1.0, 1.0, 24).reshape(2, 2, 6, 1),
        np.linspace(0.5, 2.0, 12).reshape(1, 2, 6, 1),
        id="fused-identity-between-pools-2d",
    ),
    pytest.param(
        # ReLU on variances below ~1e-154: vx*vy underflows to 0 in layers._relu_expectation,
        # which then returns max(c, 0), not the arc-cosine kernel: a non-PSD Gram matrix
        {"layers": [{"type": "conv", "filter": 1, "weight_var": 1e-300}, {"type": "relu"},
                    {"type": "readout"}]},
        _X4,
        None,
        id="relu-variance-underflow",
    ),
    pytest.param(
        {"layers": [{"type": "relu"}, {"type": "readout"}]},
        1e-90 * _X4,
        None,
        id="relu-tiny-pixels",
    ),
]


@pytest.mark.parametrize("spec, x1, x2", KNOWN)
def test_known_cases(spec, x1, x2):
    assert check_kernel_property(spec, x1, x2) == "a"

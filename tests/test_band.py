"""The band representation (only the diagonals |q' − q| ≤ R a strided net needs) against the
brute-force oracle, the full path and the neural-tangents references."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cnngp
import cnngp.kernels.layers
from cnngp import AvgPool, Conv, Flatten, Independent, Matern, ReLU, Readout, Serial, UserCorrelation
from cnngp.engine.gram import _make_plan, _split_model
from cnngp.io.spec import from_spec
from cnngp.kernels.state import Band, KernelState, describe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import rel_err  # noqa: E402
from oracle import brute_force_kernel  # noqa: E402

CORRELATED = [
    {"type": "constant"},
    {"type": "matern", "nu": 0.5, "lengthscale": 0.7},
    {"type": "matern", "nu": 2.5, "lengthscale": 2.0},
    {"type": "rbf", "lengthscale": 0.9},
]
NONLINEARITIES = [
    {"type": "relu"},
    {"type": "abrelu", "a": -0.3, "b": 0.8},
    {"type": "erf", "a": 1.5, "b": 0.7, "c": 0.1},
    {"type": "identity"},
]


def _tridiagonal(n, c=0.3):
    return np.eye(n) + c * (np.eye(n, k=1) + np.eye(n, k=-1))


def _compact_readout(grid):
    """A PSD readout correlation that is exactly zero beyond one position per axis."""
    m = np.ones((1, 1))
    for n in grid:
        m = np.kron(m, _tridiagonal(n))
    return {"type": "user", "matrix": m.tolist()}


def _grid_after(grid, layer):
    f = layer.get("filter", layer.get("window"))
    f = f if isinstance(f, list) else [f] * len(grid)
    s = layer.get("stride", f if layer["type"] == "avgpool" else 1)
    s = s if isinstance(s, list) else [s] * len(grid)
    h = layer.get("dilation", 1)
    if layer.get("padding", "valid" if layer["type"] == "avgpool" else "same") == "valid":
        return [(n - (fi - 1) * h - 1) // si + 1 for n, fi, si in zip(grid, f, s)]
    return [-(-n // si) for n, si in zip(grid, s)]


def _random_banded_case(seed):
    """A correlated or pooling layer low in a strided net whose top reads few diagonals."""
    rng = np.random.default_rng(seed)
    d = int(rng.choice([1, 2, 2, 3]))
    grid = {1: [19], 2: [11, 10], 3: [6, 6, 5]}[d]
    size = list(grid)
    rand = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    layers = [{"type": "conv", "filter": 2, "stride": 1, "padding": rand(["same", "valid"]),
               "bias_var": 0.1}, rand(NONLINEARITIES)]
    grid = _grid_after(grid, layers[0])
    if rng.random() < 0.5:
        low = {"type": "avgpool", "window": 2, "stride": int(rng.integers(1, 3)),
               "padding": rand(["same", "valid"])}
    else:
        low = {"type": "conv", "filter": [int(rng.integers(2, 4)) for _ in grid],
               "stride": int(rng.integers(1, 3)), "dilation": int(rng.integers(1, 3)),
               "padding": rand(["same", "valid"]), "weight_var": 1.7, "bias_var": 0.05,
               "correlation": rand(CORRELATED)}
        if d == 3 or any((f - 1) * low["dilation"] + 1 > n for f, n in zip(low["filter"], grid)):
            low["dilation"] = 1
    layers.append(low)
    grid = _grid_after(grid, low)
    layers.append(rand(NONLINEARITIES))
    top = {"type": "conv", "filter": 2 if min(grid) >= 2 else 1, "stride": int(rng.integers(1, 3)),
           "padding": "same", "weight_var": 1.2}
    layers += [top, rand(NONLINEARITIES)]
    grid = _grid_after(grid, top)
    head = rand(["readout", "flatten", "compact"])
    if head == "compact" and min(grid) >= 3:
        layers.append({"type": "readout", "weight_var": 0.9, "correlation": _compact_readout(grid)})
    elif head == "flatten":
        layers.append({"type": "flatten"})
    else:
        layers.append({"type": "readout", "weight_var": 1.3, "bias_var": 0.05})
    channels = int(rng.integers(1, 3))
    x1 = rng.standard_normal((2, *size, channels))
    x2 = rng.standard_normal((1, *size, channels))
    return {"input_channels": channels, "layers": layers}, x1, x2


def _plan(net, spatial):
    body, heads = _split_model(net)
    return _make_plan(body, heads, tuple(spatial))


@pytest.fixture
def bands_everywhere(monkeypatch):
    """Use a band whenever it is narrower than the grid, so small grids exercise it."""
    monkeypatch.setattr(cnngp.kernels.layers, "BAND_FRACTION", 1.0)


@pytest.mark.parametrize("seed", range(16))
def test_random_banded_networks_match_brute_force_oracle(seed, bands_everywhere):
    spec, x1, x2 = _random_banded_case(seed)
    net = from_spec(spec)
    plan = _plan(net, x1.shape[1:-1])
    assert any(isinstance(f, Band) for f in plan.pair_flags), [describe(f) for f in plan.pair_flags]
    if spec["layers"][-1]["type"] == "flatten":  # the oracle's equivalent: independent readout
        spec = {**spec, "layers": spec["layers"][:-1] + [{"type": "readout"}]}
    assert rel_err(cnngp.kernel(net, x1, x2).numpy(), brute_force_kernel(spec, x1, x2)) <= 1e-9, spec
    assert rel_err(cnngp.kernel(net, x1).numpy(), brute_force_kernel(spec, x1)) <= 1e-9, spec


def test_radius_grows_by_stride_and_extent_going_down():
    body = Serial(Conv(3), ReLU(), AvgPool(2), Conv(3, stride=2), ReLU(), Conv(3), ReLU())
    reps = body.representation((32, 32), Band((1, 1)))
    # top conv (independent, stride 1): 1; stride-2 conv: 2·1; pool 2×2/2: 2·2 + 1; conv: same
    assert [describe(r) for r in reps] == ["band 5x5", "band 5x5", "band 5x5", "band 2x2",
                                           "band 1x1", "band 1x1", "band 1x1", "band 1x1"]
    assert body.representation((32, 32), Band((1, 1)), band=False)[0] is True
    # a correlated 3×3 filter adds its extent − 1 = 2, dilation 2 doubles that
    conv = Conv(3, dilation=2, correlation=Matern(1.5, 1.0))
    assert conv.input_representation(False, (32, 32)) == Band((4, 4))
    assert conv.input_representation(Band((1, 2)), (32, 32)) == Band((5, 6))
    # circular wrap-around and global pooling need the full tensor; too wide a band is full
    assert Conv(3, padding="circular", correlation=Matern(1.5, 1.0)).input_representation(False, (32, 32)) is True
    assert conv.input_representation(False, (8, 8)) is True
    with pytest.raises(TypeError, match="no truth value"):
        bool(Band((1,)))


def test_named_architectures_with_flatten_use_bands_and_match_reference(reference_dir):
    """myrtle10-paper's pools below a flatten readout: bands 3×3 then 1×1 (vs 32×32 full)."""
    data = np.load(reference_dir / "myrtle10_paper.npz")
    x = data["x"][:3]
    net = cnngp.io.architectures.get("myrtle10-paper", readout=Independent())
    reps = _plan(net, (32, 32)).pair_flags
    assert reps[0] == Band((3, 3)) and Band((1, 1)) in reps and reps[-1] is False
    assert rel_err(cnngp.kernel(net, x), data["kernel_flatten"][:3, :3]) <= 1e-6


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_band_path_equals_full_path(cifar32, monkeypatch, dtype, tol):
    x = cifar32
    net = Serial(Conv(3), ReLU(), Conv(3, correlation=Matern(2.5, 1.5), bias_var=0.1), ReLU(),
                 AvgPool(2), Conv(3, stride=2), ReLU(), Conv(1), ReLU(), Flatten())
    reps = _plan(net, x.shape[1:-1]).pair_flags
    assert isinstance(reps[0], Band)
    k_band = cnngp.kernel(net, x, dtype=dtype).double().numpy()
    monkeypatch.setattr(cnngp.kernels.layers, "BAND_FRACTION", -1.0)  # never a band
    assert _plan(net, x.shape[1:-1]).pair_flags[0] is True
    k_full = cnngp.kernel(net, x).numpy()
    err = rel_err(k_band, k_full)
    print(f"band ({dtype}) vs full (float64): max relative error {err:.2e}")
    assert err <= tol


def test_compact_readout_reads_only_its_band(cifar_images, monkeypatch):
    x = cifar_images[:3]
    spatial = x.shape[1:-1]
    body = Serial(Conv(3), ReLU(), Conv(3, stride=2), ReLU())
    top = body.output_spatial(spatial)
    m = UserCorrelation(np.kron(_tridiagonal(top[0]), _tridiagonal(top[1])))
    readouts = [Readout(correlation=m), Readout(0.7, 0.1)]
    plan = _make_plan(body, readouts, spatial)
    assert plan.pair_flags[-1] == Band((1, 1)) and plan.pair_flags[0] == Band((2, 2))
    k = cnngp.readout_sweep(body, readouts, x).numpy()
    monkeypatch.setattr(cnngp.kernels.layers, "BAND_FRACTION", -1.0)
    assert rel_err(k, cnngp.readout_sweep(body, readouts, x).numpy()) <= 1e-12


def test_band_state_is_validated_and_zero_off_the_grid():
    x = torch.rand(2, 5, 4, 3, dtype=torch.float64)
    full = cnngp.engine.gram.input_state(x, x.flip(0), True)
    band = full.to_band((1, 2))
    assert band.cross.shape == (2, 5, 4, 3, 5)
    direct = cnngp.engine.gram.input_state(x, x.flip(0), Band((1, 2)))
    torch.testing.assert_close(direct.cross, band.cross, rtol=1e-14, atol=1e-15)
    # slot j of position q holds K[q, q + j − R]; partners off the grid hold exactly 0
    assert band.cross[1, 2, 1, 0, 4] == full.cross[1, 2, 1, 1, 3]
    assert torch.all(band.cross[:, 0, :, 0] == 0) and torch.all(band.cross[:, :, 3, :, 3:] == 0)
    assert torch.equal(band.diagonal(), full.diagonal())
    assert band.to_band((0, 1)).cross.shape == (2, 5, 4, 1, 3)
    with pytest.raises(cnngp.CNNGPError, match="expected shape"):
        KernelState(band.cross, (5, 4), False, band=(1, 1))
    with pytest.raises(cnngp.CNNGPError, match="cannot widen"):
        band.to_band((2, 2))
    assert math.prod(band.cross.shape[1:]) < math.prod(full.cross.shape[1:])

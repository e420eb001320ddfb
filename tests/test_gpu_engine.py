"""The Triton engine (``engine="triton"``, cnngp.engine.gpu): its kernels run here on CPU
tensors under Triton's interpreter and are checked against the torch path (``engine="torch"``)
and neural-tangents' reference kernels and NTKs.

TRITON_INTERPRET=1 must be set before triton is first imported in the process (its
``triton.jit`` decides then whether kernels are compiled or interpreted): this module sets it
at collection, before any test runs; if triton was imported earlier without it, the tests
skip with that reason. Checks that need a fresh process (``import cnngp`` never imports
triton; the error without triton) run in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import cnngp  # noqa: E402
from cnngp.engine import gpu  # noqa: E402
from cnngp.engine.gram import GramPlan  # noqa: E402
from cnngp.errors import CNNGPError  # noqa: E402
from cnngp.io import architectures  # noqa: E402
from conftest import rel_err  # noqa: E402
from reference_cases import BODIES  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - triton is in the test extra (Linux)
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed (pip install 'cnngp[gpu]')")


@pytest.fixture(scope="module")
def interpreted():
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (pip install 'cnngp[gpu]')")
    if not gpu._kernels_interpreted():
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: the kernels are "
                    "compiled for a GPU, not interpreted (run this file on its own)")
    return True


@pytest.fixture
def calls(monkeypatch):
    """Every conv the Triton kernel ran: (act or None, NTK?)."""
    seen = []
    original = gpu.conv_act

    def spy(v, plan, wv, bv, act=None, var1=None, var2=None, theta=None, own=(0.0, 0.0)):
        seen.append((act, theta is not None))
        return original(v, plan, wv, bv, act, var1, var2, theta, own)

    monkeypatch.setattr(gpu, "conv_act", spy)
    return seen


def gram(model, x, engine, dtype="float64", get="nngp", readouts=None, x2=None):
    """The whole (n_outputs, N1, N2) block through GramPlan (self pass, then the pairs)."""
    gp = GramPlan(model, x.shape[1:], readouts=readouts, dtype=dtype, get=get, engine=engine)
    t = gp.images(x)
    rec = gp.self_records(t)
    if x2 is None:
        return gp.block(t, rec).numpy()
    t2 = gp.images(x2, "x2")
    return gp.block(t, rec, t2, gp.self_records(t2)).numpy()


def _images(n, shape, seed=0):
    return np.random.default_rng(seed).uniform(size=(n,) + shape)


TOL = {"float64": 1e-12, "float32": 2e-6}
#: the NTK's V̇ = 1 − θ/π has θ ≈ √(2(1 − ρ)) where an image meets itself (ρ → 1): the rounding
#: of ρ (summed in another order than torch's) moves it by ~√ε (the CPU engine's numba kernels
#: differ from torch as much)
TOL_NTK = {"float64": 1e-9, "float32": 1e-5}


def check(got, want, dtype, get):
    """NNGP entries to rounding, NTK entries to the √ε sensitivity of V̇ at ρ = 1."""
    n = got.shape[0] // 2 if get == "both" else got.shape[0]
    nngp = slice(0, n) if get in ("nngp", "both") else slice(0, 0)
    ntk = slice(n, None) if get == "both" else (slice(0, None) if get == "ntk" else slice(0, 0))
    if nngp.stop:
        assert rel_err(got[nngp], want[nngp]) < TOL[dtype], rel_err(got[nngp], want[nngp])
    if get != "nngp":
        assert rel_err(got[ntk], want[ntk]) < TOL_NTK[dtype], rel_err(got[ntk], want[ntk])

S, C, R, AB = cnngp.Serial, cnngp.Conv, cnngp.ReLU, cnngp.ABReLU
GAP = cnngp.Readout(correlation=cnngp.Constant())

NETS = {
    # independent 3×3 SAME convs, balanced ReLU and ABReLU, biases
    "relu_abrelu_bias": (S(C(3, bias_var=0.1), R(), C(3, weight_var=1.7, bias_var=0.05), AB(0.1, 1.2), GAP), (8, 8, 2)),
    # strided VALID, dilated SAME, an average pool (a constant-Σ filter) and a conv without act
    "strided_dilated_pool": (S(C(3, stride=2, padding="valid"), R(), C(3, dilation=2), R(), cnngp.AvgPool(2),
                               C(2, padding="valid", weight_var=0.8), cnngp.Readout(correlation=cnngp.Matern(1.5, 1.0))),
                             (12, 12, 2)),
    # a 1-D grid: (n, 1) inside the kernels
    "conv1d": (S(C(5), R(), C(3, stride=2), AB(-0.2, 1.0), C(3, padding="valid", bias_var=0.2), R(), GAP), (20, 1)),
    # correlated 3×3 filters (Matérn, RBF) on the full tensor, rectangular filter
    "correlated": (S(C(3, correlation=cnngp.Matern(1.5, 2.0)), R(), C((3, 2), correlation=cnngp.RBF(1.0), bias_var=0.1),
                     R(), cnngp.Readout(correlation=cnngp.Matern(2.5, 2.0))), (8, 8, 3)),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("get", ["nngp", "both"])
@pytest.mark.parametrize("case", list(NETS))
def test_matches_torch_path(interpreted, calls, case, get, dtype):
    net, shape = NETS[case]
    x = _images(3, shape)
    got = gram(net, x, "triton", dtype, get)
    assert calls, "no conv ran on the Triton kernel"
    assert all(ntk == (get == "both") for _, ntk in calls)
    assert any(act is not None for act, _ in calls)
    want = gram(net, x, "torch", dtype, get)
    assert got.dtype == want.dtype and got.shape == want.shape
    check(got, want, dtype, get)
    if dtype == "float32":  # and the float32 result against the float64 one
        assert rel_err(got, gram(net, x, "torch", "float64", get)) < 1e-5


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_myrtle10_correlated(interpreted, calls, dtype):
    """The 6×6 stride-2 SAME Matérn convs that replace each pool + conv (docs/maths.md §6)."""
    net = architectures.get("myrtle10-correlated")
    x = _images(3, (12, 12, 3), seed=1)
    got = gram(net, x, "triton", dtype, "both")
    assert len(calls) == 8  # every conv, each with its ReLU
    want = gram(net, x, "torch", dtype, "both")
    check(got, want, dtype, "both")


def test_readout_sweep_and_rectangular_blocks(interpreted, calls):
    """Several readouts from one pass (independent, constant, Matérn, RBF), NNGP and NTK, on
    a rectangular block x1 × x2."""
    body = S(C(3), R(), C(3, stride=2, bias_var=0.1), R(), C(3), R())
    readouts = [cnngp.Readout(correlation=c) for c in
                (cnngp.Independent(), cnngp.Constant(), cnngp.Matern(1.5, 1.0), cnngp.Matern(0.5, 3.0), cnngp.RBF(2.0))]
    x1, x2 = _images(3, (10, 10, 2), 2), _images(2, (10, 10, 2), 3)
    for get in ("nngp", "ntk", "both"):
        got = gram(body, x1, "triton", get=get, readouts=readouts, x2=x2)
        want = gram(body, x1, "torch", get=get, readouts=readouts, x2=x2)
        assert got.shape == (len(readouts) * (2 if get == "both" else 1), 3, 2)
        check(got, want, "float64", get)


def test_gpu_block_sizes(interpreted, calls, monkeypatch):
    """The GPU's configuration (blocks of 256 entries spanning pairs, one tap pair per step)
    gives the same numbers as the interpreter's large tiles."""
    net = S(C(3, correlation=cnngp.Matern(1.5, 2.0)), R(), C(2, stride=2, bias_var=0.1), R(), GAP)
    x = _images(2, (5, 5, 1), 4)
    want = gram(net, x, "triton", get="both")
    monkeypatch.setattr(gpu, "BLOCK_INTERPRET", gpu.BLOCK_GPU)
    monkeypatch.setattr(gpu, "TILE_INTERPRET", gpu.BLOCK_GPU * gpu.TAPS_GPU)
    got = gram(net, x, "triton", get="both")
    assert rel_err(got, want) < 1e-13
    check(got, gram(net, x, "torch", get="both"), "float64", "both")


def test_declined_layers_run_on_torch(interpreted, calls):
    """Circular padding, non-ReLU nonlinearities and diagonal representations stay on torch."""
    net = S(C(3, padding="circular"), R(), C(3), cnngp.Erf(), C(3), R(), GAP)
    x = _images(2, (6, 6, 1))
    got = gram(net, x, "triton", get="both")
    # the circular conv is declined; the second conv runs without its act (Erf is not
    # ReLU-like), the third with its ReLU
    assert [(a is None) for a, _ in calls] == [True, False]
    check(got, gram(net, x, "torch", get="both"), "float64", "both")
    calls.clear()
    net = S(C(3), R(), C(3), R(), cnngp.Readout())  # independent readout: diagonal throughout
    got = gram(net, x, "triton", get="both")
    assert calls == []
    check(got, gram(net, x, "torch", get="both"), "float64", "both")


# -- neural-tangents references -----------------------------------------------------------


def _body(case):
    return cnngp.from_spec({"layers": BODIES[case]})


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-9), ("float32", 1e-6)])
@pytest.mark.parametrize("case", ["conv1d_digits", "mixed_mnist"])
def test_nngp_against_neural_tangents(interpreted, calls, reference_dir, case, dtype, tol):
    d = np.load(reference_dir / f"{case}.npz")
    x = d["x"][:3]
    readouts = [GAP] + [cnngp.Readout(correlation=cnngp.Matern(1.5, float(lam))) for lam in d["lengthscales"]]
    got = gram(_body(case), x, "triton", dtype, readouts=readouts)
    assert calls
    want = np.concatenate([d["kernel_gap"][None, :3, :3], d["kernel_matern32"][:, :3, :3]])
    assert rel_err(got, want) < tol, rel_err(got, want)


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-9), ("float32", 1e-6)])
@pytest.mark.parametrize("case", ["conv1d_digits", "mixed_mnist"])
def test_ntk_against_neural_tangents(interpreted, calls, reference_dir, case, dtype, tol):
    path = reference_dir / "ntk" / f"ntk_{case}.npz"
    d = np.load(path)
    x = d["x"][:3]
    readouts = [GAP] + [cnngp.Readout(correlation=cnngp.Matern(1.5, float(lam))) for lam in d["lengthscales"]]
    nngp, ntk = np.split(gram(_body(case), x, "triton", dtype, "both", readouts=readouts), 2)
    assert calls and all(t for _, t in calls)
    assert rel_err(nngp[0], d["nngp_gap"][:3, :3]) < tol
    want = np.concatenate([d["ntk_gap"][None, :3, :3], d["ntk_matern32"][:, :3, :3]])
    assert rel_err(ntk, want) < tol, rel_err(ntk, want)


# The 32×32 CIFAR references (what the CPU engine's tests check too): a pair of 32×32 images
# costs tens of seconds per network under the interpreter, so two images each, behind `slow`
# (`pytest -m slow tests/test_gpu_engine.py`).
CIFAR_CASES = [("cnngp4", "float64", 1e-9), ("cnngp4", "float32", 1e-6), ("cnngp14", "float64", 1e-9),
               ("myrtle10", "float64", 1e-9), ("myrtle10_paper", "float32", 1e-6)]


@pytest.mark.slow
@pytest.mark.parametrize("case, dtype, tol", CIFAR_CASES)
def test_cifar_nngp_against_neural_tangents(interpreted, calls, reference_dir, case, dtype, tol):
    d = np.load(reference_dir / f"{case}.npz")
    x = d["x"][:2]
    heads = [cnngp.Readout(correlation=cnngp.Independent()), GAP]
    want = [d["kernel_flatten"][:2, :2], d["kernel_gap"][:2, :2]]
    if "lengthscales" in d:
        heads += [cnngp.Readout(correlation=cnngp.Matern(1.5, float(lam))) for lam in d["lengthscales"][:2]]
        want += list(d["kernel_matern32"][:2, :2, :2])
    got = gram(_body(case), x, "triton", dtype, readouts=heads)
    assert calls
    assert rel_err(got, np.stack(want)) < tol, rel_err(got, np.stack(want))


#: float32 NTKs to 1e-6 (the CPU engines' bound, tests/test_ntk.py): the Triton kernels take their
#: variances from the torch self pass, so its scales must round as unbiased as theirs
#: (ops.scaled: fl(1/9) once, as the Triton tables; × fl(1/3) twice put it 1.5e-6 from the reference)
@pytest.mark.slow
@pytest.mark.parametrize("case, dtype, tol", [("cnngp4", "float64", 1e-9), ("cnngp4", "float32", 1e-6),
                                              ("myrtle10_paper", "float32", 1e-6)])
def test_cifar_ntk_against_neural_tangents(interpreted, calls, reference_dir, case, dtype, tol):
    d = np.load(reference_dir / "ntk" / f"ntk_{case}.npz")
    x = d["x"][:2]
    heads = [GAP, cnngp.Readout(correlation=cnngp.Matern(1.5, float(d["lengthscales"][0])))]
    nngp, ntk = np.split(gram(_body(case), x, "triton", dtype, "both", readouts=heads), 2)
    assert calls and all(t for _, t in calls)
    assert rel_err(nngp[0], d["nngp_gap"][:2, :2]) < tol, rel_err(nngp[0], d["nngp_gap"][:2, :2])
    want = np.stack([d["ntk_gap"][:2, :2], d["ntk_matern32"][0, :2, :2]])
    assert rel_err(ntk, want) < tol, rel_err(ntk, want)


# -- errors and imports -----------------------------------------------------------------------


def _run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_import_cnngp_does_not_import_triton():
    r = _run("""
        import sys, cnngp, cnngp.engine.gram, cnngp.engine.gpu
        print('triton' in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_without_triton_engine_triton_is_a_clear_error():
    r = _run("""
        import sys
        sys.modules['triton'] = None  # as if triton were not installed
        import cnngp
        from cnngp.engine.gram import GramPlan
        try:
            GramPlan(cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout()), (6, 6, 1), engine='triton')
        except cnngp.CNNGPError as e:
            print(e)
    """)
    assert r.returncode == 0, r.stderr
    assert "engine" in r.stdout and "cnngp[gpu]" in r.stdout, r.stdout


@needs_triton
def test_triton_on_a_cpu_without_the_interpreter_is_a_clear_error():
    r = _run("""
        import cnngp
        from cnngp.engine.gram import GramPlan
        try:
            GramPlan(cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout()), (6, 6, 1), engine='triton')
        except cnngp.CNNGPError as e:
            print(e)
    """)
    assert r.returncode == 0, r.stderr
    assert "engine" in r.stdout and "CUDA" in r.stdout, r.stdout


def test_bad_engine_name():
    with pytest.raises(CNNGPError, match="engine"):
        GramPlan(S(C(3), R(), cnngp.Readout()), (6, 6, 1), engine="cuda")


def test_supports_mirrors_the_cpu_fused_path():
    from cnngp.engine import fused

    for layer, spatial in [(C(3), (8, 8)), (C(3), (8,)), (C(3), (4, 4, 4)), (C(3, padding="circular"), (8, 8)),
                           (cnngp.AvgPool(2), (8, 8)), (R(), (8, 8)), (cnngp.Readout(), (8, 8))]:
        assert gpu.supports(layer, spatial) == fused._supported(layer, spatial), (layer, spatial)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_flip_averaged_kernel_on_the_triton_kernels(interpreted, calls, get):
    """flip=True (docs/maths.md §9) on the Triton engine: the average of the two kernels the
    torch path computes separately, the mirrored term through the same Triton kernels."""
    from cnngp.engine.gram import flip_images

    x = _images(4, (6, 6, 2), seed=3)
    net = S(C(3), R(), C(3, correlation=cnngp.Matern(1.5, 1.0)), R(), cnngp.Readout(correlation=cnngp.Matern(1.5, 2.0)))
    gp = GramPlan(net, x.shape[1:], get=get, flip=True, engine="triton")
    t = gp.images(x)
    got = gp.block(t, gp.self_records(t)).numpy()
    assert calls and all(t for _, t in calls) == (get == "ntk")
    want = (gram(net, x, "torch", get=get) + gram(net, x, "torch", get=get, x2=flip_images(x))) / 2
    assert rel_err(got, want) < 1e-12, rel_err(got, want)

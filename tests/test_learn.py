"""Learned readout correlations (docs/maths.md §8): offset sums against direct readouts and a
brute-force loop, gradients against finite differences, the objectives against their
definitions (a multivariate normal density, explicit leave-one-out refits), the optimiser
against the grid, and ``cnngp learn``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import cnngp
from cnngp import Conv, Matern, RBF, Readout, ReLU, Serial
from cnngp.cli.main import main
from cnngp.inference.gp import centered_one_hot
from cnngp.inference.learn import (
    OffsetReadout,
    learn_readout,
    log_marginal_likelihood,
    loo_log_predictive,
)
from cnngp.kernels import ops
from cnngp.kernels.correlations import offsets

FAMILIES = [("matern12", lambda l: Matern(0.5, l)), ("matern32", lambda l: Matern(1.5, l)),
            ("matern52", lambda l: Matern(2.5, l)), ("rbf", RBF)]


def test_offset_sums_match_a_loop():
    g = torch.Generator().manual_seed(0)
    v = torch.randn((2, 3, 4, 3, 4), generator=g, dtype=torch.float64)
    s = ops.offset_sums(v, (3, 4)).reshape(2, 5, 7)
    for b in range(2):
        for d0 in range(-2, 3):
            for d1 in range(-3, 4):
                ref = sum(v[b, a0, a1, a0 + d0, a1 + d1] for a0 in range(3) for a1 in range(4)
                          if 0 <= a0 + d0 < 3 and 0 <= a1 + d1 < 4)
                assert abs(float(s[b, d0 + 2, d1 + 3]) - float(ref)) < 1e-13
    delta, counts = offsets((3, 4))
    assert delta.shape == (35, 2) and counts[17] == 12 and counts.sum() == 144


@pytest.mark.parametrize("fast", ["1", "0"], ids=["fused", "torch"])
@pytest.mark.parametrize("spatial", [(7, 6), (11,)], ids=["2d", "1d"])
def test_offset_sum_readout_equals_the_direct_readout(monkeypatch, fast, spatial):
    monkeypatch.setenv("CNNGP_FAST", fast)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (4,) + spatial + (2,))
    x[0, :2] = 0.0  # blank rows: zero-variance positions
    body = Serial(Conv(3), ReLU(), Conv(3, correlation=Matern(1.5, 1.0)), ReLU())
    S = cnngp.offset_sums(body, x)
    x2 = rng.uniform(0, 1, (3,) + spatial + (2,))
    S2 = cnngp.offset_sums(body, x2, x)
    for name, make in FAMILIES:
        for lam in (0.0, 0.3, 1.0, 2.5, 10.0, 1e3, math.inf):
            corr = make(lam)
            w = corr.offset_weights(spatial)
            for s, args in ((S, (x,)), (S2, (x2, x))):
                direct = cnngp.kernel(Serial(*body.layers, Readout(weight_var=1.3, bias_var=0.2, correlation=corr)),
                                      *args)
                via = 1.3 * torch.tensordot(w, s, 1) + 0.2
                assert float((via - direct).abs().max()) <= 1e-12 * float(direct.abs().max()), (name, lam)


def test_float32_offset_sums():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (3, 6, 6, 2))
    body = Serial(Conv(3), ReLU(), Conv(3), ReLU())
    s32, s64 = cnngp.offset_sums(body, x, dtype="float32"), cnngp.offset_sums(body, x)
    assert s32.dtype == torch.float32
    assert float((s32.double() - s64).abs().max() / s64.abs().max()) < 1e-6


def test_readout_is_differentiable_in_the_lengthscale():
    rng = np.random.default_rng(1)
    S = cnngp.offset_sums(Serial(Conv(3), ReLU()), rng.uniform(0, 1, (3, 5, 5, 1)))
    for name, _ in FAMILIES:
        ro = OffsetReadout(S, (5, 5), name)
        assert torch.autograd.gradcheck(lambda t: ro.kernel(torch.exp(t), 1.7),
                                        (torch.tensor(0.4, dtype=torch.float64, requires_grad=True),))


def _problem(n=24, seed=3):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, 6))
    K = torch.tensor(a @ a.T / 6 + 0.1, dtype=torch.float64)
    y = np.arange(n) % 3
    return K, y, torch.tensor(centered_one_hot(y, 3), dtype=torch.float64)


def test_objectives_against_their_definitions():
    from scipy.stats import multivariate_normal

    K, y, Y = _problem()
    noise = 0.05
    A = K.numpy() + noise * np.eye(len(y))
    ref = sum(multivariate_normal(np.zeros(len(y)), A).logpdf(Y[:, c].numpy()) for c in range(3)) / len(y)
    assert abs(float(log_marginal_likelihood(K, Y, noise)) - ref) < 1e-10
    loo = 0.0  # explicit refits without point i
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        Ak = A[np.ix_(keep, keep)]
        kv = A[i, keep]
        mean = kv @ np.linalg.solve(Ak, Y.numpy()[keep])
        var = A[i, i] - kv @ np.linalg.solve(Ak, kv)
        loo += sum(-0.5 * math.log(2 * math.pi * var) - (Y[i, c].item() - mean[c]) ** 2 / (2 * var) for c in range(3))
    assert abs(float(loo_log_predictive(K, Y, noise)) - loo / len(y)) < 1e-10


@pytest.mark.parametrize("objective", [log_marginal_likelihood, loo_log_predictive])
def test_objective_gradients_match_finite_differences(objective):
    rng = np.random.default_rng(4)
    S = cnngp.offset_sums(Serial(Conv(3), ReLU(), Conv(3), ReLU()), rng.uniform(0, 1, (18, 6, 6, 1)))
    ro = OffsetReadout(S, (6, 6), "matern32")
    Y = torch.tensor(centered_one_hot(np.arange(18) % 3, 3), dtype=torch.float64)

    def f(t):
        return objective(ro.kernel(torch.exp(t[0]), torch.exp(t[1])), Y, torch.exp(t[2]))

    t = torch.tensor([math.log(1.7), math.log(2.0), math.log(0.03)], dtype=torch.float64, requires_grad=True)
    f(t).backward()
    for i in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[i] = 1e-5
        with torch.no_grad():
            fd = (f(t + e) - f(t - e)) / 2e-5
        assert abs(float(t.grad[i]) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("objective", ["mll", "loo"])
def test_learning_finds_the_best_lengthscale_of_the_grid_or_better(objective):
    """The optimum over (λ, a, σ²) is at least the best objective along a fine λ grid (each
    grid point with a and σ² optimised too): the optimiser is not stuck."""
    from cnngp.experiments.learned import _profile

    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (30, 6, 6, 1))
    y = np.arange(30) % 3
    x[y == 1, :3] += 0.5  # some structure to learn
    S = cnngp.offset_sums(Serial(Conv(3), ReLU(), Conv(3), ReLU()), x)
    ro = OffsetReadout(S, (6, 6), "matern32")
    res = learn_readout(ro, y, objective=objective, n_classes=3)
    Y = torch.tensor(centered_one_hot(y, 3), dtype=torch.float64)
    scale = float(torch.diagonal(ro.kernel(1.0)).mean())
    best_grid = max(_profile(ro, Y, objective, lam, [1.0, 1e-2 * scale, 1e-9 * scale, 10 * scale])[0]
                    for lam in 10 ** np.linspace(-1.5, 4.5, 25))
    assert res.objective >= best_grid - 1e-6
    assert res.kernel_evaluations > 0 and len(res.trace) >= 3


def test_cnngp_learn_writes_results_and_figure(tmp_path, capsys):
    out = tmp_path / "learn"
    assert main(["learn", "--n", "40", "--out", str(out), "--quiet", "--starts", "1,10", "--max-iter", "20"]) == 0
    r = json.loads((out / "learned.json").read_text())
    for key in ("learned", "trace", "kernel_evaluations", "heldout_accuracy", "grid_best", "config", "versions"):
        assert key in r
    assert set(r["grid_best"]) >= {"lengthscale", "heldout_accuracy", "kernel_evaluations", "tied_lengthscales"}
    # the grid's best: the first λ among those within rounding of the top CV accuracy, all of them listed
    top = max(g["cv_accuracy"] for g in r["grid"])
    tied = [g["lengthscale"] for g in r["grid"] if g["cv_accuracy"] >= top - 1e-12]
    assert r["grid_best"]["tied_lengthscales"] == tied and r["grid_best"]["lengthscale"] == tied[0]
    assert r["config"]["seed"] == 0 and r["config"]["objective"] == "mll"
    assert 0 <= r["heldout_accuracy"] <= 1 and r["learned"]["lengthscale"] > 0
    assert (out / "learned.png").stat().st_size > 1000
    assert "learned λ" in capsys.readouterr().out
    # the same command again replaces its results (another objective, a resumed store, …)
    assert main(["learn", "--n", "40", "--out", str(out), "--quiet", "--starts", "1", "--max-iter", "5"]) == 0
    assert json.loads((out / "learned.json").read_text())["config"]["starts"] == [1.0]
    (tmp_path / "plain").write_text("x")
    assert main(["learn", "--n", "40", "--out", str(tmp_path / "plain")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["learn", "--n", "40", "--starts", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "--starts" in capsys.readouterr().err
    for starts in ("3,1e300", "1e-300", "1,,3"):  # outside the optimiser's bounds: never clipped silently
        assert main(["learn", "--n", "40", "--starts", starts, "--out", str(tmp_path / "x")]) == 2
        assert capsys.readouterr().err.startswith("cnngp: error: --starts: expected ")
    assert not (tmp_path / "x").exists()


# -- every parameter by autograd -------------------------------------------------------------


def _autograd_net():
    from cnngp import ABReLU

    return Serial(Conv(3, correlation=Matern(1.5, 1.2)), ReLU(),
                  Conv(3, correlation=RBF(0.8), weight_var=1.3, bias_var=0.1), ABReLU(0.1, 1.0),
                  Readout(correlation=Matern(1.5, 2.0)))


def test_differentiable_kernel_equals_the_kernel():
    from cnngp.engine.gram import differentiable_kernel

    rng = np.random.default_rng(0)
    x1, x2 = rng.uniform(0, 1, (3, 5, 5, 1)), rng.uniform(0, 1, (2, 5, 5, 1))
    net = _autograd_net()
    assert float((differentiable_kernel(net, x1, x2) - cnngp.kernel(net, x1, x2)).abs().max()) < 1e-14
    assert float((differentiable_kernel(net, x1) - cnngp.kernel(net, x1)).abs().max()) < 1e-14


def test_gradcheck_every_lengthscale_and_variance():
    """float64 gradcheck of K(x1, x2) in each parameter, with an identical pair (ρ = 1 at every
    position: the ReLU expectation's own parts have infinite slope there) and a blank region
    (zero variance in the first layer, whose bias_var is 0; its bias_var is checked at 0.05:
    at 0 exactly the derivative is one-sided and infinite, as √(bias) in a blank region)."""
    from cnngp.engine.gram import differentiable_kernel
    from cnngp.inference.learn import kernel_parameters, with_parameters

    rng = np.random.default_rng(0)
    x1 = rng.uniform(0, 1, (2, 5, 5, 1))
    x1[0, :2] = 0.0
    x2 = np.concatenate([x1[:1], rng.uniform(0, 1, (1, 5, 5, 1))])
    net = _autograd_net()
    params = kernel_parameters(net)
    assert set(params) == {f"{layer}.{a}" for layer in ("conv0", "conv2", "readout")
                           for a in ("weight_var", "bias_var", "lengthscale")}
    for name, value in params.items():
        t = torch.tensor(value if value > 0 else 0.05, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda v: differentiable_kernel(with_parameters(net, {name: v}), x1, x2),
                                        (t,)), name
    # at bias_var = 0 (a zero-variance region) every other gradient is finite
    ts = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items() if k != "conv0.bias_var"}
    differentiable_kernel(with_parameters(net, ts), x1, x2).sum().backward()
    assert all(torch.isfinite(t.grad) for t in ts.values())


def test_whole_network_objective_gradient_matches_finite_differences():
    """kernel_vjp (tiles of autograd recomputation, symmetric tiles doubled) gives the exact
    gradient of the objective in every intermediate and readout lengthscale and the amplitude."""
    from cnngp.inference.learn import default_learnable, kernel_vjp, objective_value, with_parameters

    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, (10, 6, 6, 1))
    y = np.arange(10) % 2
    net = Serial(Conv(3, correlation=Matern(1.5, 1.0)), ReLU(), Conv(3, correlation=RBF(2.0)), ReLU(),
                 Readout(correlation=Matern(1.5, 3.0)))
    names = default_learnable(net)
    assert names == ["conv0.lengthscale", "conv2.lengthscale", "readout.lengthscale", "readout.weight_var"]
    Y = torch.tensor(centered_one_hot(y, 2), dtype=torch.float64)
    vals = np.array([1.0, 2.0, 3.0, 1.5])

    def obj(v):
        return float(objective_value("loo", cnngp.kernel(with_parameters(net, dict(zip(names, v))), x), Y, 0.05))

    K = cnngp.kernel(with_parameters(net, dict(zip(names, vals))), x).requires_grad_(True)
    objective_value("loo", K, Y, 0.05).backward()
    g = kernel_vjp(net, names, vals, x, K.grad, tile=4)  # ragged tiles: 4 + 4 + 2
    fd = [(obj(vals + e) - obj(vals - e)) / 2e-5 for e in np.eye(4) * 1e-5]
    assert np.allclose(g, fd, rtol=1e-5, atol=1e-9), (g, fd)


def test_cnngp_learn_all_parameters_runs(tmp_path):
    out = tmp_path / "all"
    assert main(["learn", "--n", "40", "--params", "all", "--max-iter", "1", "--starts", "2",
                 "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "learned.json").read_text())
    assert r["config"]["params"] == "all"
    assert {"readout.lengthscale", "readout.weight_var", "noise_variance", "lengthscale"} <= set(r["learned"])
    assert r["kernel_evaluations"] > 0 and len(r["trace"]) >= 1


# -- offset sums through the store; the mirror of a symmetric block --------------------------


def _offsets_body():
    return Serial(Conv(3), ReLU(), Conv(3, correlation=Matern(1.5, 1.0)), ReLU())


@pytest.mark.parametrize("fast", ["1", "0"], ids=["fused", "torch"])
def test_symmetric_offset_sums_mirror_their_offsets(monkeypatch, fast):
    """A symmetric Gram pass computes pairs x <= x' only; the pair (x', x) must get
    S_x'x[δ] = S_xx'[−δ], which a second images argument (every pair computed) gives directly."""
    monkeypatch.setenv("CNNGP_FAST", fast)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (5, 6, 5, 2))
    S_sym = cnngp.offset_sums(_offsets_body(), x)
    S_all = cnngp.offset_sums(_offsets_body(), x, x.copy())
    assert float((S_sym - S_all).abs().max()) <= 1e-13 * float(S_all.abs().max())
    # and the asymmetry is real: S is not symmetric in the pair without the flip
    assert float((S_all - S_all.transpose(1, 2)).abs().max()) > 1e-6 * float(S_all.abs().max())


def test_offset_sums_into_a_store_equal_the_in_memory_pass(tmp_path):
    from cnngp.engine.distributed import store_kernel
    from cnngp.engine.store import KernelStore

    rng = np.random.default_rng(4)
    x = rng.uniform(0, 1, (7, 6, 6, 1))
    xt = rng.uniform(0, 1, (3, 6, 6, 1))
    body = _offsets_body()
    for x1, x2, name in ((x, None, "S.zarr"), (xt, x, "S-test.zarr")):
        store_kernel(body, x1, x2, out=tmp_path / name, offsets=True, tile=3, progress=False)
        got = np.asarray(KernelStore.open(tmp_path / name).kernel[:])
        want = cnngp.offset_sums(body, x1, x2).numpy()
        assert got.shape == want.shape == (121, len(x1), len(x))
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * np.abs(want).max())
    # a kernel store of the same images is another computation: refused, not overwritten (the
    # mean-pool readout is the one an offsets plan carries internally: only "offsets" differs)
    from cnngp import Constant

    with pytest.raises(cnngp.CNNGPError, match=r"different contents \(it holds offset sums, not kernels\)"):
        store_kernel(body, x, out=tmp_path / "S.zarr", tile=3, progress=False,
                     readouts=[Readout(correlation=Constant())])
    store_kernel(body, x, out=tmp_path / "K.zarr", tile=3, progress=False, readouts=[Readout(correlation=Constant())])
    with pytest.raises(cnngp.CNNGPError, match=r"different contents \(it holds kernels, not offset sums\)"):
        store_kernel(body, x, out=tmp_path / "K.zarr", offsets=True, tile=3, progress=False)
    with pytest.raises(cnngp.CNNGPError, match=r"^--reuse: .* different contents \(it holds kernels, not offset "
                                               r"sums\); only a store or tile archive of the same computation "
                                               r"\(network, dtype\)"):
        store_kernel(body, x, out=tmp_path / "S2.zarr", offsets=True, tile=3, progress=False, reuse=tmp_path / "K.zarr")


def test_learn_through_a_store_matches_and_reuses_it(tmp_path, monkeypatch):
    import cnngp.engine.distributed as distributed
    from cnngp.experiments.learned import run_learn

    kw = dict(n=40, starts=(2.0,), max_iter=15, lengthscales=(1.0, 10.0))
    net = Serial(Conv(3), ReLU(), Conv(3), ReLU(), Readout(correlation=Matern(1.5, 1.0)))
    plain = run_learn(net, "digits", **kw)
    stored = run_learn(net, "digits", store=tmp_path / "S.zarr", **kw)
    for k, v in plain["learned"].items():
        assert stored["learned"][k] == pytest.approx(v, rel=1e-8)
    assert stored["heldout_accuracy"] == plain["heldout_accuracy"]

    def no_body_pass(*a, **k):
        raise AssertionError("the store is complete: no tile may be computed again")

    monkeypatch.setattr(distributed, "run_tile_task", no_body_pass)
    again = run_learn(net, "digits", store=tmp_path / "S.zarr", objective="loo", **kw)
    assert again["config"]["objective"] == "loo" and again["learned"]["lengthscale"] > 0
    with pytest.raises(cnngp.CNNGPError, match="not with params='all'"):
        run_learn(net, "digits", store=tmp_path / "S.zarr", params="all", **kw)
    # the store's options need a store: refused before any work, as a keyword and inside an Execution
    for given in (dict(reuse=tmp_path / "S.zarr"), dict(execution=cnngp.Execution(archive=tmp_path / "A")),
                  dict(workers=2)):
        with pytest.raises(cnngp.CNNGPError, match=r"^(reuse|archive|workers): needs store= \(--store S.zarr\)"):
            run_learn(net, "digits", **given, **kw)
    assert not (tmp_path / "A").exists()



def test_info_describes_a_store_of_offset_sums_as_such(tmp_path, capsys):
    """`cnngp info` on learn's store: offsets over the last grid, not a list of readouts."""
    from cnngp.cli.main import main

    assert main(["learn", "--n", "40", "--starts", "2", "--max-iter", "3", "--store", str(tmp_path / "S.zarr"),
                 "--out", str(tmp_path / "learn"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "S.zarr")]) == 0
    text = capsys.readouterr().out
    assert "225 × 40 × 40 (offsets × N1 × N2)" in text  # cnngp2 on 8×8 digits: 15×15 offsets
    assert "offset sums S[δ] of the last hidden layer over 15×15 offsets" in text and "readouts" not in text


# -- the intermediate λ, profiled ------------------------------------------------------------


def _internal_net(lam=3.0):
    from cnngp import Constant

    return Serial(Conv(3), ReLU(), Conv(4, stride=2, padding="same", correlation=Matern(1.5, lam)), ReLU(),
                  Conv(3), ReLU(), Readout(correlation=Constant()))


def test_internal_profile_rows_are_the_objective_of_the_direct_kernel():
    """Each row's objective is the objective of the kernel computed directly (the network
    with that internal λ and the row's learned readout λ and amplitude), not of the offset
    route's own arithmetic; λ = 0 is the independent-tap network; the learned internal λ is
    the best row."""
    from cnngp import Independent
    from cnngp.experiments.learned import run_learn
    from cnngp.inference.learn import objective_value
    from cnngp.io.data import balanced_subset, load_dataset

    r = run_learn(_internal_net(), "digits", 40, params="internal", starts=(2.0,), max_iter=20, refine=2,
                  lengthscales=(1.0, 10.0))
    ds = load_dataset("digits")
    order = balanced_subset(ds.y_train, 40, seed=0, n_classes=10)
    x, y = ds.x_train[order], ds.y_train[order]
    Y = torch.tensor(centered_one_hot(y, 10), dtype=torch.float64)
    rows = r["trace"]
    assert len(rows) >= 7 + 1 and {0.0, 3.0, 100.0} <= {row["internal_lengthscale"] for row in rows}
    for row in rows[:: 3] + [rows[0]]:
        lam = row["internal_lengthscale"]
        corr = Independent() if lam == 0 else Matern(1.5, lam)
        net = _internal_net()
        layers = list(net.layers)
        layers[2] = Conv(4, stride=2, padding="same", correlation=corr)
        layers[-1] = Readout(weight_var=row["amplitude"], correlation=Matern(1.5, row["readout_lengthscale"]))
        K = cnngp.kernel(Serial(*layers), x)
        direct = float(objective_value("mll", K, Y, row["noise_variance"]))
        assert direct == pytest.approx(row["objective"], rel=1e-9, abs=1e-9), lam
    best = max(rows, key=lambda row: row["objective"])
    assert r["learned"]["internal_lengthscale"] == best["internal_lengthscale"]
    assert r["learned"]["lengthscale"] == best["readout_lengthscale"]
    assert r["config"]["internal"]["layers"] == [2] and r["body_pair_evaluations"] == 820 * len(rows)


def test_internal_needs_a_correlated_intermediate_conv():
    from cnngp.experiments.learned import run_learn

    net = Serial(Conv(3), ReLU(), Readout(correlation=Matern(1.5, 1.0)))
    with pytest.raises(cnngp.CNNGPError, match="no intermediate conv with a Matérn or RBF"):
        run_learn(net, "digits", 40, params="internal")


def test_cnngp_learn_internal_writes_results_and_figure(tmp_path, capsys):
    spec = tmp_path / "net.json"
    spec.write_text(json.dumps(_internal_net().to_spec()))
    out = tmp_path / "internal"
    assert main(["learn", "--arch", str(spec), "--n", "40", "--params", "internal", "--refine", "0",
                 "--starts", "2", "--max-iter", "10", "--out", str(out)]) == 0
    r = json.loads((out / "learned.json").read_text())
    assert r["config"]["params"] == "internal" and "internal_lengthscale" in r["learned"]
    assert len(r["trace"]) == 7 and (out / "learned.png").stat().st_size > 1000
    captured = capsys.readouterr()
    assert "learned internal λ" in captured.out and "internal λ 0:" in captured.err
    assert main(["learn", "--n", "40", "--params", "all", "--store", str(tmp_path / "S.zarr"),
                 "--out", str(tmp_path / "y")]) == 2
    assert "cnngp: error: --store: not with --params all" in capsys.readouterr().err


# -- a freely learned stationary readout: the spectral mixture ------------------------------


def test_spectral_mixture_correlation_against_a_loop_and_rbf():
    from cnngp import SpectralMixture

    sm = SpectralMixture([1.0, 0.4], [[0.0, 0.1], [0.3, 0.05]], [[1.5, 2.0], [0.8, 3.0]])
    shape = (4, 3)
    pos = [(i, j) for i in range(4) for j in range(3)]
    ref = np.zeros((12, 12))
    for a, (i, j) in enumerate(pos):
        for b, (k, l) in enumerate(pos):
            d = (k - i, l - j)
            ref[a, b] = sum(w * math.exp(-d[0] ** 2 / (2 * e[0] ** 2) - d[1] ** 2 / (2 * e[1] ** 2))
                            * math.cos(2 * math.pi * m[0] * d[0]) * math.cos(2 * math.pi * m[1] * d[1])
                            for w, m, e in zip([1.0, 0.4], [[0.0, 0.1], [0.3, 0.05]], [[1.5, 2.0], [0.8, 3.0]]))
    got = sm.matrix(shape).numpy()
    np.testing.assert_allclose(got, ref / ref.sum(), rtol=1e-12)
    assert np.linalg.eigvalsh(got).min() > -1e-14
    # one component at frequency 0 with equal envelopes is the RBF
    np.testing.assert_allclose(SpectralMixture([2.0], [[0.0, 0.0]], [[1.7, 1.7]]).matrix((5, 4)).numpy(),
                               RBF(1.7).matrix((5, 4)).numpy(), rtol=1e-12)
    assert cnngp.from_spec({"layers": [{"type": "readout", "correlation": sm.to_spec()}]}).layers[0].correlation == sm
    with pytest.raises(cnngp.CNNGPError, match="lengthscales: expected finite numbers > 0"):
        SpectralMixture([1.0], [[0.0]], [[-1.0]])
    with pytest.raises(cnngp.CNNGPError, match="defined for 2-D grids"):
        sm.matrix((5,))


@pytest.mark.parametrize("fast", ["1", "0"], ids=["fused", "torch"])
def test_spectral_mixture_offset_readout_equals_the_direct_readout(monkeypatch, fast):
    from cnngp import SpectralMixture

    monkeypatch.setenv("CNNGP_FAST", fast)
    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, (4, 7, 6, 2))
    body = _offsets_body()
    S = cnngp.offset_sums(body, x)
    sm = SpectralMixture([1.0, 0.7], [[0.0, 0.2], [0.4, 0.0]], [[2.0, 1.0], [1.2, 4.0]])
    direct = cnngp.kernel(Serial(*body.layers, Readout(weight_var=1.3, bias_var=0.2, correlation=sm)), x)
    via = 1.3 * torch.tensordot(sm.offset_weights((7, 6)), S, 1) + 0.2
    assert float((via - direct).abs().max()) <= 1e-12 * float(direct.abs().max())


def test_spectral_mixture_weights_gradcheck():
    from cnngp.kernels.correlations import spectral_mixture_offset_weights

    params = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for v in ([1.0, 0.5], [[0.05, 0.1], [0.3, 0.2]], [[1.5, 2.0], [0.9, 3.0]])]
    assert torch.autograd.gradcheck(lambda *p: spectral_mixture_offset_weights((4, 3), *p), params)


def test_learned_spectral_mixture_is_at_least_the_learned_rbf():
    """Q = 1 at frequency 0 with equal envelopes is the RBF readout, so the mixture's optimum
    (Q = 2, per-axis envelopes) can only be better."""
    from cnngp.inference.learn import learn_spectral_mixture

    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (30, 6, 6, 1))
    y = np.arange(30) % 3
    x[y == 1, :3] += 0.5
    x[y == 2, :, :2] += 0.4
    S = cnngp.offset_sums(Serial(Conv(3), ReLU(), Conv(3), ReLU()), x)
    rbf = learn_readout(OffsetReadout(S, (6, 6), "rbf"), y, n_classes=3)
    sm = learn_spectral_mixture(S, (6, 6), y, components=2, n_classes=3)
    assert sm.objective >= rbf.objective - 1e-6
    warm = learn_spectral_mixture(S, (6, 6), y, components=1, n_classes=3, starts=(), warm=rbf.learned)
    assert warm.objective >= rbf.objective - 1e-6 and warm.starts[0]["warm"]
    corr = cnngp.from_spec({"layers": [{"type": "readout", "correlation": sm.learned["correlation"]}]}).layers[0].correlation
    K = sm.learned["amplitude"] * torch.tensordot(corr.offset_weights((6, 6)), S, 1)
    Y = torch.tensor(centered_one_hot(y, 3), dtype=torch.float64)
    assert float(log_marginal_likelihood(K, Y, sm.learned["noise_variance"])) == pytest.approx(sm.objective, rel=1e-10)
    assert sm.kernel_evaluations > 0 and len(sm.trace) >= 3


def test_cnngp_learn_spectral_mixture(tmp_path, capsys):
    out = tmp_path / "sm"
    assert main(["learn", "--n", "40", "--spectral-mixture", "2", "--starts", "2", "--max-iter", "15",
                 "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "learned.json").read_text())
    sm = r["spectral_mixture"]
    assert sm["components"] == 2 and sm["learned"]["correlation"]["type"] == "spectral_mixture"
    assert 0 <= sm["heldout_accuracy"] <= 1 and sm["kernel_evaluations"] > 0
    assert "spectral mixture (Q = 2)" in capsys.readouterr().out


def test_internal_through_stores_resumes_without_a_body_pass(tmp_path, monkeypatch):
    """Each internal λ's offset sums go into their own store; the same run again computes no
    tile and reproduces every row."""
    import cnngp.engine.distributed as distributed
    from cnngp.experiments.learned import internal_store_path, run_learn

    kw = dict(params="internal", starts=(2.0,), max_iter=10, refine=1, lengthscales=(1.0,),
              store=tmp_path / "S.zarr")
    first = run_learn(_internal_net(), "digits", 40, **kw)
    assert internal_store_path(tmp_path / "S.zarr", 0.3).name == "S-internal-0.3.zarr"
    assert all(internal_store_path(tmp_path / "S.zarr", r["internal_lengthscale"]).exists()
               for r in first["trace"] if r["internal_lengthscale"] != 3.0)

    def no_body_pass(*a, **k):
        raise AssertionError("every store is complete: no tile may be computed again")

    monkeypatch.setattr(distributed, "run_tile_task", no_body_pass)
    again = run_learn(_internal_net(), "digits", 40, **kw)
    assert [r["objective"] for r in again["trace"]] == [r["objective"] for r in first["trace"]]
    assert again["learned"] == first["learned"]


@pytest.mark.filterwarnings("ignore:max_iter")
@pytest.mark.parametrize("params, flip", [("readout", False), ("all", False), ("readout", True)])
def test_learn_test_split_reports_nll_and_ece_of_the_learned_model(params, flip):
    """--test: the learned model's test accuracy, NLL and ECE. Oracle: the network with the
    learned readout (λ, amplitude) built by hand, its kernels by cnngp.kernel, scored by
    cnngp.inference.calibration.test_scores on the same folds and σ²."""
    import cnngp
    from cnngp.experiments.learned import run_learn
    from cnngp.experiments.sweep import _folds_for, split_network
    from cnngp.inference import calibration, gp
    from cnngp.io.data import Dataset, balanced_subset, load_digits

    xd, yd = load_digits()
    data = Dataset(xd[:200], yd[:200], xd[1000:1050], yd[1000:1050], "digits", tuple(str(i) for i in range(10)))
    res = run_learn("cnngp1", data, 40, params=params, starts=(3.0,), max_iter=4, lengthscales=(1.0,),
                    folds=2, progress=False, test=True, flip=flip)
    held, learned = res["heldout"], res["learned"]
    order = balanced_subset(data.y_train, 40, seed=0, n_classes=10)
    x, y, xt, yt = data.x_train[order], data.y_train[order], data.x_test, data.y_test
    body, template, _ = split_network("cnngp1")
    lam = learned["lengthscale"] if params == "readout" else learned["readout.lengthscale"]
    amp = learned["amplitude"] if params == "readout" else learned["readout.weight_var"]
    net = cnngp.Serial(body, cnngp.Readout(amp, template.bias_var, cnngp.Matern(1.5, lam), template.parameterization))
    K = cnngp.kernel(net, x, flip=flip).double().numpy()
    Kt = cnngp.kernel(net, xt, x, flip=flip).double().numpy()
    prior = np.diag(cnngp.kernel(net, xt, flip=flip).double().numpy())
    folds = _folds_for("paper", 40, y, 2, 0)
    ref = calibration.test_scores(K, y, Kt, prior, yt, learned["noise_variance"], folds, 10)
    assert held["n_test"] == 50
    assert held["test_accuracy"] == gp.test_accuracy(K, y, Kt, yt, learned["noise_variance"], 10)
    assert held["test_nll"] == pytest.approx(ref["nll"], rel=1e-6)
    assert held["test_ece"] == pytest.approx(ref["ece"], rel=1e-6, abs=1e-9)
    assert held["calibration_scale"] == pytest.approx(ref["calibration_scale"], rel=1e-6)


# -- learn through the store's options: --reuse, --archive, --workers, --dry-run ----------------


def _digits_with_test():
    from cnngp.io.data import Dataset, load_digits

    xd, yd = load_digits()
    return Dataset(xd[:200], yd[:200], xd[1000:1050], yd[1000:1050], "digits", tuple(str(i) for i in range(10)))


def _lent_tiles(path) -> list:
    """The tiles of a store that were lent, not computed (their records say where from)."""
    return sorted(p.stem for p in (path / "records").glob("tile-*.json") if "reused_from" in json.loads(p.read_text()))


def _stored(path):
    from cnngp.engine.store import KernelStore

    return np.asarray(KernelStore.open(path).kernel[...])


_STORE_KW = dict(starts=(2.0,), max_iter=5, lengthscales=(1.0,), folds=2, test=True, progress=False)


@pytest.mark.filterwarnings("ignore:max_iter")
def test_learn_grown_from_a_smaller_runs_stores_equals_a_fresh_run(tmp_path):
    """``reuse``: a learn run at n = 60 borrows from one at n = 40 the tiles of its train, test
    and mirror-term stores that lie within the first 40 images (the balanced subsets begin
    alike), computes the rest, and equals a run from scratch. Oracles: the tiles the tiling
    geometry puts within the smaller run (tile 16: 3 of the train stores' 10, 2 × 4 of the
    test stores' 4 × 4), the lender's bytes, and the fresh run's offset sums and results."""
    from cnngp.experiments.learned import run_learn

    data, net = _digits_with_test(), "cnngp1"
    kw = dict(_STORE_KW, flip=True, tile=16)
    run_learn(net, data, 40, store=tmp_path / "S.zarr", **kw)
    grown = run_learn(net, data, 60, store=tmp_path / "G.zarr", reuse=tmp_path / "S.zarr", **kw)
    fresh = run_learn(net, data, 60, store=tmp_path / "F.zarr", **kw)
    for name in ("G.zarr", "G-mirror.zarr"):
        assert _lent_tiles(tmp_path / name) == ["tile-0-0", "tile-0-1", "tile-1-1"], name
    for name in ("G-test.zarr", "G-mirror-test.zarr"):  # 50 test rows (4 tiles) × the first 32 columns
        assert _lent_tiles(tmp_path / name) == [f"tile-{i}-{j}" for i in range(4) for j in range(2)], name
    for suffix in ("", "-mirror", "-test", "-mirror-test"):
        got, want = _stored(tmp_path / f"G{suffix}.zarr"), _stored(tmp_path / f"F{suffix}.zarr")
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * np.abs(want).max())
        rows = slice(None) if "test" in suffix else slice(0, 32)  # the block lent: the lender's to the bit
        assert got[:, rows, :32].tobytes() == _stored(tmp_path / f"S{suffix}.zarr")[:, rows, :32].tobytes()
    for k, v in fresh["learned"].items():
        assert grown["learned"][k] == pytest.approx(v, rel=1e-8)
    assert grown["heldout"]["test_accuracy"] == fresh["heldout"]["test_accuracy"]
    assert grown["heldout"]["test_nll"] == pytest.approx(fresh["heldout"]["test_nll"], rel=1e-8)


@pytest.mark.filterwarnings("ignore:max_iter")
def test_learn_archive_restores_its_stores_and_lends_as_they_would(tmp_path, monkeypatch):
    """``archive``: each store (train, test, ``internal-<λ>/`` of ``params="internal"``) keeps its
    tiles in its own part of the folder; the stores deleted, the same run restores them and
    computes no tile; a new store ``reuse``-ing the archive folder borrows every tile. Before,
    the test store was refused by the train store's archive."""
    import shutil

    import cnngp.engine.distributed as distributed
    from cnngp.experiments.learned import internal_archive_path, run_learn

    data = _digits_with_test()
    kw = dict(_STORE_KW, params="internal", refine=1, tile=16)
    first = run_learn(_internal_net(), data, 40, store=tmp_path / "S.zarr", archive=tmp_path / "A", **kw)
    lams = [r["internal_lengthscale"] for r in first["trace"] if r["body_pass"]]
    assert len(lams) >= 7 and sorted(p.name for p in (tmp_path / "A").iterdir()) == sorted(
        ["train", "test"] + [internal_archive_path("A", lam).name for lam in lams])
    fitted = first["learned"]["internal_lengthscale"]
    if fitted != 3.0:  # the test pass at the learned internal λ went through its store too
        assert (internal_archive_path(tmp_path / "A", fitted) / "test" / "archive.json").is_file()
    for p in tmp_path.glob("S*.zarr"):
        shutil.rmtree(p)

    def no_body_pass(*a, **k):
        raise AssertionError("every tile is archived: none may be computed")

    monkeypatch.setattr(distributed, "run_tile_task", no_body_pass)
    again = run_learn(_internal_net(), data, 40, store=tmp_path / "S.zarr", archive=tmp_path / "A", **kw)
    lent = run_learn(_internal_net(), data, 40, store=tmp_path / "T.zarr", reuse=tmp_path / "A", **kw)
    for r in (again, lent):
        assert [row["objective"] for row in r["trace"]] == [row["objective"] for row in first["trace"]]
        assert r["learned"] == first["learned"] and r["heldout"] == first["heldout"]
    assert _lent_tiles(tmp_path / "T.zarr") == ["tile-0-0", "tile-0-1", "tile-0-2", "tile-1-1", "tile-1-2",
                                                "tile-2-2"]
    assert len(_lent_tiles(tmp_path / f"T-internal-{lams[0]:.10g}.zarr")) == 6


@pytest.mark.filterwarnings("ignore:max_iter")
def test_learn_dry_run_plans_every_body_pass_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """``cnngp learn --dry-run``: JSON on stdout, nothing written, not refused as long (the same
    command without --yes is). Oracles: the closed-form pair counts of every pass (with
    ``--params internal`` one per internal λ besides the network's own, the refine steps and
    the test pass at the learned λ), and, after the run, a plan with nothing left to compute
    in the known passes' stores."""
    from cnngp.engine import resources

    npz = tmp_path / "d.npz"
    data = _digits_with_test()
    np.savez(npz, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    spec = tmp_path / "net.json"
    spec.write_text(json.dumps(_internal_net().to_spec()))
    argv = ["learn", "--arch", str(spec), "--data", str(npz), "--n", "40", "--test", "--params", "internal",
            "--refine", "2", "--starts", "2", "--max-iter", "5", "--folds", "2"]
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(resources, "LONG_JOB_SECONDS", 1e-6)  # every learn is "long" now
    assert main(argv + ["--out", str(tmp_path / "o"), "--dry-run", "--quiet"]) == 0
    plan = json.loads(capsys.readouterr().out)
    train, test = 40 * 41 // 2, 50 * 40
    assert [(s["name"], s["pairs"], s["times"]) for s in plan["stages"]] == [
        ("offset sums", train, 1), ("test offset sums", test, 1),
        *((f"offset sums at internal λ {lam:g}", train, 1) for lam in (0, 0.3, 1, 10, 30, 100)),
        ("offset sums at the internal λ the search refines to", train, 3),  # --refine 2: at most 3 λ
        ("test offset sums at the learned internal λ", test, 1)]
    assert [(k["pairs"], k["times"]) for k in plan["kernels"]] == [(train, 1), (test, 1)] + [(train, 1)] * 6 + [
        (train, 3), (test, 1)]
    # held in float64: the 4×4 last grid's 7×7 offsets of two train sets (best λ, current) and two
    # test sets (the network's, the learned λ's), and the larger set as read (float64 here)
    assert plan["seconds"] > 0 and plan["memory_bytes"] == 8 * 7 ** 2 * (2 * 40 * 40 + 2 * test + test)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2  # refused: over the limit
    assert "pass --yes" in capsys.readouterr().err and not (tmp_path / "o").exists()
    monkeypatch.setattr(resources, "LONG_JOB_SECONDS", 3600.0)

    # through stores: each store's tiles; after the run, none left: the search's λ are those of
    # the stores the run left (it chooses them again), and so is the learned λ's test store
    store = ["--store", str(tmp_path / "S.zarr"), "--tile", "16"]
    assert main(argv + store + ["--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    plan = json.loads(out)
    assert err.startswith("data: ") and "plan: offset sums: 820 pairs; test offset sums: 2,000 pairs" in err
    assert [k["tiles"] for k in plan["kernels"]] == [6, 12] + [6] * 6 + [6, 12]
    assert [k["path"] for k in plan["kernels"]][:3] == [str(tmp_path / "S.zarr"), str(tmp_path / "S-test.zarr"),
                                                       str(tmp_path / "S-internal-0.zarr")]
    assert plan["kernels"][-1]["path"] is None and not (tmp_path / "S.zarr").exists()
    assert plan["disk_bytes"] == sum(k["disk_bytes"] * k["times"] for k in plan["kernels"]) > 0
    assert main(argv + store + ["--out", str(tmp_path / "o"), "--quiet"]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "o" / "learned.json").read_text())
    searched = sorted({r["internal_lengthscale"] for r in result["trace"]} - {0, 0.3, 1, 3, 10, 30, 100})
    assert 1 <= len(searched) <= 3
    assert main(argv + store + ["--out", str(tmp_path / "o2"), "--dry-run", "--quiet"]) == 0
    plan = json.loads(capsys.readouterr().out)
    names = [k["name"] for k in plan["kernels"]]
    assert names[8:8 + len(searched)] == [f"offset sums at internal λ {lam:.10g} (a refine step of an earlier run)"
                                          for lam in searched]
    learned_lam = result["learned"]["internal_lengthscale"]
    if learned_lam != 3.0:  # its test sums are in their store: priced (nothing left), not in full
        assert names[-1] == f"test offset sums at internal λ {learned_lam:.10g} (learned by an earlier run)"
    tiles = {k["name"]: k["tiles"] for k in plan["kernels"]}
    assert all(t == 0 for name, t in tiles.items() if "refines to" not in name and "the learned internal" not in name)
    assert tiles.get("offset sums at the internal λ the search refines to", 0) == (6 if len(searched) < 3 else 0)


def test_learn_store_options_are_refused_in_one_line_before_any_work(tmp_path, capsys):
    """--workers, --archive, --reuse without --store; --reuse of the store itself, of nothing,
    --archive of a folder that is not an archive, --workers with --scheduler: one line, exit 2,
    nothing written."""
    base = ["learn", "--n", "40", "--starts", "2", "--max-iter", "3", "--out", str(tmp_path / "o"), "--quiet"]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    s = str(tmp_path / "S.zarr")
    for extra, message in [
        (["--workers", "2"], "--workers: needs --store S.zarr (a store of offset sums)"),
        (["--reuse", s], "--reuse: needs --store S.zarr"),
        (["--store", s, "--reuse", s], "--reuse: "),
        (["--store", s, "--reuse", str(tmp_path / "none.zarr")], "--reuse: "),
        (["--store", s, "--archive", str(tmp_path / "foreign")], "--archive: "),
        (["--store", s, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "--workers: cannot be combined"),
        (["--store", s, "--params", "all"], "--store: not with --params all"),
    ]:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"cnngp: error: {message}"), (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


@pytest.mark.filterwarnings("ignore:max_iter")
def test_learn_on_dask_workers_opens_one_cluster_and_equals_one_process(tmp_path, dask_cluster, monkeypatch):
    """``workers``: every store of the run (train, test, their mirror terms, each internal λ's)
    is computed on one cluster, opened once; its stores hold the same bytes as a run in one
    process, and the results are the same."""
    import contextlib

    import cnngp.engine.distributed as distributed
    from cnngp.experiments.learned import run_learn

    opened = []

    @contextlib.contextmanager
    def one_client(workers=None, scheduler=None, memory_limit=None):
        opened.append(workers)
        yield dask_cluster

    monkeypatch.setattr(distributed, "dask_client", one_client)
    data = _digits_with_test()
    kw = dict(_STORE_KW, params="internal", refine=0, flip=True, tile=16)
    alone = run_learn(_internal_net(), data, 40, store=tmp_path / "A.zarr", **kw)
    # yes=False: the plan times pairs of the body in this process first, which once left plans
    # of its λ in the layers' caches that the workers' copies of every internal λ's network
    # revived (a stale-cache bug: those stores were off by up to 23 %)
    spread = run_learn(_internal_net(), data, 40, store=tmp_path / "B.zarr", workers=2, yes=False, **kw)
    assert opened == [2]
    assert spread["learned"] == alone["learned"] and spread["heldout"] == alone["heldout"]
    # recorded as given: two workers, not the address of the cluster they were started as
    assert (spread["config"]["execution"]["workers"], spread["config"]["execution"]["scheduler"]) == (2, None)
    names = sorted(p.name[1:] for p in tmp_path.glob("A*.zarr"))
    assert len(names) >= 2 * 8 and names == sorted(p.name[1:] for p in tmp_path.glob("B*.zarr"))
    for name in names:
        assert _stored(tmp_path / f"B{name}").tobytes() == _stored(tmp_path / f"A{name}").tobytes(), name


@pytest.mark.filterwarnings("ignore:max_iter")
def test_learn_and_sweep_grow_from_a_run_without_test_or_flip_stores(tmp_path, capsys):
    """A lender without test or mirror-term stores lends its train kernel alone, silently: the
    borrower computes its test and mirror terms (a regression of 2df442c crashed both commands
    with UnboundLocalError)."""
    npz = tmp_path / "d.npz"
    data = _digits_with_test()
    np.savez(npz, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test)
    common = ["--arch", "cnngp1", "--data", str(npz), "--folds", "2", "--quiet"]
    learn = ["learn", *common, "--starts", "2", "--max-iter", "3"]
    assert main(learn + ["--n", "20", "--store", str(tmp_path / "A.zarr"), "--out", str(tmp_path / "a")]) == 0
    assert main(learn + ["--n", "30", "--store", str(tmp_path / "B.zarr"), "--reuse", str(tmp_path / "A.zarr"),
                         "--tile", "10", "--test", "--n-test", "20", "--flip", "--out", str(tmp_path / "b")]) == 0
    assert _lent_tiles(tmp_path / "B.zarr") == ["tile-0-0", "tile-0-1", "tile-1-1"]
    assert not _lent_tiles(tmp_path / "B-test.zarr") and not _lent_tiles(tmp_path / "B-mirror.zarr")
    sweep = ["sweep", *common, "--lengthscales", "1"]
    assert main(sweep + ["--n", "20", "--store", str(tmp_path / "S.zarr"), "--tile", "10",
                         "--out", str(tmp_path / "s")]) == 0
    assert main(sweep + ["--n", "30", "--store", str(tmp_path / "T.zarr"), "--reuse", str(tmp_path / "S.zarr"),
                         "--flip", "--out", str(tmp_path / "t")]) == 0
    assert _lent_tiles(tmp_path / "T.zarr") == ["tile-0-0", "tile-0-1", "tile-1-1"]
    assert "--reuse" not in capsys.readouterr().err  # nothing to say: no counterparts to refuse


def test_a_learn_archive_folder_holds_archives_only(tmp_path, capsys):
    """--archive's internal-<λ>/ folders are checked as the folder itself is: a foreign file in
    one is refused, in one line, before any work."""
    junk = tmp_path / "A" / "internal-junk"
    junk.mkdir(parents=True)
    (junk / "a.txt").write_text("mine")
    argv = ["learn", "--n", "40", "--starts", "2", "--max-iter", "3", "--store", str(tmp_path / "S.zarr"),
            "--archive", str(tmp_path / "A"), "--out", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cnngp: error: --archive: '{junk}' is a folder that is not"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A"]

"""Flip-averaged kernels ½[K(x, x') + K(x, flip x')] (docs/maths.md §9): through the same
engine (fused and torch, NNGP and NTK, readout sweeps, the tiled store and its resume), checked
against the average of the two kernels computed separately, symmetric and PSD, refused for
networks that are not flip-symmetric, and part of every identity (store, checkpoint, cache)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cnngp
from cnngp.cli.main import main
from cnngp.engine import timing
from cnngp.engine.gram import (
    FLIP_TOLERANCE, MIRROR, GramPlan, check_flip_symmetric, estimate_cost, flip_images, readout_sweep,
)
from cnngp.engine.storage import CheckpointMismatchError
from cnngp.errors import CNNGPError
from cnngp.kernels.correlations import UserCorrelation

# a correlated conv, a pool, a correlated readout: every part of the recursion that mirroring touches
NET = cnngp.Serial(cnngp.Conv(3, correlation=cnngp.Matern(1.5, 1.0)), cnngp.ReLU(), cnngp.AvgPool(2),
                   cnngp.Conv(3, bias_var=0.1), cnngp.ReLU(), cnngp.Readout(correlation=cnngp.Matern(1.5, 2.0)))
BODY = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU())
READOUTS = [cnngp.Readout(correlation=c) for c in (cnngp.Independent(), cnngp.RBF(1.5), cnngp.Constant())]


def _images(n, shape=(6, 6, 2), seed=0):
    return np.random.default_rng(seed).uniform(size=(n,) + shape)


def _mirror_permutation(h, w):
    """Row-major positions of an h×w grid → the position mirrored along the width."""
    return np.arange(h * w).reshape(h, w)[:, ::-1].reshape(-1)


def _asymmetric_matrix(h, w, seed=1):
    """A PSD correlation over an h×w grid that is not mirror-symmetric (and its symmetrised twin)."""
    v = np.random.default_rng(seed).normal(size=(h * w, 3))
    m = v @ v.T + np.eye(h * w)
    p = _mirror_permutation(h, w)
    return m, (m + m[np.ix_(p, p)]) / 2


# -- the kernel equals the average of the two kernels computed separately ----------------------


@pytest.mark.parametrize("engine", ["fused", "torch"])
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_flip_kernel_is_the_average_of_the_two_kernels(engine, get):
    x = _images(7)
    flipped = cnngp.kernel(NET, x, get=get, flip=True, engine=engine).numpy()
    plain = cnngp.kernel(NET, x, get=get, engine=engine).numpy()
    cross = cnngp.kernel(NET, x, flip_images(x), get=get, engine=engine).numpy()  # every pair, no mirroring
    np.testing.assert_allclose(flipped, (plain + cross) / 2, rtol=1e-12, atol=0)
    # the cross block is symmetric (what lets a Gram pass compute only i <= j), the result exactly so
    np.testing.assert_allclose(cross, cross.T, rtol=1e-12, atol=0)
    assert np.array_equal(flipped, flipped.T)
    eig = np.linalg.eigvalsh(flipped)
    assert eig.min() > -1e-12 * eig.max()
    # invariant to mirroring either argument
    again = cnngp.kernel(NET, x, flip_images(x), get=get, flip=True, engine=engine).numpy()
    np.testing.assert_allclose(again, flipped, rtol=1e-12, atol=0)


def test_rectangular_and_both_kernels():
    x1, x2 = _images(5, seed=1), _images(4, seed=2)
    nngp, ntk = cnngp.kernel(NET, x1, x2, get="both", flip=True)
    for got, get in ((nngp, "nngp"), (ntk, "ntk")):
        want = (cnngp.kernel(NET, x1, x2, get=get) + cnngp.kernel(NET, x1, flip_images(x2), get=get)) / 2
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=0)
    # a test × train block of a flip Gram matrix is that Gram matrix's block
    whole = cnngp.kernel(NET, np.concatenate([x1, x2]), flip=True).numpy()
    np.testing.assert_allclose(nngp.numpy(), whole[:5, 5:], rtol=1e-12, atol=0)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_readout_sweep_flip_is_the_average_of_each_readouts_kernels(get):
    x = _images(6, seed=3)
    got = readout_sweep(BODY, READOUTS, x, get=get, flip=True).numpy()
    want = (readout_sweep(BODY, READOUTS, x, get=get).numpy()
            + readout_sweep(BODY, READOUTS, x, flip_images(x), get=get).numpy()) / 2
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    for k in got:
        assert np.array_equal(k, k.T) and np.linalg.eigvalsh(k).min() > -1e-12 * np.abs(k).max()


def test_kernel_diagonal_of_the_flip_kernel():
    from cnngp.engine.gram import kernel_diagonal

    x = _images(5, seed=7)
    for get in ("nngp", "ntk"):
        want = np.diagonal(cnngp.kernel(NET, x, get=get, flip=True).numpy())
        got = kernel_diagonal(NET, x, get=get, flip=True, batch_size=2).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    got = kernel_diagonal(BODY, x, readouts=READOUTS, flip=True).numpy()
    want = np.diagonal(readout_sweep(BODY, READOUTS, x, flip=True).numpy(), axis1=1, axis2=2)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)


def test_float32_flip_kernel_agrees_with_float64():
    x = _images(5, seed=4)
    k32 = cnngp.kernel(NET, x, flip=True, dtype="float32").double()
    k64 = cnngp.kernel(NET, x, flip=True)
    assert float((k32 - k64).abs().max() / k64.abs().max()) < 1e-5


# -- refusals ------------------------------------------------------------------------------


def _refused(model, x, match, **kwargs):
    with pytest.raises(CNNGPError, match=match) as info:
        cnngp.kernel(model, x, flip=True, **kwargs)
    assert str(info.value).startswith("flip: ")
    return str(info.value)


def test_a_network_that_is_not_flip_symmetric_is_refused():
    x = _images(3)
    cases = {  # each breaks the mirror symmetry one way; the message names the layer it shows at
        "even filter, same padding": cnngp.Serial(cnngp.Conv(2), cnngp.ReLU(), cnngp.Readout()),
        "stride leaving a ragged edge": cnngp.Serial(cnngp.Conv(3, stride=2, padding="valid"), cnngp.ReLU(),
                                                     cnngp.Readout()),
        "asymmetric conv correlation": cnngp.Serial(
            cnngp.Conv(3, correlation=UserCorrelation(_asymmetric_matrix(3, 3)[0])), cnngp.ReLU(), cnngp.Readout()),
    }
    for name, net in cases.items():
        message = _refused(net, x, r"not flip-symmetric on 6×6 images.*layer 1 \(ReLU\(\)\)")
        assert "mirror-symmetric" in message, name
    # after the last nonlinearity only the outputs show it: the readout is named, every kernel type
    bad, good = _asymmetric_matrix(6, 6)
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout(correlation=UserCorrelation(bad)))
    _refused(net, x, r"flip: readout 0 .* NNGP of two mirrored random images")
    _refused(net, x, r"flip: readout 0 .* NTK of two mirrored random images", get="ntk")
    # a sweep names the one bad readout among symmetric ones
    readouts = READOUTS + [cnngp.Readout(correlation=UserCorrelation(bad))]
    with pytest.raises(CNNGPError, match=r"flip: readout 3 "):
        readout_sweep(BODY, readouts, x, flip=True)
    # the same matrix symmetrised passes, and so do circular padding and even pools on even grids
    for ok in (cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout(correlation=UserCorrelation(good))),
               cnngp.Serial(cnngp.Conv(3, padding="circular"), cnngp.ReLU(), cnngp.AvgPool(2),
                            cnngp.Readout(correlation=cnngp.Constant()))):
        check_flip_symmetric(ok, (6, 6, 2))
    # ... but not an odd grid under a 2×2 valid pool (its windows leave the last column out)
    pooled = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.AvgPool(2), cnngp.Conv(3), cnngp.ReLU(),
                          cnngp.Readout())
    check_flip_symmetric(pooled, (6, 6, 2))
    with pytest.raises(CNNGPError, match="layer 4"):
        check_flip_symmetric(pooled, (7, 7, 2))


def test_the_check_cannot_pass_a_small_asymmetry():
    """An asymmetry far below what a classifier would notice is still refused: the check compares
    at 1e-9 relative, and the readout's asymmetry here moves the kernel by about 1e-6."""
    m, sym = _asymmetric_matrix(6, 6)
    barely = sym + 1e-6 * (m - sym)
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout(correlation=UserCorrelation(barely)))
    message = _refused(net, _images(2), "readout 0")
    gap = float(message.split("relative difference ")[1].split(")")[0])
    assert FLIP_TOLERANCE < gap < 1e-4


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("get", ["nngp", "both"])
def test_the_mirror_term_completes_a_plain_kernel_into_the_flip_kernel_to_the_bit(dtype, get):
    """flip="mirror" computes K(x, flip x') alone (a store of the plain kernel then needs only
    it): ½[K + K_mirror] is the flip-averaged block, bit for bit, on diagonal and off-diagonal
    blocks and on the diagonal pass; the mirror block equals the plain kernel against the
    mirrored images, and is symmetric."""
    x, y = _images(5), _images(4, seed=3)
    plans = {f: GramPlan(NET, (6, 6, 2), get=get, flip=f, dtype=dtype, batch_size=4) for f in (False, True, MIRROR)}
    assert plans[MIRROR].flip == MIRROR
    blocks = {}
    for f, plan in plans.items():
        tx, ty = plan.images(x), plan.images(y, "x2")
        rx, ry = plan.self_records(tx), plan.self_records(ty)
        blocks[f] = (plan.block(tx, rx), plan.block(tx, rx, ty, ry), plan.diagonal(tx, rx))
    for plain, mirror, both in zip(*(blocks[f] for f in (False, MIRROR, True))):
        assert torch.equal((plain + mirror) * 0.5, both)
    square = blocks[MIRROR][0].numpy()
    assert np.array_equal(square, np.swapaxes(square, 1, 2))
    cross = cnngp.readout_sweep(BODY, READOUTS, x, flip_images(x)).numpy() if get == "nngp" else None
    if cross is not None:  # the same through the public API, against the plain kernel of mirrored images
        mirror = cnngp.readout_sweep(BODY, READOUTS, x, flip=MIRROR).numpy()
        np.testing.assert_allclose(mirror, cross, rtol=1e-12 if dtype == "float64" else 1e-5, atol=0)


def test_a_mirror_store_is_priced_once_and_never_resumed_as_a_flip_or_plain_store(tmp_path, capsys):
    pytest.importorskip("zarr")
    from cnngp.engine.distributed import store_dry_run, store_kernel
    from cnngp.engine.store import KernelStore

    x = _images(6)
    plain, mirror = tmp_path / "k.zarr", tmp_path / "k-mirror.zarr"
    store_kernel(NET, x, out=plain, tile=3, progress=False)
    dry = store_dry_run(NET, x, out=mirror, tile=3, flip=MIRROR, progress=False).dry_run
    assert dry["flip"] == MIRROR and "× 2" not in dry["estimate"] and "(the mirror term" in describe(dry)
    assert estimate_cost(NET, (6, 6, 2), 100, flip=MIRROR).seconds == estimate_cost(NET, (6, 6, 2), 100).seconds
    store_kernel(NET, x, out=mirror, tile=3, flip=MIRROR, progress=False)
    assert KernelStore.open(mirror).info()["flip"] == MIRROR
    # cnngp info tells the three apart (it used to call the mirror term "flip-averaged")
    from cnngp.cli.main import main

    flipped = tmp_path / "k-flip.zarr"
    store_kernel(NET, x, out=flipped, tile=3, flip=True, progress=False)
    shapes = {}
    for path in (plain, mirror, flipped):
        assert main(["info", str(path)]) == 0
        shapes[path] = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  shape"))
    assert shapes[plain].endswith("tile 3") and shapes[flipped].endswith("tile 3, flip-averaged")
    assert shapes[mirror].endswith("tile 3, the mirror term K(x1, mirrored x2) of a flip average (half of it: "
                                   "average with the plain store)")
    averaged = (np.asarray(KernelStore.open(plain).kernel) + np.asarray(KernelStore.open(mirror).kernel)) * 0.5
    assert np.array_equal(averaged, cnngp.kernel(NET, x, flip=True).numpy()[None])
    for f in (True, False):
        with pytest.raises(CNNGPError, match="flip averaging"):
            store_kernel(NET, x, out=mirror, tile=3, flip=f, progress=False)
    with pytest.raises(CNNGPError, match="flip averaging"):
        store_kernel(NET, x, out=plain, tile=3, flip=MIRROR, progress=False)


def describe(dry):
    from cnngp.engine.distributed import describe_dry_run

    return describe_dry_run(dry)


def test_bad_flip_values_and_offsets_are_refused():
    x = _images(3)
    for bad in ("yes", 1, None):
        with pytest.raises(CNNGPError, match="flip: expected True, False or 'mirror'"):
            cnngp.kernel(NET, x, flip=bad)


# -- cost, checkpoints ----------------------------------------------------------------------


def test_estimates_count_every_pair_twice():
    plain = estimate_cost(NET, (6, 6, 2), 2000)
    flipped = estimate_cost(NET, (6, 6, 2), 2000, flip=True)
    assert flipped.pairs == plain.pairs  # image pairs; each is two kernel evaluations
    assert 1.95 < flipped.seconds / plain.seconds < 2.0  # the self pass is not repeated
    stage = timing.Stage("kernel", 10, flip=True)
    assert (stage.pairs, stage.evaluations) == (55, 110)
    assert stage.describe_pairs() == "55 pairs × 2 (flip-averaged)"
    # a timed flip plan's pair holds both terms
    plan = GramPlan(NET, (6, 6, 2), flip=True)
    assert plan.flip and GramPlan(NET, (6, 6, 2)).flip is False


def test_a_checkpoint_of_the_plain_kernel_is_not_resumed_as_a_flip_one(tmp_path, monkeypatch):
    from cnngp.engine.storage import Checkpoint

    monkeypatch.setattr(Checkpoint, "EVERY", 0.0)  # saved after every batch
    x = _images(5)
    path = tmp_path / "k.checkpoint.npz"
    cnngp.kernel(NET, x, checkpoint=path, keep_checkpoint=True, batch_size=4)
    assert path.exists()
    with pytest.raises(CheckpointMismatchError):
        cnngp.kernel(NET, x, flip=True, checkpoint=path)
    path.unlink()
    got = cnngp.kernel(NET, x, flip=True, checkpoint=path, keep_checkpoint=True, batch_size=4)
    assert path.exists()
    assert torch.equal(got, cnngp.kernel(NET, x, flip=True, checkpoint=path))  # resumed: the same bits


# -- the store -------------------------------------------------------------------------------


def test_store_with_several_tiles_resumed_and_refused_without_flip(tmp_path):
    pytest.importorskip("zarr")
    from cnngp.engine.distributed import store_dry_run, store_kernel
    from cnngp.engine.store import KernelStore

    x = _images(9)
    out = tmp_path / "k.zarr"
    want = cnngp.kernel(NET, x, flip=True).numpy()
    report = store_kernel(NET, x, out=out, tile=3, flip=True, progress=False)
    assert report.tiles_computed == 6
    store = KernelStore.open(out)
    assert store.attrs["flip"] is True and store.info()["flip"] is True
    assert np.array_equal(np.asarray(store.kernel[0]), want)  # the same blocks, bit for bit
    # interrupted: two tiles lost (records gone); the resumed run computes those, flip-averaged
    for name in ("tile-0-2", "tile-2-2"):
        (out / "records" / f"{name}.json").unlink()
    store.kernel[:, 6:9, 6:9] = 0.0  # what the lost run left behind is recomputed, not trusted
    report = store_kernel(NET, x, out=out, tile=3, flip=True, progress=False)
    assert (report.tiles_done_before, report.tiles_computed) == (4, 2)
    assert np.array_equal(np.asarray(KernelStore.open(out).kernel[0]), want)
    # a flip store is refused when resumed without flip, and nothing in it is overwritten
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(CNNGPError, match=r"different flip averaging;"):
        store_kernel(NET, x, out=out, tile=3, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # and a plain store is refused when resumed with flip
    plain = tmp_path / "plain.zarr"
    store_kernel(NET, x, out=plain, tile=3, progress=False)
    assert "flip" not in KernelStore.open(plain).attrs  # plain stores keep their old identity
    with pytest.raises(CNNGPError, match="flip averaging"):
        store_kernel(NET, x, out=plain, tile=3, flip=True, progress=False)
    dry = store_dry_run(NET, x, out=tmp_path / "new.zarr", tile=3, flip=True, progress=False).dry_run
    assert dry["flip"] is True and "pairs × 2 (flip-averaged)" in dry["estimate"]


def test_store_readout_sweep_rectangular_ntk(tmp_path):
    pytest.importorskip("zarr")
    from cnngp.engine.distributed import store_kernel
    from cnngp.engine.store import KernelStore

    x1, x2 = _images(5, seed=5), _images(7, seed=6)
    store_kernel(BODY, x1, x2, readouts=READOUTS, get="both", out=tmp_path / "k.zarr", tile=2, flip=True,
                 progress=False)
    got = np.asarray(KernelStore.open(tmp_path / "k.zarr").kernel[...])
    nngp, ntk = readout_sweep(BODY, READOUTS, x1, x2, get="both", flip=True)
    assert np.array_equal(got, np.concatenate([nngp.numpy(), ntk.numpy()]))


# -- the sweep, the command line and the estimators ------------------------------------------


def test_sweep_flip_kernels_cache_and_plan(tmp_path):
    from cnngp.experiments.sweep import SweepProtocol, run_sweep

    cache = tmp_path / "k.npz"
    protocol = SweepProtocol(ns=(40,), lengthscales=[2.0], flip=True, n_grid=20)
    res = run_sweep("cnngp1", "digits", protocol, kernel_cache=cache, dtype="float64", progress=False)
    assert res["config"]["flip"] is True
    stage = res["timing"]["estimate"]["stages"][0]
    assert stage["kernel_evaluations"] == 2 * stage["pairs"] == 40 * 41
    assert "× 2 (flip-averaged)" in res["timing"]["estimate"]["text"]
    with np.load(cache) as z:
        K, index = z["kernels"], z["train_index"]
    from cnngp.io.architectures import split_network
    from cnngp.io.data import load_dataset
    from cnngp.experiments.sweep import sweep_readouts

    body, template, _ = split_network("cnngp1")
    readouts, _ = sweep_readouts(template, [2.0])
    x = load_dataset("digits").x_train[index]
    want = (readout_sweep(body, readouts, x).numpy() + readout_sweep(body, readouts, x, flip_images(x)).numpy()) / 2
    np.testing.assert_allclose(K, want, rtol=1e-12, atol=0)
    with pytest.raises(CNNGPError, match="differs in flip"):  # the cache of flip kernels is not plain kernels
        run_sweep("cnngp1", "digits", protocol.replace(flip=False), kernel_cache=cache, dtype="float64",
                  progress=False)
    with pytest.raises(CNNGPError, match="flip: expected True or False"):
        SweepProtocol(flip="no")


def _spec(tmp_path, filter_size):
    spec = {"input_channels": 1, "layers": [{"type": "conv", "filter": filter_size}, {"type": "relu"},
                                            {"type": "readout"}]}
    path = tmp_path / f"net{filter_size}.json"
    path.write_text(json.dumps(spec))
    return path


def test_cli_kernel_flip_and_its_refusal(tmp_path, capsys):
    out = tmp_path / "k.npz"
    assert main(["kernel", "--arch", str(_spec(tmp_path, 3)), "--x1", "digits:6", "--out", str(out),
                 "--flip", "--quiet"]) == 0
    with np.load(out) as z:
        config = json.loads(str(z["config"]))
        K = z["kernel"]
    assert config["flip"] is True and "--flip" in config["command_line"]
    from cnngp.io.data import load_digits

    x = load_digits()[0][:6]
    net = cnngp.io.spec.load_spec(_spec(tmp_path, 3))
    np.testing.assert_allclose(K, cnngp.kernel(net, x, flip=True).numpy(), rtol=1e-12, atol=0)
    capsys.readouterr()
    bad = tmp_path / "bad.npz"
    assert main(["kernel", "--arch", str(_spec(tmp_path, 2)), "--x1", "digits:6", "--out", str(bad),
                 "--flip", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnngp: error: --flip: the network is not flip-symmetric")
    assert not bad.exists()


@pytest.mark.parametrize("cls", ["CNNGPClassifier", "CNNGPClassifierCV"])
def test_estimators_with_flip_predict_the_same_for_mirrored_images(cls):
    from cnngp.inference import estimator
    from cnngp.io.data import load_digits

    x, y = load_digits()
    options = dict(correlation="matern32", lengthscale=2.0) if cls == "CNNGPClassifier" else dict(
        lengthscales=[0.0, 2.0])
    clf = getattr(estimator, cls)("cnngp1", flip=True, **options).fit(x[:60], y[:60])
    scores = clf.decision_function(x[60:80])
    np.testing.assert_allclose(clf.decision_function(flip_images(x[60:80])), scores, rtol=1e-9, atol=1e-12)
    _, std = clf.predict(x[60:80], return_std=True)
    np.testing.assert_allclose(clf.predict(flip_images(x[60:80]), return_std=True)[1], std, rtol=1e-8)
    if cls == "CNNGPClassifier":  # the flip GP's posterior standard deviation, by a Cholesky solve
        net = clf.network_
        K = cnngp.kernel(net, x[:60], flip=True).numpy() + clf.noise_variance * np.eye(60)
        Ks = cnngp.kernel(net, x[60:80], x[:60], flip=True).numpy()
        prior = np.diagonal(cnngp.kernel(net, x[60:80], flip=True).numpy())
        L = np.linalg.cholesky(K)
        v = np.linalg.solve(L, Ks.T)
        np.testing.assert_allclose(std, np.sqrt(prior - (v * v).sum(0)), rtol=1e-6)
    plain = getattr(estimator, cls)("cnngp1", **options).fit(x[:60], y[:60])
    assert not np.allclose(plain.decision_function(flip_images(x[60:80])), plain.decision_function(x[60:80]))
    if cls == "CNNGPClassifierCV":  # λ learned by gradients from the flip-averaged offset sums
        from cnngp.inference.gp import centered_one_hot

        g = estimator.CNNGPClassifierCV("cnngp1", flip=True, search="gradient").fit(x[:40], y[:40])
        np.testing.assert_allclose(g.decision_function(flip_images(x[60:80])), g.decision_function(x[60:80]),
                                   rtol=1e-9, atol=1e-12)
        # its fit's kernel is the flip kernel of the learned network: (K + σ²I) α = Y
        K = cnngp.kernel(g.network_, x[:40], flip=True).numpy() + g.noise_variance_ * np.eye(40)
        Y = centered_one_hot(np.searchsorted(g.classes_, y[:40]), len(g.classes_))
        np.testing.assert_allclose(K @ g.dual_coef_, Y, atol=1e-7)


def test_sweep_into_a_store_equals_the_in_memory_flip_sweep(tmp_path, monkeypatch):
    pytest.importorskip("zarr")
    from cnngp.engine import gram
    from cnngp.engine.store import KernelStore
    from cnngp.engine import distributed
    from cnngp.experiments.sweep import SweepProtocol, mirror_store_path, run_sweep, test_store_path

    from cnngp.io.data import load_digits

    x, y = load_digits()
    data = tmp_path / "digits.npz"
    np.savez(data, x_train=x[:300], y_train=y[:300], x_test=x[300:400], y_test=y[300:400])
    protocol = SweepProtocol(ns=(40,), lengthscales=[2.0], flip=True, n_grid=20, test="best", n_test=20)
    options = dict(dtype="float64", progress=False)
    computed, compute = [], gram._compute

    def spy(*args, **kwargs):  # every in-memory kernel of the sweep: train, then the chosen test kernel
        computed.append(kwargs.get("flip"))
        return compute(*args, **kwargs)

    monkeypatch.setattr(gram, "_compute", spy)
    memory = run_sweep("cnngp1", data, protocol, **options)
    assert computed == [True, True]
    # a flip sweep into a store: the plain kernels in K.zarr (and K-test.zarr), their mirror
    # terms beside them, averaged when read; the same results as in memory, to the bit
    store = tmp_path / "K.zarr"
    stored = run_sweep("cnngp1", data, protocol, store=store, tile=16, **options)
    assert [r["cv_accuracy"] for r in stored["results"]] == [r["cv_accuracy"] for r in memory["results"]]
    assert stored["test"] == memory["test"]
    mirror = mirror_store_path(store)
    assert mirror.name == "K-mirror.zarr"
    for path, term in ((store, None), (test_store_path(store), None), (mirror, "mirror"),
                       (test_store_path(mirror), "mirror")):
        assert KernelStore.open(path).attrs.get("flip") == term, path
    # with --test all (every readout's test kernel: the same stores whichever λ is chosen) a
    # plain sweep and a flip sweep share the plain stores: a flip sweep after a plain one
    # computes the mirror terms alone, a plain one after a flip one nothing
    every = protocol.replace(test="all")
    real = distributed.store_kernel
    written = []
    monkeypatch.setattr(distributed, "store_kernel",
                        lambda *a, **k: written.append((k.get("flip"), real(*a, **k).tiles_computed)) or None)
    second = tmp_path / "K2.zarr"
    plain = run_sweep("cnngp1", data, every.replace(flip=False), store=second, tile=16, **options)
    assert [f for f, _ in written] == [False, False] and all(n > 0 for _, n in written)
    written.clear()
    again = run_sweep("cnngp1", data, every, store=second, tile=16, **options)
    assert [f for f, _ in written] == [False, "mirror", False, "mirror"]
    assert [n for _, n in written][0::2] == [0, 0] and all(n > 0 for _, n in written[1::2])
    written.clear()
    assert run_sweep("cnngp1", data, every.replace(flip=False), store=second, tile=16, **options)["test"] == plain["test"]
    assert [n for _, n in written] == [0, 0]
    assert again["test"] == run_sweep("cnngp1", data, every, **options)["test"]  # as in memory


def test_a_mirror_store_of_other_readouts_is_refused(tmp_path):
    pytest.importorskip("zarr")
    from cnngp.engine.distributed import store_kernel
    from cnngp.engine.store import FlipAveragedReadouts, KernelStore, StoredReadouts

    x = _images(4)
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    store_kernel(BODY, x, out=a, readouts=READOUTS, progress=False)
    store_kernel(BODY, x, out=b, readouts=READOUTS[:2], flip="mirror", progress=False)
    with pytest.raises(CNNGPError, match="is not the mirror term of"):
        FlipAveragedReadouts(StoredReadouts(KernelStore.open(a)), StoredReadouts(KernelStore.open(b)))


def test_check_gram_prices_a_flip_plan(monkeypatch):
    from cnngp.engine import gram

    plan = GramPlan(NET, (6, 6, 2), flip=True)
    monkeypatch.setattr(gram, "MEASURE_ABOVE_SECONDS", 0.0)  # time it, however small
    est = gram.check_gram("--x1", plan, (6, 6, 2), 10, images=_images(4), yes=True)
    assert "55 pairs × 2 (flip-averaged)" in est.describe()
    memory, seconds, _ = gram.gram_needs(NET, (6, 6, 2), 500, flip=True)
    assert seconds > 1.9 * gram.gram_needs(NET, (6, 6, 2), 500)[1]
    with pytest.raises(CNNGPError, match="readouts: not with a GramPlan"):
        gram.check_gram("--x1", plan, (6, 6, 2), 10, readouts=READOUTS)


def test_a_flip_sweep_on_dask_workers_reuses_the_plain_stores_and_matches_in_process(tmp_path, dask_cluster):
    """The sweep's mirror stores on a 2-process LocalCluster (the tile tasks rebuild the plan
    from its recipe, flip="mirror" included): after a plain sweep into the same store, the flip
    sweep computes the mirror terms alone, and its results are those of the in-process flip sweep."""
    pytest.importorskip("zarr")
    pytest.importorskip("distributed")
    from cnngp.engine.store import KernelStore
    from cnngp.experiments.sweep import SweepProtocol, mirror_store_path, run_sweep
    from cnngp.io.data import Dataset

    rng = np.random.default_rng(5)
    x = rng.uniform(size=(24, 6, 6, 2))
    xt = rng.uniform(size=(8, 6, 6, 2))
    ds = Dataset(x, np.repeat(np.arange(2), 12), xt, np.repeat(np.arange(2), 4), "toy", ("a", "b"))
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    protocol = SweepProtocol(ns=(12, 24), folds=2, lengthscales=[1.0, 3.0], test="all")
    here = run_sweep(net, ds, protocol.replace(flip=True), store=tmp_path / "A.zarr", tile=8, progress=False)
    run_sweep(net, ds, protocol, store=tmp_path / "B.zarr", tile=8, progress=False)
    plain = np.asarray(KernelStore.open(tmp_path / "B.zarr").kernel[...])
    records = {p: p.stat().st_mtime_ns for p in (tmp_path / "B.zarr" / "records").iterdir()}
    there = run_sweep(net, ds, protocol.replace(flip=True), store=tmp_path / "B.zarr", tile=8,
                      scheduler=dask_cluster, progress=False)
    assert np.array_equal(np.asarray(KernelStore.open(tmp_path / "B.zarr").kernel[...]), plain)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "B.zarr" / "records").iterdir()} == records  # not rewritten
    assert KernelStore.open(mirror_store_path(tmp_path / "B.zarr")).attrs["flip"] == "mirror"
    assert np.array_equal(np.asarray(KernelStore.open(mirror_store_path(tmp_path / "B.zarr")).kernel[...]),
                          np.asarray(KernelStore.open(mirror_store_path(tmp_path / "A.zarr")).kernel[...]))
    assert there["results"] == here["results"] and there["test"] == here["test"]


# -- flip-averaged offset sums (the readouts' λ learned with flips: cnngp learn --flip) --------


@pytest.mark.parametrize("spatial", [(6, 5), (7,)], ids=["2d", "1d"])
def test_flip_averaged_offset_sums_read_out_the_flip_kernel(spatial):
    """½[S_xx' + S_x,flip x'] read out by a mirror-symmetric readout is that readout's
    flip-averaged kernel, Gram and rectangular; the mirror term of a Gram matrix (pairs i <= j
    computed, the others by GramPlan.mirrored) is the rectangular pass against the mirrored
    images, entry for entry."""
    x, x2 = _images(5, spatial + (2,)), _images(3, spatial + (2,), seed=1)
    S, S2 = cnngp.offset_sums(BODY, x, flip=True), cnngp.offset_sums(BODY, x2, x, flip=True)
    rect = cnngp.offset_sums(BODY, x, flip_images(x))
    gap = float((cnngp.offset_sums(BODY, x, flip=MIRROR) - rect).abs().max())
    assert gap <= 1e-13 * float(rect.abs().max())
    assert float((S - 0.5 * (cnngp.offset_sums(BODY, x) + rect)).abs().max()) <= 1e-13 * float(rect.abs().max())
    from cnngp.kernels.correlations import family

    for corr in (family("matern32", 0.0), family("matern32", 2.0), family("rbf", 0.7), family("matern52", np.inf)):
        w = corr.offset_weights(spatial)
        for s, args in ((S, (x,)), (S2, (x2, x))):
            direct = cnngp.kernel(cnngp.Serial(*BODY.layers, cnngp.Readout(weight_var=1.3, bias_var=0.2,
                                                                           correlation=corr)), *args, flip=True)
            via = 1.3 * torch.tensordot(w, s, 1) + 0.2
            assert float((via - direct).abs().max()) <= 1e-12 * float(direct.abs().max()), corr


def test_the_mirror_term_of_offset_sums_through_a_store(tmp_path):
    """A store of the mirror term writes each off-diagonal tile's transpose by the mirror
    term's rule (offsets reversed but along the width); flip-averaged sums are refused."""
    from cnngp.engine.distributed import store_kernel
    from cnngp.engine.store import KernelStore

    x = _images(7, (6, 5, 2))
    store_kernel(BODY, x, offsets=True, flip=MIRROR, out=tmp_path / "S-mirror.zarr", tile=3, progress=False)
    got = np.asarray(KernelStore.open(tmp_path / "S-mirror.zarr").kernel[...])
    want = cnngp.offset_sums(BODY, x, flip_images(x)).numpy()
    assert np.abs(got - want).max() <= 1e-13 * np.abs(want).max()
    with pytest.raises(CNNGPError, match="flip-averaged offset sums are not stored as one"):
        store_kernel(BODY, x, offsets=True, flip=True, out=tmp_path / "T.zarr", tile=3, progress=False)
    assert not (tmp_path / "T.zarr").exists()


def test_offset_sums_of_a_body_that_is_not_flip_symmetric_are_refused():
    x = _images(3)
    with pytest.raises(CNNGPError, match=r"not flip-symmetric on 6×6 images.*layer 1"):
        cnngp.offset_sums(cnngp.Serial(cnngp.Conv(2), cnngp.ReLU()), x, flip=True)
    # the asymmetry after the last nonlinearity shows in the offset sums alone
    last = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3, correlation=UserCorrelation(_asymmetric_matrix(3, 3)[0])))
    with pytest.raises(CNNGPError, match="offset sums of its last hidden layer .* are not the mirrored ones"):
        cnngp.offset_sums(last, x, flip=MIRROR)
    cnngp.offset_sums(last, x)  # without flips nothing is asked of it


def test_learn_with_flips_in_memory_and_through_stores(tmp_path, monkeypatch):
    import cnngp.engine.distributed as distributed
    from cnngp.experiments.learned import run_learn

    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(),
                       cnngp.Readout(correlation=cnngp.Matern(1.5, 1.0)))
    from cnngp.io.data import Dataset, load_dataset

    digits = load_dataset("digits")  # its last 200 images as the test split
    ds = Dataset(digits.x_train[:-200], digits.y_train[:-200], digits.x_train[-200:], digits.y_train[-200:],
                 "digits-split", digits.class_names)
    kw = dict(n=40, starts=(2.0,), max_iter=15, lengthscales=(1.0, 10.0), test=True, n_test=20)
    memory = run_learn(net, ds, flip=True, **kw)
    stored = run_learn(net, ds, flip=True, store=tmp_path / "S.zarr", **kw)
    for k, v in memory["learned"].items():
        assert stored["learned"][k] == pytest.approx(v, rel=1e-8)
    assert stored["heldout_accuracy"] == memory["heldout_accuracy"]
    assert memory["config"]["flip"] is True and memory["body_pair_evaluations"] == 2 * (40 * 41 // 2 + 20 * 40)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S-mirror-test.zarr", "S-mirror.zarr", "S-test.zarr", "S.zarr"]
    plain = run_learn(net, ds, **kw)
    assert plain["config"]["flip"] is False and plain["learned"] != memory["learned"]

    def no_body_pass(*a, **k):
        raise AssertionError("the plain stores are complete: no tile may be computed again")

    monkeypatch.setattr(distributed, "run_tile_task", no_body_pass)
    again = run_learn(net, ds, store=tmp_path / "S.zarr", **kw)  # the flip run's plain stores
    assert again["learned"] == pytest.approx(plain["learned"], rel=1e-8)
    with pytest.raises(CNNGPError, match="flip: not with spectral_mixture"):
        run_learn(net, ds, flip=True, spectral_mixture=2, **kw)


def test_whole_network_gradient_of_the_flip_kernel_matches_finite_differences():
    from cnngp.inference.gp import centered_one_hot
    from cnngp.inference.learn import default_learnable, kernel_vjp, objective_value, with_parameters

    x = _images(7, (6, 6, 1), seed=6)
    net = cnngp.Serial(cnngp.Conv(3, correlation=cnngp.Matern(1.5, 1.0)), cnngp.ReLU(),
                       cnngp.Readout(correlation=cnngp.Matern(1.5, 3.0)))
    names = default_learnable(net)
    Y = torch.tensor(centered_one_hot(np.arange(7) % 2, 2), dtype=torch.float64)
    vals = np.array([1.0, 3.0, 1.5])

    def obj(v):
        K = cnngp.kernel(with_parameters(net, dict(zip(names, v))), x, flip=True)
        return float(objective_value("loo", K, Y, 0.05))

    K = cnngp.kernel(with_parameters(net, dict(zip(names, vals))), x, flip=True).requires_grad_(True)
    objective_value("loo", K, Y, 0.05).backward()
    g = kernel_vjp(net, names, vals, x, K.grad, tile=3, flip=True)  # ragged tiles: 3 + 3 + 1
    fd = [(obj(vals + e) - obj(vals - e)) / 2e-5 for e in np.eye(3) * 1e-5]
    assert np.allclose(g, fd, rtol=1e-5, atol=1e-9), (g, fd)
    plain = kernel_vjp(net, names, vals, x, K.grad, tile=3)
    assert not np.allclose(plain, g, rtol=1e-3)  # the mirror term counts


def test_cli_learn_flip(tmp_path, capsys):
    assert main(["learn", "--arch", "cnngp2", "--n", "40", "--flip", "--quiet", "--starts", "3",
                 "--max-iter", "5", "--out", str(tmp_path / "L")]) == 0
    result = json.loads((tmp_path / "L" / "learned.json").read_text())
    assert result["config"]["flip"] is True and "--flip" in result["config"]["command"]
    assert main(["learn", "--arch", "cnngp2", "--n", "40", "--flip", "--spectral-mixture", "2",
                 "--out", str(tmp_path / "M")]) != 0
    assert "flip: not with spectral_mixture" in capsys.readouterr().err


def test_learn_internal_lengthscale_with_flips(tmp_path):
    """params="internal" with flips: each internal λ's flip-averaged offset sums (in memory, and
    through a plain and a mirror-term store per λ) give the rows whose objective is that of the
    flip kernel computed directly."""
    from cnngp.experiments.learned import internal_store_path, run_learn
    from cnngp.experiments.sweep import mirror_store_path
    from cnngp.inference.gp import centered_one_hot
    from cnngp.inference.learn import objective_value
    from cnngp.io.data import balanced_subset, load_dataset

    def net(corr=cnngp.Matern(1.5, 3.0), readout=cnngp.Constant(), amplitude=1.0):
        # 4 taps, stride 2, same padding on 8 pixels: one pixel of padding each side, symmetric
        return cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(4, stride=2, padding="same", correlation=corr),
                            cnngp.ReLU(), cnngp.Readout(weight_var=amplitude, correlation=readout))

    kw = dict(params="internal", starts=(2.0,), max_iter=10, refine=0, lengthscales=(1.0,), flip=True)
    memory = run_learn(net(), "digits", 40, **kw)
    stored = run_learn(net(), "digits", 40, store=tmp_path / "S.zarr", **kw)
    assert [r["objective"] for r in stored["trace"]] == pytest.approx([r["objective"] for r in memory["trace"]],
                                                                        rel=1e-9)
    lam = memory["trace"][-1]["internal_lengthscale"]
    assert mirror_store_path(internal_store_path(tmp_path / "S.zarr", lam)).exists()
    ds = load_dataset("digits")
    order = balanced_subset(ds.y_train, 40, seed=0, n_classes=10)
    x, Y = ds.x_train[order], torch.tensor(centered_one_hot(ds.y_train[order], 10), dtype=torch.float64)
    for row in (memory["trace"][0], memory["trace"][-1]):
        corr = cnngp.Independent() if row["internal_lengthscale"] == 0 else cnngp.Matern(1.5, row["internal_lengthscale"])
        K = cnngp.kernel(net(corr, cnngp.Matern(1.5, row["readout_lengthscale"]), row["amplitude"]), x, flip=True)
        assert float(objective_value("mll", K, Y, row["noise_variance"])) == pytest.approx(row["objective"], rel=1e-9)


def test_learn_network_refuses_a_flip_that_is_not_true_or_false():
    """``flip`` (among ``learn_network``'s keyword options: it keeps the ten-parameter rule) is
    refused by name when not True/False, before any kernel is computed."""
    from cnngp.inference.learn import learn_network

    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout(correlation=cnngp.Matern(1.5, 1.0)))
    x, y = np.random.default_rng(0).random((6, 5, 5, 1)), np.arange(6) % 2
    with pytest.raises(CNNGPError, match=r"^flip: expected True or False, got 'yes'"):
        learn_network(net, x, y, flip="yes")

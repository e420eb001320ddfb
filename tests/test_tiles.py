"""The tile seam: a Gram matrix assembled tile by tile, in any order, through the public
GramPlan API equals the one-call kernel() bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cnngp
from cnngp.engine.gram import GramPlan, write_tile


def _images(n, shape=(6, 6, 2), seed=0):
    return np.random.default_rng(seed).uniform(size=(n,) + shape)


NETS = {
    "matern-readout": cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(),
                                   cnngp.Readout(correlation=cnngp.Matern(1.5, 2.0))),
    "flatten-diagonal": cnngp.io.architectures.get("cnngp3"),
    "pooled-band": cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.AvgPool(2), cnngp.Conv(3),
                                cnngp.ReLU(), cnngp.Readout()),
    "correlated-conv": cnngp.Serial(cnngp.Conv(3, correlation=cnngp.RBF(1.0)), cnngp.Erf(),
                                    cnngp.GlobalAvgPool()),
}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(NETS))
def test_symmetric_gram_from_shuffled_tiles_is_bit_identical(name, dtype):
    net = NETS[name]
    x = _images(7)
    whole = cnngp.kernel(net, x, dtype=dtype).numpy()
    plan = GramPlan(net, x.shape[1:], dtype=dtype, batch_size=2)
    xt = plan.images(x)
    records = plan.self_records(xt)
    tiles = plan.tiles(7, tile=3)
    assert [(t[0].start, t[1].start, t[2]) for t in tiles] == [
        (0, 0, True), (0, 3, False), (3, 3, True), (0, 6, False), (3, 6, False), (6, 6, True)]  # nested order
    out = np.full((plan.n_outputs, 7, 7), np.nan, dtype=whole.dtype)
    for k in np.random.default_rng(1).permutation(len(tiles)):
        rows, cols, diagonal = tiles[k]
        if diagonal:
            block = plan.block(xt[rows], records.take(rows))
        else:
            block = plan.block(xt[rows], records.take(rows), xt[cols], records.take(cols))
        write_tile(out, rows, cols, block, mirror=not diagonal)
    assert np.array_equal(out[0], whole)


@pytest.mark.parametrize("flip", [False, "mirror"])
def test_offset_sums_from_tiles_with_their_plan(flip):
    """A plan of offset sums (and of their mirror term) transposes its off-diagonal tiles by
    reversing offsets (GramPlan.mirrored), which write_tile does when given the plan."""
    body = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU())
    x = _images(7)
    whole = cnngp.offset_sums(body, x, flip=flip).numpy()
    plan = GramPlan(body, x.shape[1:], offsets=True, flip=flip)
    xt = plan.images(x)
    records = plan.self_records(xt)
    out = np.full((plan.n_outputs, 7, 7), np.nan)
    for rows, cols, diagonal in plan.tiles(7, tile=3):
        if diagonal:
            write_tile(out, rows, cols, plan.block(xt[rows], records.take(rows)))
        else:
            block = plan.block(xt[rows], records.take(rows), xt[cols], records.take(cols))
            write_tile(out, rows, cols, block, mirror=True, plan=plan)
            off_diagonal = rows, cols, block
    assert np.abs(out - whole).max() <= 1e-13 * np.abs(whole).max()
    with pytest.raises(cnngp.CNNGPError, match="two terms apart"):
        write_tile(out, *off_diagonal, mirror=True, plan=GramPlan(body, x.shape[1:], offsets=True, flip=True))
    with pytest.raises(cnngp.CNNGPError, match="plan: expected a cnngp.engine.gram.GramPlan or None, got dict"):
        write_tile(out, *off_diagonal, mirror=True, plan={"offsets": True})


def test_rectangular_gram_and_readout_sweep_from_tiles():
    body = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU())
    readouts = [cnngp.Readout(correlation=cnngp.Matern(1.5, lam)) for lam in (0.0, 1.0, float("inf"))]
    x1, x2 = _images(5, seed=2), _images(4, seed=3)
    whole = cnngp.readout_sweep(body, readouts, x1, x2).numpy()
    plan = GramPlan(body, x1.shape[1:], readouts=readouts)
    t1, t2 = plan.images(x1), plan.images(x2, "x2")
    r1, r2 = plan.self_records(t1), plan.self_records(t2)
    out = np.full((3, 5, 4), np.nan)
    for rows, cols, diagonal in reversed(plan.tiles(5, 4, tile=2)):
        assert not diagonal
        write_tile(out, rows, cols, plan.block(t1[rows], r1.take(rows), t2[cols], r2.take(cols)))
    assert np.array_equal(out, whole)
    # index arrays select records too (a scheduler may hand out any subset)
    idx = np.array([4, 0, 2])
    block = plan.block(t1[idx], r1.take(idx), t2[:2], r2.take(slice(0, 2)))
    assert np.array_equal(block.numpy(), whole[:, idx][:, :, :2])


def test_resuming_a_block_continues_where_it_stopped():
    net = NETS["matern-readout"]
    x = _images(6)
    plan = GramPlan(net, x.shape[1:], batch_size=4)
    xt = plan.images(x)
    rec = plan.self_records(xt)
    seen = []
    full = plan.block(xt, rec, on_batch=lambda out, done: seen.append(done))
    assert seen == [4, 8, 12, 16, 20, 21]  # 21 = 6·7/2 pairs, in batches of 4
    partial = torch.full_like(full, float("nan"))
    rows, cols = plan.pairs(6, 6, True)
    partial[:, rows[:8], cols[:8]] = full[:, rows[:8], cols[:8]]
    partial[:, cols[:8], rows[:8]] = full[:, rows[:8], cols[:8]]
    resumed = plan.block(xt, rec, out=partial, start=8)
    assert torch.equal(resumed, full)


def test_plan_errors():
    net = NETS["matern-readout"]
    plan = GramPlan(net, (6, 6, 2))
    with pytest.raises(cnngp.CNNGPError, match=r"x1: images of shape \(5, 5, 2\) do not match the plan's \(6, 6, 2\)"):
        plan.images(_images(2, (5, 5, 2)))
    with pytest.raises(cnngp.CNNGPError, match=r"tile: expected an int >= 1"):
        plan.tiles(4, tile=0)
    with pytest.raises(cnngp.CNNGPError, match=r"readouts: expected a non-empty list"):
        GramPlan(net[:-1], (6, 6, 2), readouts=[])


@pytest.mark.parametrize("name", ["pooled-band", "flatten-diagonal", "matern-readout"])
def test_a_pairs_kernel_does_not_depend_on_the_batch_it_is_computed_in(name):
    """Every pair gets the same bits whether its batch holds 1, 3 or all 28 pairs (float32,
    where a last-bit difference is visible): what makes tiles, resumes and workers agree with
    the whole matrix. Torch's vectorised atan2 rounds its SIMD body and its scalar tail
    differently, so the diagonal/band ReLUs run on the fused kernel at every size
    (layers.POINTWISE_MIN = 0)."""
    net = NETS[name]
    for seed in range(3):
        x = _images(7, seed=seed)
        blocks = []
        for batch in (1, 3, 28):
            plan = GramPlan(net, x.shape[1:], dtype="float32", batch_size=batch)
            xt = plan.images(x)
            blocks.append(plan.block(xt, plan.self_records(xt)).numpy())
        assert all(np.array_equal(b, blocks[0]) for b in blocks[1:]), (name, seed)

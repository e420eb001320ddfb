"""Tile archives: a store's finished tiles carried, compressed, to a fresh machine.

The oracle is the single-process ``cnngp.kernel`` / ``readout_sweep`` result and the store's
own bytes: a store rebuilt from an archive must equal the original bit for bit, whatever mix
of restored and recomputed tiles built it."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cnngp
from cnngp.cli.main import main
from cnngp.engine.archive import TileArchive, decode_tile, encode_tile
from cnngp.engine.distributed import store_kernel
from cnngp.engine.store import KernelStore
from cnngp.errors import CNNGPError
from conftest import last_bits_changed as _last_bits_changed

pytest.importorskip("zarr")
pytest.importorskip("numcodecs")

BODY = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU())
READOUTS = [cnngp.Readout(correlation=cnngp.Matern(1.5, lam)) for lam in (0.0, 1.0, 4.0, float("inf"))]


def _images(n, shape=(6, 6, 3), seed=0):
    return np.random.default_rng(seed).uniform(size=(n,) + shape)


def _stored(path) -> np.ndarray:
    return np.asarray(KernelStore.open(path).kernel[...])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encoding_is_lossless_on_values_that_stress_the_integer_deltas(dtype):
    rng = np.random.default_rng(3)
    block = (rng.normal(size=(5, 7, 3)) * 10.0 ** rng.integers(-30, 30, size=(5, 7, 3))).astype(dtype)
    block[0, 0, 0], block[1, 0, 0], block[2, 0, 0] = 0.0, -0.0, np.finfo(dtype).tiny / 4  # subnormal
    block[3, 1, 1], block[4, 1, 1] = np.finfo(dtype).max, -np.finfo(dtype).max
    back = decode_tile(encode_tile(block), block.shape, dtype)
    assert back.dtype == dtype and back.shape == block.shape
    assert back.tobytes() == block.tobytes()  # bit for bit, signed zeros included


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(st.sampled_from([np.float32, np.float64]),
                  st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)),
                  elements={"allow_nan": True, "allow_infinity": True, "allow_subnormal": True}))
def test_encoding_round_trips_any_block_bit_for_bit(block):
    back = decode_tile(encode_tile(block), block.shape, block.dtype)
    assert back.dtype == block.dtype and back.tobytes() == block.tobytes()


def test_a_smooth_readout_stack_compresses_well():
    """What the layout is for: readouts of one pair side by side differ in their last bits."""
    x = _images(10)
    block = cnngp.readout_sweep(BODY, [cnngp.Readout(correlation=cnngp.Matern(1.5, lam))
                                       for lam in np.geomspace(0.1, 100, 20)], x).numpy().astype(np.float32)
    assert len(encode_tile(block)) < 0.6 * block.nbytes


def test_a_store_rebuilt_from_its_archive_equals_the_original(tmp_path, capsys):
    x = _images(11)
    whole = cnngp.readout_sweep(BODY, READOUTS, x).numpy()
    first = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=4,
                         archive=tmp_path / "arch", progress=False)
    assert (first.tiles_computed, first.tiles_restored) == (6, 0)
    assert np.array_equal(_stored(tmp_path / "a.zarr"), whole)
    names = sorted(p.name for p in (tmp_path / "arch").glob("tile-*.bin"))
    assert names == sorted(f"{t.name}.bin" for t in KernelStore.open(tmp_path / "a.zarr").tiles())
    archived = sum(p.stat().st_size for p in (tmp_path / "arch").glob("tile-*.bin"))
    assert archived < _stored(tmp_path / "a.zarr").nbytes  # no mirrors
    header = json.loads((tmp_path / "arch" / "archive.json").read_text())
    assert header["identity"]["shape"] == [4, 11, 11] and header["versions"]["numpy"]

    # a fresh machine: only the archive survived (copied, or committed and cloned)
    shutil.copytree(tmp_path / "arch", tmp_path / "carried")
    again = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "b.zarr", tile=4,
                         archive=tmp_path / "carried", progress=True)
    assert (again.tiles_restored, again.tiles_computed, again.pairs_computed) == (6, 0, 0)
    assert "6 of 6 tiles already done (6 restored from" in capsys.readouterr().err
    assert _stored(tmp_path / "b.zarr").tobytes() == _stored(tmp_path / "a.zarr").tobytes()
    assert KernelStore.open(tmp_path / "b.zarr").complete()  # records written for restored tiles
    # with what each tile took where it was computed
    a, b = KernelStore.open(tmp_path / "a.zarr"), KernelStore.open(tmp_path / "b.zarr")
    for t in a.tiles():
        ra, rb = a._record(t.name), b._record(t.name)
        assert (rb["seconds"], rb["cpu_seconds"]) == (ra["seconds"], ra["cpu_seconds"]) and ra["cpu_seconds"] > 0


def test_a_partial_archive_resumes_and_a_damaged_tile_is_recomputed(tmp_path, capsys):
    x1, x2 = _images(9), _images(7, seed=1)
    whole = cnngp.readout_sweep(BODY, READOUTS, x1, x2).numpy()
    store_kernel(BODY, x1, x2, readouts=READOUTS, out=tmp_path / "a.zarr", tile=3,
                 archive=tmp_path / "arch", progress=False)
    tiles = KernelStore.open(tmp_path / "a.zarr").tiles()
    assert len(tiles) == 9
    (tmp_path / "arch" / f"{tiles[0].name}.json").unlink()  # a tile whose record never landed
    (tmp_path / "arch" / f"{tiles[4].name}.bin").unlink()  # record without data
    damaged = tmp_path / "arch" / f"{tiles[7].name}.bin"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x5A
    damaged.write_bytes(bytes(data))
    report = store_kernel(BODY, x1, x2, readouts=READOUTS, out=tmp_path / "b.zarr", tile=3,
                          archive=tmp_path / "arch", progress=False)
    assert (report.tiles_restored, report.tiles_computed) == (6, 3)
    err = capsys.readouterr().err
    assert f"tile {tiles[4].name}" in err and f"tile {tiles[7].name}" in err and "recomputed" in err
    assert np.array_equal(_stored(tmp_path / "b.zarr"), whole.astype(np.float64))
    # the recomputed tiles are archived again: a third machine restores everything
    third = store_kernel(BODY, x1, x2, readouts=READOUTS, out=tmp_path / "c.zarr", tile=3,
                         archive=tmp_path / "arch", progress=False)
    assert (third.tiles_restored, third.tiles_computed) == (9, 0)
    assert np.array_equal(_stored(tmp_path / "c.zarr"), _stored(tmp_path / "b.zarr"))


def test_an_archive_added_to_a_running_store_catches_up(tmp_path):
    x = _images(8)
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=4, dtype="float32", progress=False)
    report = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=4, dtype="float32",
                          archive=tmp_path / "arch", progress=False)
    assert report.tiles_computed == 0
    store = KernelStore.open(tmp_path / "a.zarr")
    archive = TileArchive(tmp_path / "arch", store)
    for tile in store.tiles():
        block, _ = archive.load(tile)
        assert block.dtype == np.float32
        assert np.array_equal(block, np.asarray(store.kernel[:, tile.rows, tile.cols]))
    # an archived tile damaged (or lost) while the store still holds it is saved again
    tiles = store.tiles()
    (tmp_path / "arch" / f"{tiles[0].name}.bin").write_bytes(b"torn")
    (tmp_path / "arch" / f"{tiles[1].name}.json").unlink()
    assert not archive.intact(tiles[0]) and not archive.intact(tiles[1]) and archive.intact(tiles[2])
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=4, dtype="float32",
                 archive=tmp_path / "arch", progress=False)
    assert all(archive.intact(t) for t in tiles)


def test_an_archive_of_another_computation_is_refused(tmp_path):
    x = _images(6)
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=3, archive=tmp_path / "arch",
                 progress=False)
    before = sorted(p.name for p in (tmp_path / "arch").iterdir())
    for kwargs, what in [(dict(x1=_images(6, seed=5)), r"images \(its rows\)"),
                         (dict(dtype="float32"), "dtype"),
                         (dict(readouts=READOUTS[:2]), "readouts")]:
        args = dict(x1=x, dtype="float64", readouts=READOUTS) | kwargs
        with pytest.raises(CNNGPError, match=f"--archive: .* holds tiles of a kernel of different {what}"):
            store_kernel(BODY, args["x1"], readouts=args["readouts"], dtype=args["dtype"], tile=3,
                         out=tmp_path / f"other-{len(what)}.zarr", archive=tmp_path / "arch", progress=False)
        assert not (tmp_path / f"other-{len(what)}.zarr").exists()  # refused before the store is made
    assert sorted(p.name for p in (tmp_path / "arch").iterdir()) == before  # nothing overwritten


def test_an_archive_sets_the_tile_and_a_refusal_leaves_no_store_in_a_run_or_its_dry_run(tmp_path):
    """A store restored from an archive must have its tile size: without a tile it takes the
    archive's (every tile restored, none computed); with another tile the run and its dry run
    both refuse, naming the two sizes, and leave no store behind, so the corrected command
    runs. The dry run prices the tiles the archive would restore as restored, not computed."""
    from cnngp.engine.distributed import describe_dry_run, store_dry_run

    x = _images(6)
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=2, archive=tmp_path / "arch",
                 progress=False)
    for run in (store_kernel, store_dry_run):
        with pytest.raises(CNNGPError, match=r"^--archive: .*arch' holds tiles of a kernel of different tile size "
                                             r"\(2; this computation: 4\)"):
            run(BODY, x, readouts=READOUTS, out=tmp_path / "b.zarr", tile=4, archive=tmp_path / "arch",
                progress=False)
        assert not (tmp_path / "b.zarr").exists()
    plan = store_dry_run(BODY, x, readouts=READOUTS, out=tmp_path / "b.zarr", archive=tmp_path / "arch",
                         progress=False).dry_run
    assert (plan["tile"], plan["tiles"], plan["tiles_restored"], plan["tiles_total"]) == (2, 0, 6, 6)
    assert f"0 tiles of 2 to compute (of 6; 6 restored from {tmp_path / 'arch'} (--archive))" in describe_dry_run(plan)
    report = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "b.zarr", archive=tmp_path / "arch",
                          progress=False)
    assert (report.tile, report.tiles_restored, report.tiles_computed) == (2, 6, 0)
    assert np.asarray(KernelStore.open(tmp_path / "b.zarr").kernel[...]).tobytes() == \
        np.asarray(KernelStore.open(tmp_path / "a.zarr").kernel[...]).tobytes()


def test_cli_info_on_a_sweeps_archive_folder_describes_each_part(tmp_path, capsys):
    """A sweep's --archive DIR holds one archive per part (train/, test/, …): info describes
    each, with --json a record per part."""
    for part, n in (("train", 6), ("test", 4)):
        x = tmp_path / f"{part}.npz"
        np.savez(x, x=_images(n, seed=n).astype(np.float32))
        assert main(["kernel", "--arch", "cnngp2", "--x1", str(x), "--tile", "4", "--dtype", "float32", "--quiet",
                     "--out", str(tmp_path / f"{part}.zarr"), "--archive", str(tmp_path / "sw" / part)]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "sw")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'sw' / 'train'}: 3/3 tiles archived" in out and "shape 1×6×6 float32" in out
    assert f"{tmp_path / 'sw' / 'test'}: 1/1 tiles archived" in out and "shape 1×4×4 float32" in out
    assert main(["info", str(tmp_path / "sw"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert sorted(info) == ["test", "train"] and info["train"]["shape"] == [1, 6, 6]


def test_cli_archive_round_trip_and_its_errors(tmp_path, capsys):
    x = tmp_path / "x.npz"
    np.savez(x, x=_images(10).astype(np.float32))
    argv = ["kernel", "--arch", "cnngp2", "--x1", str(x), "--tile", "4", "--dtype", "float32"]
    assert main(argv + ["--out", str(tmp_path / "a.zarr"), "--archive", str(tmp_path / "arch"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "b.zarr"), "--archive", str(tmp_path / "arch")]) == 0
    assert "0 tile(s) computed" in capsys.readouterr().err
    assert _stored(tmp_path / "b.zarr").tobytes() == _stored(tmp_path / "a.zarr").tobytes()
    (tmp_path / "arch" / "tile-1-2.json").unlink()
    assert main(["info", str(tmp_path / "arch"), "--json"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert (info["tiles_total"], info["tiles_archived"], info["pairs_total"]) == (6, 5, 55)
    assert info["shape"] == [1, 10, 10] and info["dtype"] == "float32" and "5/6 tiles archived" in captured.err
    assert info["tiles_damaged"] == ["tile-1-2"]  # its data without its record
    # a record that is not JSON, and a lone data file: listed as damaged, not counted
    (tmp_path / "arch" / "tile-0-1.json").write_text("{")
    (tmp_path / "arch" / "tile-1-1.json").unlink()
    assert main(["info", str(tmp_path / "arch")]) == 0
    assert "3/6 tiles archived (0.0 MiB), 3 damaged: tile-0-1, tile-1-1, tile-1-2" in capsys.readouterr().out
    ref = cnngp.kernel(cnngp.io.architectures.get("cnngp2"), np.load(x)["x"], dtype=np.float32).numpy()
    np.testing.assert_allclose(_stored(tmp_path / "b.zarr")[0], ref, rtol=1e-5)

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    (tmp_path / "file").write_text("a file")
    for extra, pattern in [
        (["--out", str(tmp_path / "k.npz")], "--tile: needs --out K.zarr"),
        (["--out", str(tmp_path / "c.zarr"), "--archive", str(tmp_path / "junk")], "--archive: .* is a folder that is not a tile archive"),
        (["--out", str(tmp_path / "c.zarr"), "--archive", str(tmp_path / "file")], "--archive: .* is not a folder"),
        (["--out", str(tmp_path / "c.zarr"), "--archive", ""], "--archive: is empty"),
    ]:
        capsys.readouterr()
        code = main(argv + extra)
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and re.search(pattern, lines[0]), lines
    assert not (tmp_path / "c.zarr").exists() and (tmp_path / "junk" / "notes.txt").read_text() == "mine"
    code = main(["kernel", "--arch", "cnngp2", "--x1", str(x), "--out", str(tmp_path / "k.npz"),
                 "--archive", str(tmp_path / "arch")])
    assert code == 2 and "--archive: needs --out K.zarr" in capsys.readouterr().err
    capsys.readouterr()
    code = main(["sweep", "--arch", "cnngp2", "--data", "digits", "--n", "40", "--out", str(tmp_path / "sw"),
                 "--archive", str(tmp_path / "arch2")])
    assert code == 2 and "--archive: needs --store K.zarr" in capsys.readouterr().err


def test_a_sweep_finishes_from_its_archive_on_a_fresh_machine(tmp_path):
    from cnngp.experiments.sweep import run_sweep
    from cnngp.io.data import Dataset

    rng = np.random.default_rng(11)
    ds = Dataset(rng.uniform(size=(48, 6, 6, 1)).astype(np.float32), np.repeat(np.arange(3), 16),
                 rng.uniform(size=(9, 6, 6, 1)).astype(np.float32), np.repeat(np.arange(3), 3), "toy", ("a", "b", "c"))
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    common = dict(ns=(12, 24), folds=2, lengthscales=(1.0, 3.0), test=True, progress=False, tile=5)
    a = run_sweep(net, ds, **common)
    b = run_sweep(net, ds, store=tmp_path / "m1" / "K.zarr", archive=tmp_path / "arch", **common)
    assert sorted(p.name for p in (tmp_path / "arch").iterdir()) == ["test", "train"]
    assert b["config"]["archive"] == str(tmp_path / "arch")
    c = run_sweep(net, ds, store=tmp_path / "m2" / "K.zarr", archive=tmp_path / "arch", **common)
    for r in (b, c):
        assert r["results"] == a["results"] and r["best"] == a["best"] and r["test"] == a["test"]
    assert np.array_equal(_stored(tmp_path / "m1" / "K-test.zarr"), _stored(tmp_path / "m2" / "K-test.zarr"))


def test_test_best_scores_the_cross_validated_choice_with_one_readouts_kernels(tmp_path):
    """``test="best"`` gives the same top-level test entry as scoring every readout, from a
    test store (and archive) of that one readout."""
    from cnngp.experiments.sweep import run_sweep, test_store_path
    from cnngp.io.data import Dataset

    rng = np.random.default_rng(5)
    ds = Dataset(rng.uniform(size=(36, 6, 6, 1)).astype(np.float32), np.repeat(np.arange(3), 12),
                 rng.uniform(size=(9, 6, 6, 1)).astype(np.float32), np.repeat(np.arange(3), 3), "toy", ("a", "b", "c"))
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    common = dict(ns=(12, 36), folds=2, lengthscales=(0.5, 2.0, 8.0), progress=False)
    every = run_sweep(net, ds, test=True, **common)
    best_in_memory = run_sweep(net, ds, test="best", **common)
    best_stored = run_sweep(net, ds, test="best", store=tmp_path / "K.zarr", tile=4,
                            archive=tmp_path / "arch", **common)
    # the probabilities' scores are continuous: one readout's float32 kernels (test="best") can
    # differ in the last bit from the same readout's among several (its representation follows
    # the others'), so they agree to rounding; everything discrete agrees exactly
    fuzzy = ("test_nll", "test_ece", "calibration_scale", "calibration_nll", "mean_posterior_variance")
    for r in (best_in_memory, best_stored):
        exact = {k: v for k, v in r["test"].items() if k not in fuzzy + ("reliability",)}
        assert exact == {k: v for k, v in every["test"].items() if k not in fuzzy + ("reliability",)}
        for k in fuzzy:
            assert r["test"][k] == pytest.approx(every["test"][k], rel=1e-4), k
        assert r["test"]["reliability"]["count"] == every["test"]["reliability"]["count"]
        assert r["best"] == every["best"]
        assert r["config"]["test_readouts"] == "best"
        scored = [x for x in r["results"] if "test_accuracy" in x]
        assert len(scored) == 1 and scored[0]["readout"] == every["test"]["readout"]
    assert every["config"]["test_readouts"] == "all"
    store = KernelStore.open(test_store_path(tmp_path / "K.zarr"))
    assert store.shape == (1, 9, 36) and store.labels()[0].startswith(every["test"]["readout"])
    assert sorted(p.name for p in (tmp_path / "arch").iterdir()) == ["test", "train"]
    with pytest.raises(CNNGPError, match="test: expected False, True"):
        run_sweep(net, ds, test="some", **common)


def test_a_test_best_sweep_resumes_from_its_store_and_restores_from_its_archive(tmp_path):
    """``test="best"`` whose CV chooses another readout than the sweep's first: its plan used to
    price the first readout's test store, and so refused the earlier attempt's own test store
    ("holds a kernel of different readouts") and, on a fresh machine, its own archive. The same
    sweep again on its store, and on a new store from its archive, gives the same results."""
    from cnngp.experiments.sweep import run_sweep
    from cnngp.io.data import Dataset

    rng = np.random.default_rng(0)
    y, y_test = np.repeat(np.arange(3), 12), np.repeat(np.arange(3), 3)
    x = rng.uniform(size=(36, 6, 6, 1)) + 0.15 * y[:, None, None, None]  # brighter by class: pooling helps
    x_test = rng.uniform(size=(9, 6, 6, 1)) + 0.15 * y_test[:, None, None, None]
    ds = Dataset(x.astype(np.float32), y, x_test.astype(np.float32), y_test, "toy", ("a", "b", "c"))
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    common = dict(ns=(12, 36), folds=2, lengthscales=(0.5, 2.0, 8.0), progress=False, test="best", tile=4)
    first = run_sweep(net, ds, store=tmp_path / "m1" / "K.zarr", archive=tmp_path / "arch", **common)
    assert first["test"]["readout"] != "independent"  # the premise: not the first readout
    again = run_sweep(net, ds, store=tmp_path / "m1" / "K.zarr", archive=tmp_path / "arch", **common)
    fresh = run_sweep(net, ds, store=tmp_path / "m2" / "K.zarr", archive=tmp_path / "arch", **common)
    for r in (again, fresh):
        assert r["results"] == first["results"] and r["test"] == first["test"]
    assert np.array_equal(_stored(tmp_path / "m1" / "K-test.zarr"), _stored(tmp_path / "m2" / "K-test.zarr"))


def test_archives_of_offset_sum_and_ntk_stores_restore_bit_for_bit(tmp_path):
    """The mirror of an offset-sum tile reverses its offsets and an NTK store stacks two kernel
    types: both are rebuilt by the store's own write_tile, so both restore exactly."""
    x = _images(7)
    for name, kwargs in [("offsets", dict(offsets=True)), ("both", dict(readouts=READOUTS[:2], get="both"))]:
        first = tmp_path / f"{name}-a.zarr"
        store_kernel(BODY, x, out=first, tile=3, archive=tmp_path / name, progress=False, **kwargs)
        report = store_kernel(BODY, x, out=tmp_path / f"{name}-b.zarr", tile=3, archive=tmp_path / name,
                              progress=False, **kwargs)
        assert (report.tiles_restored, report.tiles_computed) == (6, 0)
        assert _stored(tmp_path / f"{name}-b.zarr").tobytes() == _stored(first).tobytes()


def test_tiles_finished_on_dask_workers_are_archived(tmp_path, dask_cluster):
    x = _images(9)
    whole = cnngp.readout_sweep(BODY, READOUTS, x).numpy()
    report = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=3, scheduler=dask_cluster,
                          archive=tmp_path / "arch", progress=False)
    assert report.tiles_computed == 6
    again = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "b.zarr", tile=3,
                         archive=tmp_path / "arch", progress=False)
    assert (again.tiles_restored, again.tiles_computed) == (6, 0)
    assert np.array_equal(_stored(tmp_path / "b.zarr"), whole)


# -- issue 28: everything read back is checked against what the store recorded ------------------


def _store_with_missing_tiles(tmp_path, n=9, tile=3, **kwargs):
    x = _images(n)
    out = tmp_path / "a.zarr"
    store_kernel(BODY, x, readouts=READOUTS, out=out, tile=tile, progress=False, **kwargs)
    for record in sorted((out / "records").glob("tile-*.json"))[:2]:
        record.unlink()
    return x, out


def test_a_store_whose_records_folder_was_deleted_is_recomputed_in_full(tmp_path):
    """Without records no tile is trusted: the folder is made again, every tile recomputed,
    and the kernel is the one of a fresh store to the bit."""
    import shutil

    x, out = _store_with_missing_tiles(tmp_path)
    want = _stored(out).copy()
    shutil.rmtree(out / "records")
    report = store_kernel(BODY, x, readouts=READOUTS, out=out, tile=3, progress=False)
    assert (report.tiles_done_before, report.tiles_computed) == (0, 6)
    assert _stored(out).tobytes() == want.tobytes()


def test_a_store_whose_stored_images_were_altered_is_refused_on_resume(tmp_path, capsys):
    import zarr

    x, out = _store_with_missing_tiles(tmp_path)
    images = zarr.open_group(str(out), mode="r+")["images"]["x1"]
    images[0] = images[0] + 0.5  # the attributes still hold the sha256 of the true images
    records = sorted(p.name for p in (out / "records").iterdir())
    with pytest.raises(CNNGPError, match=r"^--out: .*a\.zarr'.*images/x1 do not match .*x1_sha256"):
        store_kernel(BODY, x, readouts=READOUTS, out=out, tile=3, progress=False)
    assert sorted(p.name for p in (out / "records").iterdir()) == records  # nothing computed
    # and `cnngp info` says so, beside the tiles (intact) it counts
    assert KernelStore.open(out).info()["images_damaged"] == ["x1"]
    assert main(["info", str(out)]) == 0
    assert "DAMAGED  stored images images/x1 do not match" in capsys.readouterr().out


def test_swapped_archive_tiles_are_recomputed_not_restored_in_each_others_place(tmp_path, capsys):
    x = _images(9)
    whole = cnngp.readout_sweep(BODY, READOUTS, x).numpy()
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=3, archive=tmp_path / "arch",
                 progress=False)
    arch = tmp_path / "arch"
    for ext in ("bin", "json"):  # two off-diagonal tiles of the same shape, each in the other's files
        (arch / f"tile-0-1.{ext}").rename(arch / f"swap.{ext}")
        (arch / f"tile-0-2.{ext}").rename(arch / f"tile-0-1.{ext}")
        (arch / f"swap.{ext}").rename(arch / f"tile-0-2.{ext}")
    report = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "b.zarr", tile=3, archive=arch,
                          progress=False)
    assert (report.tiles_restored, report.tiles_computed) == (4, 2)
    err = capsys.readouterr().err
    assert "tile tile-0-1" in err and "tile tile-0-2" in err and "rows" in err
    assert np.array_equal(_stored(tmp_path / "b.zarr"), whole)


@pytest.mark.parametrize("where", ["records", "./records", "store-in-archive"])
def test_an_archive_inside_the_store_or_holding_it_is_refused(tmp_path, where):
    x = _images(6)
    if where == "store-in-archive":
        archive, out = tmp_path / "arch", tmp_path / "arch" / "a.zarr"
    else:
        out = tmp_path / "a.zarr"
        archive = f"{out}/{where}"
    with pytest.raises(CNNGPError, match=r"^--archive: .*(inside the kernel store|holds the kernel store)"):
        store_kernel(BODY, x, readouts=READOUTS, out=out, tile=3, archive=archive, progress=False)
    assert not out.exists()  # refused before the store was made


def test_an_existing_store_refuses_its_own_records_folder_as_archive(tmp_path):
    x, out = _store_with_missing_tiles(tmp_path, n=6)
    records = {p.name: p.read_bytes() for p in (out / "records").iterdir()}
    with pytest.raises(CNNGPError, match=r"inside the kernel store"):
        store_kernel(BODY, x, readouts=READOUTS, out=out, tile=3, archive=out / "." / "records", progress=False)
    assert {p.name: p.read_bytes() for p in (out / "records").iterdir()} == records


def test_a_store_whose_recorded_dtype_differs_from_its_array_is_refused(tmp_path):
    x, out = _store_with_missing_tiles(tmp_path)
    meta = out / "kernel" / "zarr.json"
    text = meta.read_text()
    assert '"float64"' in text
    meta.write_text(text.replace('"float64"', '"float32"'))
    with pytest.raises(CNNGPError, match=r"a\.zarr'.*array kernel is float32.*records dtype float64"):
        store_kernel(BODY, x, readouts=READOUTS, out=out, tile=3, progress=False)
    with pytest.raises(CNNGPError, match=r"array kernel is float32"):
        KernelStore.open(out)


def test_a_store_whose_kernel_array_was_given_another_shape_is_refused(tmp_path):
    """An edited kernel/zarr.json (a larger shape: the new cells read as NaN fill) is refused
    on opening, before verify() could call the recorded tiles complete."""
    x, out = _store_with_missing_tiles(tmp_path)
    meta = out / "kernel" / "zarr.json"
    spec = json.loads(meta.read_text())
    recorded = list(spec["shape"])
    spec["shape"] = [recorded[0], 100, 100]
    meta.write_text(json.dumps(spec))
    want = rf"a\.zarr'.*kernel array has shape \({recorded[0]}, 100, 100\), but the store records shape"
    with pytest.raises(CNNGPError, match=want):
        KernelStore.open(out)
    with pytest.raises(CNNGPError, match=want):
        store_kernel(BODY, x, readouts=READOUTS, out=out, tile=3, progress=False)


@pytest.mark.parametrize("linked", ["records", "images", "kernel/c"])
def test_a_store_with_a_symlinked_subfolder_is_refused_and_nothing_is_written_outside(tmp_path, linked):
    x, out = _store_with_missing_tiles(tmp_path)
    outside = tmp_path / "outside"
    shutil.move(str(out / linked), str(outside))
    (out / linked).symlink_to(outside, target_is_directory=True)
    before = sorted((p.relative_to(outside), p.stat().st_mtime_ns) for p in outside.rglob("*"))
    with pytest.raises(CNNGPError, match=r"symbolic link"):
        store_kernel(BODY, x, readouts=READOUTS, out=out, tile=3, progress=False)
    assert sorted((p.relative_to(outside), p.stat().st_mtime_ns) for p in outside.rglob("*")) == before


def test_a_failed_archive_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    """An archived tile's bytes go through a temporary file (named by host and process, for
    archives shared by several machines); a failure removes it and leaves the target as it was."""
    from cnngp.engine import archive

    target = tmp_path / "tile-0-0.bin"
    archive._atomic_bytes(target, b"old")

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive.os, "replace", full)
    with pytest.raises(OSError):
        archive._atomic_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["tile-0-0.bin"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_an_archive_of_the_same_images_rounded_otherwise_is_verified_and_restored(tmp_path, capsys, dtype):
    """A ZCA-whitened run resumed on another machine: its images differ from the archive's in
    a few last bits, so their sha256 differs. Pairs covering every image are computed again and
    agree to rounding: every tile is restored (none computed), the header takes the new images'
    sha256 and records the check, and the kernel equals the one computed from scratch on them."""
    x = _images(7).astype(dtype)
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=3, dtype=dtype,
                 archive=tmp_path / "arch", progress=False)
    old = json.loads((tmp_path / "arch" / "archive.json").read_text())["identity"]["x1_sha256"]
    y = _last_bits_changed(x, (slice(None), 2, 3, 1))
    from cnngp.engine.distributed import describe_dry_run, store_dry_run

    plan = store_dry_run(BODY, y, readouts=READOUTS, out=tmp_path / "b.zarr", dtype=dtype,
                         archive=tmp_path / "arch", progress=False).dry_run
    assert (plan["tiles"], plan["tiles_restored"], plan["archive_images_differ"]) == (0, 6, ["x1_sha256"])
    assert "6 restored from" in describe_dry_run(plan) and "after a check of its images by pairs" in \
        describe_dry_run(plan)
    assert not (tmp_path / "b.zarr").exists() and "images_verified" not in \
        json.loads((tmp_path / "arch" / "archive.json").read_text())  # a dry run writes nothing (the run checks)
    report = store_kernel(BODY, y, readouts=READOUTS, out=tmp_path / "b.zarr", dtype=dtype,
                          archive=tmp_path / "arch", progress=True)
    assert (report.tiles_restored, report.tiles_computed) == (6, 0)
    header = json.loads((tmp_path / "arch" / "archive.json").read_text())
    new = KernelStore.open(tmp_path / "b.zarr").attrs["x1_sha256"]
    assert new != old and header["identity"]["x1_sha256"] == new
    (check,) = header["images_verified"]
    assert check["previous"] == {"x1_sha256": old} and check["pairs_checked"] == 7  # one per image here
    assert 0 <= check["largest_relative_difference"] <= check["tolerance"]
    fresh = cnngp.readout_sweep(BODY, READOUTS, y, dtype=getattr(__import__("torch"), dtype)).numpy()
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert np.allclose(_stored(tmp_path / "b.zarr"), fresh, rtol=tol, atol=tol * np.abs(fresh).max())
    assert "computing again 7 pairs that cover every image" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "arch")]) == 0
    assert re.search(r"6/6 tiles archived .*; accepted for images of another sha256 at .* on .*: 7 pairs computed "
                     r"again agreed \(largest difference .* relative, tolerance", capsys.readouterr().out)
    # and back: the first images are accepted again the same way (a second record)
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "c.zarr", dtype=dtype, archive=tmp_path / "arch",
                 progress=False)
    assert len(json.loads((tmp_path / "arch" / "archive.json").read_text())["images_verified"]) == 2


def test_an_archive_of_other_images_is_refused_even_when_one_image_alone_differs(tmp_path):
    """The check covers every image: one image replaced (all the others the same) is found,
    named by its pair, and nothing is written: no store, the archive as it was."""
    x = _images(7)
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=3, archive=tmp_path / "arch",
                 progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "arch").iterdir()}
    y = x.copy()
    y[5] = _images(1, seed=9)[0]
    with pytest.raises(CNNGPError, match=r"^--archive: .*arch' holds tiles of a kernel of different images \(its "
                                         r"rows\): their sha256 differs from these images', and the pair \(\d, 5\)"):
        store_kernel(BODY, y, readouts=READOUTS, out=tmp_path / "b.zarr", archive=tmp_path / "arch",
                     progress=False)
    assert not (tmp_path / "b.zarr").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "arch").iterdir()} == before


def test_a_test_kernels_archive_is_verified_on_both_its_images(tmp_path):
    """x1 × x2 (a sweep's test kernel): rows and columns are covered apart; a change in the
    columns' last bits is accepted, a changed column image is refused naming the columns."""
    from cnngp.engine.distributed import covering_pairs
    from cnngp.engine.gram import tile_plan

    pairs = covering_pairs(tile_plan(5, 8, 3), symmetric=False)
    assert {i for i, _, _ in pairs} == set(range(5)) and {j for _, j, _ in pairs} == set(range(8))
    assert len(pairs) <= 5 + 8
    x1, x2 = _images(5, seed=1), _images(8, seed=2)
    store_kernel(BODY, x1, x2, readouts=READOUTS, out=tmp_path / "a.zarr", tile=3, archive=tmp_path / "arch",
                 progress=False)
    report = store_kernel(BODY, x1, _last_bits_changed(x2, (slice(None), 0, 0, 0)), readouts=READOUTS,
                          out=tmp_path / "b.zarr", archive=tmp_path / "arch", progress=False)
    assert (report.tiles_restored, report.tiles_computed) == (6, 0)
    other = x2.copy()
    other[7] = _images(1, seed=9)[0]
    with pytest.raises(CNNGPError, match=r"different images \(its columns\).* the pair \(\d, 7\)"):
        store_kernel(BODY, x1, other, readouts=READOUTS, out=tmp_path / "c.zarr", archive=tmp_path / "arch",
                     progress=False)


@pytest.mark.parametrize("kwargs", [dict(flip=True), dict(flip="mirror"), dict(get=("nngp", "ntk"))],
                         ids=["flip-average", "mirror-term", "nngp+ntk"])
def test_images_rounded_otherwise_are_verified_for_flip_terms_and_ntks(tmp_path, kwargs):
    """The recomputed pairs are the stored quantity itself (the flip average, its mirror term,
    NNGP and NTK side by side): the archive is accepted for the same images in other last
    bits, its kernel that of a store computed from scratch on them, and refused for others."""
    x = _images(7)
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=3, archive=tmp_path / "arch",
                 progress=False, **kwargs)
    y = _last_bits_changed(x, (slice(None), 1, 4, 0))
    report = store_kernel(BODY, y, readouts=READOUTS, out=tmp_path / "b.zarr", archive=tmp_path / "arch",
                          progress=False, **kwargs)
    assert (report.tiles_restored, report.tiles_computed) == (6, 0)
    store_kernel(BODY, y, readouts=READOUTS, out=tmp_path / "fresh.zarr", tile=3, progress=False, **kwargs)
    fresh = _stored(tmp_path / "fresh.zarr")
    assert np.allclose(_stored(tmp_path / "b.zarr"), fresh, rtol=1e-12, atol=1e-12 * np.abs(fresh).max())
    other = y.copy()
    other[3] = _images(1, seed=9)[0]  # (not its mirror image: the flip average is the same for it)
    with pytest.raises(CNNGPError, match=r"different images \(its rows\).* the pair \(\d, 3\)"):
        store_kernel(BODY, other, readouts=READOUTS, out=tmp_path / "c.zarr", archive=tmp_path / "arch",
                     progress=False, **kwargs)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_store_resumed_on_the_same_images_rounded_otherwise_goes_on_and_other_images_are_refused(tmp_path,
                                                                                                    dtype, capsys):
    """A store on a shared file system resumed from a machine whose preprocessing rounds
    otherwise: its kept images are compared with these (within rounding), so it is resumed —
    its kept images and their sha256 rewritten to these, the change recorded — and its missing
    tiles computed; the kernel is that of these images to rounding. The dry run agrees. An image
    moved beyond rounding is refused as before, the store untouched."""
    from cnngp.engine.distributed import store_dry_run

    x = _images(7).astype(dtype)
    path = tmp_path / "a.zarr"
    store_kernel(BODY, x, readouts=READOUTS, out=path, tile=3, dtype=dtype, progress=False)
    store = KernelStore.open(path)
    old_sha = store.attrs["x1_sha256"]
    store.forget(store.tiles()[-1])  # an unfinished store
    y = _last_bits_changed(x, (slice(None), 3, 2, 0))
    assert store_dry_run(BODY, y, readouts=READOUTS, out=path, dtype=dtype, progress=False).dry_run["tiles"] == 1
    report = store_kernel(BODY, y, readouts=READOUTS, out=path, dtype=dtype, progress=False)
    assert (report.tiles_done_before, report.tiles_computed) == (5, 1)
    store = KernelStore.open(path)
    assert store.attrs["x1_sha256"] != old_sha and store.damaged_images() == []
    assert np.asarray(store.group["images"]["x1"][...]).tobytes() == y.tobytes()
    (entry,) = store.attrs["images_rounded_otherwise"]
    assert entry["previous"] == {"x1_sha256": old_sha} and store.info()["images_rounded_otherwise"] == [entry]
    assert main(["info", str(path)]) == 0
    assert f"resumed {entry['at']} on {entry['host']} with the same images rounded otherwise" in \
        capsys.readouterr().out
    want = cnngp.readout_sweep(BODY, READOUTS, y, dtype=getattr(__import__("torch"), dtype)).numpy()
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert np.allclose(_stored(path), want, rtol=tol, atol=tol * np.abs(want).max())
    moved = y.copy()
    moved[2] = _images(1, seed=9)[0]
    before = _stored(path).tobytes()
    for run in (store_dry_run, store_kernel):
        with pytest.raises(CNNGPError, match=r"holds a kernel of different images \(its rows\)"):
            run(BODY, moved, readouts=READOUTS, out=path, dtype=dtype, progress=False)
    assert _stored(path).tobytes() == before and KernelStore.open(path).attrs["x1_sha256"] == store.attrs["x1_sha256"]


def test_a_rekey_cut_short_is_finished_by_the_next_resume(tmp_path):
    """Kept images already rewritten, the sha256 not yet: the next resume with those images
    accepts the store (its images hash to the new sha256) and finishes the rekey."""
    x = _images(5)
    path = tmp_path / "a.zarr"
    store_kernel(BODY, x, readouts=READOUTS, out=path, tile=3, progress=False)
    y = _last_bits_changed(x, (slice(None), 0, 1, 2))
    KernelStore.open(path).group["images"]["x1"][...] = y  # cut short after the images
    assert KernelStore.open(path).damaged_images() == ["x1"]
    report = store_kernel(BODY, y, readouts=READOUTS, out=path, progress=False)
    assert report.tiles_computed == 0 and KernelStore.open(path).damaged_images() == []

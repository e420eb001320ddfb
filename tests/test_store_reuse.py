"""Lending (``reuse=`` / ``--reuse``): a store of N images lends its finished tiles to the
store of N' > N images that begin with the same N, which computes only the pairs with a new
image; a store of more images lends its leading block; tile sizes may differ; a tile archive
lends as its store would. Oracles: the kernel computed in memory from scratch, the source
store's bytes, the records' times, and a sweep run from scratch."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import digits_npz

import cnngp
from cnngp.cli.main import main
from cnngp.engine.distributed import describe_dry_run, store_dry_run, store_kernel
from cnngp.engine.store import KernelStore, tile_plan
from cnngp.errors import CNNGPError
from conftest import last_bits_changed as _last_bits_changed

pytest.importorskip("zarr")

BODY = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU())
READOUTS = [cnngp.Readout(correlation=cnngp.Matern(1.5, lam)) for lam in (0.0, 2.0, float("inf"))]


def _images(n, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, 6, 6, 2))


def _records(path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (path / "records").glob("tile-*.json")}


def _lent(path) -> list:
    """The names of a store's tiles that were lent, not computed (their records say where from)."""
    return sorted(n for n, r in _records(path).items() if "reused_from" in r)


def _grown_and_fresh(argv, tmp_path, lender) -> tuple:
    """Run the sweep ``argv`` at --n 40,80 into s2.zarr grown from ``lender`` (--reuse) and into
    s3.zarr from scratch; their results (folders b and c)."""
    assert main(argv + ["--n", "40,80", "--store", str(tmp_path / "s2.zarr"), "--reuse", str(lender),
                        "--out", str(tmp_path / "b")]) == 0
    assert main(argv + ["--n", "40,80", "--store", str(tmp_path / "s3.zarr"), "--out", str(tmp_path / "c")]) == 0
    return tuple(json.loads((tmp_path / d / "results.json").read_text()) for d in ("b", "c"))


def test_a_grown_symmetric_store_copies_the_old_tiles_and_equals_a_kernel_from_scratch(tmp_path):
    x = _images(9)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    report = store_kernel(BODY, x, readouts=READOUTS, out=new, tile=3, reuse=old, progress=False)
    # tiles of side 3 over 9 images: 6 on and above the diagonal, 3 of them within the first 6
    assert (report.tiles_total, report.tiles_reused, report.tiles_computed) == (6, 3, 3)
    assert report.reuse == str(old)
    K = np.asarray(KernelStore.open(new).kernel[...])
    want = cnngp.readout_sweep(BODY, READOUTS, x).numpy()
    np.testing.assert_allclose(K, want, rtol=1e-12, atol=0)
    # the lent block is the old store's, to the bit, and its records say where it came from
    assert K[:, :6, :6].tobytes() == np.asarray(KernelStore.open(old).kernel[...]).tobytes()
    records = _records(new)
    lent = {name for name, r in records.items() if r.get("reused_from") == str(old)}
    assert lent == {"tile-0-0", "tile-0-1", "tile-1-1"}
    assert all(records[name]["seconds"] == _records(old)[name]["seconds"] for name in lent)
    assert KernelStore.open(new).complete()
    info = KernelStore.open(new).info()
    assert info["tiles_reused_from"] == {str(old): 3}
    assert info["seconds_recorded_reused"] == pytest.approx(sum(_records(old)[n]["seconds"] for n in lent))


def test_lent_tiles_stay_lent_through_a_tile_archive(tmp_path, capsys):
    """A grown store's tile archive keeps which tiles were lent and by whom: restored on
    another machine (the store gone), the lent tiles are recorded as lent, with the lender's
    time, and the store's info says so as before (the archive's too); they used to come back as computed there,
    the lender's seconds counted as the restored store's own."""
    import shutil

    x = _images(9)
    old, new, archive = tmp_path / "old.zarr", tmp_path / "new.zarr", tmp_path / "new-archive"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    store_kernel(BODY, x, readouts=READOUTS, out=new, tile=3, reuse=old, archive=archive, progress=False)
    before, info = _records(new), KernelStore.open(new).info()
    assert info["tiles_reused_from"] == {str(old): 3}
    from cnngp.engine.archive import archive_info

    assert archive_info(archive)["tiles_reused_from"] == {str(old): 3}  # what `cnngp info DIR` prints
    assert main(["info", str(archive)]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{archive}: 6/6 tiles archived ({archive_info(archive)['bytes'] / 2**20:.1f} MiB), 3 of them copied "
        f"from {old} (--reuse)")
    shutil.rmtree(new)
    report = store_kernel(BODY, x, readouts=READOUTS, out=new, tile=3, archive=archive, progress=False)
    assert (report.tiles_restored, report.tiles_computed) == (6, 0)
    after = _records(new)
    assert {n: r.get("reused_from") for n, r in after.items()} == {n: r.get("reused_from") for n, r in before.items()}
    assert _lent(new) == ["tile-0-0", "tile-0-1", "tile-1-1"]
    assert all(after[n]["seconds"] == before[n]["seconds"] for n in before)
    again = KernelStore.open(new).info()
    assert again["tiles_reused_from"] == {str(old): 3}
    assert again["seconds_recorded_reused"] == pytest.approx(info["seconds_recorded_reused"])


def test_a_grown_store_without_a_tile_takes_the_lenders(tmp_path):
    """The default tile grows with N; a store grown from a smaller one takes that store's tile
    (a tile is lent whole, at its place), as a resumed store keeps its own."""
    x = _images(9)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    report = store_kernel(BODY, x, readouts=READOUTS, out=new, reuse=old, progress=False)  # no tile
    assert (report.tile, report.tiles_reused, report.tiles_computed) == (3, 3, 3)


@pytest.mark.parametrize("tile", [2, 4, 5])
def test_a_store_of_another_tile_size_lends_the_blocks_its_tiles_hold(tmp_path, tile):
    """Tiles of another size: a new tile is cut from one old tile or assembled out of up to
    four, mirror chunks of the old symmetric store included (below its diagonal). Oracles: the
    old store's bytes (the lent block, to the bit), the kernel from scratch (the rest), and the
    old records' times, in proportion to the entries taken from each."""
    x = _images(9)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    report = store_kernel(BODY, x, readouts=READOUTS, out=new, tile=tile, reuse=old, progress=False)
    # the new tiles within the first 6 images: blocks of `tile` that end by image 6
    inside = [t for t in KernelStore.open(new).tiles() if t.cols.stop <= 6]
    assert report.tiles_reused == len(inside) > 0
    assert report.tiles_computed == report.tiles_total - len(inside)
    K = np.asarray(KernelStore.open(new).kernel[...])
    np.testing.assert_allclose(K, cnngp.readout_sweep(BODY, READOUTS, x).numpy(), rtol=1e-12, atol=0)
    reach = max(t.cols.stop for t in inside)
    assert K[:, :reach, :reach].tobytes() == np.asarray(KernelStore.open(old).kernel[:, :reach, :reach]).tobytes()
    assert KernelStore.open(new).complete()
    # times: each new tile is charged, for every pair (r <= c) it takes, that pair's share of the
    # old tile that computed it (6 pairs on the diagonal, 9 off it), counted pair by pair here
    old_seconds = {name: r["seconds"] for name, r in _records(old).items()}
    records = _records(new)
    for t in inside:
        want = sum(old_seconds[f"tile-{r // 3}-{c // 3}"] / (6 if r // 3 == c // 3 else 9)
                   for r in range(t.rows.start, t.rows.stop) for c in range(t.cols.start, t.cols.stop) if r <= c)
        assert records[t.name]["seconds"] == pytest.approx(want, rel=1e-12)
        assert records[t.name]["reused_from"] == str(old)
    if 6 % tile == 0:  # the new tiles cover the old matrix: its time is charged once, in full
        assert sum(records[t.name]["seconds"] for t in inside) == pytest.approx(sum(old_seconds.values()), rel=1e-12)


@pytest.mark.parametrize("n, tile", [(6, 3), (5, 2), (4, 4)])
def test_a_store_of_more_images_lends_its_leading_block_whole(tmp_path, n, tile):
    """A kernel on the first n images of a larger store's: every tile is lent, none computed,
    and the matrix is the larger store's leading block to the bit (the images it keeps are
    the check that they are its first)."""
    x = _images(9)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x, readouts=READOUTS, out=old, tile=3, progress=False)
    plan = store_dry_run(BODY, x[:n], readouts=READOUTS, out=new, tile=tile, reuse=old, progress=False).dry_run
    assert plan["tiles"] == 0 and plan["tiles_lent"] == plan["tiles_total"]
    report = store_kernel(BODY, x[:n], readouts=READOUTS, out=new, tile=tile, reuse=old, progress=False)
    assert (report.tiles_reused, report.tiles_computed) == (report.tiles_total, 0)
    K = np.asarray(KernelStore.open(new).kernel[...])
    assert K.tobytes() == np.asarray(KernelStore.open(old).kernel[:, :n, :n]).tobytes()
    assert KernelStore.open(new).complete()


def test_a_store_of_more_images_whose_kept_images_were_altered_lends_nothing(tmp_path):
    """A larger lender is checked against the images it keeps, and those against the sha256 it
    recorded of the images it computed on: images altered after the fact (even where they
    now match this computation's) make it refuse, in one line, before any store is made."""
    x = _images(9)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x, readouts=READOUTS, out=old, tile=3, progress=False)
    altered = x.copy()
    altered[0] += 1e-3
    KernelStore.open(old).group["images"]["x1"][...] = altered  # its kernel is still of x
    with pytest.raises(CNNGPError, match=r"^--reuse: .*old\.zarr': its stored images \(x1\) cannot be read or do "
                                         r"not match the sha256 it recorded"):
        store_kernel(BODY, altered[:6], readouts=READOUTS, out=new, tile=3, reuse=old, progress=False)
    assert not new.exists()


def test_a_rectangular_store_lends_where_both_image_sets_overlap(tmp_path):
    """x1 × x2 with more rows and fewer columns than the old store (and another tile size):
    the blocks within the old rows and the new columns are lent, the rest computed."""
    x1, x2 = _images(9, seed=1), _images(9, seed=2)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x1[:6], x2, readouts=READOUTS, out=old, tile=3, progress=False)
    report = store_kernel(BODY, x1, x2[:5], readouts=READOUTS, out=new, tile=2, reuse=old, progress=False)
    # row blocks of 2 over 9 rows (3 end by row 6) × column blocks over 5 columns (3)
    assert (report.tiles_total, report.tiles_reused, report.tiles_computed) == (15, 9, 6)
    K = np.asarray(KernelStore.open(new).kernel[...])
    np.testing.assert_allclose(K, cnngp.readout_sweep(BODY, READOUTS, x1, x2[:5]).numpy(), rtol=1e-12, atol=0)
    assert K[:, :6].tobytes() == np.asarray(KernelStore.open(old).kernel[:, :6, :5]).tobytes()


def test_a_new_tile_is_lent_only_if_every_old_tile_it_takes_from_is_intact(tmp_path, capsys):
    """An old tile without a record lends none of its entries (the dry run, from records), and
    one whose mirror chunk no longer matches its record's mirror hash is computed after all
    (the copy, which reads the bytes): both are checked per old tile, mirror parts included."""
    x = _images(9)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x, readouts=READOUTS, out=old, tile=3, progress=False)
    (old / "records" / "tile-2-2.json").unlink()
    damaged = KernelStore.open(old)
    damaged.kernel[1, 4, 1] = damaged.kernel[1, 4, 1] + 1.0  # tile-0-1's mirror chunk (rows 3-5, cols 0-2)
    plan = store_dry_run(BODY, x, readouts=READOUTS, out=new, tile=2, reuse=old, progress=False).dry_run
    # new tiles of 2 that meet images 6-8 in both rows and columns take entries from tile-2-2
    needs_2_2 = lambda t: t.rows.stop > 6 and t.cols.stop > 6  # noqa: E731
    expected_lent = {t.name for t in tile_plan(9, None, 2) if not needs_2_2(t)}
    assert plan["tiles_lent"] == len(expected_lent) and not new.exists()
    capsys.readouterr()
    report = store_kernel(BODY, x, readouts=READOUTS, out=new, tile=2, reuse=old, progress=True)
    assert report.tiles_lend_refused == 1  # said, not silent
    assert f"(1 that {old} would lend did not match their records there or could not be read: computed)" \
        in capsys.readouterr().err
    records = _records(new)
    lent = {n for n, r in records.items() if "reused_from" in r}
    # of the new tiles, only tile-1-1 (images 2-3 × 2-3) takes an entry from rows 3-5 × cols
    # 0-2, the damaged mirror chunk (its entry (3, 2)): it alone is computed after all, while
    # tile-0-1 (images 0-1 × 2-3) takes tile-0-1's intact upper chunk
    assert "tile-1-1" not in lent and "tile-1-1" in records
    assert lent == expected_lent - {"tile-1-1"}
    assert report.tiles_reused == len(lent)
    np.testing.assert_allclose(np.asarray(KernelStore.open(new).kernel[...]),
                               cnngp.readout_sweep(BODY, READOUTS, x).numpy(), rtol=1e-12, atol=0)


def test_a_grown_rectangular_store_lends_along_both_image_sets(tmp_path):
    """x1 (rows) and x2 (columns) each begin with the source's images: the tiles within both
    prefixes are lent, the ragged last row block included when it is the same block."""
    x1, x2 = _images(4, seed=1), _images(9, seed=2)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x1, x2[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    report = store_kernel(BODY, x1, x2, readouts=READOUTS, out=new, tile=3, reuse=old, progress=False)
    assert (report.tiles_total, report.tiles_reused, report.tiles_computed) == (6, 4, 2)
    want = cnngp.readout_sweep(BODY, READOUTS, x1, x2).numpy()
    np.testing.assert_allclose(np.asarray(KernelStore.open(new).kernel[...]), want, rtol=1e-12, atol=0)


def test_only_finished_intact_tiles_are_lent_and_the_dry_run_counts_them(tmp_path):
    x = _images(9)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    (old / "records" / "tile-0-1.json").unlink()  # as if stopped before that tile was recorded
    plan = store_dry_run(BODY, x, readouts=READOUTS, out=new, tile=3, reuse=old, progress=False).dry_run
    assert (plan["tiles"], plan["tiles_lent"], plan["tiles_total"]) == (4, 2, 6) and not new.exists()
    # the copies are written too: the disk the run needs is that of the whole store
    whole = store_dry_run(BODY, x, readouts=READOUTS, out=new, tile=3, progress=False).dry_run
    assert plan["disk_bytes"] == whole["disk_bytes"] and whole["tiles_lent"] == 0
    assert f"plan: 4 tiles of 3 to compute (of 6; 2 copied from {old} (--reuse))" in describe_dry_run(plan)
    report = store_kernel(BODY, x, readouts=READOUTS, out=new, tile=3, reuse=old, progress=False)
    assert (report.tiles_reused, report.tiles_computed) == (2, 4)
    np.testing.assert_allclose(np.asarray(KernelStore.open(new).kernel[...]),
                               cnngp.readout_sweep(BODY, READOUTS, x).numpy(), rtol=1e-12, atol=0)


def test_a_lent_tile_whose_bytes_no_longer_match_its_record_is_computed_not_copied(tmp_path):
    """Tiles are chosen by their records (the dry run reads no kernel bytes); each block is
    checked against its record's sha256 as it is copied, and one that fails is computed."""
    x = _images(9)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    damaged = KernelStore.open(old)
    damaged.kernel[0, 0, 4] = damaged.kernel[0, 0, 4] + 1.0  # tile-0-1's block, its record kept
    plan = store_dry_run(BODY, x, readouts=READOUTS, out=new, tile=3, reuse=old, progress=False).dry_run
    assert plan["tiles"] == 3  # priced as lent: only a copy reads the bytes
    report = store_kernel(BODY, x, readouts=READOUTS, out=new, tile=3, reuse=old, progress=False)
    assert (report.tiles_reused, report.tiles_computed) == (2, 4)
    records = _records(new)
    assert "reused_from" not in records["tile-0-1"]
    assert {n for n, r in records.items() if "reused_from" in r} == {"tile-0-0", "tile-1-1"}
    np.testing.assert_allclose(np.asarray(KernelStore.open(new).kernel[...]),
                               cnngp.readout_sweep(BODY, READOUTS, x).numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("change, message", [
    (dict(body=cnngp.Serial(cnngp.Conv(3), cnngp.ReLU())), "different network spec"),
    (dict(readouts=[READOUTS[0], cnngp.Readout(correlation=cnngp.Matern(1.5, 9.0))]),
     r"different readouts \(it lacks 1 of this computation's 2 readouts"),
    (dict(dtype="float32"), "different dtype"),
    (dict(flip="mirror"), r"different flip averaging \(no flip; this computation: the mirror term\)"),
    (dict(images=lambda x: x[::-1]), r"computed on 6 images \(x1\) that are not the first 6 of this "
                                     r"computation's 9"),
    (dict(images=lambda x: x[1:6]), r"computed on 6 images \(x1\) whose first 5 are not this computation's 5"),
    (dict(x2=True), r"holds a x1 × x1 kernel; this one is x1 × x2"),
])
def test_a_store_of_another_computation_lends_nothing_and_is_refused_naming_reuse(tmp_path, change, message):
    x = _images(9)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    images = change.get("images", lambda v: v)(x)
    x2 = _images(3, seed=5) if change.get("x2") else None
    with pytest.raises(CNNGPError, match=rf"^--reuse: .*old\.zarr'.*{message}"):
        store_kernel(change.get("body", BODY), images, x2, readouts=change.get("readouts", READOUTS), out=new,
                     tile=change.get("tile", 3), dtype=change.get("dtype", "float64"),
                     flip=change.get("flip", False), reuse=old, progress=False)
    # the old store is untouched, and the refused run made no store
    assert KernelStore.open(old).complete() and len(_records(old)) == 3
    assert not new.exists()


def test_reuse_refuses_the_store_being_computed(tmp_path):
    x = _images(6)
    out = tmp_path / "k.zarr"
    store_kernel(BODY, x, readouts=READOUTS, out=out, tile=3, progress=False)
    (out / "records" / "tile-0-1.json").unlink()
    with pytest.raises(CNNGPError, match=r"^--reuse: .*k\.zarr'.* is the store being computed"):
        store_kernel(BODY, x, readouts=READOUTS, out=out, tile=3, reuse=out, progress=False)


def test_cli_kernel_reuse_grows_a_store_and_refuses_misuse_in_one_line(tmp_path, capsys):
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    common = ["kernel", "--arch", "cnngp2", "--lengthscales", "0,2", "--quiet", "--tile", "3"]
    assert main(common + ["--x1", "digits:6", "--out", str(old)]) == 0
    capsys.readouterr()
    assert main([a for a in common if a != "--quiet"] + ["--x1", "digits:9", "--out", str(new), "--reuse", str(old)]) == 0
    assert f"3 reused from {old}" in capsys.readouterr().err
    assert main(["info", str(new)]) == 0
    out = capsys.readouterr().out
    assert f"; 3 tile(s) copied from {old} (--reuse)" in out
    assert "s wall of it spent in the store the copied tiles came from)" in out
    fresh = tmp_path / "fresh.zarr"
    assert main(common + ["--x1", "digits:9", "--out", str(fresh)]) == 0
    np.testing.assert_allclose(np.asarray(KernelStore.open(new).kernel[...]),
                               np.asarray(KernelStore.open(fresh).kernel[...]), rtol=1e-12, atol=0)
    capsys.readouterr()
    for extra, pattern in [
        (["--out", str(tmp_path / "k.npz"), "--reuse", str(old)], r"--reuse: needs --out K\.zarr"),
        (["--out", str(new), "--reuse", str(new)], r"--reuse: .*new\.zarr' is the store of --out"),
        (["--out", str(tmp_path / "b.zarr"), "--reuse", str(tmp_path / "none.zarr")],
         r"--reuse: kernel store .*none\.zarr' does not exist"),
    ]:
        assert main(common[:-2] + ["--x1", "digits:9"] + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(pattern, err[0]), err


def test_sweep_reuse_at_a_larger_n_reproduces_a_sweep_from_scratch(tmp_path, capsys):
    """An earlier sweep's stores (--n 40, train and test) lend to one at --n 40,80: the
    balanced training subset of 80 begins with that of 40, so its results are those of a
    sweep from scratch, and a quarter of the train tiles and half the test tiles are lent."""
    data = digits_npz(tmp_path / "d.npz")
    argv = ["sweep", "--arch", "cnngp1", "--data", str(data), "--lengthscales", "0.5,5", "--test", "all",
            "--n-test", "30", "--tile", "20", "--quiet", "--yes"]
    assert main(argv + ["--n", "40", "--store", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "a")]) == 0
    grown, fresh = _grown_and_fresh(argv, tmp_path, tmp_path / "s1.zarr")
    assert _lent(tmp_path / "s2.zarr") == ["tile-0-0", "tile-0-1", "tile-1-1"]  # of 10
    assert _lent(tmp_path / "s2-test.zarr") == ["tile-0-0", "tile-0-1", "tile-1-0", "tile-1-1"]  # of 8
    scored = 0
    for a, b in zip(grown["results"], fresh["results"], strict=True):
        assert a.keys() == b.keys()
        for key in ("cv_accuracy", "noise_variance", "test_accuracy", "test_nll", "test_ece"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
                scored += key == "test_accuracy"
    assert scored == 8  # independent, the two λ, mean pool: trained on the 80, and on each block of 40
    assert "--reuse" not in grown["config"]["command"]  # how, not what: the numbers are a fresh sweep's
    capsys.readouterr()
    # refused before any work: without --store, or with a store that is not there
    untiled = [a for a in argv if a not in ("--tile", "20")]
    assert main(untiled + ["--n", "40", "--reuse", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "d")]) == 2
    assert "--reuse: needs --store K.zarr" in capsys.readouterr().err
    assert main(argv + ["--n", "40", "--store", str(tmp_path / "s4.zarr"), "--reuse", str(tmp_path / "no.zarr"),
                        "--out", str(tmp_path / "e")]) == 2
    assert "--reuse: kernel store" in capsys.readouterr().err and not (tmp_path / "s4.zarr").exists()


def test_a_flip_averaged_store_grows_the_same_way(tmp_path):
    """Flip-averaged kernels (their identity's flip setting the same) are lent like plain ones;
    the grown kernel is the flip average computed from scratch."""
    x = _images(9, seed=3)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, flip=True, progress=False)
    report = store_kernel(BODY, x, readouts=READOUTS, out=new, tile=3, flip=True, reuse=old, progress=False)
    assert (report.tiles_reused, report.tiles_computed) == (3, 3)
    np.testing.assert_allclose(np.asarray(KernelStore.open(new).kernel[...]),
                               cnngp.readout_sweep(BODY, READOUTS, x, flip=True).numpy(), rtol=1e-12, atol=0)


def test_sweep_reuse_of_a_test_best_sweep_lends_its_train_kernels_alone(tmp_path):
    """An earlier sweep with --test best keeps one readout's test kernels: they cannot lend to
    a --test all sweep's 4 readouts, so only its train kernels are lent (no refusal), and a
    --test best sweep that chooses the same readout is lent its test kernels too."""
    data = digits_npz(tmp_path / "d.npz")
    argv = ["sweep", "--arch", "cnngp1", "--data", str(data), "--lengthscales", "0.5,5", "--n-test", "30",
            "--tile", "20", "--quiet", "--yes"]
    assert main(argv + ["--test", "best", "--n", "40", "--store", str(tmp_path / "s1.zarr"),
                        "--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--test", "all", "--n", "40,80", "--store", str(tmp_path / "s2.zarr"),
                        "--reuse", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "b")]) == 0
    assert _lent(tmp_path / "s2.zarr") == ["tile-0-0", "tile-0-1", "tile-1-1"]
    assert _lent(tmp_path / "s2-test.zarr") == []
    first = json.loads((tmp_path / "a" / "results.json").read_text())["test"]
    # the same N and readouts again with --test best: the same readout is chosen, its test kernels lent
    assert main(argv + ["--test", "best", "--n", "40", "--store", str(tmp_path / "s3.zarr"),
                        "--reuse", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "c")]) == 0
    again = json.loads((tmp_path / "c" / "results.json").read_text())["test"]
    assert (again["readout"], again["lengthscale"]) == (first["readout"], first["lengthscale"])
    assert _lent(tmp_path / "s3-test.zarr") == ["tile-0-0", "tile-0-1", "tile-1-0", "tile-1-1"]
    assert again["test_accuracy"] == first["test_accuracy"]


def test_sweep_reuse_with_other_test_images_lends_the_train_kernel_and_warns(tmp_path, capsys):
    """A sweep on other test images (the same file's test images in reverse: not those the old
    sweep's begin with) than the sweep it grows: the old test store cannot lend, so the test
    kernel is computed in full with a one-line warning, and the train kernel is still lent.
    Oracle: the same sweep from scratch."""
    data = digits_npz(tmp_path / "d.npz")
    other = tmp_path / "reversed-test.npz"
    with np.load(data) as f:
        np.savez(other, **{k: f[k][::-1] if k.endswith("_test") else f[k] for k in f.files})
    argv = ["sweep", "--arch", "cnngp1", "--lengthscales", "0.5,5", "--tile", "20",
            "--test", "all", "--quiet", "--yes"]
    assert main(argv + ["--data", str(data), "--n-test", "30", "--n", "40", "--store", str(tmp_path / "s1.zarr"),
                        "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(argv + ["--data", str(other), "--n-test", "20", "--n", "40,80", "--store", str(tmp_path / "s2.zarr"),
                        "--reuse", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"--reuse: .*s1-test\.zarr' was computed on 30 images \(x1\) whose first 20 are not this "
                     r"computation's 20.*s2-test\.zarr' is computed in full", err), err
    assert _lent(tmp_path / "s2.zarr") == ["tile-0-0", "tile-0-1", "tile-1-1"]
    assert _lent(tmp_path / "s2-test.zarr") == []
    assert main(argv + ["--data", str(other), "--n-test", "20", "--n", "40,80", "--store", str(tmp_path / "s3.zarr"),
                        "--out", str(tmp_path / "c")]) == 0
    grown, fresh = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("b", "c"))
    assert grown["test"]["test_accuracy"] == fresh["test"]["test_accuracy"]


def test_a_sweep_at_a_smaller_n_takes_every_tile_from_a_larger_sweeps_stores(tmp_path, capsys):
    """A sweep at --n 40 on the first 20 test images, given the stores of one at --n 40,80 on
    30 (another tile size): its training subset and test images are the first of those, so
    every train and test tile is lent and none computed. Oracle: the same sweep from scratch."""
    data = digits_npz(tmp_path / "d.npz")
    argv = ["sweep", "--arch", "cnngp1", "--data", str(data), "--lengthscales", "0.5,5", "--test", "all",
            "--quiet", "--yes"]
    assert main(argv + ["--n", "40,80", "--n-test", "30", "--tile", "20", "--store", str(tmp_path / "big.zarr"),
                        "--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--n", "40", "--n-test", "20", "--tile", "16", "--store", str(tmp_path / "small.zarr"),
                        "--reuse", str(tmp_path / "big.zarr"), "--out", str(tmp_path / "b")]) == 0
    assert main(argv + ["--n", "40", "--n-test", "20", "--tile", "16", "--store", str(tmp_path / "fresh.zarr"),
                        "--out", str(tmp_path / "c")]) == 0
    for name in ("small.zarr", "small-test.zarr"):
        records = _records(tmp_path / name)
        assert records and all(r.get("reused_from") for r in records.values()), name
    grown, fresh = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("b", "c"))
    for a, b in zip(grown["results"], fresh["results"], strict=True):
        for key in ("cv_accuracy", "noise_variance", "test_accuracy", "test_nll"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key


def test_sweep_reuse_across_a_refitted_whitening_is_refused_saying_why(tmp_path, capsys):
    """With --zca the whitening is fitted on the N_max training images: a larger N refits it, so
    its images are not the old store's, and the refusal says it is the whitening."""
    data = digits_npz(tmp_path / "d.npz")
    argv = ["sweep", "--arch", "cnngp1", "--data", str(data), "--lengthscales", "0.5", "--tile", "20", "--quiet",
            "--yes", "--zca", "0.1"]
    assert main(argv + ["--n", "40", "--store", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    assert main(argv + ["--n", "40,80", "--store", str(tmp_path / "s2.zarr"), "--reuse", str(tmp_path / "s1.zarr"),
                        "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"^cnngp: error: --reuse: .*s1\.zarr' was computed on 40 images \(x1\) that are not the first "
                     r"40 of this computation's 80; .*; its images were whitened by ZCA of strength 0\.1 fitted on "
                     r"the N_max training subset", err), err
    assert not (tmp_path / "s2.zarr").exists()


def test_sweep_reuse_with_a_whitening_fitted_outside_the_larger_n_lends_and_reproduces(tmp_path, capsys):
    """--zca-fit rest --zca-fit-outside 80: the sweeps at N_max = 40 and 80 whiten with one fit
    (on the images outside the balanced 80), so the N = 40 stores lend their tiles as without
    whitening, and the grown sweep's numbers are those of the same sweep from scratch."""
    data = digits_npz(tmp_path / "d.npz")
    argv = ["sweep", "--arch", "cnngp1", "--data", str(data), "--lengthscales", "0.5", "--test", "all",
            "--n-test", "30", "--tile", "20", "--quiet", "--yes", "--zca", "0.1", "--zca-fit", "rest",
            "--zca-fit-outside", "80"]
    assert main(argv + ["--n", "40", "--store", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "a")]) == 0
    grown, fresh = _grown_and_fresh(argv, tmp_path, tmp_path / "s1.zarr")
    assert _lent(tmp_path / "s2.zarr") == ["tile-0-0", "tile-0-1", "tile-1-1"]
    assert _lent(tmp_path / "s2-test.zarr") == ["tile-0-0", "tile-0-1", "tile-1-0", "tile-1-1"]
    small = json.loads((tmp_path / "a" / "results.json").read_text())
    assert small["config"]["zca_fit"] == grown["config"]["zca_fit"]  # one whitening for both N_max
    assert small["config"]["zca_fit"]["fit_outside"] == 80
    assert small["config"]["zca_fit"]["fitted_on"] == 600 - 80  # the 600 training images of d.npz but the 80
    for a, b in zip(grown["results"], fresh["results"], strict=True):
        for key in ("cv_accuracy", "noise_variance", "test_accuracy", "test_nll"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
    # the stores keep what they were whitened with: another --zca-fit-outside is refused naming both
    capsys.readouterr()
    other = [a if a != "80" else "120" for a in argv]
    assert main(other + ["--n", "40", "--store", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"cnngp: error: --zca: .*s1\.zarr' holds kernels of images whitened by ZCA fitted on the "
                        r"training images outside the balanced 80 \(unlabelled\), not on the training images outside "
                        r"the balanced 120 \(unlabelled\) \(--zca-fit rest --zca-fit-outside 120\); .*", err), err


def test_dask_workers_assemble_lent_tiles_of_another_size(tmp_path, dask_cluster):
    """On a cluster each lent tile is a worker's task (cut from, or assembled out of, the old
    tiles): the same tiles lent, and the same matrix, as in one process."""
    x = _images(9)
    old = tmp_path / "old.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    alone = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "alone.zarr", tile=2, reuse=old, progress=False)
    spread = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "spread.zarr", tile=2, reuse=old,
                          scheduler=dask_cluster, progress=False)
    assert spread.tiles_reused == alone.tiles_reused == 6  # blocks of 2 within the first 6: 3 × 4 / 2
    assert spread.tiles_lend_refused == alone.tiles_lend_refused == 0
    # a lender chunk damaged since: the workers' copies of the tiles that need it fail their check,
    # are computed instead, and the report counts them (tile-0-0 of the old store: images 0-2)
    damaged = KernelStore.open(old)
    damaged.kernel[0, 0, 0] = damaged.kernel[0, 0, 0] + 1.0
    again = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "again.zarr", tile=2, reuse=old,
                         scheduler=dask_cluster, progress=False)
    assert (again.tiles_reused, again.tiles_lend_refused) == (3, 3)  # new tiles 0-0, 0-1 and 1-1 need it
    np.testing.assert_allclose(np.asarray(KernelStore.open(tmp_path / "again.zarr").kernel[...]),
                               cnngp.readout_sweep(BODY, READOUTS, x).numpy(), rtol=1e-12, atol=0)
    assert _lent(tmp_path / "spread.zarr") == _lent(tmp_path / "alone.zarr")
    assert np.asarray(KernelStore.open(tmp_path / "spread.zarr").kernel[...]).tobytes() == \
        np.asarray(KernelStore.open(tmp_path / "alone.zarr").kernel[...]).tobytes()


def test_a_tile_archive_lends_as_its_store_would(tmp_path):
    """The store gone, its tile archive lends (another tile size: parts of its tiles, mirror
    parts as transposes of the archived tiles): the same tiles lent, the same bytes, as the store
    itself lends. A damaged archived tile lends nothing: the tiles that need it are computed."""
    import shutil

    x = _images(9)
    old, archive = tmp_path / "old.zarr", tmp_path / "old-archive"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, archive=archive, progress=False)
    by_store = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "a.zarr", tile=2, reuse=old, progress=False)
    old_kernel = np.asarray(KernelStore.open(old).kernel[...])
    shutil.rmtree(old)
    by_archive = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "b.zarr", tile=2, reuse=archive,
                              progress=False)
    assert by_archive.tiles_reused == by_store.tiles_reused == 6
    K = np.asarray(KernelStore.open(tmp_path / "b.zarr").kernel[...])
    assert K.tobytes() == np.asarray(KernelStore.open(tmp_path / "a.zarr").kernel[...]).tobytes()
    assert K[:, :6, :6].tobytes() == old_kernel.tobytes()
    lent = {n: r for n, r in _records(tmp_path / "b.zarr").items() if "reused_from" in r}
    assert {r["reused_from"] for r in lent.values()} == {str(archive)} and len(lent) == 6
    # tile-0-1 of the archive (images 0-2 × 3-5) damaged: every new tile that takes from it, or
    # from its transpose, is computed; tile-0-0 (images 0-1) and tile-2-2 (images 4-5) are not
    data = (archive / "tile-0-1.bin").read_bytes()
    (archive / "tile-0-1.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    report = store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "c.zarr", tile=2, reuse=archive,
                          progress=False)
    lent = {n for n, r in _records(tmp_path / "c.zarr").items() if "reused_from" in r}
    assert lent == {"tile-0-0", "tile-2-2"} and report.tiles_reused == 2
    np.testing.assert_allclose(np.asarray(KernelStore.open(tmp_path / "c.zarr").kernel[...]),
                               cnngp.readout_sweep(BODY, READOUTS, x).numpy(), rtol=1e-12, atol=0)


def test_a_tile_archive_of_more_images_is_refused_saying_to_restore_it(tmp_path):
    """An archive keeps no images, so a kernel on fewer cannot check that they are its first:
    refused in one line naming --reuse and the remedy, before any store is made."""
    x = _images(9)
    archive = tmp_path / "archive"
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "old.zarr", tile=3, archive=archive, progress=False)
    with pytest.raises(CNNGPError, match=r"^--reuse: .*archive' is a tile archive of a kernel on more images "
                                         r"\(x1: 9\) than this computation has \(6\).*restore it into a store first"):
        store_kernel(BODY, x[:6], readouts=READOUTS, out=tmp_path / "new.zarr", tile=3, reuse=archive,
                     progress=False)
    assert not (tmp_path / "new.zarr").exists()


def test_sweep_reuse_of_an_earlier_sweeps_archive_folder_reproduces_a_sweep_from_scratch(tmp_path, capsys):
    """A new machine with only an earlier sweep's --archive folder (train/, test/) grows it
    directly: --reuse DIR lends from its train and test archives as the stores would. Oracle:
    the same sweep from scratch."""
    import shutil

    data = digits_npz(tmp_path / "d.npz")
    argv = ["sweep", "--arch", "cnngp1", "--data", str(data), "--lengthscales", "0.5,5", "--test", "all",
            "--n-test", "30", "--tile", "20", "--quiet", "--yes"]
    assert main(argv + ["--n", "40", "--store", str(tmp_path / "s1.zarr"), "--archive", str(tmp_path / "arch"),
                        "--out", str(tmp_path / "a")]) == 0
    for name in ("s1.zarr", "s1-test.zarr"):
        shutil.rmtree(tmp_path / name)
    grown, fresh = _grown_and_fresh(argv, tmp_path, tmp_path / "arch")
    assert _lent(tmp_path / "s2.zarr") == ["tile-0-0", "tile-0-1", "tile-1-1"]
    assert _lent(tmp_path / "s2-test.zarr") == ["tile-0-0", "tile-0-1", "tile-1-0", "tile-1-1"]
    for a, b in zip(grown["results"], fresh["results"], strict=True):
        for key in ("cv_accuracy", "noise_variance", "test_accuracy", "test_nll"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
    capsys.readouterr()
    # an archive folder whose test archive is gone: the train kernel is still lent, and the
    # sweep says the test part lends nothing (not silently)
    (tmp_path / "arch" / "test" / "archive.json").unlink()
    assert main(argv + ["--n", "40,80", "--store", str(tmp_path / "s5.zarr"), "--reuse", str(tmp_path / "arch"),
                        "--out", str(tmp_path / "f")]) == 0
    err = capsys.readouterr().err
    assert f"--reuse: '{tmp_path / 'arch' / 'test'}' is not of the test kernel this run computes" in err
    assert _lent(tmp_path / "s5.zarr") == ["tile-0-0", "tile-0-1", "tile-1-1"] and not _lent(tmp_path / "s5-test.zarr")
    # a folder that is neither a store nor an archive: one line, before any work
    (tmp_path / "empty").mkdir()
    assert main(argv + ["--n", "40", "--store", str(tmp_path / "s4.zarr"), "--reuse", str(tmp_path / "empty"),
                        "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnngp: error: --reuse: ") and err.count("\n") == 1 and not (tmp_path / "s4.zarr").exists()
    assert "is neither a kernel store (zarr.json) nor a tile archive (archive.json)" in err


def test_a_test_best_sweeps_plan_prices_the_readout_its_lender_holds(tmp_path, capsys):
    """``--test best`` chooses its readout after the CV, so its plan guesses: the one readout
    the lender's test store holds (an earlier sweep's choice, which it would lend, at that
    store's tile size). Oracle: the real run then computes exactly the planned test tiles."""
    data = digits_npz(tmp_path / "d.npz")
    argv = ["sweep", "--arch", "cnngp1", "--data", str(data), "--lengthscales", "0.5,5", "--test", "best",
            "--n-test", "30", "--quiet", "--yes"]
    assert main(argv + ["--n", "40", "--store", str(tmp_path / "s1.zarr"), "--tile", "8",
                        "--out", str(tmp_path / "a")]) == 0
    grow = argv + ["--n", "40,80", "--store", str(tmp_path / "s2.zarr"), "--reuse", str(tmp_path / "s1.zarr"),
                   "--out", str(tmp_path / "b")]
    capsys.readouterr()
    assert main(grow + ["--dry-run"]) == 0
    planned = json.loads(capsys.readouterr().out)["kernels"][1]
    assert (planned["tile"], planned["tiles"], planned["tiles_lent"], planned["tiles_total"]) == (8, 20, 20, 40)
    assert main(grow) == 0
    chosen = [json.loads((tmp_path / d / "results.json").read_text())["test"]["lengthscale"] for d in "ab"]
    records = _records(tmp_path / "s2-test.zarr")
    computed = [r for r in records.values() if "reused_from" not in r]
    assert chosen[0] == chosen[1]  # on these data the CV at 80 chooses as the one at 40 did: the guess holds
    assert (len(records), len(computed), sum(r["pairs"] for r in computed)) == (40, planned["tiles"], planned["pairs"])


def test_a_store_of_more_readouts_lends_those_it_shares(tmp_path):
    """A lender of more readouts lends the borrower's, taken from its rows (in the borrower's
    order, NNGP then NTK rows with both kernels); one that lacks a readout is refused naming
    how many. Oracle: the lender's rows, bit for bit, and the kernel from scratch."""
    x = _images(9)
    old = tmp_path / "old.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, get=("nngp", "ntk"), progress=False)
    some = [READOUTS[2], READOUTS[0]]  # two of the three, in another order
    new = tmp_path / "new.zarr"
    report = store_kernel(BODY, x, readouts=some, out=new, tile=2, get=("nngp", "ntk"), reuse=old, progress=False)
    assert report.tiles_reused == 6
    K, K_old = (np.asarray(KernelStore.open(p).kernel[...]) for p in (new, old))
    rows = [2, 0, 3 + 2, 3 + 0]  # NNGP λ = inf, λ = 0; NTK λ = inf, λ = 0
    assert K[:, :6, :6].tobytes() == np.ascontiguousarray(K_old[rows]).tobytes()
    nngp, ntk = cnngp.readout_sweep(BODY, some, x, get=("nngp", "ntk"))
    np.testing.assert_allclose(K, np.concatenate([nngp.numpy(), ntk.numpy()]), rtol=1e-12, atol=0)
    other = [cnngp.Readout(correlation=cnngp.Matern(1.5, 7.0)), READOUTS[0]]
    with pytest.raises(CNNGPError, match=r"^--reuse: .*old\.zarr' holds a kernel of different readouts \(it lacks "
                                         r"1 of this computation's 2 readouts"):
        store_kernel(BODY, x, readouts=other, out=tmp_path / "no.zarr", tile=2, get=("nngp", "ntk"), reuse=old,
                     progress=False)
    assert not (tmp_path / "no.zarr").exists()


def test_a_test_best_sweep_borrows_its_chosen_readout_from_a_test_all_sweeps_stores(tmp_path, capsys):
    """A --test all sweep's test store holds every readout, so it lends the one a later --test
    best sweep chooses. Oracle: the same --test best sweep from scratch."""
    data = digits_npz(tmp_path / "d.npz")
    argv = ["sweep", "--arch", "cnngp1", "--data", str(data), "--lengthscales", "0.5,5", "--n-test", "30",
            "--tile", "20", "--quiet", "--yes", "--n", "40"]
    assert main(argv + ["--test", "all", "--store", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--test", "best", "--store", str(tmp_path / "s2.zarr"), "--reuse", str(tmp_path / "s1.zarr"),
                        "--out", str(tmp_path / "b")]) == 0
    assert main(argv + ["--test", "best", "--store", str(tmp_path / "s3.zarr"), "--out", str(tmp_path / "c")]) == 0
    assert _lent(tmp_path / "s2-test.zarr") == ["tile-0-0", "tile-0-1", "tile-1-0", "tile-1-1"]  # all of them
    grown, fresh = (json.loads((tmp_path / d / "results.json").read_text()) for d in "bc")
    assert (grown["test"]["readout"], grown["test"]["lengthscale"]) == (fresh["test"]["readout"],
                                                                        fresh["test"]["lengthscale"])
    for key in ("test_accuracy", "test_nll", "test_ece"):
        assert grown["test"][key] == pytest.approx(fresh["test"][key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("grow", [True, False], ids=["lender-of-fewer", "lender-of-more"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_store_on_the_same_images_rounded_otherwise_lends_and_other_images_are_refused(tmp_path, grow, dtype):
    """A lender store whose sha256 differs from these images' compares the images it keeps:
    within rounding (last bits) it lends, and the kernel is that of these images to the
    dtype's rounding; one pixel moved beyond rounding, and it is refused, nothing made."""
    from cnngp.engine.lending import same_to_rounding

    x = _images(9).astype(dtype)
    old = tmp_path / "old.zarr"
    store_kernel(BODY, x[:6] if grow else x, readouts=READOUTS, out=old, tile=3, dtype=dtype, progress=False)
    y = _last_bits_changed(x, (slice(None), 2, 3, 1))
    n = 9 if grow else 6
    report = store_kernel(BODY, y[:n], readouts=READOUTS, out=tmp_path / "new.zarr", tile=3, reuse=old,
                          dtype=dtype, progress=False)
    assert report.tiles_reused == 3 if grow else report.tiles_reused == report.tiles_total
    K = np.asarray(KernelStore.open(tmp_path / "new.zarr").kernel[...])
    want = cnngp.readout_sweep(BODY, READOUTS, y[:n], dtype=dtype).numpy()
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(K, want, rtol=tol, atol=tol * np.abs(want).max())
    # the rule itself: last bits pass; a pixel moved by 1e-6 of the scale, another shape or dtype do not
    assert same_to_rounding(x, y) and not same_to_rounding(x, y[:5]) and not same_to_rounding(None, y)
    assert not same_to_rounding(x.astype(np.float64 if dtype == "float32" else np.float32), y)
    moved = y.copy()
    moved[4, 0, 0, 0] += 1e-6 * np.abs(y).max()
    assert not same_to_rounding(x, moved)
    with pytest.raises(CNNGPError, match=r"^--reuse: .*old\.zarr' was computed on .*images \(x1\)"):
        store_kernel(BODY, moved[:n], readouts=READOUTS, out=tmp_path / "other.zarr", tile=3, reuse=old,
                     dtype=dtype, progress=False)
    assert not (tmp_path / "other.zarr").exists()


def test_an_archive_lender_on_images_rounded_otherwise_is_refused_saying_to_restore_it(tmp_path):
    """An archive keeps no images to compare: its lending is refused, with the remedy (restore
    it with its own command, which checks the images by computing pairs again)."""
    x = _images(6)
    archive = tmp_path / "archive"
    store_kernel(BODY, x, readouts=READOUTS, out=tmp_path / "old.zarr", tile=3, archive=archive, progress=False)
    y = np.concatenate([_last_bits_changed(x, (slice(None), 0, 0, 0)), _images(3, seed=4)])
    with pytest.raises(CNNGPError, match=r"^--reuse: .*archive' was computed on .*an archive keeps no images to "
                                         r"compare: restore it into a store first"):
        store_kernel(BODY, y, readouts=READOUTS, out=tmp_path / "new.zarr", tile=3, reuse=archive, progress=False)
    restored = store_kernel(BODY, y[:6], readouts=READOUTS, out=tmp_path / "restored.zarr", archive=archive,
                            progress=False)
    assert (restored.tiles_restored, restored.tiles_computed) == (3, 0)  # the remedy, checked by pairs
    grown = store_kernel(BODY, y, readouts=READOUTS, out=tmp_path / "new.zarr", tile=3,
                         reuse=tmp_path / "restored.zarr", progress=False)
    assert (grown.tiles_reused, grown.tiles_computed) == (3, 3)

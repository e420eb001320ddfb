"""Scale out: the tile plan, the Zarr kernel store, resume and repair, a real Dask LocalCluster
(2 worker processes) with a worker killed mid-run, SIGKILL and SIGINT of the whole run, and the
sweep from a store. Every matrix is compared bit for bit with the single-process kernel()."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cnngp
from cnngp.engine import timing
from cnngp.cli.main import main
from cnngp.engine.distributed import choose_tile, dask_client, store_kernel
from cnngp.engine.gram import GramPlan, tile_plan
from cnngp.engine.store import KernelStore, StoredReadouts
from cnngp.errors import CNNGPError

pytest.importorskip("zarr")
pytest.importorskip("distributed")

NET = cnngp.io.architectures.get("cnngp2")
BODY = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU())
READOUTS = [cnngp.Readout(correlation=cnngp.Matern(1.5, lam)) for lam in (0.0, 1.0, float("inf"))]


def _images(n, shape=(6, 6, 3), seed=0):
    return np.random.default_rng(seed).uniform(size=(n,) + shape)


def _cli(*argv):
    return main([str(a) for a in argv])


# -- the tile plan ------------------------------------------------------------------------


@pytest.mark.parametrize("n1,n2", [(7, None), (1, None), (10, None), (7, 3), (3, 11), (1, 1)])
@pytest.mark.parametrize("tile", [1, 2, 3, 5, 16])
def test_tiles_cover_every_entry_exactly_once(n1, n2, tile):
    count = np.zeros((n1, n1 if n2 is None else n2), dtype=int)
    for t in tile_plan(n1, n2, tile):
        assert t.rows.stop - t.rows.start <= tile and t.cols.stop - t.cols.start <= tile
        block = np.zeros_like(count)
        block[t.rows, t.cols] = 1
        if t.diagonal:  # only pairs r <= c are computed, then mirrored
            block[t.rows, t.cols] = np.triu(block[t.rows, t.cols]) + np.tril(block[t.rows, t.cols], -1)
        count += block
        if t.mirror:
            count[t.cols, t.rows] += 1
    assert (count == 1).all()
    n_pairs = n1 * (n1 + 1) // 2 if n2 is None else n1 * n2
    assert sum(t.pairs for t in tile_plan(n1, n2, tile)) == n_pairs


def test_tile_plan_refuses_bad_sizes():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(CNNGPError, match="tile"):
            tile_plan(4, None, bad)


def test_default_tile_fits_the_budget_and_balances_the_workers():
    plan = GramPlan(NET, (6, 6, 3))
    grids = {1: (6, 6), 3: (6, 6)}
    assert choose_tile(plan, 1000, None, grids, 2 * 1024**3, 2) == 256  # 10 tiles >= 4 per worker
    assert choose_tile(plan, 3000, None, grids, 2 * 1024**3, 1) == 1024  # 6 tiles
    assert choose_tile(plan, 10, None, grids, 2 * 1024**3, 1) == 10  # never wider than the matrix
    small = choose_tile(plan, 50_000, None, grids, 8 * 1024**2, 1)  # 8 MiB: small tiles
    from cnngp.engine.distributed import tile_bytes

    assert tile_bytes(plan, small, grids) <= 4 * 1024**2 or small == 16


# -- the store, single process --------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("tile", [1, 3, 4, 20])
def test_store_equals_kernel_bit_for_bit(tmp_path, dtype, tile):
    x = _images(9)
    whole = cnngp.kernel(NET, x, dtype=dtype).numpy()
    report = store_kernel(NET, x, out=tmp_path / "k.zarr", tile=tile, dtype=dtype, progress=False)
    assert report.tiles_computed == report.tiles_total == len(tile_plan(9, None, tile))
    store = KernelStore.open(tmp_path / "k.zarr")
    assert store.kernel.dtype == np.dtype(dtype)
    assert np.array_equal(np.asarray(store.kernel[0]), whole)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_any_subset_of_a_fused_path_store_equals_its_own_kernel(tmp_path, dtype):
    """The full position-pair tensor on the fused CPU path (global pooling): the store's entries
    for any subset of images equal kernel() of that subset bit for bit — self records do not
    depend on which images share a call (gram.SELF_BATCH)."""
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.AvgPool(2), cnngp.Conv(3), cnngp.ReLU(),
                       cnngp.Readout(correlation=cnngp.Constant()))
    x = _images(37, shape=(8, 8, 3), seed=8)
    store_kernel(net, x, out=tmp_path / "k.zarr", tile=11, dtype=dtype, progress=False)
    stored = np.asarray(KernelStore.open(tmp_path / "k.zarr").kernel[0])
    assert np.array_equal(stored, cnngp.kernel(net, x, dtype=dtype).numpy())
    for seed in range(3):
        idx = np.sort(np.random.default_rng(seed).choice(37, 9, replace=False))
        assert np.array_equal(stored[np.ix_(idx, idx)], cnngp.kernel(net, x[idx], dtype=dtype).numpy())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_self_records_do_not_depend_on_the_other_images_of_a_call(dtype):
    """A whole-N self pass and per-block passes (what a store's stage 1 runs) give the same bits
    (found on CIFAR-10 at 32×32: 1-ulp differences in float32 before every call got one shape)."""
    x = _images(100, shape=(16, 16, 3), seed=9)
    plan = GramPlan(cnngp.io.architectures.get("myrtle5"), x.shape[1:], dtype=dtype)
    xt = plan.images(x)
    whole = plan.self_records(xt).variances
    for sl in (slice(0, 7), slice(7, 40), slice(40, 100)):
        part = plan.self_records(xt[sl]).variances
        assert all(torch.equal(whole[k][sl], part[k]) for k in whole)


@pytest.mark.parametrize("tile", [2, 4, 10])
def test_store_readout_sweep_rectangular_bit_for_bit(tmp_path, tile):
    x1, x2 = _images(7, seed=1), _images(5, seed=2)
    whole = cnngp.readout_sweep(BODY, READOUTS, x1, x2).numpy()
    store_kernel(BODY, x1, x2, readouts=READOUTS, out=tmp_path / "k.zarr", tile=tile, progress=False)
    store = KernelStore.open(tmp_path / "k.zarr")
    assert store.shape == (3, 7, 5) and not store.symmetric
    assert np.array_equal(np.asarray(store.kernel[...]), whole)
    assert [m.shape for m in StoredReadouts(store)] == [(7, 5)] * 3


def test_rerun_computes_only_missing_and_bad_tiles(tmp_path):
    x = _images(10)
    whole = cnngp.kernel(NET, x).numpy()
    out = tmp_path / "k.zarr"
    store_kernel(NET, x, out=out, tile=3, progress=False)
    store = KernelStore.open(out)
    tiles = store.tiles()
    assert len(tiles) == 10
    (out / "records" / f"{tiles[1].name}.json").unlink()  # a tile whose record never landed
    chunk = out / "kernel" / "c" / "0" / "2" / "3"  # a torn chunk under a valid record
    chunk.write_bytes(chunk.read_bytes()[:10])
    state = KernelStore.open(out).verify()
    assert [t.name for t in state["missing"]] == [tiles[1].name]
    assert [t.name for t in state["bad"]] == ["tile-2-3"]
    # the check reads tiles on several threads at once (VERIFY_THREADS); one thread finds the same
    serial = KernelStore.open(out).verify(threads=1)
    assert {k: [t.name for t in v] for k, v in serial.items()} == {k: [t.name for t in v] for k, v in state.items()}
    report = store_kernel(NET, x, out=out, tile=3, progress=False)
    assert (report.tiles_done_before, report.tiles_bad, report.tiles_computed) == (8, 1, 2)
    assert report.self_blocks_computed == 0  # the self records were all there
    assert np.array_equal(np.asarray(KernelStore.open(out).kernel[0]), whole)
    assert store_kernel(NET, x, out=out, tile=3, progress=False).tiles_computed == 0


def test_a_resume_keeps_the_stored_tile_whatever_the_workers(tmp_path):
    x = _images(6)
    store_kernel(NET, x, out=tmp_path / "k.zarr", tile=2, progress=False)
    report = store_kernel(NET, x, out=tmp_path / "k.zarr", progress=False)  # no --tile
    assert report.tile == 2 and report.tiles_computed == 0


def test_a_different_computation_is_refused_and_nothing_overwritten(tmp_path):
    x = _images(6)
    out = tmp_path / "k.zarr"
    store_kernel(NET, x, out=out, tile=3, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cases = [
        (dict(model=cnngp.io.architectures.get("cnngp3")), "network spec"),
        (dict(x1=_images(6, seed=5)), r"images \(its rows\)"),
        (dict(dtype="float32"), "dtype"),
        (dict(tile=2), "tile size"),
        (dict(x1=_images(7)), r"images \(its rows\)"),
    ]
    for change, what in cases:
        args = dict(model=NET, x1=x, out=out, tile=3, progress=False) | change
        with pytest.raises(CNNGPError, match=f"holds a kernel of different {what}"):
            store_kernel(args.pop("model"), args.pop("x1"), **args)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_store_refuses_a_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "k.zarr").mkdir()
    (tmp_path / "k.zarr" / "mine.txt").write_text("keep me")
    with pytest.raises(CNNGPError, match="not a kernel store"):
        store_kernel(NET, _images(3), out=tmp_path / "k.zarr", progress=False)
    assert (tmp_path / "k.zarr" / "mine.txt").read_text() == "keep me"


def test_stored_readouts_refuses_an_incomplete_store(tmp_path):
    out = tmp_path / "k.zarr"
    store_kernel(NET, _images(6), out=out, tile=3, progress=False)
    (out / "records" / "tile-0-1.json").unlink()
    with pytest.raises(CNNGPError, match="not complete .1 missing"):
        StoredReadouts(KernelStore.open(out))


# -- the command line -----------------------------------------------------------------------


@pytest.fixture
def images_npz(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=_images(12).astype(np.float32))
    return path


def test_cli_store_info_corruption_and_repair(tmp_path, images_npz, capsys):
    out = tmp_path / "K.zarr"
    assert _cli("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out, "--tile", "4", "--quiet") == 0
    ref = cnngp.kernel(NET, np.load(images_npz)["x"]).numpy()
    assert np.array_equal(np.asarray(KernelStore.open(out).kernel[0]), ref)
    capsys.readouterr()
    assert _cli("info", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["shape"], info["tiles_total"], info["tiles_done"], info["tiles_bad"]) == ([1, 12, 12], 6, 6, [])
    assert info["pairs_total"] == info["pairs_done"] == 78 and info["complete"]
    assert info["versions"]["zarr"] and info["spec"] == NET.split_readout()[0].to_spec()
    # each tile's record holds its wall and CPU time; info sums them (a cost that survives stops)
    records = [json.loads(p.read_text()) for p in (out / "records").glob("tile-*.json")]
    assert len(records) == 6 and all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in records)
    assert info["cpu_seconds_recorded"] == pytest.approx(sum(r["cpu_seconds"] for r in records))
    assert info["seconds_recorded"] == pytest.approx(sum(r["seconds"] for r in records))
    assert _cli("info", out) == 0
    assert "s CPU (the finished tiles, every attempt)" in capsys.readouterr().out

    chunk = out / "kernel" / "c" / "0" / "1" / "2"
    data = bytearray(chunk.read_bytes())
    data[37] ^= 0xFF  # flip the bits of one byte of one stored float
    chunk.write_bytes(bytes(data))
    assert _cli("info", out, "--json") == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert info["tiles_bad"] == ["tile-1-2"] and info["tiles_done"] == 5 and not info["complete"]
    assert "1 bad: tile-1-2" in captured.err

    assert _cli("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out) == 0
    assert "5 of 6 tiles already done, 1 to compute (1 bad, recomputed)" in capsys.readouterr().err
    assert np.array_equal(np.asarray(KernelStore.open(out).kernel[0]), ref)


def _error_line(capsys, *argv):
    """Run the CLI in this process: its exit status and its one stderr line."""
    capsys.readouterr()
    code = _cli(*argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return code, lines[0]


def test_cli_refuses_a_different_computation_with_one_line(tmp_path, images_npz, capsys):
    out = tmp_path / "K.zarr"
    assert _cli("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out, "--tile", "6", "--quiet") == 0
    other = tmp_path / "y.npz"
    np.savez(other, x=_images(12, seed=9).astype(np.float32))
    for argv, what in [
        (("--arch", "cnngp3", "--x1", images_npz), "network spec"),
        (("--arch", "cnngp2", "--x1", other), r"images \(its rows\)"),
        (("--arch", "cnngp2", "--x1", images_npz, "--dtype", "float32"), "dtype"),
        (("--arch", "cnngp2", "--x1", images_npz, "--tile", "4"), "tile size"),
    ]:
        code, line = _error_line(capsys, "kernel", *argv, "--out", out, "--quiet")
        assert code == 2 and re.search(f"^cnngp: error: --out: .* holds a kernel of different {what}", line), line


def test_cli_store_flags_need_a_store(tmp_path, images_npz, capsys):
    for flags in (["--workers", "2"], ["--tile", "4"], ["--dry-run"], ["--scheduler", "tcp://127.0.0.1:1"]):
        code, line = _error_line(capsys, "kernel", "--arch", "cnngp2", "--x1", images_npz, "--out",
                                 tmp_path / "k.npz", *flags)
        assert code == 2 and f"{flags[0]}: needs --out K.zarr" in line, line
    code, line = _error_line(capsys, "kernel", "--arch", "cnngp2", "--x1", images_npz, "--out",
                             tmp_path / "k.zarr", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1")
    assert code == 2 and "cannot be combined with --scheduler" in line
    (tmp_path / "file.zarr").write_text("not a folder")
    code, line = _error_line(capsys, "kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", tmp_path / "file.zarr")
    assert code == 2 and "is not a folder" in line
    code, line = _error_line(capsys, "info", tmp_path / "none.zarr")
    assert code == 2 and "does not exist" in line
    code, line = _error_line(capsys, "sweep", "--arch", "cnngp2", "--data", "digits", "--n", "40",
                             "--out", tmp_path / "sw", "--workers", "2")
    assert code == 2 and "--workers: needs --store K.zarr" in line


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, images_npz, capsys, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 12)  # room for 3 workers at once, whatever this machine
    out = tmp_path / "K.zarr"
    assert _cli("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out, "--tile", "5",
                "--dry-run", "--workers", "3") == 0
    printed = capsys.readouterr()
    text = printed.err  # the plan for a person on stderr, the JSON alone on stdout
    assert "plan: 6 tiles of 5 to compute, 3 on the diagonal; 78 image pairs, 12 images" in text
    plan = json.loads(printed.out)
    assert (plan["tiles"], plan["pairs"], plan["workers"]) == (6, 78, 3)
    assert plan["seconds_per_pair"] > 0 and plan["estimated_seconds_one_worker"] == pytest.approx(
        78 * plan["seconds_per_pair"] + 12 * plan["seconds_per_image_self"])
    # on 3 cold workers: the start of the cluster and of the workers, then the busiest worker
    assert plan["estimated_seconds"] >= timing.CLUSTER_START_SECONDS + plan["start_seconds"] + (
        plan["estimated_seconds_one_worker"] / 3) * 0.999
    assert "on 3 worker(s)" in plan["estimate"] and "start: this command, the cluster and its workers" in plan["estimate"]
    assert not out.exists()
    # more single-thread local workers than cores: priced as many at a time as the cores hold
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert _cli("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out, "--tile", "5",
                "--dry-run", "--workers", "3") == 0
    printed = capsys.readouterr()
    text, plan = printed.err, json.loads(printed.out)
    assert (plan["workers"], plan["workers_at_once"], plan["threads_per_worker"]) == (3, 2, 1)
    assert "3 worker(s), 2 at a time on this machine's 2 cores (priced so)" in text
    assert "on 2 worker(s)" in plan["estimate"] and not out.exists()
    assert _cli("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out, "--tile", "5", "--quiet") == 0
    capsys.readouterr()
    assert _cli("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out, "--dry-run") == 0
    assert "plan: 0 tiles of 5 to compute (of 6; the rest are in the store)" in capsys.readouterr().err
    # --quiet: the JSON alone
    assert _cli("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out, "--dry-run", "--quiet") == 0
    printed = capsys.readouterr()
    assert printed.err == "" and json.loads(printed.out)["tiles"] == 0
    # a store of another computation: the dry run refuses it as the run does, in the same words
    for change in (("--tile", "4"), ("--dtype", "float32")):
        argv = ("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out, *change, "--quiet")
        code, dry = _error_line(capsys, *argv, "--dry-run")
        assert code == 2 and _error_line(capsys, *argv) == (2, dry)
        assert "holds a kernel of different" in dry and "give another --out" in dry


def test_sweep_into_a_store_refuses_a_long_job_without_yes(tmp_path, monkeypatch):
    from cnngp.engine import resources
    from cnngp.experiments.sweep import run_sweep

    monkeypatch.setattr(resources, "LONG_JOB_SECONDS", 1e-6)
    with pytest.raises(CNNGPError, match="would take about .* pass --yes"):
        run_sweep("cnngp2", "digits", ns=(40,), folds=2, lengthscales=(1.0,), store=tmp_path / "K.zarr",
                  yes=False, progress=False)
    assert not (tmp_path / "K.zarr").exists()


def test_cli_sigint_keeps_finished_tiles_and_the_rerun_finishes(tmp_path):
    x = tmp_path / "x.npz"
    np.savez(x, x=_images(40, shape=(8, 8, 3)).astype(np.float32))
    out = tmp_path / "K.zarr"
    argv = [sys.executable, "-m", "cnngp.cli", "kernel", "--arch", "cnngp4", "--x1", str(x),
            "--out", str(out), "--tile", "4", "--quiet"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_records(out, 3, proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        assert "the finished tiles are in" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
        proc.stderr.close()
    done = len(KernelStore.open(out).verify()["done"])
    assert 0 < done < 55  # 10 blocks of 4 images: 55 tiles
    r = subprocess.run(argv[:-1], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{done} of 55 tiles already done, {55 - done} to compute" in r.stderr
    ref = cnngp.kernel(cnngp.io.architectures.get("cnngp4"), np.load(x)["x"]).numpy()
    assert np.array_equal(np.asarray(KernelStore.open(out).kernel[0]), ref)


def _wait_for_records(out: Path, n: int, proc, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        records = out / "records"
        if records.is_dir() and sum(1 for p in records.glob("tile-*.json")) >= n:
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no tile finished in time")


# -- a real LocalCluster --------------------------------------------------------------------


@pytest.fixture
def client(dask_cluster):
    """conftest's session-wide 2-worker LocalCluster, both workers up (one test kills one)."""
    dask_cluster.wait_for_workers(2, timeout=60)
    return dask_cluster


def test_local_cluster_listens_on_loopback_only(client):
    info = client.scheduler_info()
    addresses = [client.scheduler.address, *info["workers"]]
    assert len(info["workers"]) == 2
    for address in addresses:
        assert address.startswith("tcp://127.0.0.1:"), address
    for worker in info["workers"].values():
        assert worker["host"] == "127.0.0.1"
        for port in worker.get("services", {}).values():  # a worker dashboard, if any
            assert isinstance(port, int)
    server = client.cluster.scheduler.http_server
    if server is not None:  # the scheduler's HTTP (dashboard) server
        hosts = {s.getsockname()[0] for s in server._sockets.values()}
        assert hosts == {"127.0.0.1"}, hosts


def test_dask_matches_the_single_process_kernel(client, tmp_path):
    x1, x2 = _images(9, seed=3), _images(7, seed=4)
    for args, ref in [
        ((NET, x1), cnngp.kernel(NET, x1).numpy()[None]),
        ((BODY, x1, x2), cnngp.readout_sweep(BODY, READOUTS, x1, x2).numpy()),
    ]:
        out = tmp_path / f"k{len(args)}.zarr"
        readouts = READOUTS if len(args) == 3 else None
        report = store_kernel(*args, readouts=readouts, out=out, tile=3, scheduler=client, progress=False)
        assert report.tiles_computed == report.tiles_total
        assert np.array_equal(np.asarray(KernelStore.open(out).kernel[...]), ref)


def test_on_a_cluster_the_workers_copy_the_lent_tiles_and_compute_a_damaged_one(client, tmp_path):
    """``reuse=`` on a cluster: each lent tile is copied by a worker (its record's pid is not
    this process's), checked against the lender's record as it is read; a tile whose bytes no
    longer match is computed instead. Oracle: the kernel computed in memory from scratch."""
    x = _images(9, seed=3)
    old, new = tmp_path / "old.zarr", tmp_path / "new.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    damaged = KernelStore.open(old)
    damaged.kernel[1, 4, 5] = damaged.kernel[1, 4, 5] * 2.0  # tile-1-1's block, its record kept
    report = store_kernel(BODY, x, readouts=READOUTS, out=new, tile=3, scheduler=client, reuse=old, progress=False)
    assert (report.tiles_total, report.tiles_reused, report.tiles_computed) == (6, 2, 4)
    assert report.tiles_done_before == 2
    np.testing.assert_allclose(np.asarray(KernelStore.open(new).kernel[...]),
                               cnngp.readout_sweep(BODY, READOUTS, x).numpy(), rtol=1e-12, atol=0)
    records = {p.stem: json.loads(p.read_text()) for p in (new / "records").glob("tile-*.json")}
    lent = {n for n, r in records.items() if r.get("reused_from") == str(old)}
    assert lent == {"tile-0-0", "tile-0-1"}
    assert all(records[n]["pid"] != os.getpid() for n in lent)
    assert KernelStore.open(new).info()["tiles_reused_from"] == {str(old): 2}


def test_on_a_cluster_a_store_lent_every_tile_computes_no_self_block(client, tmp_path):
    """Self blocks are submitted with the first computed tile that reads them: a copy of a
    whole store (the same images) runs no self task, and a self block only rows of lent tiles
    read is not computed."""
    x = _images(9, seed=5)
    old, same, grown = tmp_path / "old.zarr", tmp_path / "same.zarr", tmp_path / "grown.zarr"
    store_kernel(BODY, x[:6], readouts=READOUTS, out=old, tile=3, progress=False)
    report = store_kernel(BODY, x[:6], readouts=READOUTS, out=same, tile=3, scheduler=client, reuse=old,
                          progress=False)
    assert (report.tiles_reused, report.tiles_computed, report.self_blocks_computed) == (3, 0, 0)
    assert np.array_equal(np.asarray(KernelStore.open(same).kernel[...]), np.asarray(KernelStore.open(old).kernel[...]))
    # x1 (6 rows) × x2 grown from 6 to 9 columns: the new tiles 0-2 and 1-2 read x1's blocks 0
    # and 1 and x2's block 2; x2's blocks 0 and 1 are read by lent tiles alone (3 of 5 blocks)
    x2 = _images(9, seed=6)
    old2 = tmp_path / "old2.zarr"
    store_kernel(BODY, x[:6], x2[:6], readouts=READOUTS, out=old2, tile=3, progress=False)
    report = store_kernel(BODY, x[:6], x2, readouts=READOUTS, out=grown, tile=3, scheduler=client, reuse=old2,
                          progress=False)
    assert (report.tiles_reused, report.tiles_computed, report.self_blocks_computed) == (4, 2, 3)
    np.testing.assert_allclose(np.asarray(KernelStore.open(grown).kernel[...]),
                               cnngp.readout_sweep(BODY, READOUTS, x[:6], x2).numpy(), rtol=1e-12, atol=0)


def test_killing_a_worker_mid_run_still_gives_the_identical_matrix(client, tmp_path):
    net = cnngp.io.architectures.get("cnngp4")
    x = _images(30, shape=(8, 8, 3), seed=6)
    ref = cnngp.kernel(net, x).numpy()
    out = tmp_path / "k.zarr"
    result = {}
    run = threading.Thread(target=lambda: result.update(
        report=store_kernel(net, x, out=out, tile=2, scheduler=client, progress=False)))
    run.start()
    try:
        _wait_for_records(out, 2, None)
        pids = client.run(os.getpid)
        n_done = sum(1 for _ in (out / "records").glob("tile-*.json"))
        os.kill(next(iter(pids.values())), signal.SIGKILL)
    finally:
        run.join(300)
    assert n_done < 120, "the run finished before the worker was killed"
    assert result["report"].tiles_computed == 120
    assert np.array_equal(np.asarray(KernelStore.open(out).kernel[0]), ref)
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_sigkill_of_the_whole_run_then_the_same_command_finishes_it(tmp_path):
    x = tmp_path / "x.npz"
    np.savez(x, x=_images(40, shape=(8, 8, 3), seed=7).astype(np.float32))
    out = tmp_path / "K.zarr"
    argv = [sys.executable, "-m", "cnngp.cli", "kernel", "--arch", "cnngp4", "--x1", str(x),
            "--out", str(out), "--tile", "4", "--workers", "2", "--threads-per-worker", "1"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_records(out, 5, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # client, scheduler, nannies and workers at once
        proc.wait(60)
        proc.stderr.close()
    state = KernelStore.open(out).verify()
    missing = len(state["missing"]) + len(state["bad"])
    assert 0 < missing < 55  # 10 blocks of 4 images: 55 tiles
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert re.search(rf"{missing} tile\(s\) computed, {55 - missing} already done", r.stderr), r.stderr
    ref = cnngp.kernel(cnngp.io.architectures.get("cnngp4"), np.load(x)["x"]).numpy()
    assert np.array_equal(np.asarray(KernelStore.open(out).kernel[0]), ref)


# -- the sweep from a store -----------------------------------------------------------------


def test_sweep_from_a_store_equals_the_in_memory_sweep(tmp_path):
    from cnngp.experiments.sweep import run_sweep, test_store_path
    from cnngp.io.data import Dataset

    rng = np.random.default_rng(11)
    x = rng.uniform(size=(60, 6, 6, 1)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    xt = rng.uniform(size=(12, 6, 6, 1)).astype(np.float32)
    ds = Dataset(x, y, xt, np.repeat(np.arange(3), 4), "toy", ("a", "b", "c"))
    common = dict(ns=(12, 24), folds=2, lengthscales=(1.0, 3.0), test=True, progress=False)
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    a = run_sweep(net, ds, **common)
    b = run_sweep(net, ds, store=tmp_path / "K.zarr", tile=5, **common)
    assert a["results"] == b["results"] and a["best"] == b["best"] and a["test"] == b["test"]
    assert KernelStore.open(test_store_path(tmp_path / "K.zarr")).shape == (4, 12, 24)
    c = run_sweep(net, ds, store=tmp_path / "K.zarr", tile=5, **common)  # all reused
    assert c["results"] == a["results"]
    # kernels and the per-readout cross-validation as tasks on a 2-process LocalCluster
    d = run_sweep(net, ds, store=tmp_path / "K2.zarr", tile=5, workers=2, **common)
    assert np.array_equal(np.asarray(KernelStore.open(tmp_path / "K2.zarr").kernel[...]),
                          np.asarray(KernelStore.open(tmp_path / "K.zarr").kernel[...]))
    assert d["results"] == a["results"] and d["best"] == a["best"] and d["test"] == a["test"]


def test_the_progress_bar_advances_within_a_tile(tmp_path, monkeypatch):
    """In-process tiles report every batch of pairs, not only their end: the bar's updates sum
    to the pairs of the matrix exactly, and there are more of them than tiles."""
    import cnngp.engine.distributed as distributed

    updates = []

    class Bar:
        def update(self, k):
            updates.append(int(k))

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    monkeypatch.setattr(distributed, "_progress_bar", lambda *a, **k: Bar())
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (9, 5, 5, 1))
    net = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Readout())
    report = store_kernel(net, x, out=tmp_path / "K.zarr", tile=4, batch_size=3, progress=True)
    assert sum(updates) == 9 * 10 // 2 == report.pairs_computed
    assert len([u for u in updates if u > 0]) > report.tiles_computed == 6
    np.testing.assert_allclose(StoredReadouts(KernelStore.open(tmp_path / "K.zarr"))[0],
                               cnngp.kernel(net, x).numpy(), rtol=1e-12)


@pytest.mark.parametrize("n1,tile", [(10, 3), (9, 2), (9, 4), (1, 1)])
def test_tile_plan_completes_leading_blocks_first(n1, tile):
    """Symmetric: after the first m tiles, the tiles done are exactly those of a leading k×k
    block (plus part of the next ring): no tile outside the block of the largest ring started
    comes early."""
    plan = tile_plan(n1, None, tile)
    rings = [max(t.i, t.j) for t in plan]
    assert rings == sorted(rings)
    for k in range(max(rings) + 1):
        first = {(t.i, t.j) for t in plan[: sum(r <= k for r in rings)]}
        block = {(t.i, t.j) for t in plan if t.i <= k and t.j <= k}
        assert first == block


@pytest.mark.parametrize("n1,n2,tile", [(7, 11, 2), (9, 4, 4), (1, 5, 2), (5, 1, 3)])
def test_rectangular_tile_plan_finishes_rows_of_x1_first(n1, n2, tile):
    """Rectangular (test × train): after each row of tiles, those x1 rows are complete against
    every column of x2, before any later row starts; the tiles cover the matrix exactly once."""
    plan = tile_plan(n1, n2, tile)
    n_col_tiles = -(-n2 // tile)
    assert [t.i for t in plan] == sorted(t.i for t in plan)
    for r in range(-(-n1 // tile)):
        row = plan[r * n_col_tiles:(r + 1) * n_col_tiles]
        assert {t.i for t in row} == {r}
        covered = np.zeros(n2, int)
        for t in row:
            covered[t.cols] += 1
        assert (covered == 1).all()


# -- bad scheduler addresses and edited stores: one line, exit 2 (issue 28) -------------------


def test_cli_scheduler_junk_address_is_one_line(tmp_path, images_npz, capsys):
    code, line = _error_line(capsys, "kernel", "--arch", "cnngp2", "--x1", images_npz,
                             "--out", tmp_path / "K.zarr", "--scheduler", "junk", "--quiet")
    assert code == 2 and line.startswith("cnngp: error: --scheduler: not a scheduler address 'junk'"), line
    assert not (tmp_path / "K.zarr").exists()  # refused before the store was created


@pytest.mark.parametrize("timeout", [False, True])
def test_cli_scheduler_that_cannot_be_reached_leaves_no_store(tmp_path, images_npz, capsys, monkeypatch, timeout):
    """A well-formed address where nothing listens (refused), or where a listener accepts the
    connection and never answers (timed out, within seconds): one line naming --scheduler, and
    no K.zarr left behind (the store is created only once the cluster has answered)."""
    import socket

    from cnngp.engine import distributed

    monkeypatch.setattr(distributed, "SCHEDULER_TIMEOUT_S", 1.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted, stop = [], threading.Event()

    def accept():  # takes every connection, says nothing
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    if timeout:
        listener.listen(8)
        thread.start()
    else:
        listener.close()  # nothing listens there: connection refused
    try:
        start = time.monotonic()
        code, line = _error_line(capsys, "kernel", "--arch", "cnngp2", "--x1", images_npz, "--out",
                                 tmp_path / "K.zarr", "--quiet", "--scheduler", f"tcp://127.0.0.1:{port}")
        assert time.monotonic() - start < 30
    finally:
        stop.set()
        if timeout:
            thread.join()
        for c in accepted:
            c.close()
        listener.close()
    assert not timeout or accepted, "the listener never saw the connection"
    assert code == 2 and re.search(r"^cnngp: error: --scheduler: .*(did not answer|cannot reach)", line), line
    assert not (tmp_path / "K.zarr").exists()


@pytest.mark.parametrize("key, value", [("tile", "junk"), ("shape", "junk"), ("readouts", 7),
                                        ("spec", "junk"), ("x1_sha256", 3), (None, "junk")])
def test_cli_edited_store_metadata_is_one_line(tmp_path, images_npz, capsys, key, value):
    out = tmp_path / "K.zarr"
    assert _cli("kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out, "--tile", "6", "--quiet") == 0
    meta = json.loads((out / "zarr.json").read_text())
    if key is None:
        meta["attributes"] = value
    else:
        meta["attributes"][key] = value
    (out / "zarr.json").write_text(json.dumps(meta))
    code, line = _error_line(capsys, "info", out)
    assert code == 2 and "K.zarr" in line and re.search("altered|cannot be opened", line), line
    code, line = _error_line(capsys, "kernel", "--arch", "cnngp2", "--x1", images_npz, "--out", out,
                             "--tile", "6", "--quiet")
    assert code == 2 and line.startswith("cnngp: error: --out: ") and re.search("altered|cannot be opened", line), line


def test_all_workers_lost_is_one_line_and_the_rerun_resumes(client, tmp_path, monkeypatch, capsys):
    """Every worker gone: Dask cancels the futures (FutureCancelledError); the run ends with
    exit 2 and one line, the tiles already finished stay in the store and a rerun finishes it."""
    import distributed
    from distributed.client import FutureCancelledError

    x = _images(6, seed=2)
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "K.zarr"
    real = distributed.as_completed

    def losing(futures, *args, **kwargs):
        it = real(futures, *args, **kwargs)
        yield next(it)  # one tile finishes, then every worker is gone

        class Lost:
            def result(self):
                raise FutureCancelledError("cnngp-tile", "lost")

        yield Lost()

    monkeypatch.setattr(distributed, "as_completed", losing)
    with pytest.raises(CNNGPError, match=r"^dask: all workers were lost .*finished tiles are in .*K\.zarr: rerun to resume"):
        store_kernel(NET, x, out=out, tile=2, scheduler=client, progress=False)
    monkeypatch.setattr(distributed, "as_completed", real)
    report = store_kernel(NET, x, out=out, tile=2, scheduler=client, progress=False)
    assert report.tiles_computed < report.tiles_total  # the finished tile(s) were kept
    assert np.array_equal(np.asarray(KernelStore.open(out).kernel[...]), cnngp.kernel(NET, x).numpy()[None])


def test_local_cluster_scratch_is_a_cnngp_temp_folder_removed_on_exit(tmp_path, monkeypatch):
    """The workers' scratch space lives in a cnngp-dask-PID-* temp folder that is removed when
    the cluster closes; one left by a killed run (its PID gone) is removed by the next run."""
    import tempfile

    from cnngp.engine import distributed

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{distributed.SCRATCH_PREFIX}{dead.pid}-x"
    (stale / "dask-scratch-space").mkdir(parents=True)
    live = tmp_path / f"{distributed.SCRATCH_PREFIX}{os.getpid()}-y"
    live.mkdir()
    with dask_client(workers=1) as c:
        c.wait_for_workers(1, timeout=60)
        ours = [p for p in tmp_path.iterdir() if p.name.startswith(f"{distributed.SCRATCH_PREFIX}{os.getpid()}-")
                and p != live]
        assert len(ours) == 1 and (ours[0] / "dask-scratch-space").is_dir()
        assert not stale.exists() and live.exists()
    assert not ours[0].exists() and live.exists()
    # nor do Dask's own lock files (dask-scratch-space/global.lock) land in the shared temp folder
    assert not (tmp_path / "dask-scratch-space").exists()


@pytest.mark.parametrize("trial", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_ctrl_c_of_a_run_on_local_workers_prints_one_line(tmp_path, trial):
    """Ctrl-C signals the whole process group: the workers ignore it (the main process closes
    the cluster), so stderr holds only cnngp's line, no worker traceback (it did in some tries:
    a second trial, under ``-m slow``, gives a race another chance)."""
    x = tmp_path / "x.npz"
    np.savez(x, x=_images(40, shape=(8, 8, 3), seed=trial).astype(np.float32))
    out = tmp_path / "K.zarr"
    argv = [sys.executable, "-m", "cnngp.cli", "kernel", "--arch", "cnngp4", "--x1", str(x),
            "--out", str(out), "--tile", "2", "--quiet", "--workers", "2"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_records(out, 2, proc)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert proc.wait(60) == 130
        lines = proc.stderr.read().strip().splitlines()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)
        proc.stderr.close()
    assert len(lines) == 1 and "the finished tiles are in" in lines[0], lines


def test_disk_check_counts_file_blocks_and_only_what_a_resumed_store_still_writes(tmp_path):
    """The disk a store needs: every chunk and record file takes whole file-system blocks (with
    tiny tiles the blocks, not the numbers, fill a disk), and a resumed store needs room only
    for the tiles it still lacks — a finished store reruns on a nearly full disk."""
    from cnngp.engine.distributed import FILE_BLOCK, store_dry_run

    x = _images(8)
    out = tmp_path / "K.zarr"
    new = store_dry_run(NET, x, out=out, tile=2, progress=False).dry_run
    tiles = 4 * 5 // 2  # 4 blocks of 2 images: 10 tiles, 6 of them mirrored
    assert new["disk_bytes"] >= new["store_bytes"] + (10 + 6 + 10) * FILE_BLOCK
    store_kernel(NET, x, out=out, tile=2, progress=False)
    (out / "records" / "tile-0-1.json").unlink()  # one tile lost: only it is still to write
    resumed = store_dry_run(NET, x, out=out, tile=2, progress=False).dry_run
    assert resumed["tiles"] == 1 and resumed["tiles_total"] == tiles
    chunk = -(-1 * 2 * 2 * 8 // FILE_BLOCK) * FILE_BLOCK + FILE_BLOCK
    assert resumed["disk_bytes"] == 2 * chunk + FILE_BLOCK  # the tile, its mirror, its record


def test_a_local_cluster_is_refused_while_a_worker_process_is_being_started(monkeypatch):
    """A script without a main guard that runs cnngp with workers runs again in every spawned
    worker, before it is a worker: there cnngp refuses to start a cluster of its own, in one line
    naming the guard, instead of Dask's "Nanny failed to start"."""
    import multiprocessing

    from cnngp.engine.distributed import dask_client

    monkeypatch.setattr(multiprocessing.current_process(), "_inheriting", True, raising=False)
    with pytest.raises(CNNGPError, match=r'^--workers: .*`if __name__ == "__main__":`$'):
        with dask_client(workers=2):
            pass


def test_workers_values_are_spot_checked_against_this_process(tmp_path, dask_cluster, monkeypatch):
    """After a cluster computed tiles, one pair of each worker's is computed again in this
    process (and its mirror entry): equal to rounding, the worker's tiles are vouched for in
    their records; a worker that computes something else (here every task's network has
    another λ, as a worker of another version or a stale plan would) is refused in one line,
    the tiles it computed and the self records are discarded from the store and its archive,
    and the same command with sound workers then finishes the store, equal to the kernel."""
    import cnngp.engine.distributed as distributed
    from cnngp.engine.distributed import store_kernel
    from cnngp.engine.store import KernelStore

    x = np.random.default_rng(3).uniform(size=(9, 6, 6, 2))
    body = cnngp.Serial(cnngp.Conv(3, correlation=cnngp.Matern(1.5, 2.0)), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU())
    readouts = [cnngp.Readout(correlation=cnngp.Matern(1.5, 1.0))]
    good = store_kernel(body, x, readouts=readouts, out=tmp_path / "good.zarr", tile=3, scheduler=dask_cluster,
                        progress=False)
    records = [json.loads(p.read_text()) for p in (tmp_path / "good.zarr" / "records").glob("tile-*.json")]
    workers = {(r["host"], r["pid"]) for r in records}
    assert good.pairs_spot_checked == len(workers) >= 1 and {r["worker"] for r in records} == {"checked"}
    assert KernelStore.open(tmp_path / "good.zarr").complete()
    # a worker's tile archived before any check is restored as unchecked (checked by the next
    # run there), one vouched for is not
    import shutil

    archived = store_kernel(body, x, readouts=readouts, out=tmp_path / "a.zarr", tile=3, scheduler=dask_cluster,
                            archive=tmp_path / "a-archive", progress=False)
    assert archived.pairs_spot_checked >= 1
    assert not any("worker" in json.loads(p.read_text()) for p in (tmp_path / "a-archive").glob("tile-*.json"))
    tile = KernelStore.open(tmp_path / "a.zarr").tiles()[0]
    record_path = tmp_path / "a-archive" / f"{tile.name}.json"
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "worker": True}))
    shutil.rmtree(tmp_path / "a.zarr")
    restored = store_kernel(body, x, readouts=readouts, out=tmp_path / "a.zarr", tile=3,
                            archive=tmp_path / "a-archive", progress=False)
    assert (restored.tiles_restored, restored.tiles_computed, restored.pairs_spot_checked) == (6, 0, 1)

    real = distributed.run_tile_task

    def another_network(path, key, recipe, *args, **kwargs):
        import pickle

        recipe = pickle.loads(recipe) if isinstance(recipe, bytes) else recipe  # (it travels pickled)
        other = cnngp.Serial(cnngp.Conv(3, correlation=cnngp.Matern(1.5, 0.3)), cnngp.ReLU(), cnngp.Conv(3),
                             cnngp.ReLU())
        distributed._PLANS.clear()
        return real(path, key + "-other", (other, *recipe[1:]), *args, **kwargs)

    monkeypatch.setattr(distributed, "run_tile_task", another_network)
    bad = tmp_path / "bad.zarr"
    with pytest.raises(CNNGPError, match=r"^--out: the value of the pair \(\d+, \d+\) \(tile tile-\d-\d\) computed by "
                                         r"the worker .*:\d+ differs from this process's by .* the 6 tile\(s\) they "
                                         r"computed were discarded from .*bad.zarr' and its archive"):
        store_kernel(body, x, readouts=readouts, out=bad, tile=3, scheduler=dask_cluster,
                     archive=tmp_path / "bad-archive", progress=False)
    state = KernelStore.open(bad).verify()
    assert len(state["missing"]) == 6 and not state["done"]
    assert not list((tmp_path / "bad-archive").glob("tile-*")) and not list((bad / "records").glob("self-*"))
    monkeypatch.setattr(distributed, "run_tile_task", real)
    again = store_kernel(body, x, readouts=readouts, out=bad, tile=3, scheduler=dask_cluster,
                         archive=tmp_path / "bad-archive", progress=False)
    assert again.tiles_computed == 6 and KernelStore.open(bad).complete()
    np.testing.assert_allclose(np.asarray(KernelStore.open(bad).kernel[...]),
                               cnngp.readout_sweep(body, readouts, x).numpy(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("offsets", [False, True])
def test_a_workers_tiles_left_unchecked_are_checked_by_the_next_run_mirrors_included(tmp_path, monkeypatch, capsys,
                                                                                     offsets):
    """Tiles a worker wrote that no check has vouched for (a cluster run stopped before its
    check) are checked by the next run on the store, in one process too, and the pair's mirror
    entry with them: a worker whose mirror half alone is wrong (here offset sums not reversed,
    or a kernel's mirror scaled) is caught. Tiles written right pass and are vouched for."""
    import cnngp.engine.store as store_module
    from cnngp.engine.distributed import store_kernel
    from cnngp.engine.store import KernelStore

    x = np.random.default_rng(4).uniform(size=(7, 6, 6, 1))
    body = cnngp.Serial(cnngp.Conv(3), cnngp.ReLU(), cnngp.Conv(3), cnngp.ReLU())
    kw = dict(offsets=True) if offsets else dict(readouts=[cnngp.Readout(correlation=cnngp.Matern(1.5, 1.0))])
    for name, spoil in (("right.zarr", False), ("wrong.zarr", True)):
        path = tmp_path / name
        store_kernel(body, x, out=path, tile=3, progress=False, **kw)
        store = KernelStore.open(path)
        with monkeypatch.context() as m:
            if spoil and offsets:  # the upper half right, its mirror not reversed
                m.setattr(store_module, "mirrored_offsets", lambda values, *a: values)
            for tile in store.tiles():  # rewritten as a worker's, unchecked
                block = np.array(store.kernel[:, tile.rows, tile.cols])
                if spoil and offsets and tile.diagonal:  # its lower half, too, not reversed
                    upper = block.copy()
                    for r in range(block.shape[1]):
                        block[:, r, :r] = upper[:, :r, r]
                elif spoil and not offsets:
                    block = block * 1.01
                store.write_tile(tile, block, worker=True)
        report = None
        if spoil:
            with pytest.raises(CNNGPError, match=r"computed by the worker .* differs from this process's"):
                store_kernel(body, x, out=path, tile=3, progress=False, **kw)
            assert not KernelStore.open(path).verify()["done"]
        else:
            assert KernelStore.open(path).info()["tiles_by_workers"] == {"checked": 0, "unchecked": 6}
            report = store_kernel(body, x, out=path, tile=3, progress=False, **kw)
            assert report.pairs_spot_checked == 1 and report.tiles_computed == 0
            assert not KernelStore.open(path).unchecked_worker_tiles()
            assert KernelStore.open(path).info()["tiles_by_workers"] == {"checked": 6, "unchecked": 0}
            from cnngp.cli.main import main

            assert main(["info", str(path)]) == 0
            assert "6 tile(s) computed by cluster workers, each worker checked" in capsys.readouterr().out

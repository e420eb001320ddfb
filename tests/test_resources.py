"""Jobs are sized before they allocate: exact counts from the plan, and refusals with numbers."""

from __future__ import annotations

import re

import numpy as np
import pytest

import cnngp
from cnngp.engine import resources
from cnngp.cli.main import main
from cnngp.engine.gram import estimate_cost


def _cifar_shaped(path):
    """5120 CIFAR-shaped training images (512 per class): what the estimate sees is the plan's
    shapes and counts, and the timing of a few pairs, which random pixels cost the same."""
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, size=(5120, 32, 32, 3), dtype=np.uint8),
             y_train=np.tile(np.arange(10, dtype=np.uint8), 512))
    return path


def test_estimate_counts_pairs_and_bytes_exactly():
    net = cnngp.io.architectures.get("cnngp3", readout=cnngp.Matern(1.5, 2.0))
    sym = estimate_cost(net, (8, 8, 1), 10)
    assert sym.pairs == 55 and sym.output_bytes == 10 * 10 * 8
    cross = estimate_cost(net, (8, 8, 1), 10, 7, dtype="float32")
    assert cross.pairs == 70 and cross.output_bytes == 10 * 7 * 4
    readouts = [cnngp.Readout(correlation=cnngp.Matern(1.5, lam)) for lam in (0.5, 1, 2)]
    stack = estimate_cost(net[:-1], (8, 8, 1), 10, readouts=readouts)
    assert stack.output_bytes == 3 * 10 * 10 * 8
    # time grows with the pairs (quadratically in N) and with the work per pair
    assert estimate_cost(net, (8, 8, 1), 20).seconds > 3.5 * sym.seconds
    deep = cnngp.io.architectures.get("cnngp14", readout=cnngp.Matern(1.5, 2.0))
    assert estimate_cost(deep, (8, 8, 1), 10).seconds > 3 * sym.seconds
    # nothing is computed: a plan for 10^5 images costs no time or memory to make
    big = estimate_cost(deep, (32, 32, 3), 100_000)
    assert big.pairs == 100_000 * 100_001 // 2 and big.output_bytes == 8 * 10**10


def test_check_job_refuses_with_numbers(monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda: 8 * 1024**3)
    with pytest.raises(cnngp.CNNGPError, match=r"^--x1 \(1 image\): needs about 16 GiB of memory "
                                                r"but this machine has 8 GiB available; fewer"):
        resources.check_job("--x1 (1 image)", memory_bytes=16 * 1024**3, remedy="fewer")
    with pytest.raises(cnngp.CNNGPError, match=r"would take about 2\.0 h on this machine .*pass --yes"):
        resources.check_job("job", seconds=7200)
    resources.check_job("job", seconds=7200, yes=True)  # --yes starts it
    resources.check_job("job", memory_bytes=1024**3, seconds=10)  # fits: silent


def test_kernel_command_refuses_what_does_not_fit_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(resources, "available_memory", lambda: 2 * 1024**2)
    x = np.random.default_rng(0).uniform(size=(300, 4, 4, 1))
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "k.npz"
    assert main(["kernel", "--arch", "cnngp1", "--x1", str(tmp_path / "x.npz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the one-line refusal alone (how --x1 was read is said only once a job passes its checks)
    assert len(err) == 1 and err[0].startswith("cnngp: error: --x1 (300 images, 45150 pairs): needs about"), err
    assert "available" in err[0] and not out.exists()


def test_sweep_refuses_a_days_long_job_without_yes_and_an_oversized_one(tmp_path, capsys):
    """The two hostile-probe cases: a 5120-image CNNGP-14 sweep (days on 2 cores) started
    without a word, and 200 lengthscales asking for 41 GiB after 17 s of work."""
    out = tmp_path / "sweep"
    data = _cifar_shaped(tmp_path / "cifar.npz")
    base = ["sweep", "--arch", "cnngp14", "--data", str(data), "--n", "5120", "--out", str(out)]
    assert main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "cnngp: error: --n 5120 with 27 readouts: would take about"), err
    # timed on this machine (random CIFAR-shaped images: the cost does not depend on pixels)
    assert re.search(r"would take about [0-9.]+ (h|days) on this machine", err[0]) and "pass --yes" in err[0], err
    many = ",".join(str(v) for v in range(1, 199))  # + independent and mean pool = 200
    real = resources.available_memory
    try:
        resources.available_memory = lambda: 16 * 1024**3
        assert main(base + ["--lengthscales", many, "--yes"]) == 2
    finally:
        resources.available_memory = real
    err = capsys.readouterr().err.strip().splitlines()
    # float32 (the sweep's default) kernels and their float64 copy: 200 × 5120² × 12 B + 2 GiB,
    # and the dense readouts' Σ over the 32×32 grid (198 kept + 5 temporaries) × 1024² × 8 B
    assert err == ["cnngp: error: --n 5120 with 200 readouts: needs about 62.2 GiB of memory but "
                   "this machine has 16 GiB available; use a smaller --n, fewer --lengthscales "
                   "or --n-test (or --store K.zarr)"], err
    assert not out.exists()


def test_local_cluster_counts_every_worker_process_and_caps_threads(tmp_path, monkeypatch, capsys):
    """Issue 28: ``--workers 1000 --memory-budget 1M`` started 177 processes (each ~260 MB
    resident that the check did not count) before the machine went down."""
    from cnngp.engine import distributed

    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).uniform(size=(3, 4, 4, 1)))
    base = ["kernel", "--arch", "cnngp1", "--x1", str(tmp_path / "x.npz"), "--out", str(tmp_path / "k.zarr"),
            "--quiet", "--dry-run"]
    monkeypatch.setattr(resources, "available_memory", lambda: 24 * 1024**3)
    assert main(base + ["--workers", "1000", "--memory-budget", "1M"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnngp: error: --workers 1000 (260 MiB per worker process"), err
    assert "available" in err[0] and "fewer --workers" in err[0]
    cores = __import__("os").cpu_count()
    assert main(base + ["--threads-per-worker", str(cores + 1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cnngp: error: --threads-per-worker {cores + 1}: this machine has {cores} cores; "
                   f"use at most {cores}"], err
    # what fits passes the gate (checked alone: no cluster is started here)
    distributed.check_local_cluster(2, cores, 64 * 1024**2)
    with pytest.raises(cnngp.CNNGPError, match=r"^--workers 80 "):
        distributed.check_local_cluster(80, None, 64 * 1024**2)  # 80 × 324 MiB > 90% of 24 GiB


def test_a_tile_plan_of_millions_of_tiles_is_refused_before_it_is_listed(tmp_path, capsys):
    """Issue 28: ``--tile 1 --dry-run`` on 5,120 images planned 13 M tiles for minutes."""
    from cnngp.engine import distributed
    from cnngp.engine.gram import tile_plan

    assert distributed.count_tiles(7, None, 2) == len(tile_plan(7, None, 2))
    assert distributed.count_tiles(7, 5, 2) == len(tile_plan(7, 5, 2))
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).uniform(size=(1500, 3, 3, 1)))
    out = tmp_path / "k.zarr"
    argv = ["kernel", "--arch", "cnngp1", "--x1", str(tmp_path / "x.npz"), "--out", str(out), "--quiet",
            "--dry-run", "--tile", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("cnngp: error: --tile 1: plans 1,125,750 tiles for 1500 images, over the "
                       "1,000,000 accepted; use --tile 2 or more"), err
    assert not out.exists()


def test_learn_refuses_an_absurd_spectral_mixture_before_it_allocates(tmp_path, capsys):
    """Issue 28: ``cnngp learn --spectral-mixture 1000000000`` started allocating."""
    from cnngp.inference.learn import MAX_SPECTRAL_COMPONENTS, learn_spectral_mixture

    out = tmp_path / "learn"
    assert main(["learn", "--n", "40", "--spectral-mixture", "1000000000", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cnngp: error: --spectral-mixture: 1000000000 spectral-mixture components "
                   f"is too many (accepted: 1..{MAX_SPECTRAL_COMPONENTS}; each adds parameters and a weight "
                   "table to every step)"], err
    assert not out.exists()
    with pytest.raises(cnngp.CNNGPError, match=r"^components: 1000000000 .* too many"):
        learn_spectral_mixture(np.zeros((1, 2, 2)), (1,), [0, 1], components=10**9)


def test_a_gzip_bomb_in_mnist_is_refused_from_its_header_before_it_is_decompressed(tmp_path):
    """Issue 28: a 3 MB MNIST ``.gz`` expanded to 6 GiB before the refusal. Here 60,000 blank
    images (47 MB, 46 KB compressed): the header's declared size is checked against the file's
    compressed size before the body is decompressed."""
    import gzip
    import struct

    from cnngp.io.data import load_dataset

    def write(name, shape):
        with gzip.open(tmp_path / (name + ".gz"), "wb") as fh:
            fh.write(struct.pack(">BBBB", 0, 0, 0x08, len(shape)) + struct.pack(f">{len(shape)}I", *shape))
            fh.write(bytes(int(np.prod(shape))))

    write("train-images-idx3-ubyte", (60000, 28, 28))
    write("train-labels-idx1-ubyte", (60000,))
    write("t10k-images-idx3-ubyte", (10, 28, 28))
    write("t10k-labels-idx1-ubyte", (10,))
    with pytest.raises(cnngp.CNNGPError, match=r"train-images-idx3-ubyte\.gz: the IDX header declares shape "
                                               r"\(60000, 28, 28\) \(47,040,000 bytes of data\), over the .* "
                                               r"accepted for a .*-byte gzip file \(at most 200x; a decompression bomb\?\)"):
        load_dataset(str(tmp_path))


def test_learn_and_montecarlo_have_the_one_hour_gate(tmp_path, monkeypatch, capsys):
    """Issue 28: ``learn`` (ETA 15 h) and ``montecarlo --samples`` (53,000 h) started silently;
    like the other commands they now need --yes past CNNGP_LONG_JOB_SECONDS."""
    from cnngp.finite import network_seconds

    net = cnngp.io.architectures.get("cnngp3")
    one = network_seconds(net, (32, 32, 3), 1024, 100, 1, 16)
    assert network_seconds(net, (32, 32, 3), 1024, 100, 20_000, 16) == pytest.approx(20_000 * one)
    assert network_seconds(net, (32, 32, 3), 1024, 100, 20_000, 16) > 3600
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).uniform(size=(3, 4, 4, 1)))
    mc = ["montecarlo", "--arch", "cnngp1", "--x1", str(tmp_path / "x.npz"), "--width", "4",
          "--samples", "1000000000", "--out", str(tmp_path / "mc.json"), "--quiet"]
    assert main(mc) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnngp: error: --samples 1000000000 networks of --width 4 on "
                                               "3 images: would take about"), err
    assert "pass --yes" in err[0]
    monkeypatch.setattr(resources, "LONG_JOB_SECONDS", 1e-6)  # any learn is "long" now
    out = tmp_path / "learn"
    learn = ["learn", "--arch", "cnngp2", "--n", "40", "--out", str(out), "--quiet"]
    assert main(learn) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cnngp: error: --n 40 (820 pairs): would take about"), err
    assert "pass --yes" in err[0] and not out.exists()


def test_a_dense_readout_is_counted_and_not_built_to_plan(tmp_path, monkeypatch, capsys):
    """Issue 28: a Matérn readout on a large grid built |P|×|P| matrices inside the check
    (``cnngp info ... --shape 200x200``: 17.5 GiB) and was not counted by it (a run peaked at
    7.1 GiB against the 4.5 it estimated)."""
    import tracemalloc

    from cnngp.engine.gram import READOUT_MATRICES

    net = cnngp.io.architectures.get("cnngp1", readout=cnngp.Matern(1.5, 2.0))
    p = 70 * 70
    per_pair = estimate_cost(cnngp.io.architectures.get("cnngp1", readout=cnngp.Constant()), (70, 70, 1), 3,
                             memory_budget=1024**2).working_bytes
    cost = estimate_cost(net, (70, 70, 1), 3, memory_budget=1024**2)
    # Σ's |P|² float64 arrays, counted once on top of a pair's working set
    assert cost.working_bytes >= per_pair + READOUT_MATRICES * p * p * 8
    independent = cnngp.io.architectures.get("cnngp1")
    assert estimate_cost(independent, (70, 70, 1), 3).working_bytes < p * p * 8
    # planning (info's representation, the cost check) reads Σ's support from its offset table
    tracemalloc.start()
    try:
        assert main(["info", "--arch", "cnngp2", "--readout", "matern32:2", "--shape", "70x70"]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024**2, peak  # one 4900² float64 matrix alone is 183 MiB
    capsys.readouterr()
    # and a run whose Σ does not fit is refused before it is built
    monkeypatch.setattr(resources, "available_memory", lambda: 1536 * 1024**2)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).uniform(size=(3, 70, 70, 1)))
    out = tmp_path / "k.npz"
    assert main(["kernel", "--arch", "cnngp1", "--readout", "matern32:2", "--x1", str(tmp_path / "x.npz"),
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cnngp: error: --x1 (3 images, 6 pairs): needs about") and "available" in err[-1], err
    assert not out.exists()

"""Bad input: one clear error naming the argument and what is accepted — in the library
(CNNGPError) and on the command line (exit code 2, one line on stderr, no output file)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import cnngp
from cnngp import CNNGPError, Conv, Matern, RBF, Readout, ReLU, Serial, UserCorrelation
from cnngp.cli.main import main
from cnngp.io.spec import from_spec

NET = Serial(Conv(3), ReLU(), Readout())
GOOD = np.random.default_rng(0).uniform(size=(2, 5, 5, 3))


@pytest.mark.parametrize(
    "x, match",
    [
        (np.zeros((2, 5, 3)), None),  # 1-D images are fine: checked separately below
        (np.zeros((5, 5)), r"x1: expected images of shape \(N, \*spatial, C\)"),
        (np.zeros((1, 2, 2, 2, 2, 2, 1)), r"x1: expected images of shape"),
        (np.zeros((0, 5, 5, 3)), r"x1: is empty"),
        (np.zeros((2, 5, 5, 0)), r"x1: its images have no channels \(shape \(2, 5, 5, 0\), channels last\)"),
        (np.zeros((2, 5, 0, 3)), r"x1: its images have no pixels along spatial axis 2 \(shape \(2, 5, 0, 3\)\)"),
        (np.full((2, 5, 5, 3), np.nan), r"x1: contains 150 NaN or infinite"),
        (np.where(np.eye(5)[None, :, :, None] > 0, np.inf, 0.5) * np.ones((1, 1, 1, 3)), r"x1: contains 15 NaN"),
        (np.array([[["a"]]]), r"x1: got a string array .*accepted are uint8"),
        (np.ones((1, 2, 2, 1), dtype=complex), r"x1: got a complex array"),
        (np.full((1, 2, 2, 1), 1e300), r"x1: pixel values reach 1e\+300; accepted are \|x\| <= 1e\+08"),
    ],
)
def test_bad_images(x, match):
    if match is None:
        net1d = Serial(Conv(3), ReLU(), Readout())
        assert cnngp.kernel(net1d, x).shape == (2, 2)
        return
    with pytest.raises(CNNGPError, match=match):
        cnngp.kernel(NET, x)


def test_meta_tensor_images_are_refused_naming_the_argument():
    meta = torch.empty(2, 5, 5, 3, device="meta")
    with pytest.raises(CNNGPError, match=r"^x1: got a tensor on the 'meta' device"):
        cnngp.kernel(NET, meta)
    with pytest.raises(CNNGPError, match=r"^x2: got a tensor on the 'meta' device"):
        cnngp.kernel(NET, GOOD, meta)


def test_api_refuses_bfloat16_and_accepts_a_memory_budget_string():
    for dtype in (torch.bfloat16, "bfloat16"):
        with pytest.raises(CNNGPError, match=r"dtype: expected 'float64' or 'float32'"):
            cnngp.kernel(NET, GOOD, dtype=dtype)
    k = cnngp.kernel(NET, GOOD, memory_budget="2G")
    assert torch.allclose(k, cnngp.kernel(NET, GOOD))


def test_any_strides_and_read_only_inputs():
    """A horizontally flipped batch (negative strides), a read-only array and a float32 view
    give the kernel of their contiguous float64 copy (once a raw torch error)."""
    x = np.random.default_rng(3).uniform(size=(3, 5, 6, 2))
    ref = cnngp.kernel(NET2, np.ascontiguousarray(x[:, :, ::-1])).numpy()
    np.testing.assert_array_equal(cnngp.kernel(NET2, x[:, :, ::-1]).numpy(), ref)
    ro = np.ascontiguousarray(x[:, :, ::-1])
    ro.flags.writeable = False
    np.testing.assert_array_equal(cnngp.kernel(NET2, ro).numpy(), ref)
    np.testing.assert_array_equal(
        cnngp.kernel(NET2, torch.as_tensor(np.ascontiguousarray(x[:, :, ::-1]))).numpy(), ref
    )


NET2 = Serial(Conv(3), ReLU(), Readout())


def test_mismatched_second_input_and_channels():
    with pytest.raises(CNNGPError, match=r"x2: images of shape \(4, 4, 3\) do not match x1's \(5, 5, 3\)"):
        cnngp.kernel(NET, GOOD, np.zeros((1, 4, 4, 3)))
    net = from_spec({"input_channels": 1, "layers": [{"type": "conv"}, {"type": "relu"}, {"type": "readout"}]})
    with pytest.raises(CNNGPError, match=r"x1: has 3 channels .* the network expects 1"):
        cnngp.kernel(net, GOOD)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "-2", "soon", None, True])
def test_bad_lengthscales(bad):
    with pytest.raises(CNNGPError, match=r"lengthscale: expected a number >= 0, 0 or 'inf'"):
        Matern(1.5, bad)
    with pytest.raises(CNNGPError, match=r"lengthscale: expected a number >= 0"):
        RBF(bad)


@pytest.mark.parametrize("text, end", [("1e400", r"beyond float range \(it would read as inf, mean pooling\); "
                                                 r"write inf"),
                                       ("2.5e-400", r"below float range \(it would read as 0, the independent "
                                                    r"readout\); write 0")])
def test_a_lengthscale_beyond_float_range_is_not_silently_an_end(text, end):
    """A written number that overflows or underflows float is refused, naming the end it would
    have become; the ends themselves (inf, 0, 0.0, 0e5, -0) and the extreme floats are kept."""
    from cnngp.cli.main import parse_lengthscales

    with pytest.raises(CNNGPError, match=rf"^--lengthscales: '{text}' is {end}"):
        parse_lengthscales(f"0.5,{text}")
    assert parse_lengthscales("inf,0,0.0,0e5,1e308,5e-324") == [math.inf, 0.0, 0.0, 0.0, 1e308, 5e-324]
    assert str(parse_lengthscales("-0")[0]) == "0.0"  # not -0.0 in labels
    assert main(["kernel", "--arch", "cnngp1", "--x1", "digits:2", "--lengthscales", text, "--out", "k.npz"]) == 2


def test_bad_matern_order_and_variances():
    with pytest.raises(CNNGPError, match=r"nu: expected one of 0.5, 1.5, 2.5"):
        Matern(1.0, 2.0)
    for kw in ({"weight_var": -1.0}, {"bias_var": float("nan")}, {"weight_var": math.inf}):
        with pytest.raises(CNNGPError, match=rf"{list(kw)[0]}: expected a finite number >= 0"):
            Conv(3, **kw)
        with pytest.raises(CNNGPError, match=rf"{list(kw)[0]}: expected a finite number >= 0"):
            Readout(**kw)
    with pytest.raises(CNNGPError, match=r"filter: expected an int >= 1"):
        Conv(0)
    with pytest.raises(CNNGPError, match=r"stride: expected an int >= 1"):
        Conv(3, stride=1.5)
    with pytest.raises(CNNGPError, match=r"padding: expected one of \('same', 'valid', 'circular'\)"):
        Conv(3, padding="full")


def test_user_correlation_checks():
    with pytest.raises(CNNGPError, match=r"must be positive semi-definite, smallest eigenvalue"):
        UserCorrelation(np.array([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(CNNGPError, match=r"must be symmetric"):
        UserCorrelation(np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(CNNGPError, match=r"expected a square"):
        UserCorrelation(np.ones((2, 3)))
    with pytest.raises(CNNGPError, match=r"NaN"):
        UserCorrelation(np.array([[1.0, np.nan], [np.nan, 1.0]]))
    for flag in ("yes", 1, None):  # a JSON spec's "normalise" is true or false, never coerced
        with pytest.raises(CNNGPError, match=rf"^normalise: expected true or false, got {flag!r}"):
            UserCorrelation(np.eye(2), normalise=flag)
    net = Serial(Conv(3, correlation=UserCorrelation(np.eye(4))), ReLU(), Readout())
    with pytest.raises(CNNGPError, match=r"layer 0 .*has shape \(4, 4\) but the grid \(3, 3\) has 9 positions"):
        cnngp.kernel(net, GOOD)


def test_filter_or_pool_larger_than_grid():
    with pytest.raises(CNNGPError, match=r"layer 0 .*filter of extent 7 .* larger than its input grid of size 5"):
        cnngp.kernel(Serial(Conv(7), ReLU(), Readout()), GOOD)
    with pytest.raises(CNNGPError, match=r"extent 5 \(taps 3, dilation 2\)"):
        cnngp.kernel(Serial(Conv(3, dilation=2, padding="valid"), Conv(3, dilation=2), Readout()), GOOD)
    with pytest.raises(CNNGPError, match=r"layer 2 \(AvgPool.*larger than its input grid of size 2"):
        cnngp.kernel(Serial(Conv(3, stride=3), ReLU(), cnngp.AvgPool(3), Readout()), GOOD)
    with pytest.raises(CNNGPError, match=r"ends on a spatial grid"):
        cnngp.kernel(Serial(Conv(3), ReLU()), GOOD)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"layers": [{"type": "convolution"}]}, r"layer 0: unknown type 'convolution'; expected one of \['abrelu'"),
        ({"layers": [{"type": "conv", "correlation": {"type": "cauchy"}}]}, r"correlation: unknown type 'cauchy'; expected one of"),
        ({"layers": [{"type": "conv", "size": 3}]}, r"layer 0 of type 'conv': unknown key\(s\) \['size'\]; accepted keys are"),
        ({"layers": [{"type": "conv", "correlation": {"type": "matern", "lengthscale": -1}}]}, r"lengthscale: expected a number >= 0"),
        ({"layers": []}, r"'layers' must be a non-empty list"),
        ({"layer": []}, r"spec: unknown key\(s\) \['layer'\]"),
        ({"input_channels": 0, "layers": [{"type": "relu"}]}, r"'input_channels' must be an int >= 1"),
        ([1, 2], r"spec: expected a JSON object"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(CNNGPError, match=match):
        from_spec(spec)


# -- the command line -----------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, x=(GOOD * 255).astype(np.uint8), other=GOOD[:1])
    return path


def _run_cli(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--arch", "resnet50"], r"arch: unknown architecture 'resnet50'"),
        (["--x1", "{tmp}/missing.npz"], r"--x1: .*not found"),
        (["--x1", "{tmp}/x.npz:nope"], r"--x1: no array 'nope' .* available arrays: \['x', 'other'\]"),
        (["--lengthscales", "1,-2"], r"--lengthscales: expected a number >= 0"),
        (["--arch", "{tmp}/spec.json"], r"spec file: .* is not valid JSON"),
        (["--arch", "{tmp}/unknown.json"], r"layer 0: unknown type 'dense'"),
        (["--x1", "{tmp}/nan.npz"], r"--x1: contains 1 NaN or infinite pixel values"),
        (["--arch", "cnngp2", "--readout", "matern32"], r"--readout: matern32 needs a lengthscale"),
        (["--arch", "cnngp9"], r"layer 0 .*larger than its input grid|NONE"),
        (["--memory-budget", "lots"], r"--memory-budget: expected a size of at least 1M such as 2G"),
    ],
)
def test_cli_errors_one_line_no_output(tmp_path, images, capsys, extra, match):
    (tmp_path / "spec.json").write_text("{not json")
    (tmp_path / "unknown.json").write_text(json.dumps({"layers": [{"type": "dense"}]}))
    bad = GOOD.copy()
    bad[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad)
    out = tmp_path / "k.npz"
    args = {"--arch": "cnngp2", "--x1": str(images), "--out": str(out)}
    flags = []
    it = iter(extra)
    for a in it:
        value = next(it).replace("{tmp}", str(tmp_path))
        if a in args:
            args[a] = value
        else:
            flags += [a, value]
    if args["--arch"] == "cnngp9":  # 9 layers of 3x3 'same' convs fit a 5x5 grid: succeeds
        code, err = _run_cli(capsys, "kernel", *sum(([k, v] for k, v in args.items()), []), "--quiet")
        assert code == 0 and out.exists()
        return
    code, err = _run_cli(capsys, "kernel", *sum(([k, v] for k, v in args.items()), []), *flags, "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnngp: error: "), err
    assert __import__("re").search(match, lines[0]), lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".k.npz*"))  # no partial file left behind


def test_cli_kernel_writes_everything(tmp_path, images, capsys):
    out = tmp_path / "k.npz"
    code, _ = _run_cli(capsys, "kernel", "--arch", "cnngp2", "--x1", images, "--x2", f"{images}:other",
                       "--out", out, "--lengthscales", "0,1.5,inf", "--quiet")
    assert code == 0
    z = np.load(out)
    assert z["kernel"].shape == (3, 2, 1)
    assert list(z["lengthscales"]) == [0.0, 1.5, math.inf]
    config = json.loads(str(z["config"]))
    assert config["arch"] == "cnngp2" and config["dtype"] == "float64"
    assert "torch" in json.loads(str(z["versions"]))
    assert len(str(z["x1_sha256"])) == 64 and len(str(z["x2_sha256"])) == 64
    # uint8 input was scaled to [0, 1]: the same kernel as the float images
    net = cnngp.io.architectures.get("cnngp2")
    x = (GOOD * 255).astype(np.uint8) / 255.0
    expected = cnngp.readout_sweep(net[:-1], [Readout(correlation=Matern(1.5, lam)) for lam in (0, 1.5, math.inf)], x, GOOD[:1])
    np.testing.assert_allclose(z["kernel"], expected.numpy(), rtol=1e-12)


def test_cli_entry_point_runs_as_a_process(tmp_path, images):
    out = tmp_path / "k.npz"
    ok = subprocess.run([sys.executable, "-m", "cnngp.cli.main", "kernel", "--arch", "cnngp2", "--x1", str(images),
                         "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "cnngp.cli.main", "kernel", "--arch", "cnngp2", "--x1",
                          str(tmp_path / "none.npz"), "--out", str(tmp_path / "k2.npz")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert not (tmp_path / "k2.npz").exists()


def test_cli_info_lists_grids_and_representation(capsys):
    assert main(["info", "--arch", "myrtle10-paper", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["grids"][0] == [32, 32] and info["grids"][-1] == []
    assert [32, 32] in info["grids"] and [8, 8] in info["grids"]
    assert info["representation"][0] == "full"  # global pooling on top: the full tensor
    assert main(["info", "--arch", "cnngp3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["representation"] == ["diagonal"] * 8
    assert main(["info", "--arch", "myrtle10-paper", "--readout", "independent", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    reps = record["representation"]
    assert reps[0] == "band 3x3" and "band 1x1" in reps and reps[-1] == "diagonal"
    # without --json: a table a person reads, one row per layer, the same grids and representations
    assert main(["info", "--arch", "myrtle10-paper", "--readout", "independent"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "myrtle10-paper on a 32×32 input:" and lines[-1].endswith("(full record: --json)")
    rows = [line.split() for line in lines[2:-1]]
    layers = record["spec"]["layers"]
    assert [int(r[0]) for r in rows] == list(range(1, len(layers) + 1))
    for i, row in enumerate(rows):
        out = record["grids"][i + 1]
        assert row[-3 if reps[i].startswith("band") else -2] == ("×".join(map(str, out)) if out else "—")
        assert " ".join(row[-2:]).endswith(reps[i])
        assert row[1] == layers[i]["type"]
    assert main(["info"]) == 0
    assert "architectures: cnngp{depth}, myrtle5" in capsys.readouterr().out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_cuda_requested_without_a_device(images, tmp_path, capsys):
    with pytest.raises(CNNGPError, match=r"device: 'cuda' was requested but torch finds no CUDA device"):
        cnngp.kernel(NET, GOOD, device="cuda")
    code, err = _run_cli(capsys, "kernel", "--arch", "cnngp2", "--x1", images, "--out", tmp_path / "k.npz",
                         "--device", "cuda", "--quiet")
    assert code == 2 and "no CUDA device" in err and not (tmp_path / "k.npz").exists()
    with pytest.raises(CNNGPError, match=r"dtype: expected 'float64' or 'float32'"):
        cnngp.kernel(NET, GOOD, dtype="float16")


def test_bad_tuning_variable_warns_and_keeps_the_default():
    """A malformed CNNGP_* knob names itself in a warning; the import and the run go on."""
    code = ("import warnings, numpy as np\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import cnngp, cnngp.kernels.layers, cnngp.engine.gram\n"
            "print([str(x.message) for x in w])\n"
            "print(cnngp.kernels.layers.BAND_FRACTION, cnngp.engine.gram.STREAM_BATCH_BYTES)\n")
    env = dict(os.environ, CNNGP_BAND_FRACTION="abc", CNNGP_STREAM_BATCH_BYTES="-5")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "CNNGP_BAND_FRACTION='abc' is not a finite number >= 0; using the default 0.25" in out
    assert "CNNGP_STREAM_BATCH_BYTES='-5' is not a finite number >= 1" in out
    assert out.strip().endswith("0.25 16777216")


def test_interrupt_turned_into_import_error_is_still_an_interrupt(monkeypatch, capsys):
    """numpy turns a Ctrl-C during its C-extension import into ImportError: still exit 130,
    one line, not an "internal error" (seen on a loaded CI machine)."""
    import cnngp.cli.main as cli

    def interrupted_import(args):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as stop:
            raise ImportError("Importing the numpy C-extensions failed") from stop

    monkeypatch.setattr(cli, "cmd_info", interrupted_import)
    assert cli.main(["info"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cnngp: interrupted; no output written"]


def test_broken_pipe_ends_quietly(monkeypatch, capsys):
    """`cnngp info | head -2`: the reader leaves early; exit 141 like a shell, no message."""
    import cnngp.cli.main as cli

    def reader_left(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "cmd_info", reader_left)
    monkeypatch.setattr(cli.os, "dup2", lambda *a: None)  # keep pytest's own stdout
    assert cli.main(["info"]) == 141
    assert capsys.readouterr().err == ""


def test_montecarlo_never_writes_an_overflowed_estimate(tmp_path, monkeypatch, capsys):
    import torch

    import cnngp.finite

    def overflowed(*a, **k):
        return torch.full((2, 2), float("inf")), torch.ones(2, 2)

    monkeypatch.setattr(cnngp.finite, "monte_carlo_kernel", overflowed)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).uniform(size=(2, 4, 4, 1)))
    out = tmp_path / "mc.json"
    argv = ["montecarlo", "--arch", "cnngp1", "--x1", str(tmp_path / "x.npz"), "--width", "4",
            "--samples", "2", "--out", str(out), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "overflowed" in err[0] and err[0].startswith("cnngp: error: --dtype")
    assert not out.exists()


@pytest.mark.parametrize("lam", [1e-300, 1e-4, 0.001, 0.002])
def test_a_matern_readout_whose_off_diagonal_underflows_is_the_independent_kernel(lam, tmp_path, capsys):
    """exp(-√3/λ) is 0 in float64 for λ <= 0.0023: Σ is exactly I/|P|, the λ = 0 kernel
    (it raised 'needs the full position-pair covariance' for every 0 < λ <= 0.002)."""
    x = GOOD
    base = cnngp.kernel(Serial(Conv(3), ReLU(), Readout(correlation=Matern(1.5, 0.0))), x)
    tiny = cnngp.kernel(Serial(Conv(3), ReLU(), Readout(correlation=Matern(1.5, lam))), x)
    assert torch.equal(tiny, base)
    np.savez(tmp_path / "x.npz", x)
    out = {}
    for ls in ("0", repr(lam)):
        argv = ["kernel", "--arch", "cnngp1", "--x1", str(tmp_path / "x.npz"), "--quiet",
                "--out", str(tmp_path / f"k{ls}.npz"), "--readout", f"matern32:{ls}"]
        assert main(argv) == 0, capsys.readouterr().err
        out[ls] = np.load(tmp_path / f"k{ls}.npz")["kernel"]
    assert np.array_equal(out["0"], out[repr(lam)])


# -- options that would be ignored or misread: refused, naming the flag (issue 28) ----------------


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--refine", "3"], r"^cnngp: error: --refine: only meaningful with --params internal"),
        (["--params", "readout", "--refine", "0"], r"^cnngp: error: --refine: only meaningful with --params internal"),
        (["--store", "{tmp}/S.npz"], r"^cnngp: error: --store .*S\.npz: .*must end in \.zarr"),
    ],
)
def test_learn_refuses_ignored_or_misnamed_options(tmp_path, capsys, extra, match):
    out = tmp_path / "learn-out"
    argv = ["learn", "--n", "4", "--out", str(out), "--quiet"] + [a.format(tmp=tmp_path) for a in extra]
    code, err = _run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err.strip()), err
    assert not out.exists() and not (tmp_path / "S.npz").exists()


def test_spec_refuses_a_number_given_as_a_string():
    layers = [{"type": "conv", "weight_var": "1"}, {"type": "relu"}, {"type": "readout"}]
    with pytest.raises(CNNGPError, match=r"layer 0 of type 'conv': 'weight_var' must be a number.*'1'"):
        from_spec({"layers": layers})
    layers = [{"type": "conv"}, {"type": "relu"}, {"type": "readout", "bias_var": "0.5"}]
    with pytest.raises(CNNGPError, match=r"layer 2 of type 'readout': 'bias_var' must be a number"):
        from_spec({"layers": layers})
    layers = [{"type": "conv", "correlation": {"type": "matern", "lengthscale": "2"}}, {"type": "relu"},
              {"type": "readout"}]
    with pytest.raises(CNNGPError, match=r"layer 0 .*'lengthscale' must be a number"):
        from_spec({"layers": layers})


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 8 GiB")])
def test_out_of_memory_names_the_jobs_size_not_only_images(tmp_path, images, monkeypatch, capsys, error):
    import cnngp.cli.main as cli_main

    def boom(*a, **k):
        raise error

    monkeypatch.setattr(cli_main, "load_network", boom)
    code, err = _run_cli(capsys, "kernel", "--arch", "cnngp1", "--x1", images, "--out", tmp_path / "k.npz", "--quiet")
    assert code == 2
    line = err.strip()
    assert len(line.splitlines()) == 1, err
    assert line.startswith("cnngp: error: out of memory (the job's size: images, grid, readouts, --memory-budget")
    assert "grid" in line and "--memory-budget" in line


@pytest.mark.parametrize("pair", [False, True])
def test_overflow_message_gives_the_pixel_maximum_over_all_images(pair):
    # only the last image is large: the message must say 1e+07, not the first image's 0.5
    net = Serial(Conv(3, weight_var=1e6), ReLU(), Conv(3, weight_var=1e6), ReLU(), Readout())
    x = np.full((3, 4, 4, 1), 0.5)
    x[2] = 1e7
    args = (x[:1], x) if pair else (x,)
    with pytest.raises(CNNGPError, match=r"overflowed .*\(pixels up to 1e\+07,.*; use dtype float64, "):
        cnngp.kernel(net, *args, execution=cnngp.Execution(dtype="float32"))


def test_overflow_in_float64_does_not_advise_float64():
    net = Serial(Conv(3, weight_var=1e150), ReLU(), Conv(3, weight_var=1e150), ReLU(), Conv(3, weight_var=1e150),
                 ReLU(), Readout())
    with pytest.raises(CNNGPError, match=r"overflowed to NaN or infinity in float64") as info:
        cnngp.kernel(net, np.full((2, 4, 4, 1), 0.5))
    assert "use dtype float64" not in str(info.value) and "smaller weight_var" in str(info.value)


@pytest.mark.parametrize("n_test, match", [
    ("3", r"^cnngp: error: --n-test: n_test=3 must be a positive multiple of the number of classes"),
    ("6", r"^cnngp: error: --n-test: n_test=6 needs 3 images per class .*largest balanced n_test is 4"),
])
def test_learn_n_test_errors_name_n_test_not_n(tmp_path, capsys, n_test, match):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=rng.uniform(size=(12, 4, 4, 1)), y_train=np.arange(12) % 2,
             x_test=rng.uniform(size=(4, 4, 4, 1)), y_test=np.arange(4) % 2)
    code, err = _run_cli(capsys, "learn", "--arch", "cnngp1", "--data", data, "--n", "4", "--folds", "2",
                         "--out", tmp_path / "lo", "--quiet", "--test", "--n-test", n_test)
    assert code == 2
    assert re.search(match, err.strip()), err


def test_sweep_refuses_single_class_data_before_any_kernel(monkeypatch):
    from cnngp.experiments import sweep as sweep_mod
    from cnngp.io.data import Dataset

    rng = np.random.default_rng(0)
    ds = Dataset(name="one", x_train=rng.uniform(size=(8, 4, 4, 1)), y_train=np.zeros(8, dtype=np.int64),
                 x_test=None, y_test=None, class_names=("zero",))

    def no_kernel(*a, **k):
        raise AssertionError("a kernel was computed before the single-class data was refused")

    monkeypatch.setattr(sweep_mod, "split_network", no_kernel)
    protocol = sweep_mod.SweepProtocol(ns=(4,), folds=2, lengthscales=(1.0,))
    with pytest.raises(CNNGPError, match=r"^dataset .*only 1 class; classification needs at least 2"):
        sweep_mod.run_sweep("cnngp1", ds, protocol)


@pytest.mark.parametrize("name, text, match", [
    ("big_int.json", '{"layers": [{"type": "conv", "weight_var": %d}, {"type": "relu"}, {"type": "readout"}]}'
     % 10**400, r"big_int\.json.*integer.*too large"),
    ("big_filter.json", '{"layers": [{"type": "conv", "filter": %s}, {"type": "relu"}, {"type": "readout"}]}'
     % ("1" + "0" * 5000), r"big_filter\.json.*integer.*too large"),
    ("ragged.json", json.dumps({"layers": [{"type": "conv", "filter": 2, "correlation": {
        "type": "user", "matrix": [[1, 0, 0, 0], [0, 1], [0, 0, 1, 0], [0, 0, 0, 1]]}},
        {"type": "relu"}, {"type": "readout"}]}), r"correlation matrix: expected a square"),
])
def test_cli_spec_with_a_huge_integer_or_a_ragged_matrix_is_one_line(tmp_path, capsys, name, text, match):
    (tmp_path / name).write_text(text)
    np.savez(tmp_path / "x.npz", GOOD)
    code = main(["kernel", "--arch", str(tmp_path / name), "--x1", str(tmp_path / "x.npz"),
                 "--out", str(tmp_path / "k.npz"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("cnngp: error: --arch: ") and re.search(match, err[0]), err[0]
    assert not (tmp_path / "k.npz").exists()


def test_full_disk_under_sweep_outputs_names_out_and_the_file(tmp_path, monkeypatch):
    import errno

    from cnngp.engine.storage import write_files

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, payload):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    out = tmp_path / "sw"
    with pytest.raises(CNNGPError, match=r"^--out: writing '.*sw/sweep\.png' failed \(No space left on device\)"):
        write_files(out, {"sweep.png": b"png", "results.json": b"{}"})
    assert not out.exists()


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_output_write_leaves_the_previous_outputs_as_they_were(tmp_path, monkeypatch, failure):
    """A rename failing (or Ctrl-C landing) after earlier files of the set were put in place
    used to unlink those: the previous run's sweep.png and reliability.png were gone while the
    message said nothing was written. Every previous file is back, byte for byte, no new file
    stays and no temporary or backup file is left."""
    from cnngp.engine.storage import write_files

    out = tmp_path / "sw"
    old = {"sweep.png": b"old png", "reliability.png": b"old rel", "results.json": b'{"old": 1}'}
    write_files(out, old)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("results.json") and str(src).endswith(".partial"):
            raise failure
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    new = {"sweep.png": b"new png", "reliability.png": b"new rel", "extra.npz": b"new",
           "results.json": b'{"new": 1}'}
    with pytest.raises((CNNGPError, KeyboardInterrupt)) as info:
        write_files(out, new)
    if isinstance(failure, OSError):
        assert str(info.value).startswith("--out: writing") and "nothing was written" in str(info.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    monkeypatch.setattr(os, "replace", real_replace)
    write_files(out, new)  # and a write that succeeds leaves only the new files
    assert {p.name: p.read_bytes() for p in out.iterdir()} == new


def test_a_layer_in_a_message_shows_its_user_matrix_by_size_not_entries():
    """Layers appear in one-line messages by their repr; a 64×64 user matrix there would be
    4,096 numbers. The repr shows a correlation by its own (short) repr instead."""
    net = Serial(Conv(3), ReLU(), Readout(correlation=UserCorrelation(np.eye(9))))
    with pytest.raises(CNNGPError) as info:
        net.grids((8, 8))
    text = str(info.value)
    assert "Readout(weight_var=1.0, bias_var=0.0, correlation=UserCorrelation(<9x9>))" in text
    assert "has shape (9, 9) but the grid (8, 8) has 64 positions" in text and len(text) < 300
    assert repr(Conv(3, correlation=Matern(1.5, 2.0))).endswith("correlation=Matern(nu=1.5, lengthscale=2.0))")


def test_kernel_on_a_disk_without_room_names_out(tmp_path, capsys, monkeypatch):
    """The output's disk is --out's problem, not --x1's: one line naming --out and its path."""
    from cnngp.engine import resources

    monkeypatch.setattr(resources, "free_disk", lambda path: 1024)
    x = tmp_path / "x.npz"
    np.savez(x, x=np.random.default_rng(0).random((10, 8, 8, 1)))
    out = tmp_path / "k.npz"
    code, err = _run_cli(capsys, "kernel", "--arch", "cnngp2", "--x1", x, "--out", out, "--quiet")
    err = err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.fullmatch(rf"cnngp: error: --out: writes about .* but {re.escape(repr(str(out)))} has 1 KiB free; "
                        r"free space there, or give an --out on a larger disk", err[0]), err[0]
    assert not out.exists()


def test_cli_kernel_says_how_it_read_the_images_only_after_every_check(tmp_path, capsys):
    """``cnngp kernel`` prints how it read --x1/--x2 once the command's checks have passed, so a
    refusal after reading them (a second image set of another shape, a lender that cannot lend)
    is still one line; a run that starts says it first."""
    np.savez(tmp_path / "small.npz", x=np.random.default_rng(0).uniform(size=(3, 4, 4, 1)))
    base = ["kernel", "--arch", "cnngp2", "--x1", "digits:8"]
    assert main(base + ["--x2", str(tmp_path / "small.npz"), "--out", str(tmp_path / "a.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnngp: error: --x2: images of shape (4, 4, 1)")
    assert main(["kernel", "--arch", "cnngp2", "--x1", "digits:12", "--out", str(tmp_path / "big.zarr"),
                 "--archive", str(tmp_path / "arch"), "--quiet"]) == 0
    assert main(base + ["--out", str(tmp_path / "b.zarr"), "--reuse", str(tmp_path / "arch")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reuse: " in err and "a tile archive of a kernel on more images" in err
    assert main(base + ["--out", str(tmp_path / "c.zarr"), "--reuse", str(tmp_path / "big.zarr")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("--x1: 8 images of 8×8, 1 channel (N, H, W, C)\n") and "1 reused from" in err


def test_cli_montecarlo_says_how_it_read_the_images_only_after_every_check(tmp_path, capsys):
    """As ``kernel``: a refusal after reading the images (a --x2 of another shape) is one line."""
    np.savez(tmp_path / "small.npz", x=np.random.default_rng(0).uniform(size=(3, 4, 4, 1)))
    argv = ["montecarlo", "--arch", "cnngp2", "--x1", "digits:2", "--samples", "4", "--width", "8",
            "--out", str(tmp_path / "m.json")]
    assert main(argv + ["--x2", str(tmp_path / "small.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnngp: error: --x2: images of shape (4, 4, 1)")
    assert main(argv) == 0
    assert capsys.readouterr().err.startswith("--x1: 2 images of 8×8, 1 channel (N, H, W, C)\n")

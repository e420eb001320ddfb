"""Issue 28, "Silent wrong answers and missing provenance": image layouts decided once and echoed,
commands recorded from their parsed arguments, learn's starts and iteration limit, `cnngp info`'s
summary, saved dtypes and arrays, the sweep's figure and bands, the resumed progress bar."""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest

import cnngp
from cnngp.cli.main import build_parser, main
from cnngp.errors import CNNGPError
from cnngp.validation import as_images


# -- 1. image layouts --------------------------------------------------------------------------


def test_channels_first_images_are_refused_with_what_was_read():
    x = np.random.default_rng(0).uniform(size=(4, 3, 32, 32))
    with pytest.raises(CNNGPError, match=r"x1: shape \(4, 3, 32, 32\) looks channels-first.*NCHW"):
        as_images(x, "x1")
    with pytest.raises(CNNGPError, match="looks channels-first"):  # the kernel entry point too
        cnngp.kernel(cnngp.io.architectures.get("cnngp2"), x)


def test_grey_images_without_channel_axis_are_refused():
    x = np.random.default_rng(0).uniform(size=(4, 28, 28))
    with pytest.raises(CNNGPError, match=r"x1: shape \(4, 28, 28\) looks like grey images.*add a channel axis"):
        as_images(x, "x1")


def test_stated_layouts_convert_and_signals_stay_accepted():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(4, 3, 8, 10))
    np.testing.assert_array_equal(as_images(x, layout="NCHW"), x.transpose(0, 2, 3, 1))
    g = rng.uniform(size=(4, 8, 8))
    assert as_images(g, layout="NHW").shape == (4, 8, 8, 1)
    assert as_images(rng.uniform(size=(4, 64, 1))).shape == (4, 64, 1)  # 1-D signals (conv1d_digits)
    kept = as_images(x, layout="NHWC")  # stated channels-last: taken as it is, and not re-guessed
    assert kept.shape == x.shape and as_images(kept).shape == x.shape
    with pytest.raises(CNNGPError, match="layout 'NCHW' needs a 4-D array"):
        as_images(g, layout="NCHW")


def test_cli_refuses_channels_first_echoes_the_shape_and_converts_with_layout(tmp_path, capsys):
    x = np.random.default_rng(2).uniform(size=(3, 3, 6, 6))
    np.savez(tmp_path / "x.npz", x=x)
    argv = ["kernel", "--arch", "cnngp2", "--x1", str(tmp_path / "x.npz"), "--out", str(tmp_path / "k.npz")]
    assert main(argv) == 2
    assert "--x1: shape (3, 3, 6, 6) looks channels-first" in capsys.readouterr().err
    assert main(argv + ["--layout", "nchw"]) == 0
    err = capsys.readouterr().err
    assert "--x1: 3 images of 6×6, 3 channels (N, H, W, C)" in err
    with np.load(tmp_path / "k.npz") as f:
        ref = cnngp.kernel(cnngp.io.architectures.get("cnngp2"), x.transpose(0, 2, 3, 1)).numpy()
        np.testing.assert_allclose(f["kernel"], ref, rtol=1e-12)


# -- 2. provenance of the sweep ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ntk_sweep(tmp_path_factory):
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("ntk") / "s"
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = main(["sweep", "--arch", "cnngp1", "--n", "40", "--lengthscales", "1", "--kernel", "ntk",
                     "--quiet", "--out", str(out)])
    assert code == 0
    return json.loads((out / "results.json").read_text()), buf.getvalue()


def test_sweep_ntk_records_a_command_that_replays_the_ntk(ntk_sweep):
    results, table = ntk_sweep
    command = results["config"]["command"]
    assert "--kernel ntk" in command
    replay = build_parser().parse_args(shlex.split(command)[1:])
    assert replay.kernel == "ntk" and replay.arch == "cnngp1" and replay.lengthscales == "1"
    assert "NTK" in table.splitlines()[0]


def test_sweep_figure_title_says_ntk(ntk_sweep):
    from cnngp.experiments.plots import sweep_figure

    import io

    fig = sweep_figure(ntk_sweep[0], io.BytesIO(), format="png")
    assert "NTK" in fig.axes[0].get_title()


# -- 3. cnngp learn --params all ---------------------------------------------------------------


def test_learn_all_runs_every_start_warns_at_the_limit_and_names_layers(tmp_path, capsys):
    out = tmp_path / "all"
    assert main(["learn", "--n", "40", "--params", "all", "--max-iter", "1", "--starts", "0.3,3",
                 "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "iteration limit" in err and "--max-iter" in err
    r = json.loads((out / "learned.json").read_text())
    assert [s["start_lengthscale"] for s in r["starts"]] == [0.3, 3.0]
    assert {e["start"] for e in r["trace"]} == {0, 1}
    assert "readout.lengthscale" in r["learned"] and not any(k[0].isdigit() for k in r["learned"])
    assert "--params all" in r["config"]["command"] and "--starts 0.3,3" in r["config"]["command"]


def test_parameter_names_say_which_layer():
    from cnngp.inference.learn import kernel_parameters

    net = cnngp.Serial(cnngp.Conv(3, correlation=cnngp.Matern(1.5, 1.0)), cnngp.ReLU(),
                       cnngp.Readout(correlation=cnngp.Matern(1.5, 3.0)))
    assert {"conv0.lengthscale", "readout.lengthscale", "readout.weight_var"} <= set(kernel_parameters(net))


# -- 4. info, --version, saved dtype and arrays, the sweep's figure and bands -----------------


def test_info_prints_a_summary_with_readout_correlations_and_json_on_request(tmp_path, capsys):
    store = tmp_path / "K.zarr"
    assert main(["kernel", "--arch", "cnngp2", "--x1", "digits:5", "--out", str(store), "--quiet",
                 "--lengthscales", "0,2"]) == 0
    capsys.readouterr()
    assert main(["info", str(store)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].startswith(f"{store}: 1/1 tiles done") and len(lines) < 20
    assert "λ=2" in text and "float64" in text and "network" in text and "DAMAGED" not in text
    assert main(["info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["readout_specs"][1]["correlation"]["lengthscale"] == 2.0


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cnngp {cnngp.__version__}"


def test_kernel_saved_in_the_dtype_computed_and_no_duplicate_array(tmp_path):
    out = tmp_path / "k.npz"
    assert main(["kernel", "--arch", "cnngp2", "--x1", "digits:4", "--out", str(out), "--dtype", "float32",
                 "--quiet"]) == 0
    with np.load(out) as f:
        assert f["kernel"].dtype == np.float32 and "nngp" not in f.files and "ntk" not in f.files
        config = json.loads(str(f["config"]))
        assert config["saved_dtype"] == "float32" and "--dtype float32" in config["command_line"]


def _rows(n, sets, accs):
    return [{"n": n, "readout": r, "lengthscale": lam, "cv_accuracy": float(np.mean(accs)),
             "cv_accuracy_2se": float(2 * np.std(accs, ddof=1) / math.sqrt(sets)) if sets > 1 else 0.0,
             "n_datasets": sets, "block_cv_accuracies": list(accs), "noise_variance": 0.1}
            for r, lam in (("independent", 0.0), ("matern32", 1.0), ("constant", "inf"))]


def test_agreeing_blocks_get_the_binomial_band_marked():
    from cnngp.experiments.plots import accuracy_2se
    from cnngp.experiments.sweep import summary_table

    rows = _rows(40, 2, [0.75, 0.75])
    assert accuracy_2se(rows[0]) == pytest.approx(2 * math.sqrt(0.75 * 0.25 / 80))
    best = [{**rows[1], "n": 40}]
    table = summary_table({"results": rows, "best": best, "config": {}})
    assert "± 0.0" not in table and "b" in table.splitlines()[2].split("±", 1)[1].split()[0]
    assert table.splitlines()[-1].startswith("b:")


def test_sweep_figure_shows_test_accuracy():
    import io

    from cnngp.experiments.plots import sweep_figure

    rows = _rows(40, 2, [0.7, 0.8])
    for r in rows:
        r["test_accuracy"] = 0.65
    fig = sweep_figure({"results": rows, "best": [rows[1]], "config": {}}, io.BytesIO(), format="png")
    labels = [h.get_label() for h in fig.axes[0].get_lines()]
    assert any("test accuracy" in label for label in labels)


# -- 6. a resumed run's progress bar ------------------------------------------------------------


def test_resumed_progress_bar_starts_where_it_stopped(tmp_path, monkeypatch):
    import tqdm.auto

    from cnngp.engine import gram, storage

    real_init = storage.Checkpoint.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.every = 0.0

    monkeypatch.setattr(storage.Checkpoint, "__init__", init)
    shown = []
    real_tqdm = tqdm.auto.tqdm

    class Recorder(real_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            shown.append(self)
            self.first = self.counted = kwargs.get("initial", 0)
            self.total_ = kwargs.get("total")

        def update(self, n=1):
            self.counted += n
            return super().update(n)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    net = cnngp.io.architectures.get("cnngp2")
    x = np.random.default_rng(3).uniform(size=(6, 5, 5, 1))
    ckpt = tmp_path / "c.npz"
    real_pairs = gram._pair_values
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_pairs(*args, **kwargs)

    monkeypatch.setattr(gram, "_pair_values", flaky)
    opts = dict(checkpoint=ckpt, keep_checkpoint=True, batch_size=4, progress=True)
    with pytest.raises(KeyboardInterrupt):
        cnngp.kernel(net, x, **opts)
    before = shown[-1].counted
    assert 0 < before < shown[-1].total_
    monkeypatch.setattr(gram, "_pair_values", real_pairs)
    cnngp.kernel(net, x, **opts)
    resumed = shown[-1]
    assert resumed is not shown[-2]
    assert resumed.first == before  # it starts from what the interrupted run had shown
    assert resumed.counted == resumed.total_  # and ends exactly at its total

"""The paper's protocol end to end (cnngp.experiments.sweep), its figure, and the ``cnngp sweep`` command."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

import cnngp

from cnngp.inference import gp
from cnngp.cli.main import main
from cnngp.io.data import Dataset, blocks, load_digits
from cnngp.errors import CNNGPError
from cnngp.experiments.sweep import run_sweep, summary_table
from conftest import needs_proc, open_handles

ARCH = "cnngp1"
NS = (40, 80)
LAMS = [0.0, 1.0, 10.0, math.inf]  # 0 and inf must reproduce the two exact ends
ROW_KEYS = {
    "n", "readout", "lengthscale", "cv_accuracy", "cv_accuracy_2se", "n_datasets",
    "noise_variance", "block_cv_accuracies", "block_noise_variances", "block_noise_variance_ties",
}


def _digits_npz(path, test=True, drop_class=None, n_train=600):
    x, y = load_digits()
    x8 = np.round(x * 255).astype(np.uint8)
    arrays = {"x_train": x8[:n_train], "y_train": y[:n_train].astype(np.uint8)}
    if test:
        arrays.update(x_test=x8[1500:], y_test=y[1500:].astype(np.uint8))
    arrays["class_names"] = np.array([str(i) for i in range(10)])
    if drop_class is not None:
        keep = arrays["y_train"] != drop_class
        arrays["x_train"], arrays["y_train"] = arrays["x_train"][keep], arrays["y_train"][keep]
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "kernels.npz"
    res = run_sweep(ARCH, "digits", ns=NS, lengthscales=LAMS, progress=False, kernel_cache=cache)
    return res, cache


def _row(res, n, readout, lam):
    return next(
        r for r in res["results"]
        if r["n"] == n and r["readout"] == readout and r["lengthscale"] == lam
    )


# -- library --------------------------------------------------------------------------------


def test_results_schema(sweep):
    res, _ = sweep
    assert set(res) == {"config", "versions", "results", "best", "timing", "float64_check"}
    # float32 is the default; a few entries are recomputed in float64: a float32 rounding error
    check = res["float64_check"]
    assert res["config"]["dtype"] == "float32" and check["pairs"] == 10
    assert 0 < check["max_relative_error"] < 1e-5
    json.dumps(res, allow_nan=False)  # strict JSON: inf is written as the string "inf"
    # the plan timed before the kernels: its stages' pairs are the sweep's, its rates positive
    plan = res["timing"]["estimate"]
    n = max(NS)
    assert plan["stages"][0]["pairs"] == n * (n + 1) // 2 and plan["stages"][0]["images"] == n
    assert plan["seconds"] > 0 and plan["rates"]["seconds_per_pair"] > 0
    assert res["timing"]["kernel_seconds"] > 0
    cfg = res["config"]
    assert cfg["ns"] == list(NS) and cfg["folds"] == 4 and cfg["family"] == "matern32"
    assert cfg["readout_grid"] == [8, 8] and cfg["seed"] == 0
    assert cfg["lengthscales"] == [0.0, 1.0, 10.0, "inf"]
    rows = res["results"]
    assert len(rows) == len(NS) * (len(LAMS) + 2)
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["readout"] in ("independent", "matern32", "constant")
        assert r["lengthscale"] == "inf" or isinstance(r["lengthscale"], float)
        assert 0 <= r["cv_accuracy"] <= 1 and r["cv_accuracy_2se"] >= 0
        assert r["n_datasets"] == 80 // r["n"] == len(r["block_cv_accuracies"])
        assert r["noise_variance"] > 0
        assert r["cv_accuracy"] == pytest.approx(np.mean(r["block_cv_accuracies"]))
    for n in NS:
        assert _row(res, n, "independent", 0.0)
        assert _row(res, n, "constant", "inf")
    assert [b["n"] for b in res["best"]] == list(NS)
    for b in res["best"]:
        assert b["cv_accuracy"] == max(r["cv_accuracy"] for r in rows if r["n"] == b["n"])
    # digits are easy: any readout of a 1-layer net is far above chance
    assert min(r["cv_accuracy"] for r in rows) > 0.6


def test_lengthscale_ends_equal_exact_readouts(sweep):
    res, _ = sweep
    for n in NS:
        for lam, end in ((0.0, "independent"), ("inf", "constant")):
            a, b = _row(res, n, "matern32", lam), _row(res, n, end, lam)
            for key in ("cv_accuracy", "cv_accuracy_2se", "noise_variance",
                        "block_cv_accuracies", "block_noise_variances"):
                assert a[key] == b[key], (n, lam, key)


def test_blocks_are_disjoint_and_reproduce_the_reported_accuracies(sweep):
    res, cache = sweep
    with np.load(cache) as z:
        K, order, y = z["kernels"], z["train_index"], z["y_train"]
        names = z["readout_names"].tolist()
    assert K.shape == (len(LAMS) + 2, 80, 80)
    assert len(np.unique(order)) == 80  # distinct images
    assert np.array_equal(y, load_digits()[1][order])
    for n in NS:
        bl = blocks(80, n, 10)
        covered = np.concatenate(bl)
        assert len(np.unique(covered)) == len(covered) == 80  # disjoint, cover all
        for b in bl:
            assert np.all(np.bincount(y[b], minlength=10) == n // 10)  # balanced
        ind = _row(res, n, "independent", 0.0)
        k = names.index("independent")
        accs = [gp.cross_validate(K[k][np.ix_(b, b)], y[b], 4, n_classes=10).best_accuracy
                for b in bl]
        assert accs == ind["block_cv_accuracies"]


def test_same_seed_same_numbers_and_cache_reuse(sweep, monkeypatch):
    res, cache = sweep

    def boom(*a, **k):
        raise AssertionError("kernel recomputed despite a matching cache")

    monkeypatch.setattr("cnngp.engine.gram.readout_sweep", boom)
    again = run_sweep(ARCH, "digits", ns=NS, lengthscales=LAMS, progress=False, kernel_cache=cache)
    assert again["results"] == res["results"] and again["config"] == res["config"]


def test_recomputed_with_same_seed_is_identical_and_other_seed_differs():
    once = run_sweep(ARCH, "digits", ns=(40,), lengthscales=[1.0], progress=False)
    twice = run_sweep(ARCH, "digits", ns=(40,), lengthscales=[1.0], progress=False)
    assert twice["results"] == once["results"] and twice["config"] == once["config"]
    other = run_sweep(ARCH, "digits", ns=(40,), lengthscales=[1.0], progress=False, seed=1)
    assert other["config"]["train_sha256"] != once["config"]["train_sha256"]


def test_mismatched_cache_is_an_error(sweep):
    _, cache = sweep
    with pytest.raises(CNNGPError, match="different sweep"):
        run_sweep("cnngp2", "digits", ns=NS, lengthscales=LAMS, progress=False, kernel_cache=cache)


@pytest.mark.parametrize("change", ["negated", "one entry"])
def test_altered_cache_is_refused_by_its_checksum(sweep, tmp_path, change):
    """A cache whose kernels were edited after they were written (a negated stack: every
    readout with a negative diagonal; or one entry nudged, which no other check could see)
    fails the sha256 recorded beside them, naming the file."""
    _, cache = sweep
    with np.load(cache) as z:
        arrays = dict(z)
    if change == "negated":
        arrays["kernels"] = -arrays["kernels"]
    else:
        arrays["kernels"][0, 0, 1] *= 1 + 1e-12
    bad = tmp_path / "altered.npz"
    np.savez(bad, **arrays)
    with pytest.raises(CNNGPError, match=r"kernel_cache: .*altered.npz.*: its kernels do not match the sha256"):
        run_sweep(ARCH, "digits", ns=NS, lengthscales=LAMS, progress=False, kernel_cache=bad)


@needs_proc
def test_truncated_cache_is_refused_with_its_file_closed(sweep, tmp_path):
    _, cache = sweep
    bad = tmp_path / "kernels.npz"
    bad.write_bytes(cache.read_bytes()[:500])
    with pytest.raises(CNNGPError, match="not a readable cnngp sweep kernel file") as info:
        run_sweep(ARCH, "digits", ns=NS, lengthscales=LAMS, progress=False, kernel_cache=bad)
    assert repr(str(bad)) in str(info.value)
    assert open_handles(bad) == 0


def test_test_accuracy_of_cv_selected_model(tmp_path):
    src = _digits_npz(tmp_path / "d.npz")
    res = run_sweep(ARCH, src, ns=(40,), lengthscales=[2.0], test=True, n_test=20,
                    progress=False, kernel_cache=tmp_path / "k.npz")
    t = res["test"]
    assert t["n_train"] == 40 and t["n_test"] == 20
    chosen = _row(res, 40, t["readout"], t["lengthscale"])
    assert chosen["cv_accuracy"] == res["best"][0]["cv_accuracy"]
    assert t["test_accuracy"] == chosen["test_accuracy"]
    assert all("test_accuracy" in r for r in res["results"])
    with np.load(tmp_path / "k.npz") as z:
        K, Kt, y, yt = z["kernels"], z["test_kernels"], z["y_train"], z["y_test"]
        names = z["readout_names"].tolist()
    k = names.index(t["readout"]) if t["readout"] != "matern32" else 1
    expect = gp.test_accuracy(K[k], y, Kt[k], yt, t["noise_variance"], 10)
    assert t["test_accuracy"] == expect
    assert "test:" in summary_table(res)


def test_test_all_scores_every_smaller_blocks_model_on_the_test_set(tmp_path):
    """The test learning curve: at N = 40 < N_max = 80 each of the two disjoint blocks' models
    (at the σ² its own CV chose) is scored on the test images; the accuracies equal a
    brute-force GP posterior mean (a dense solve), and the row reports their mean ± 2 SE."""
    src = _digits_npz(tmp_path / "d.npz")
    res = run_sweep(ARCH, src, ns=(40, 80), lengthscales=[2.0], test=True, n_test=30,
                    progress=False, kernel_cache=tmp_path / "k.npz")
    with np.load(tmp_path / "k.npz") as z:
        K, Kt, y, yt = z["kernels"], z["test_kernels"], z["y_train"], z["y_test"]
    targets = np.eye(10)[y] - 0.1
    small = [r for r in res["results"] if r["n"] == 40]
    assert len(small) == 3
    for k, row in enumerate(small):  # the sweep's readout order: independent, λ = 2, mean pool
        want = []
        for b, noise in zip((np.arange(40), np.arange(40, 80)), row["block_noise_variances"], strict=True):
            mean = Kt[k][:, b] @ np.linalg.solve(K[k][np.ix_(b, b)] + noise * np.eye(40), targets[b])
            want.append(np.mean(mean.argmax(1) == yt))
        np.testing.assert_allclose(row["block_test_accuracies"], want, atol=1e-12)
        assert row["test_accuracy"] == pytest.approx(np.mean(want), abs=1e-12)
        # the spread of the 2 blocks and the binomial noise of the 30 test images they share
        p = np.mean(want)
        assert row["test_accuracy_2se"] == pytest.approx(2 * np.sqrt(np.var(want, ddof=1) / 2 + p * (1 - p) / 30),
                                                         abs=1e-12)
        assert row["test_nll"] == pytest.approx(np.mean(row["block_test_nlls"]), abs=1e-12)
        assert all(v > 0 for v in row["block_test_nlls"]) and all(0 <= v <= 1 for v in row["block_test_eces"])
    assert "block_test_accuracies" not in _row(res, 80, "independent", 0.0)  # N_max: the one model
    chosen = next(r for r in small if (r["readout"], r["lengthscale"]) == (res["best"][0]["readout"],
                                                                         res["best"][0]["lengthscale"]))
    assert f"at smaller N (the CV-chosen readout; mean over the disjoint training sets ± 2 SE of their spread " \
           f"and the test images'): N=40 " \
           f"{100 * chosen['test_accuracy']:.1f}" in summary_table(res)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ns=(45,)), "multiple of the number of classes"),
        (dict(ns=(80, 120)), "does not divide"),
        (dict(ns=(2000,)), "largest balanced n"),
        (dict(ns=(30,)), "fewer than the 4 folds"),
        (dict(ns=(40,), folds=1), "folds"),
        (dict(ns=(40,), test=True), "no test split"),
        (dict(ns=(40,), family="cosine"), "family"),
    ],
)
def test_bad_sizes_and_options(kwargs, match):
    with pytest.raises(CNNGPError, match=match):
        run_sweep(ARCH, "digits", lengthscales=[1.0], progress=False, **kwargs)


def test_missing_class_and_too_few_per_class(tmp_path):
    src = _digits_npz(tmp_path / "m.npz", drop_class=3)
    with pytest.raises(CNNGPError, match=r"class\(es\) \[3\]"):
        run_sweep(ARCH, src, ns=(40,), lengthscales=[1.0], progress=False)
    x, y = load_digits()
    ds = Dataset(x[:30], np.arange(10).repeat(3), None, None, "t", tuple("0123456789"))
    with pytest.raises(CNNGPError, match="fewer than the 4 folds"):
        run_sweep(ARCH, ds, ns=(40,), lengthscales=[1.0], progress=False)


def test_test_labels_above_every_training_label_are_refused_by_sweep_and_learn():
    """Test labels 10..11 against training labels 0..9 (a mislabelled or mismatched test split):
    refused before any kernel, naming the data set and the classes, not blamed on the training
    labels (which the inflated class count would have said lack classes 10 and 11)."""
    from cnngp.experiments.learned import run_learn

    x, y = load_digits()
    ds = Dataset(x[:100], y[:100], x[100:110], np.r_[y[100:108], 10, 11], "odd", tuple("0123456789ab"))
    for run in (lambda: run_sweep(ARCH, ds, ns=(40,), lengthscales=[1.0], progress=False),
                lambda: run_learn(ARCH, ds, 40)):
        with pytest.raises(CNNGPError, match=r"^dataset: odd: the test labels hold 2 class\(es\) \(10, 11\) that "
                                             "no training image has"):
            run()


def test_sweep_figure_writes_png(sweep, tmp_path):
    from cnngp.experiments.plots import sweep_figure

    res, _ = sweep
    fig = sweep_figure(res, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert "λ" in ax.get_xlabel() and ax.get_xticklabels()[0].get_text().startswith("indep")


def test_summary_table(sweep):
    res = sweep[0]
    text = summary_table(res)
    assert "independent" in text and "mean pool" in text
    lines = text.splitlines()
    # N = 80 is one block: the binomial footnote; then the nested column's footnote
    assert len(lines) == 2 + len(NS) + 2
    assert lines[-2].startswith("b: one data set") and lines[-1].startswith("nested: ")
    ind = _row(res, 80, "independent", 0.0)
    p = ind["cv_accuracy"]
    binomial = f"{100 * p:5.1f} ± {200 * math.sqrt(p * (1 - p) / 80):4.1f}b"
    assert binomial in lines[-3], (binomial, lines[-3])
    nested = res["best"][-1]["nested"]
    assert f"{100 * nested['cv_accuracy']:5.1f} ± {100 * nested['cv_accuracy_2se']:4.1f}" in lines[-3]
    assert "b" not in lines[2].split("±", 1)[1].split()[0]  # N = 40: two blocks, their spread


def test_summary_table_says_how_the_images_were_seen_and_where_no_nested_estimate_is(sweep, tmp_path):
    """The header names flips and the whitening (and where it was fitted), the figures' titles
    too; an N without a nested estimate shows a dash and a line saying why; a whitening fitted
    on the N_max the CV validates on is flagged."""
    import copy

    from cnngp.experiments.plots import input_words

    res = copy.deepcopy(sweep[0])
    res["config"].update(flip=True, zca=0.1, zca_fit={"fit": "train"})
    res["best"][0]["nested"] = {"unavailable": "not possible at N=40: too few images per class"}
    lines = summary_table(res).splitlines()
    assert lines[0].endswith("(NNGP, flip-averaged, ZCA ε=0.1 (fitted on the N_max): CV accuracy %)")
    assert lines[2].rstrip().endswith("—")  # N = 40's nested column
    assert "no nested estimate (the best column alone, optimistic): not possible at N=40: too few images " \
           "per class" in lines
    assert any(line.startswith("zca: fitted on the N_max images the CV validates on") for line in lines)
    res["config"]["zca_fit"] = {"fit": "rest", "fit_outside": 1280}
    assert not any(line.startswith("zca:") for line in summary_table(res).splitlines())
    assert input_words(res["config"]) == ", flip-averaged, ZCA ε=0.1 (fitted outside the balanced 1280)"
    assert input_words({"zca": 0.5, "zca_fit": {"fit": "rest"}}) == ", ZCA ε=0.5 (fitted outside the N_max)"
    assert input_words({"flip": False, "zca": None}) == ""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from cnngp.experiments.plots import sweep_figure

    res["config"].update(arch="cnngp1", dataset="d.npz")
    fig = sweep_figure(res, tmp_path / "s.png")
    assert fig.axes[0].get_title() == "cnngp1 NNGP, flip-averaged, ZCA ε=0.1 (fitted outside the balanced 1280) on d.npz"
    plt.close(fig)


# -- command line ---------------------------------------------------------------------------

CLI = ["sweep", "--arch", ARCH, "--n", "40,80", "--lengthscales", "0.5,5", "--quiet"]


def test_cli_writes_results_and_figure_reproducibly(tmp_path, capsys):
    out1, out2 = tmp_path / "a", tmp_path / "b" / "nested"
    assert main(CLI + ["--out", str(out1)]) == 0
    table = capsys.readouterr().out
    assert "mean pool" in table and "    80" in table
    assert sorted(os.listdir(out1)) == ["results.json", "sweep.png"]
    res = json.loads((out1 / "results.json").read_text())
    assert [r["n"] for r in res["results"]].count(40) == 4
    assert res["config"]["command"].startswith("cnngp sweep --arch cnngp1")
    assert (out1 / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert main(CLI + ["--out", str(out2)]) == 0
    first, second = (json.loads((o / "results.json").read_text()) for o in (out1, out2))
    assert first.pop("timing")["estimate"]["stages"] == second.pop("timing")["estimate"]["stages"]
    assert first == second  # everything but the run's timing is reproduced exactly


def _bad_truncated(tmp_path):
    src = _digits_npz(tmp_path / "t.npz")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    return ["--data", str(src), "--n", "40"]


def _bad_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    return ["--data", str(tmp_path / "empty"), "--n", "40"]


def _bad_missing_class(tmp_path):
    return ["--data", str(_digits_npz(tmp_path / "m.npz", drop_class=7)), "--n", "40"]


def _bad_not_npz(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip archive")
    return ["--data", str(tmp_path / "x.npz"), "--n", "40"]


@pytest.mark.parametrize(
    "make_args, match",
    [
        (lambda p: ["--n", "45"], "multiple of the number of classes"),
        (lambda p: ["--n", "80,120"], "does not divide"),
        (lambda p: ["--n", "5000"], "largest balanced n"),
        (lambda p: ["--n", "30"], "fewer than the 4 folds"),
        (lambda p: ["--n", "40,x"], "--n"),
        (lambda p: ["--folds", "1"], "--folds"),
        (lambda p: ["--n", "40", "--test"], "no test split"),
        (lambda p: ["--data", str(p / "nope.npz")], "does not exist"),
        (_bad_truncated, "--data"),
        (_bad_not_npz, "not a .npz archive"),
        (_bad_empty_folder, "holds no known data set"),
        (_bad_missing_class, r"class\(es\) \[7\]"),
        (lambda p: ["--arch", "resnet9"], "unknown architecture"),
    ],
)
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, make_args, match):
    import re

    out = tmp_path / "out"
    rc = main(["sweep", "--arch", ARCH, "--lengthscales", "1", "--quiet", "--out", str(out)]
              + make_args(tmp_path))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("cnngp: error: ")
    assert re.search(match, err[0]), err[0]
    assert not out.exists()


def test_cli_existing_out_dir_untouched_on_error(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["sweep", "--n", "45", "--quiet", "--out", str(out)]) == 2
    assert os.listdir(out) == ["keep.txt"]


def test_cli_interrupt_and_late_failure_leave_nothing(tmp_path, capsys, monkeypatch):
    import cnngp.experiments.plots
    import cnngp.experiments.sweep

    out = tmp_path / "out"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cnngp.experiments.sweep, "run_sweep", interrupted)
    assert main(CLI + ["--out", str(out)]) == 130
    assert not out.exists()
    monkeypatch.undo()

    def broken_figure(*a, **k):  # a bug (not a CNNGPError): exit 1, still nothing written
        raise ValueError("figure failed")

    monkeypatch.setattr(cnngp.experiments.plots, "sweep_figure", broken_figure)
    assert main(CLI[:4] + ["40", "--lengthscales", "1", "--quiet", "--out", str(out)]) == 1
    assert not out.exists()
    monkeypatch.undo()

    real_replace = os.replace
    calls = []

    def replace_then_interrupt(src, dst):  # Ctrl-C between the two renames
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr("cnngp.engine.storage.os.replace", replace_then_interrupt)
    assert main(CLI[:4] + ["40", "--lengthscales", "1", "--quiet", "--out", str(out)]) == 130
    assert not out.exists()


def test_cli_defaults():
    from cnngp.cli.main import _register_optional_commands, build_parser
    from cnngp.cli.sweep import DEFAULT_ARCH, DEFAULT_NS

    _register_optional_commands()
    args = build_parser().parse_args(["sweep"])
    assert (args.arch, args.data, args.n, args.folds) == (DEFAULT_ARCH, "digits", DEFAULT_NS, "4")
    assert args.lengthscales is None and not args.test


@pytest.mark.slow
def test_cli_default_main_job(tmp_path, capsys):
    """``cnngp sweep`` with no arguments (about 20-30 s on 2 cores)."""
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["sweep", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    res = json.loads((tmp_path / "cnngp-sweep" / "results.json").read_text())
    assert res["config"]["ns"] == [40, 80, 160]
    assert max(b["cv_accuracy"] for b in res["best"]) > 0.9


def test_sweep_figure_overlays_published_numbers(tmp_path):
    from cnngp.experiments.paper import CNNGP14
    from cnngp.experiments.plots import sweep_figure

    rows = [{"n": n, "readout": r, "lengthscale": lam, "cv_accuracy": 0.3, "cv_accuracy_2se": 0.01,
             "n_datasets": 1} for n in (160, 320) for r, lam in
            (("independent", 0.0), ("matern32", 1.0), ("matern32", 31.6), ("constant", "inf"))]
    results = {"config": {"arch": "cnngp14", "dataset": "cifar10"}, "results": rows, "best": []}
    plain = sweep_figure(results, tmp_path / "a.png")
    overlaid = sweep_figure(results, tmp_path / "b.png", reference=CNNGP14)

    def hollow(fig):
        return [(float(x), float(y)) for ln in fig.axes[0].lines if ln.get_markerfacecolor() == "none"
                for x, y in zip(ln.get_xdata(), ln.get_ydata())]

    assert hollow(plain) == []
    ys = sorted(y for _, y in hollow(overlaid))
    assert ys == sorted([28.8, 34.9, 35.3, 32.5, 40.2, 40.5])  # only the N that were run


def test_figure3_draws_every_variant_and_the_papers_numbers(tmp_path):
    from cnngp.experiments.paper import FIGURE3
    from cnngp.experiments.plots import figure3

    def results(shift):
        rows = [{"n": n, "readout": r, "lengthscale": lam, "cv_accuracy": acc + shift + n / 1e4,
                 "cv_accuracy_2se": 0.02, "n_datasets": 640 // n} for n in (160, 320, 640)
                for r, lam, acc in (("independent", 0.0, 0.30), ("matern32", 3.0, 0.33), ("constant", "inf", 0.35))]
        return {"config": {}, "results": rows}

    fig = figure3({"pooled": results(0.05), "6×6 independent": results(0.0)}, tmp_path / "f3.png",
                  reference=FIGURE3)
    assert (tmp_path / "f3.png").stat().st_size > 1000
    left = fig.axes[0]
    curves = {c.get_label(): [round(float(v), 6) for v in c.lines[0].get_ydata()] for c in left.containers}
    assert curves["pooled"] == [41.6, 43.2, 46.4] and curves["6×6 independent"] == [36.6, 38.2, 41.4]
    hollow = sorted(round(float(y), 6) for c in left.containers if c.lines[0].get_markerfacecolor() == "none"
                    for y in c.lines[0].get_ydata())
    assert hollow == [48.1, 51.65, 51.65]  # ranges drawn at their midpoints, with bars
    # error bars: ±2 SE over the blocks where there are several; the N = 640 row is one block
    # (its stored spread is meaningless), so its bar is the binomial 2·sqrt(p(1 − p)/640)
    pooled = next(c for c in left.containers if c.get_label() == "pooled")
    half = [round(float(seg[1][1] - seg[0][1]) / 2, 6) for seg in pooled.lines[2][0].get_segments()]
    p = 0.35 + 0.05 + 0.064
    assert half[:2] == [2.0, 2.0] and half[2] == pytest.approx(200 * np.sqrt(p * (1 - p) / 640), abs=1e-6)


def test_nested_estimate_and_ties_recomputed_from_the_cached_kernels(sweep):
    """Every N's best entry names all readouts tied with it (first in the sweep's order taken)
    and carries the nested CV estimate, recomputed here from the cached kernels with
    cnngp.inference.selection by a loop over blocks, readouts and outer folds."""
    from cnngp.inference.selection import nested_choice, nested_fold_scores

    res, cache = sweep
    with np.load(cache) as z:
        K, y = z["kernels"], z["y_train"]
    for b in res["best"]:
        n = b["n"]
        at_n = [r for r in res["results"] if r["n"] == n]
        top = max(r["cv_accuracy"] for r in at_n)
        tied = [{"readout": r["readout"], "lengthscale": r["lengthscale"]} for r in at_n
                if r["cv_accuracy"] >= top - 1e-12]
        assert b["tied"] == tied and (b["readout"], b["lengthscale"]) == (tied[0]["readout"], tied[0]["lengthscale"])
        accs = []
        for blk in blocks(80, n, 10):
            yb = y[blk]
            scores = [nested_fold_scores(Kl[np.ix_(blk, blk)], yb, gp.paper_folds(n, 4),
                                         lambda tr, y_tr: gp.paper_folds(len(tr), 4), 10) for Kl in K]
            accs.append(nested_choice(scores).accuracy)
        assert b["nested"]["block_accuracies"] == pytest.approx(accs, abs=1e-12)
        assert b["nested"]["cv_accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
        labels = {(r["readout"], r["lengthscale"]) for r in at_n}
        assert all((c["readout"], c["lengthscale"]) in labels for fold in b["nested"]["chosen"] for c in fold)
    assert all("_nested" not in r for r in res["results"])
    quick = run_sweep(ARCH, "digits", ns=NS, lengthscales=LAMS, progress=False, kernel_cache=cache, nested=False)
    assert all("nested" not in b for b in quick["best"]) and quick["best"][0]["tied"] == res["best"][0]["tied"]


# -- predictive uncertainty on the test split --------------------------------------------------------


def test_test_nll_ece_and_calibration_scale_of_the_sweep(tmp_path):
    """The sweep's test NLL, ECE and τ are those of cnngp.inference.calibration on its own kernels
    (read back from the cache), with prior variances from an independent full test Gram matrix;
    τ is chosen on the N_max training folds, so test labels change nothing fitted."""
    import cnngp
    from cnngp.inference import calibration
    from cnngp.experiments.sweep import split_network, sweep_readouts
    from cnngp.io.data import load_dataset

    src = _digits_npz(tmp_path / "d.npz")
    res = run_sweep(ARCH, src, ns=(40,), lengthscales=[2.0], test=True, progress=False,
                    kernel_cache=tmp_path / "k.npz")  # all 297 test images
    t = res["test"]
    for key in ("test_nll", "test_ece", "calibration_scale", "calibration_nll", "reliability"):
        assert key in t
    assert all({"test_nll", "test_ece", "calibration_scale"} <= set(r) for r in res["results"])
    assert res["config"]["test_probabilities"]["ece_bins"] == 15
    with np.load(tmp_path / "k.npz") as z:
        K, Kt, y, yt = z["kernels"], z["test_kernels"], z["y_train"], z["y_test"]
        names = z["readout_names"].tolist()
    k = names.index(t["readout"]) if t["readout"] != "matern32" else 1
    ds = load_dataset(src)
    x_test = ds.x_test
    body, template, _ = split_network(ARCH)
    readouts, _ = sweep_readouts(template, [2.0])
    prior = np.diagonal(cnngp.readout_sweep(body, [readouts[k]], x_test, dtype="float64")[0].numpy())
    expect = calibration.test_scores(K[k], y, Kt[k], prior, yt, t["noise_variance"],
                                     gp.paper_folds(40, 4), 10)
    assert t["calibration_scale"] == pytest.approx(expect["calibration_scale"], rel=1e-3)
    assert t["test_nll"] == pytest.approx(expect["nll"], rel=1e-3)
    assert t["test_ece"] == pytest.approx(expect["ece"], abs=1e-3)
    assert t["test_accuracy"] == expect["accuracy"]
    assert "NLL" in summary_table(res) and "ECE" in summary_table(res)

    # the same sweep with the test labels shuffled (--test best; the same test images, since all
    # are used): nothing fitted moves
    with np.load(src) as z:
        arrays = dict(z)
    arrays["y_test"] = np.roll(arrays["y_test"], 7)
    np.savez(tmp_path / "shuffled.npz", **arrays)
    other = run_sweep(ARCH, tmp_path / "shuffled.npz", ns=(40,), lengthscales=[2.0], test="best",
                      progress=False)
    o = other["test"]
    for key in ("readout", "lengthscale", "noise_variance", "calibration_scale", "calibration_nll",
                "mean_posterior_variance"):
        assert o[key] == t[key], key
    assert o["test_accuracy"] != t["test_accuracy"]


def test_separable_training_folds_calibrate_to_the_gp_variance(tmp_path):
    """Digits 0 and 1 at N = 40: every held-out prediction of the training folds is right, so they
    set no τ (the grid's lower end gave τ ~ 1e-10, one-hot probabilities and an NLL of 708 per
    wrong test image). τ = 1 with a warning, recorded and printed, and the NLL stays small."""
    from cnngp.inference import calibration

    x, y = load_digits()
    keep = y < 2
    x8, y = np.round(x[keep] * 255).astype(np.uint8), y[keep].astype(np.uint8)
    np.savez(tmp_path / "d01.npz", x_train=x8[:200], y_train=y[:200], x_test=x8[200:], y_test=y[200:])
    with pytest.warns(calibration.CalibrationWarning, match="40 right"):
        res = run_sweep(ARCH, tmp_path / "d01.npz", ns=(40,), lengthscales=[2.0], test=True, progress=False)
    t = res["test"]
    assert res["best"][0]["cv_accuracy"] == 1.0
    assert t["calibration_scale"] == 1.0 and t["calibration_separable"] is True
    assert t["test_accuracy"] < 1.0  # some wrong test image, each of which one-hot probabilities cost 708
    assert t["test_nll"] < 1.0
    assert "τ = 1, the GP's own: every held-out prediction" in summary_table(res)


def test_tied_noise_variances_are_recorded_and_reported(tmp_path):
    """Every block's [smallest, largest, count] of the σ² tied with the best agree with a brute
    force over gp.cross_validate's grid on the cached kernels; the test line names the count."""
    src = _digits_npz(tmp_path / "d.npz")
    res = run_sweep(ARCH, src, ns=(40, 80), lengthscales=[2.0], test="best", progress=False,
                    kernel_cache=tmp_path / "k.npz")
    with np.load(tmp_path / "k.npz") as z:
        kernels, y = z["kernels"], z["y_train"]
        names = [str(n) for n in z["readout_names"]]
    for row in res["results"]:
        k = names.index(row["readout"]) if row["readout"] in names else names.index(f"{row['readout']}:2")
        for b, (lo, hi, count), s2 in zip(blocks(80, row["n"], 10), row["block_noise_variance_ties"],
                                          row["block_noise_variances"]):
            cv = gp.cross_validate(kernels[k][np.ix_(b, b)], y[b], gp.paper_folds(len(b), 4), n_classes=10)
            acc = cv.accuracy
            tied = np.sort(cv.noise_variances[acc >= np.nanmax(acc) - 1e-12])
            assert (lo, hi, count) == (tied[0], tied[-1], tied.size) and lo == s2
    t = res["test"]
    assert t["noise_variance_ties"][0] == t["noise_variance"]
    if t["noise_variance_ties"][2] > 1:
        assert f"the smallest of {t['noise_variance_ties'][2]} tied σ²" in summary_table(res)


def test_reliability_figure(sweep, tmp_path):
    from cnngp.experiments.plots import reliability_figure
    from cnngp.inference.calibration import reliability

    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    res = {"config": {"arch": ARCH, "dataset": "digits"},
           "test": {"readout": "independent", "lengthscale": 0.0, "test_accuracy": 2 / 3,
                    "test_nll": 0.5, "test_ece": 0.1, "calibration_scale": 2.0, "n_train": 40,
                    "reliability": reliability(probs, np.array([0, 1, 1]))}}
    fig = reliability_figure(res, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "ECE 10.0 %" in fig.axes[0].get_title()
    with pytest.raises(CNNGPError, match="no test reliability data"):
        reliability_figure(sweep[0], tmp_path / "none.png")


def test_figures_written_to_a_path_are_atomic(sweep, tmp_path, monkeypatch):
    """A figure saved to a path goes through a temporary file: a failure while drawing leaves
    the previous figure as it was and no partial file; the format follows the extension."""
    import matplotlib.figure

    from cnngp.experiments.plots import sweep_figure

    path = tmp_path / "fig.png"
    sweep_figure(sweep[0], path)
    before = path.read_bytes()
    assert before[:4] == b"\x89PNG"
    real = matplotlib.figure.Figure.savefig

    def fails(self, fname, *args, **kwargs):
        fname.write(b"half a figure")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fails)
    with pytest.raises(CNNGPError, match="No space left on device"):
        sweep_figure(sweep[0], path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real)
    sweep_figure(sweep[0], tmp_path / "fig.svg")
    assert b"<svg" in (tmp_path / "fig.svg").read_bytes()[:400]


def test_cli_test_writes_the_reliability_diagram(tmp_path, capsys):
    src = _digits_npz(tmp_path / "d.npz")
    out = tmp_path / "out"
    args = ["sweep", "--arch", ARCH, "--data", str(src), "--n", "40", "--lengthscales", "1",
            "--quiet", "--out", str(out)]
    assert main(args + ["--test", "best", "--n-test", "20"]) == 0
    assert sorted(os.listdir(out)) == ["reliability.png", "results.json", "sweep.png", "test_predictions.npz"]
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / "results.json").read_text())
    assert 0 <= res["test"]["test_ece"] <= 1 and res["test"]["test_nll"] > 0
    assert "ECE" in capsys.readouterr().out
    assert main(args) == 0  # no --test: the earlier figure, which these results do not back, goes
    assert sorted(os.listdir(out)) == ["results.json", "sweep.png"]


def test_a_resumed_in_memory_sweep_prices_only_the_pairs_its_checkpoint_lacks(tmp_path, monkeypatch):
    """The plan of a sweep whose train kernel is in its checkpoint (kept by the sweep after the
    kernel is complete) says so and prices none of its pairs; a checkpoint of another
    computation prices nothing as done (checkpoint_pairs_done checks the key)."""
    from cnngp.engine.gram import checkpoint_pairs_done
    from cnngp.experiments.sweep import split_network

    from cnngp.engine import storage

    monkeypatch.setattr(storage.Checkpoint, "EVERY", 0.0)  # a save after every batch, as a long run's
    prefix = tmp_path / "ck"
    ex = cnngp.Execution(checkpoint=str(prefix), keep_checkpoint=True, progress=False, batch_size=64)
    first = run_sweep(ARCH, "digits", ns=NS, lengthscales=LAMS, execution=ex)
    ckpt = tmp_path / "ck.train.npz"
    assert ckpt.is_file()
    pairs = 80 * 81 // 2
    again = run_sweep(ARCH, "digits", ns=NS, lengthscales=LAMS, execution=ex)
    assert f"resuming, {pairs:,} of {pairs:,} pairs already done" in again["timing"]["estimate"]["text"]
    assert f"train kernel ({len(LAMS) + 2} readouts): 0 pairs, 80 images" in again["timing"]["estimate"]["text"]
    assert f"train kernel ({len(LAMS) + 2} readouts): {pairs:,} pairs, 80 images" in first["timing"]["estimate"]["text"]
    assert again["results"] == first["results"]
    body = split_network(ARCH)[0]
    readouts = [cnngp.Readout(correlation=cnngp.Independent())]
    x = np.random.default_rng(0).uniform(size=(5, 8, 8, 1))
    assert checkpoint_pairs_done(ckpt, body, x, readouts=readouts) == 0  # another computation
    assert checkpoint_pairs_done(tmp_path / "missing.npz", body, x, readouts=readouts) == 0


def test_a_store_sweep_on_a_disk_without_room_is_refused_naming_store_before_writing(tmp_path, capsys,
                                                                                     monkeypatch):
    """The stores' size (chunks in whole file-system blocks) is checked against the free space
    before anything is computed: one line naming --store and the path, exit 2, no store made."""
    from cnngp.engine import resources

    store = tmp_path / "K.zarr"
    monkeypatch.setattr(resources, "free_disk", lambda path: 64 * 1024)
    code = main(["sweep", "--arch", ARCH, "--n", "40,80", "--lengthscales", "0.5,5", "--quiet",
                 "--store", str(store), "--out", str(tmp_path / "sw")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert re.fullmatch(rf"cnngp: error: --store: writes about .* but {re.escape(repr(str(store)))} has "
                        r"64 KiB free; free space there, or give a --store on a larger disk", err[0]), err[0]
    assert not store.exists() and not (tmp_path / "sw").exists()


def test_cli_writes_per_image_test_predictions_that_reproduce_the_reported_scores(tmp_path, capsys):
    """--test all: DIR/test_predictions.npz holds, per scored readout and test image, the
    predicted class and the log probability of the label (paired comparisons between runs);
    their means are the reported test accuracy and NLL. A later run without --test removes it."""
    data = _digits_npz(tmp_path / "d.npz")
    out = tmp_path / "sw"
    argv = ["sweep", "--arch", ARCH, "--data", str(data), "--n", "40,80", "--lengthscales", "0.5,5",
            "--quiet", "--out", str(out)]
    assert main(argv + ["--test", "all", "--n-test", "60"]) == 0
    res = json.loads((out / "results.json").read_text())
    top = [r for r in res["results"] if r["n"] == 80]
    with np.load(out / "test_predictions.npz") as z:
        assert z["predicted"].shape == z["log_prob_true"].shape == (len(top), 60)
        assert list(z["readouts"]) == [f"{r['readout']}:{r['lengthscale']}" for r in top]
        np.testing.assert_allclose((z["predicted"] == z["y_test"][None]).mean(1),
                                   [r["test_accuracy"] for r in top], atol=1e-12)
        np.testing.assert_allclose(-z["log_prob_true"].mean(1), [r["test_nll"] for r in top], rtol=1e-9)
        assert np.all(z["log_prob_true"] <= 0)
        # what the file is, on its own: the run's configuration and versions, and the test images' hash
        provenance = json.loads(str(z["provenance"]))
        assert provenance == {"config": res["config"], "versions": res["versions"]}
        from cnngp.io.data import load_dataset
        from cnngp.provenance import array_sha256

        assert str(z["test_sha256"]) == array_sha256(load_dataset(data).x_test[z["test_index"]])  # as read
    assert "test_predictions" not in res
    assert main(argv) == 0
    assert not (out / "test_predictions.npz").exists()


def test_sweep_figure_has_a_test_nll_and_ece_panel_for_test_all_results(tmp_path):
    """--test all results: a lower panel draws each N_max readout's test NLL (±2 SE band) and
    ECE (%) at the upper panel's λ positions; results without per-readout test scores keep the
    one panel."""
    from cnngp.experiments.plots import sweep_figure

    readouts = (("independent", 0.0), ("matern32", 1.0), ("matern32", 10.0), ("constant", "inf"))
    rows = [{"n": n, "readout": r, "lengthscale": lam, "cv_accuracy": 0.5, "cv_accuracy_2se": 0.02,
             "n_datasets": 80 // n} for n in (40, 80) for r, lam in readouts]
    nll, ece = [0.9, 0.7, 0.6, 0.65], [0.05, 0.03, 0.02, 0.04]
    for row, a, b in zip(rows[4:], nll, ece):
        row.update(test_accuracy=0.6, test_nll=a, test_nll_2se=0.1, test_ece=b)
    fig = sweep_figure({"config": {}, "results": rows}, tmp_path / "s.png")
    top, low, twin = fig.axes
    # independent, λ = 1 and 10 (a line), mean pool: left to right, the ends apart
    points = [ln for ln in low.lines if ln.get_marker() == "o"]  # not the error bars' caps
    drawn = sorted(((float(x), float(y)) for ln in points for x, y in zip(ln.get_xdata(), ln.get_ydata())))
    assert [y for _, y in drawn] == nll
    assert sorted(len(ln.get_xdata()) for ln in points) == [1, 1, 2]
    eces = sorted((float(x), round(float(y), 9)) for ln in twin.lines for x, y in zip(ln.get_xdata(), ln.get_ydata()))
    assert [y for _, y in eces] == [100 * v for v in ece]
    assert "N = 80" in low.get_title() and low.get_xlabel().startswith("log10 λ")
    for row in rows:
        row.pop("test_nll", None)
    assert len(sweep_figure({"config": {}, "results": rows}, tmp_path / "t.png").axes) == 1


def test_sweep_dry_run_plans_every_kernel_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """``cnngp sweep --dry-run``: the plan as JSON on stdout (its lines on stderr; none with
    --quiet), nothing written — no --out folder, checkpoint or store — and not refused as
    too long (a run of the same command without --yes is). Oracles: the pair counts' closed
    forms, the tiles a store lends, and the real run of the same command, whose stores compute
    exactly the tiles the plan says."""
    from cnngp.engine import resources

    data = _digits_npz(tmp_path / "d.npz")
    argv = ["sweep", "--arch", ARCH, "--data", str(data), "--lengthscales", "0.5,5", "--test", "all",
            "--n-test", "30"]
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.setattr(resources, "LONG_JOB_SECONDS", 1e-6)  # every sweep is "long" now
    assert main(argv + ["--n", "40,80", "--out", str(tmp_path / "a"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    plan = json.loads(out)
    # train: 80·81/2 pairs; test: 30 × 80 (4 readouts: independent, the two λ, mean pool)
    assert [(s["name"], s["pairs"]) for s in plan["stages"]] == [
        ("train kernel (4 readouts)", 80 * 81 // 2), ("test kernel (4 readouts)", 30 * 80)]
    assert plan["seconds"] > 0 and plan["memory_bytes"] > 0
    assert [(k["pairs"], k["pairs_total"]) for k in plan["kernels"]] == [(3240, 3240), (2400, 2400)]  # no checkpoint
    assert err.startswith("data: ") and "plan: train kernel (4 readouts): 3,240 pairs" in err
    assert err.rstrip().endswith(plan["text"].splitlines()[-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out, no checkpoint
    assert main(argv + ["--n", "40,80", "--out", str(tmp_path / "a")]) == 2  # refused: over the limit
    assert "pass --yes" in capsys.readouterr().err
    monkeypatch.setattr(resources, "LONG_JOB_SECONDS", 3600.0)

    # stores: an earlier sweep's (--n 40, tile 20) lends to --n 40,80 at tile 16 (3 of 15 train
    # tiles; of the test store's 2 × 5, the 2 × 2 whose columns end by the 40th image)
    assert main(argv + ["--n", "40", "--store", str(tmp_path / "s1.zarr"), "--tile", "20", "--quiet",
                        "--out", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    stored = argv + ["--n", "40,80", "--store", str(tmp_path / "s2.zarr"), "--tile", "16",
                     "--reuse", str(tmp_path / "s1.zarr"), "--out", str(tmp_path / "c")]
    import cnngp.engine.distributed as distributed

    def no_cluster(*args, **kwargs):
        raise AssertionError("a dry run started a Dask cluster")

    with monkeypatch.context() as m:  # with --workers and --archive: no cluster, no archive folder
        m.setattr(distributed, "dask_client", no_cluster)
        assert main(stored + ["--workers", "2", "--archive", str(tmp_path / "arch"), "--dry-run", "--quiet"]) == 0
    assert "2 worker(s)" in json.loads(capsys.readouterr().out)["text"]
    assert not (tmp_path / "arch").exists()
    assert main(stored + ["--dry-run", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    plan = json.loads(out)
    # per store, as fields: tiles to compute, lent, in all; the pairs left (80·81/2 less the 3 lent
    # 16-tiles' 2·136 + 256 pairs; 30 × 80 less 2 × 2 lent 16 × 16 (and 16 × 14) tiles)
    assert [(k["tiles"], k["tiles_lent"], k["tiles_total"]) for k in plan["kernels"]] == [(12, 3, 15), (6, 4, 10)]
    assert plan["kernels"][0]["pairs"] == 3240 - (2 * 136 + 256)
    assert plan["kernels"][1]["pairs"] == 2400 - 2 * (16 * 16 + 14 * 16)
    assert f"12 tiles of 16 to compute (of 15; 3 copied from {tmp_path / 's1.zarr'} (--reuse))" in plan["text"]
    assert "6 tiles of 16 to compute (of 10; 4 copied from" in plan["text"]
    assert not (tmp_path / "s2.zarr").exists() and not (tmp_path / "s2-test.zarr").exists()
    assert not (tmp_path / "c").exists()
    assert main(stored + ["--quiet"]) == 0
    for name, computed in (("s2.zarr", 12), ("s2-test.zarr", 6)):
        records = [json.loads(p.read_text()) for p in (tmp_path / name / "records").glob("tile-*.json")]
        assert sum("reused_from" not in r for r in records) == computed, name

    # kernels from a cache: nothing to compute; a cache of another sweep is refused as a run would be
    cache = ["--n", "40", "--kernel-cache", str(tmp_path / "k.npz"), "--quiet"]
    assert main(argv + cache + ["--out", str(tmp_path / "d")]) == 0
    capsys.readouterr()
    assert main(argv + cache + ["--out", str(tmp_path / "e"), "--dry-run"]) == 0
    assert "the kernels are read from" in json.loads(capsys.readouterr().out)["text"]
    assert main(argv[:6] + ["0.5", *argv[7:]] + cache + ["--out", str(tmp_path / "e"), "--dry-run"]) == 2
    assert "holds kernels of a different sweep" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_nested_estimate_of_agreeing_blocks_has_the_binomial_2se(monkeypatch):
    """Two blocks whose nested estimates agree (0.75 and 0.75) have a spread of 0, which is
    degenerate, not certainty: their ±2 SE is the binomial one over the 2 × 40 held-out
    predictions, as the plain CV's rows (plots.accuracy_2se), not ± 0."""
    from types import SimpleNamespace

    from cnngp.experiments import sweep as sweep_module

    monkeypatch.setattr(sweep_module.selection, "nested_choice",
                        lambda scores: SimpleNamespace(accuracy=0.75, chosen=[0], noise_variances=[0.1], tied=[[0]]))
    rows = [{"readout": "mean_pool", "lengthscale": math.inf, "_nested": [None, None]}]
    entry = sweep_module._nested_entry(rows, 40)
    assert entry["cv_accuracy"] == 0.75 and entry["block_accuracies"] == [0.75, 0.75]
    assert entry["cv_accuracy_2se"] == pytest.approx(2 * math.sqrt(0.75 * 0.25 / 80), rel=1e-12)

"""``cnngp compare`` / :mod:`cnngp.experiments.compare`: paired comparisons of two sweeps'
models on the same test images. Oracles: the runs' own reported test scores, the per-image
differences recomputed by a loop, and the exact McNemar p-value summed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import digits_npz

from cnngp.cli.main import main
from cnngp.errors import CNNGPError
from cnngp.experiments.compare import load_predictions, paired_comparison, paired_differences


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two sweeps on the same 60 test images (plain and flip-averaged), and one on 30 others."""
    tmp = tmp_path_factory.mktemp("compare")
    data = digits_npz(tmp / "d.npz")
    argv = ["sweep", "--arch", "cnngp1", "--data", str(data), "--n", "40", "--folds", "2", "--lengthscales",
            "0.5,5", "--test", "all", "--quiet"]
    assert main(argv + ["--n-test", "60", "--out", str(tmp / "plain")]) == 0
    assert main(argv + ["--n-test", "60", "--flip", "--out", str(tmp / "flip")]) == 0
    assert main(argv + ["--n-test", "30", "--out", str(tmp / "other")]) == 0
    return tmp


def _mcnemar_by_hand(k: int, n: int) -> float:
    """Two-sided exact binomial test of k successes in n at p = 1/2: twice the smaller tail."""
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_paired_differences_are_the_per_image_differences_of_the_reported_scores(runs):
    a, b = load_predictions(runs / "flip"), load_predictions(runs / "plain")
    res = paired_comparison(a, "chosen", b, "chosen")
    reported = {name: json.loads((runs / name / "results.json").read_text())["test"] for name in ("flip", "plain")}
    assert res["a"]["accuracy"] == pytest.approx(reported["flip"]["test_accuracy"], abs=1e-12)
    assert res["b"]["accuracy"] == pytest.approx(reported["plain"]["test_accuracy"], abs=1e-12)
    assert res["a"]["nll"] == pytest.approx(reported["flip"]["test_nll"], rel=1e-9)
    assert res["accuracy_difference"] == pytest.approx(res["a"]["accuracy"] - res["b"]["accuracy"], abs=1e-12)
    # the paired SE by a loop over the images
    i, j = a.select("chosen"), b.select("chosen")
    d = [float(a.predicted[i][m] == a.y_test[m]) - float(b.predicted[j][m] == b.y_test[m]) for m in range(60)]
    mean = sum(d) / 60
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / 59)
    assert res["accuracy_difference_2se"] == pytest.approx(2 * sd / math.sqrt(60), rel=1e-12)
    only_a, only_b = sum(v > 0 for v in d), sum(v < 0 for v in d)
    assert (res["only_a_right"], res["only_b_right"]) == (only_a, only_b)
    assert res["mcnemar_p"] == pytest.approx(_mcnemar_by_hand(only_a, only_a + only_b), rel=1e-9)
    nll_d = [-a.log_prob_true[i][m] + b.log_prob_true[j][m] for m in range(60)]
    assert res["nll_difference"] == pytest.approx(sum(nll_d) / 60, rel=1e-9, abs=1e-12)


def test_paired_differences_of_hand_made_results_and_of_an_average_over_tied_models():
    """Five images by hand: a right on 1, 2, 4; b on 2, 3. Differences +1, 0, −1, +1, 0: mean
    0.2, sd √0.7; only a right twice, only b once: McNemar p = P(|X − 1.5| ≥ 0.5), X ~ Bin(3, ½),
    which is 1. An average of tied models (fractions, not 0/1) has no McNemar test."""
    a, b = np.array([1, 1, 0, 1, 0]), np.array([0, 1, 1, 0, 0])
    la, lb = np.log([0.9, 0.6, 0.2, 0.7, 0.1]), np.log([0.3, 0.8, 0.5, 0.4, 0.1])
    d = paired_differences(a, b, la, lb)
    assert d["accuracy_difference"] == pytest.approx(0.2, abs=1e-15)
    assert d["accuracy_difference_2se"] == pytest.approx(2 * math.sqrt(0.7 / 5), abs=1e-15)
    per_image = lb - la  # NLL(a) − NLL(b), image by image
    assert d["nll_difference"] == pytest.approx(per_image.mean(), abs=1e-15)
    assert d["nll_difference_2se"] == pytest.approx(2 * per_image.std(ddof=1) / math.sqrt(5), abs=1e-15)
    assert (d["only_a_right"], d["only_b_right"], d["mcnemar_p"]) == (2, 1, pytest.approx(1.0))
    lopsided = paired_differences(np.ones(6), np.zeros(6), np.zeros(6), np.zeros(6))
    assert lopsided["mcnemar_p"] == pytest.approx(2 * 0.5 ** 6, abs=1e-15)  # both tails of Bin(6, ½)
    tied = paired_differences(np.array([0.5, 1.0, 0.0]), np.array([1, 0, 0]), np.zeros(3), np.zeros(3))
    assert tied["accuracy_difference"] == pytest.approx(1 / 6, abs=1e-15)
    assert (tied["only_a_right"], tied["only_b_right"], tied["mcnemar_p"]) == (None, None, None)
    for bad, words in [(([1, 0], [1], [0, 0], [0, 0]), r"got lengths \[2, 1, 2, 2\]"),
                       (([], [], [], []), r"^right_a: expected one value per test image"),
                       (([[1]], [1], [0], [0]), r"^right_a: .*got shape \(1, 1\)")]:
        with pytest.raises(CNNGPError, match=words):
            paired_differences(*bad)
    one = paired_differences([1], [0], [0.0], [-1.0])
    assert (one["accuracy_difference"], one["accuracy_difference_2se"]) == (1.0, None)
    assert (one["nll_difference"], one["nll_difference_2se"]) == (-1.0, None)


def test_readouts_are_named_as_the_sweep_names_them(runs):
    p = load_predictions(runs / "plain")
    assert p.readouts == ["independent:0.0", "matern32:0.5", "matern32:5.0", "constant:inf"]
    assert (p.select("independent"), p.select("mean-pool"), p.select("matern32:5")) == (0, 3, 2)
    assert p.select("chosen") == p.readouts.index(p.chosen)
    with pytest.raises(CNNGPError, match=r"^readout: 'matern32:2' is not among the readouts .* scored on its test "
                                         r"images: chosen, independent, matern32:0\.5, matern32:5, mean-pool$"):
        p.select("matern32:2")
    import dataclasses

    # λ as printed to 3 significant digits is accepted wherever the rounding falls
    odd = dataclasses.replace(p, readouts=["matern32:10.049", "matern32:1.005", "matern32:1.0149", "constant:inf"])
    assert [odd.select(v) for v in ("matern32:10", "matern32:1", "matern32:1.01", "mean-pool")] == [0, 1, 2, 3]
    twins = dataclasses.replace(p, readouts=["matern32:1.0001", "matern32:1.0002"], chosen=None)
    with pytest.raises(CNNGPError, match=r"matches 2 readouts .*: matern32:1\.0001, matern32:1\.0002; give one"):
        twins.select("matern32:1")
    assert twins.select("matern32:1.0002") == 1
    with pytest.raises(CNNGPError, match=r"^readout: .* records no CV-chosen readout \(a sweep without --test\); "
                                         r"name one of matern32:1\.0001, matern32:1\.0002$"):
        twins.select("chosen")
    same = paired_comparison(p, "independent", p, "independent")
    assert same["accuracy_difference"] == 0 and same["mcnemar_p"] == 1.0


def test_different_test_images_are_refused(runs):
    import dataclasses

    a, other = load_predictions(runs / "plain"), load_predictions(runs / "other")
    with pytest.raises(CNNGPError, match=r"were scored on different test images \(their sha256 differ\)"):
        paired_comparison(a, "chosen", other, "chosen")
    with pytest.raises(CNNGPError, match=r"different test images \(their sha256 differ\)"):
        paired_comparison(a, "chosen", dataclasses.replace(a, test_sha256="0" * 64), "chosen")
    # runs written before the hash: told apart by their test indices and labels
    old = [dataclasses.replace(p, test_sha256=None) for p in (a, other)]
    with pytest.raises(CNNGPError, match=r"were scored on different test images \(60 and 30, or other indices"):
        paired_comparison(old[0], "chosen", old[1], "chosen")
    assert paired_comparison(old[0], "chosen", a, "independent")["n_test"] == 60


def test_cli_prints_the_comparison_and_writes_json_and_refuses_in_one_line(runs, tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["compare", str(runs / "flip"), str(runs / "plain"), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert "60 test images, the same in both" in text
    assert f"A − B: accuracy {100 * res['accuracy_difference']:+.1f} ± {100 * res['accuracy_difference_2se']:.1f}" in text
    assert res["command"].startswith(f"cnngp compare {runs / 'flip'} {runs / 'plain'} --readout-a ")
    assert res["versions"]["cnngp"]
    assert main(["compare", str(runs / "plain"), "--readout-b", "mean-pool"]) == 0
    assert "mean pool" in capsys.readouterr().out
    for argv, message in [
        (["compare", str(runs / "plain")], "cnngp: error: --readout-b: the same readout of the same run as A"),
        (["compare", str(runs / "plain"), str(runs / "other")], "cnngp: error: "),
        (["compare", str(tmp_path / "none")], "cnngp: error: "),
        (["compare", str(runs / "plain"), "--readout-b", "rbf:3"], "cnngp: error: readout: 'rbf:3' is not among"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err


def test_one_test_image_damaged_files_and_the_same_run_twice(runs, tmp_path, capsys):
    """A single test image: differences without a standard error (JSON null, no "± nan");
    damaged or foreign files: one line, exit 2; the same folder twice with one readout: refused."""
    import shutil

    one = tmp_path / "one"
    shutil.copytree(runs / "plain", one)
    with np.load(one / "test_predictions.npz") as z:
        arrays = {k: z[k] for k in z.files}
    for k in ("predicted", "log_prob_true"):
        arrays[k] = arrays[k][:, :1]
    for k in ("y_test", "test_index"):
        arrays[k] = arrays[k][:1]
    arrays.pop("test_sha256")
    np.savez(one / "test_predictions.npz", **arrays)
    out = tmp_path / "one.json"
    assert main(["compare", str(one), "--readout-b", "mean-pool", "--json", str(out)]) == 0
    assert "(one test image: no standard error)" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["n_test"] == 1 and res["accuracy_difference_2se"] is None
    broken = tmp_path / "broken"
    shutil.copytree(runs / "plain", broken)
    (broken / "test_predictions.npz").write_bytes(b"PK\x03\x04 not a zip")
    foreign = tmp_path / "foreign"
    shutil.copytree(runs / "plain", foreign)
    (foreign / "results.json").write_text("[1, 2]")
    for argv, message in [
        (["compare", str(broken), str(runs / "plain")], "cannot be read"),
        (["compare", str(foreign), str(runs / "plain")], "results.json holds no sweep's results"),
        (["compare", str(runs / "plain"), str(runs / "plain") + "/"], "the same readout of the same run"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("cnngp: error: ") and message in err[0], err

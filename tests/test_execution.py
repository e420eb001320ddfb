"""One way to say how to compute: cnngp.Execution, taken by every path (README, "Execution options")."""

import inspect
import json

import numpy as np
import pytest
import torch

import cnngp
from cnngp import CNNGPError, Execution
from cnngp.cli.main import main
from cnngp.io import architectures


def _images(n=4, size=6, channels=2, seed=0):
    return np.random.default_rng(seed).random((n, size, size, channels))


def _net():
    return architectures.get("cnngp2")


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"colour": "red"}, "colour: unknown option of kernel; accepted: dtype, device, engine"),
    ({"dtype": "int8"}, "dtype: expected 'float64' or 'float32', got 'int8'"),
    ({"batch_size": -1}, "batch_size: expected an int >= 1"),
    ({"batch_size": True}, "batch_size: expected an int >= 1"),
    ({"engine": "cuda"}, "engine: expected one of auto, fused, torch, triton, got 'cuda'"),
    ({"memory_budget": "lots"}, "memory_budget: expected a size of at least 1M"),
    ({"progress": "yes"}, "progress: expected True or False"),
    ({"device": "tpu"}, "device: expected 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    ({"workers": 2}, "workers: not an execution option of kernel; accepted here:"),
])
def test_bad_options_are_refused_by_name(options, message):
    x = _images(2)
    with pytest.raises(CNNGPError) as e:
        cnngp.kernel(_net(), x, **options)
    assert message in str(e.value)


def test_execution_validates_on_construction_and_replace():
    with pytest.raises(CNNGPError, match="workers: cannot be combined with scheduler"):
        Execution(workers=2, scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(CNNGPError, match="tile: expected an int >= 1"):
        Execution().replace(tile=0)
    with pytest.raises(CNNGPError, match="colour: unknown option of Execution; accepted: dtype"):
        Execution().replace(colour=1)
    with pytest.raises(CNNGPError, match="execution: expected a cnngp.Execution"):
        cnngp.kernel(_net(), _images(2), execution={"dtype": "float32"})
    ex = Execution(dtype=torch.float32, memory_budget="1G")
    assert (ex.dtype, ex.memory_budget, ex.resolved_engine) == ("float32", 1024**3, "fused")
    assert ex.replace(engine="torch").engine == "torch" and ex.engine == "auto"  # immutable
    json.dumps(ex.as_dict())


def test_fused_is_refused_off_the_cpu():
    device = "cuda" if torch.cuda.is_available() else None
    if device is None:  # the rule itself, without a GPU: resolve_engine checks the device type
        from cnngp.engine.execution import resolve_engine

        with pytest.raises(CNNGPError, match="engine: 'fused' runs on the CPU only"):
            resolve_engine("fused", "cuda")
        assert resolve_engine("auto", "cuda") == "torch"
        return
    with pytest.raises(CNNGPError, match="engine: 'fused' runs on the CPU only"):
        Execution(engine="fused", device=device)


# -- the engines agree, and every path computes the same kernel ----------------------------------


def test_torch_and_fused_engines_agree():
    net, x = _net(), _images(5, size=8)
    fused = cnngp.kernel(net, x, engine="fused")
    reference = cnngp.kernel(net, x, engine="torch")
    assert fused.dtype == torch.float64
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    both = cnngp.kernel(net, x, get="both", execution=Execution(engine="torch"))
    torch.testing.assert_close(both[0], reference, rtol=0, atol=0)


def test_the_engine_reaches_the_plan(monkeypatch):
    from cnngp.engine import gram

    seen = []
    original = gram.GramPlan.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.engine)

    monkeypatch.setattr(gram.GramPlan, "__init__", spy)
    net, x = _net(), _images(3)
    body, head = net.split_readout()
    ex = Execution(engine="torch")
    cnngp.kernel(net, x, execution=ex)
    cnngp.readout_sweep(body, [head], x, execution=ex)
    cnngp.offset_sums(body, x, execution=ex)
    assert seen == ["torch"] * 3


def test_one_execution_gives_the_same_kernel_on_every_path(tmp_path):
    pytest.importorskip("zarr")
    from cnngp.engine.distributed import _PLANS, store_kernel
    from cnngp.engine.store import KernelStore

    net, x = _net(), _images(5)
    body, head = net.split_readout()
    ex = Execution(engine="torch", batch_size=3)
    k = cnngp.kernel(net, x, execution=ex)
    swept = cnngp.readout_sweep(body, [head], x, execution=ex)[0]
    report = store_kernel(net, x, out=tmp_path / "K.zarr", execution=ex.replace(tile=2, progress=False))
    assert report.tiles_computed == len(cnngp.engine.gram.tile_plan(5, None, 2))
    assert _PLANS and next(iter(_PLANS.values())).engine == "torch"
    store = KernelStore.open(tmp_path / "K.zarr")
    stored = torch.as_tensor(np.asarray(store.kernel[:]))[0]
    assert torch.equal(k, swept) and torch.equal(k, stored)
    assert store.attrs["execution"]["engine"] == "torch"  # provenance


def test_store_kernel_takes_the_store_from_the_execution(tmp_path):
    pytest.importorskip("zarr")
    from cnngp.engine.distributed import store_kernel

    x = _images(3)
    report = store_kernel(_net(), x, execution=Execution(store=tmp_path / "S.zarr", progress=False))
    assert report.path == str(tmp_path / "S.zarr")
    with pytest.raises(CNNGPError, match="out: store_kernel needs a store path"):
        store_kernel(_net(), x, progress=False)


# -- the command line ------------------------------------------------------------------------------


def test_cli_engine_is_honoured_and_recorded(tmp_path, capsys):
    x = tmp_path / "x.npz"
    np.savez(x, x=_images(3))
    out = tmp_path / "K.npz"
    assert main(["kernel", "--arch", "cnngp2", "--x1", str(x), "--out", str(out), "--engine", "torch",
                 "--quiet"]) == 0
    with np.load(out) as z:
        config = json.loads(str(z["config"]))
        k = z["kernel"]
    assert config["engine"] == "torch" and config["execution"]["engine"] == "torch"
    assert np.allclose(k, cnngp.kernel(_net(), _images(3), engine="fused").numpy(), rtol=1e-12, atol=0)
    assert main(["kernel", "--arch", "cnngp2", "--x1", str(x), "--out", str(tmp_path / "b.npz"),
                 "--engine", "warp"]) == 2
    assert "--engine" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["kernel", "sweep", "learn", "montecarlo", "correlation-figure"])
def test_every_computing_command_documents_engine(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--engine {auto,fused,torch,triton}" in capsys.readouterr().out


# -- the public API stays small ---------------------------------------------------------------------


def _public_functions():
    from cnngp.engine import distributed, gram
    from cnngp.experiments import learned, plots, sweep
    from cnngp.inference import calibration, gp, learn
    from cnngp import finite

    return {
        "kernel": gram.kernel, "readout_sweep": gram.readout_sweep, "offset_sums": gram.offset_sums,
        "kernel_diagonal": gram.kernel_diagonal,
        "posterior_variance": gp.posterior_variance, "held_out_predictions": gp.held_out_predictions,
        "test_scores": calibration.test_scores, "class_probabilities": calibration.class_probabilities,
        "reliability_figure": plots.reliability_figure,
        "differentiable_kernel": gram.differentiable_kernel, "GramPlan": gram.GramPlan,
        "check_gram": gram.check_gram, "store_kernel": distributed.store_kernel,
        "run_sweep": sweep.run_sweep, "cv_stored_readout": sweep.cv_stored_readout,
        "run_learn": learned.run_learn, "learn_network": learn.learn_network,
        "monte_carlo_kernel": finite.monte_carlo_kernel,
        "monte_carlo_estimates": finite.monte_carlo_estimates,
        "correlation_figure_data": plots.correlation_figure_data,
        "execution_from_args": __import__("cnngp.cli.main", fromlist=["x"]).execution_from_args,
    }


@pytest.mark.parametrize("name, function", sorted(_public_functions().items()))
def test_no_public_function_takes_more_than_ten_parameters(name, function):
    params = [p for p in inspect.signature(function).parameters.values()
              if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert len(params) <= 10, f"{name} takes {len(params)} parameters: {[p.name for p in params]}"


@pytest.mark.parametrize("name", ["kernel", "readout_sweep", "kernel_diagonal", "offset_sums", "store_kernel", "run_sweep",
                                  "run_learn", "monte_carlo_kernel", "differentiable_kernel", "GramPlan"])
def test_every_path_takes_an_execution(name):
    assert "execution" in inspect.signature(_public_functions()[name]).parameters

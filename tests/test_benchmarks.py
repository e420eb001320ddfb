"""The prepared device check (benchmarks/gpu_check.py) runs end to end on the CPU, so it is
ready the day a session is lent a GPU."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_gpu_check_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    code = module.main(["--device", "cpu", "--n", "3", "--quick", "--workloads", "cnngp14_diag",
                        "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert {r["workload"] for r in result["correctness"]} >= {"myrtle5_flatten", "myrtle10_correlated"}
    assert all(r["rel_err_float32"] < 1e-5 for r in result["correctness"])
    (row,) = result["timing"]
    assert row["n"] == 3 and row["seconds"] > 0 and row["projected_hours_n10240"] > 0

#!/usr/bin/env bash
# Issue 27's estimate acceptance, run on an idle machine from the repository root:
#   bash results/estimates/run.sh
# (a) a 32-image CNNGP-14 store on 2 Dask workers: the --dry-run estimate, then the real run;
# (b) a CIFAR-10 sweep with --test best: its printed plan against the kernels' time and the wall.
# Writes results/estimates/{dry_run.txt,store.txt,sweep.txt,summary.json}.
set -euo pipefail
HERE=results/estimates
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python - "$TMP" <<'PY'
import sys, numpy as np
d = np.load("examples/cifar10-small.npz")
np.savez(f"{sys.argv[1]}/c32.npz", x=d["x_train"][:32])
PY
uptime > "$HERE/load.txt"
# (a)
cnngp kernel --arch cnngp14 --readout constant --dtype float32 --x1 "$TMP/c32.npz" \
    --out "$TMP/k32.zarr" --workers 2 --dry-run --quiet > "$HERE/dry_run.txt" 2>&1
start=$(date +%s.%N)
cnngp kernel --arch cnngp14 --readout constant --dtype float32 --x1 "$TMP/c32.npz" \
    --out "$TMP/k32.zarr" --workers 2 --quiet > "$HERE/store.txt" 2>&1
end=$(date +%s.%N)
echo "wall_seconds $(python -c "print($end - $start)")" >> "$HERE/store.txt"
# (b)
start=$(date +%s.%N)
cnngp sweep --arch cnngp14 --data examples/cifar10-small.npz --n 40,80 --test best --n-test 50 \
    --out "$TMP/sweep" > "$HERE/sweep.txt" 2>&1
end=$(date +%s.%N)
echo "wall_seconds $(python -c "print($end - $start)")" >> "$HERE/sweep.txt"
cp "$TMP/sweep/results.json" "$HERE/sweep-results.json"
uptime >> "$HERE/load.txt"
python - <<'PY'
import json, re
here = "results/estimates"
text = open(f"{here}/dry_run.txt").read()
dry = json.loads(text[text.index("{"):])
store_wall = float(re.search(r"wall_seconds (\S+)", open(f"{here}/store.txt").read()).group(1))
res = json.load(open(f"{here}/sweep-results.json"))
sweep_wall = float(re.search(r"wall_seconds (\S+)", open(f"{here}/sweep.txt").read()).group(1))
est = res["timing"]["estimate"]["seconds"]
out = {
    "store_32_images_2_workers": {"estimated_seconds": dry["estimated_seconds"], "measured_wall_seconds": store_wall,
                                  "ratio_measured_to_estimate": store_wall / dry["estimated_seconds"],
                                  "load_average_at_timing": dry.get("load_average")},
    "sweep_cnngp14_n80_test_best_50": {"estimated_seconds": est, "kernel_seconds": res["timing"]["kernel_seconds"],
                                       "measured_wall_seconds": sweep_wall,
                                       "ratio_kernels_to_estimate": res["timing"]["kernel_seconds"] / est,
                                       "ratio_wall_to_estimate": sweep_wall / est,
                                       "float64_check": res.get("float64_check")},
    "load": open(f"{here}/load.txt").read().split("\n"),
}
json.dump(out, open(f"{here}/summary.json", "w"), indent=1)
print(json.dumps(out, indent=1))
PY

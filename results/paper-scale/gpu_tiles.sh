#!/usr/bin/env bash
# On a lent device machine (see gpu_tiles.py): bash results/paper-scale/gpu_tiles.sh train SECONDS
#                                          or: bash results/paper-scale/gpu_tiles.sh test SECONDS
# with carry [".carry", ".whl"]. Everything it reports lands in $OUT (log, tiles-*.tar).
set -u -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 3
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
{ date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, numpy, numba, zarr; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__, 'zarr', zarr.__version__)"
  /usr/bin/time -v python3 results/paper-scale/gpu_tiles.py run "$@" --out "$OUT"; echo "exit status $?"; date -u +%FT%TZ
} 2>&1 | tr '\r' '\n' | grep -v "pair/s" > "$OUT/gpu-$1.log"
tail -20 "$OUT/gpu-$1.log"

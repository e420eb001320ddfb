#!/usr/bin/env bash
# Issue 13: the NTK counterpart of results/cifar10-myrtle10-paper-n320 (the NNGP sweep): the same data,
# N = 80/160/320 blocks, the paper's 4 folds, seed 0, Matérn-3/2 readouts, float32, classified
# by NTK kernel regression. Resumable through the store (rerun this script).
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
mkdir -p /work/stores
CMD=(cnngp sweep --arch myrtle10-paper --data ../../../shared/data/cifar10_subset.npz --n 80,160,320
     --folds 4 --seed 0 --family matern32 --fold-scheme paper --dtype float32 --kernel ntk
     --store /work/stores/myrtle10-paper-n320-ntk.zarr --tile 64 --yes --out cifar10-myrtle10-paper-n320)
{ date -u +%FT%TZ; echo "# ${CMD[*]}"; /usr/bin/time -v "${CMD[@]}"; echo "exit status $?"; date -u +%FT%TZ; } \
    >> cifar10-myrtle10-paper-n320.log 2>&1

#!/usr/bin/env bash
# Issue 15: the paper's CNNGP-14 readout sweep at N = 1,280 (smaller N as disjoint blocks), the
# 27 readouts, test accuracy on the subset's 1,000 test images, kernels in float32 through the
# resumable kernel store. Resumable: run this script again (any session) and it computes only
# the tiles the stores lack. Stores live outside the repository, in /work/stores.
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
mkdir -p /work/stores
CMD=(cnngp sweep --arch cnngp14 --data ../../../shared/data/cifar10_subset.npz
     --n 80,160,320,640,1280 --test --dtype float32 --store /work/stores/cnngp14-n1280.zarr
     --tile 128 --yes --out cnngp14-n1280)
{ date -u +%FT%TZ; echo "# ${CMD[*]}"; /usr/bin/time -v "${CMD[@]}"; echo "exit status $?"; date -u +%FT%TZ; } \
    >> cnngp14-n1280.log 2>&1

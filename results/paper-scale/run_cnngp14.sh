#!/usr/bin/env bash
# Issue 15: the paper's CNNGP-14 readout sweep at N = 1,280 (smaller N as disjoint blocks), the
# 27 readouts, kernels in float32 through the resumable kernel store. Resumable on this machine
# or a fresh one: the store lives outside the repository (/work/stores) and every finished tile
# is also kept, compressed, in the tile archive archive-cnngp14-n1280/ (committed), from which a
# new store is rebuilt before anything is computed. Run this script again (any session, any
# machine) and it computes only the tiles neither holds. The test kernel (1,000 test images ×
# 1,280) is a second step at the CV-chosen readout only: see run_cnngp14_test.sh.
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
mkdir -p /work/stores
CMD=(cnngp sweep --arch cnngp14 --data ../../../shared/data/cifar10_subset.npz
     --n 80,160,320,640,1280 --dtype float32 --store /work/stores/cnngp14-n1280.zarr
     --archive archive-cnngp14-n1280 --tile 128 --yes --out cnngp14-n1280)
{ date -u +%FT%TZ; echo "# ${CMD[*]}"; /usr/bin/time -v "${CMD[@]}"; echo "exit status $?"; date -u +%FT%TZ; } \
    >> cnngp14-n1280.log 2>&1

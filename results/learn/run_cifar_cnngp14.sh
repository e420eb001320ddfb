#!/usr/bin/env bash
# Issue 14: learned readout λ (marginal likelihood and LOO) against the grid, CNNGP-14 on the
# CIFAR-10 subset, N = 160 training images, held-out accuracy by the paper's 4-fold CV.
# The body pass (offset sums) is the expensive part: it goes into the resumable store
# /work/stores/learn-cnngp14-n160-S.zarr once, and every objective after the first reads it.
# --spectral-mixture 2 also learns a 2-component spectral-mixture readout from the same sums.
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
for OBJ in loo mll; do
  CMD=(cnngp learn --arch cnngp14 --data ../../../shared/data/cifar10_subset.npz --n 160 --objective $OBJ
       --spectral-mixture 2 --dtype float32 --store /work/stores/learn-cnngp14-n160-S.zarr
       --out cifar10-cnngp14-n160-$OBJ)
  { date -u +%FT%TZ; echo "# ${CMD[*]}"; /usr/bin/time -v "${CMD[@]}"; echo "exit status $?"; date -u +%FT%TZ; } \
      >> cifar10-cnngp14-n160.log 2>&1
done

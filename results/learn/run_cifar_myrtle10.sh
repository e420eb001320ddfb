#!/usr/bin/env bash
# Issue 14: the tied internal λ of myrtle10-correlated's two 6×6 stride-2 Matérn-3/2 convs,
# learned (profiled: the readout λ, amplitude and σ² learned exactly at each internal λ) on the
# CIFAR-10 subset, N = 160, against the pooled baseline myrtle10-paper with its readout learned
# the same way; held-out accuracy by 4-fold CV. Both objectives; the offset sums of every
# network (and every internal λ) live in resumable stores in /work/stores, so the second
# objective and any rerun after an interruption cost no body pass.
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
run() {
  { date -u +%FT%TZ; echo "# $*"; /usr/bin/time -v "$@"; echo "exit status $?"; date -u +%FT%TZ; } \
      >> cifar10-myrtle10-n160.log 2>&1
}
DATA=../../../shared/data/cifar10_subset.npz
for OBJ in loo mll; do
  run cnngp learn --arch myrtle10-paper --data $DATA --n 160 --objective $OBJ --dtype float32 \
      --store /work/stores/learn-myrtle10-paper-n160-S.zarr --out cifar10-myrtle10-paper-n160-$OBJ
  run cnngp learn --arch myrtle10-correlated --data $DATA --n 160 --objective $OBJ --params internal \
      --dtype float32 --store /work/stores/learn-myrtle10-correlated-n160-S.zarr \
      --out cifar10-myrtle10-correlated-n160-internal-$OBJ
done

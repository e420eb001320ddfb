#!/usr/bin/env bash
# Issue 15: the paper's CNNGP-14 readout sweep at N = 1,280 (smaller N as disjoint blocks), the
# 27 readouts, kernels in float32 through the resumable kernel store; then the test accuracy
# on the subset's 1,000 test images at the CV-chosen readout and σ² (`--test best`: the test
# kernels are computed for that one readout only, after the cross-validation).
# Resumable on this machine or a fresh one: the stores live outside the repository
# (/work/stores) and every finished tile is also kept, compressed, in the tile archive
# archive-cnngp14-n1280/{train,test} (committed), from which new stores are rebuilt before
# anything is computed. Run this script again (any session, any machine) and it computes only
# the tiles neither holds.
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
mkdir -p /work/stores
export TQDM_MININTERVAL=60  # progress in the log once a minute, not every 0.1 s
COMMON=(--arch cnngp14 --data ../../../shared/data/cifar10_subset.npz --n 80,160,320,640,1280
        --dtype float32 --store /work/stores/cnngp14-n1280.zarr --archive archive-cnngp14-n1280
        --tile 128 --yes)
run() {
    { date -u +%FT%TZ; echo "# $*"; /usr/bin/time -v "$@"; local rc=$?; echo "exit status $rc"; date -u +%FT%TZ; } \
        >> cnngp14-n1280.log 2>&1
    return $rc
}
# 1. the train kernels and the cross-validation (results as soon as the train store is full);
#    done once: step 2 rebuilds the train store from the archive itself when it is missing
[ -f cnngp14-n1280/results.json ] || run cnngp sweep "${COMMON[@]}" --out cnngp14-n1280 || exit $?
# 2. the same sweep (its train store reused) scoring the CV-chosen model on the test split
run cnngp sweep "${COMMON[@]}" --test best --out cnngp14-n1280-test

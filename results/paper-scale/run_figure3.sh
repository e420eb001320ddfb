#!/usr/bin/env bash
# Issue 15, Figure 3 at N = 640 (smaller N as disjoint blocks): Myrtle10 3/3/2 with its pools
# (myrtle10-paper) against myrtle10-correlated, whose pool + conv pairs are 6×6 stride-2 SAME
# convs with independent taps (internal λ = 0), Matérn-3/2 taps or RBF taps (internal λ = 3
# taps, the package default), each with the paper's 27-readout sweep. Kernels in float32
# through resumable stores in /work/stores. Run again (any session) to resume: finished
# variants only re-read their stores.
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
mkdir -p /work/stores
run() {  # run NAME ARCH
    local name=$1 arch=$2
    local CMD=(cnngp sweep --arch "$arch" --data ../../../shared/data/cifar10_subset.npz
               --n 80,160,320,640 --dtype float32 --store "/work/stores/$name-n640.zarr"
               --tile 128 --yes --out "$name-n640")
    local rc
    { date -u +%FT%TZ; echo "# ${CMD[*]}"; /usr/bin/time -v "${CMD[@]}"; rc=$?; echo "exit status $rc"; date -u +%FT%TZ; } \
        >> "$name-n640.log" 2>&1
    [ "$rc" -eq 0 ] || exit "$rc"  # stopped (143) or failed: not on to the next variant
}
run myrtle10-paper myrtle10-paper
run myrtle10-correlated-independent myrtle10-correlated-independent.json
run myrtle10-correlated-matern32 myrtle10-correlated-matern32.json
run myrtle10-correlated-rbf myrtle10-correlated-rbf.json

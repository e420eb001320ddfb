#!/usr/bin/env bash
# Issue 29: what weight correlation adds once whitening and flips are in, on the CIFAR-10 subset.
# Each configuration is one sweep: the 27 readouts (independent, Matérn-3/2 at the paper's 25 λ,
# mean pool) from one kernel pass, 4-fold CV at N = 160, 320, 640 (disjoint blocks of the 640),
# the nested estimate (λ and σ² chosen inside each outer fold), and `--test all`: every readout
# trained on the 640 and scored on the subset's 1,000 test images (accuracy, NLL, ECE).
#   plain | --zca 0.1 | --flip | --zca 0.1 --flip    (ZCA strength: a fraction of the mean
#   eigenvalue, fitted on the 640 training images only)
# Kernels in float32 through resumable stores in ../../stores (git-ignored, beside the
# checkout): run this script again — any session — and each sweep computes only the tiles its
# stores lack; finished sweeps (results.json present) are skipped. Wall and CPU time of every
# attempt go to run.log (/usr/bin/time -v). summarize.py tabulates what is finished (summary.md).
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
STORES=../../stores/small-data
mkdir -p "$STORES"
export TQDM_MININTERVAL=60  # progress in the log once a minute
DATA=../../../shared/data/cifar10_subset.npz
run() {  # run NAME ARCH [flags...]
    local name=$1 arch=$2; shift 2
    # done: results and per-image predictions (a run of an older cnngp lacks the latter; rerun,
    # its complete stores make that the cross-validation and the test scores only)
    [ -f "$name/results.json" ] && [ -f "$name/test_predictions.npz" ] && return 0
    { date -u +%FT%TZ; echo "# $name: cnngp sweep --arch $arch $*"; \
      /usr/bin/time -v cnngp sweep --arch "$arch" --data "$DATA" --n 160,320,640 --test all \
        --dtype float32 --store "$STORES/$name.zarr" --tile 160 --yes --out "$name" "$@"; \
      local rc=$?; echo "exit status $rc"; date -u +%FT%TZ; } >> run.log 2>&1
}
for arch in myrtle10; do
    run "$arch-plain" "$arch" || exit $?
    run "$arch-zca" "$arch" --zca 0.1 || exit $?
    run "$arch-flip" "$arch" --flip || exit $?
    run "$arch-zca-flip" "$arch" --zca 0.1 --flip || exit $?
done
# correlated intermediate layers (6×6 stride-2 SAME Matérn convs in place of the pools; on
# 32×32 their padding is 2 before and 2 after, so the network is flip-symmetric: the sweep's
# numerical check passes)
run myrtle10-correlated-plain myrtle10-correlated || exit $?
run myrtle10-correlated-zca myrtle10-correlated --zca 0.1 || exit $?
run myrtle10-correlated-flip myrtle10-correlated --flip || exit $?
run myrtle10-correlated-zca-flip myrtle10-correlated --zca 0.1 --flip || exit $?
# CNNGP-14 last: 3.5× Myrtle10's cost per pair
for arch in cnngp14; do
    run "$arch-plain" "$arch" || exit $?
    run "$arch-zca" "$arch" --zca 0.1 || exit $?
    run "$arch-flip" "$arch" --flip || exit $?
    run "$arch-zca-flip" "$arch" --zca 0.1 --flip || exit $?
done
python summarize.py > /dev/null

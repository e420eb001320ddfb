#!/usr/bin/env bash
# Issue 29: what weight correlation adds once whitening and flips are in, on the CIFAR-10 subset.
# Each configuration is one sweep: the 27 readouts (independent, Matérn-3/2 at the paper's 25 λ,
# mean pool) from one kernel pass, 4-fold CV at N = 160, 320, 640 (disjoint blocks of the 640),
# the nested estimate (λ and σ² chosen inside each outer fold), and `--test all`: every readout
# trained on the 640 and scored on the subset's 1,000 test images (accuracy, NLL, ECE).
#   plain | --zca 0.1 | --flip | --zca 0.1 --flip    (ZCA strength: a fraction of the mean
#   eigenvalue; --zca-fit rest --zca-fit-outside 1280: fitted on the subset's training images
#   outside the balanced 1,280 (which begins with the 640), never on an image the CV validates on
#   nor on a test image, so that validation and test images are whitened alike, out of sample,
#   and the N = 640 and N = 1,280 runs share one whitening (the 1,280 run then grows the 640
#   stores, --reuse). Runs whitened on the N_max itself (in-sample for the CV's validation
#   folds, the first protocol) are kept in zca-in-sample/ for the record.)
# Kernels in float32 through resumable stores in ../../stores (git-ignored, beside the
# checkout), every finished tile also kept in a tile archive, archive/STORE-NAME (--archive: about
# 36 bytes a pair, committed while a configuration or one that reuses its kernels is unfinished,
# removed once they are all done), because a session may start on a new machine, with no stores:
# run this script again — any session, any machine — and each sweep restores what its archive
# holds and computes only the tiles both lack; finished sweeps (results.json present) are skipped. Wall and CPU time of every
# attempt go to run.log (/usr/bin/time -v). summarize.py tabulates what is finished (summary.md).
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
STORES=../../stores/small-data
mkdir -p "$STORES"
export TQDM_MININTERVAL=60  # progress in the log once a minute
DATA=${DATA:-../../../shared/data/cifar10_subset.npz}
NS=${NS:-160,320,640}   # the training set sizes of the CV (the last: the test kernels' training set)
NS_640=$NS        # those of the 12 configurations (the N = 1,280 run's lender stores)
SUFFIX=          # of the names (folders, stores) of the runs at another N_max (see the end)
ZCA=(--zca 0.1 --zca-fit rest --zca-fit-outside 1280)  # the whitening, the same at N_max 640 and 1,280
run() {  # run NAME ARCH [flags...]; STORE=NAME2 run ...: the stores of NAME2 (shared, see below)
    local name=$1$SUFFIX arch=$2 store=${STORE:-$1}$SUFFIX lender=${STORE:-$1} reuse=(); shift 2
    # done: results and per-image predictions (a run of an older cnngp lacks the latter; rerun,
    # its complete stores make that the cross-validation and the test scores only)
    # (and test scores at every N, which a run of cnngp before 2026-12-05 14:15 UTC lacks: rerun)
    [ -f "$name/results.json" ] && [ -f "$name/test_predictions.npz" ] \
        && grep -q block_test_accuracies "$name/results.json" && return 0
    # at another N_max, a configuration grows its N = 640 stores (--reuse: the balanced 1,280
    # begin with the 640, so their tiles are lent; ZCA is fitted outside the 1,280 at both N)
    if [ -n "$SUFFIX" ] && [ "${REUSE:-}" = 1 ]; then
        if [ ! -f "$STORES/$lender.zarr/zarr.json" ] && [ -d "archive/$lender" ]; then
            # a new machine: the N = 640 stores rebuilt from their archive first (the same sweep
            # at N_max 640 again: every tile restored, none computed), so that they can lend
            { date -u +%FT%TZ; echo "# restoring $STORES/$lender.zarr from archive/$lender"; \
              cnngp sweep --arch "$arch" --data "$DATA" --n "$NS_640" --test all --dtype float32 \
                --store "$STORES/$lender.zarr" --tile 160 --yes --quiet --out "$STORES/restored-$lender" \
                --archive "archive/$lender" "$@"; echo "exit status $?"; } >> run.log 2>&1
        fi
        # without the N = 640 stores (nor their archive) the run computes every pair
        [ -f "$STORES/$lender.zarr/zarr.json" ] && reuse=(--reuse "$STORES/$lender.zarr")
    elif [ -z "$SUFFIX" ] && [ -n "${LENDER:-}" ] && [ -f "$LENDER/zarr.json" ]; then
        reuse=(--reuse "$LENDER")  # another store of these kernels (CNNGP14_LENDER below)
    fi
    { date -u +%FT%TZ; echo "# $name: cnngp sweep --arch $arch $*"; \
      /usr/bin/time -v cnngp sweep --arch "$arch" --data "$DATA" --n "$NS" --test all \
        --dtype float32 --store "$STORES/$store.zarr" --tile 160 --yes --out "$name" \
        --archive "archive/$store" ${reuse[@]+"${reuse[@]}"} "$@"; \
      local rc=$?; echo "exit status $rc"; date -u +%FT%TZ; } >> run.log 2>&1
    # the summary after each finished run, while its stores (their tile times) are on this machine
    [ "$rc" = 0 ] && { python summarize.py > /dev/null 2>> run.log || true; }
    return "$rc"  # a sweep that failed stops the queue (its reason is in run.log)
}
configs() {  # configs NAME-PREFIX ARCH CONFIG...: each of plain, zca, flip, zca-flip asked for
    local prefix=$1 arch=$2 cfg; shift 2
    for cfg in "$@"; do
        case $cfg in
            plain) REUSE=1 run "$prefix-plain" "$arch" ;;
            zca) REUSE=1 run "$prefix-zca" "$arch" "${ZCA[@]}" ;;
            # a flip sweep keeps the plain kernels in its --store and their mirror terms beside
            # (K-mirror.zarr): given the plain configuration's store it computes only those
            flip) REUSE=1 STORE="$prefix-plain" run "$prefix-flip" "$arch" --flip ;;
            # --no-zca-mirror: the whitening fitted on the images alone, as the ZCA run's (whose
            # stores hold the plain term), the flip average taken over the whitened images; the
            # mirror-symmetric fit, cnngp's default with --flip since 2026-12-06, came after these
            # runs began (README "Protocol change, 2026-12-06")
            zca-flip) REUSE=1 STORE="$prefix-zca" run "$prefix-zca-flip" "$arch" "${ZCA[@]}" --flip --no-zca-mirror ;;
        esac || return $?
    done
}
# the queue, network by network: plain and flips (a flip configuration reuses its plain one's
# stores and computes only the mirror terms, so it costs what a plain one does), then ZCA and ZCA
# + flips (their whitening fitted apart from the N_max: --zca-fit rest), for the Myrtle networks;
# CNNGP-14's ZCA configurations last. (Until 2026-12-05 23:00 UTC the queue ran every network
# without ZCA first; a session on a new machine lost the stores then, and the Myrtle networks'
# ZCA configurations, each of which fits in a session or two, went before CNNGP-14's unfinished
# ones, which span several sessions through their archives: about 5 h for CNNGP-14 + flips, its
# plain kernels lost too.) myrtle10-correlated has correlated intermediate layers: 6×6 stride-2
# SAME Matérn convs in place of the pools; on 32×32 their padding is 2 before and 2 after, so the
# network is flip-symmetric (the sweep's numerical check passes). CNNGP-14 costs 3.5× Myrtle10's
# per pair.
# (2026-12-06 02:40 UTC: CNNGP-14's ZCA configurations before its flips, whose plain train
# kernels results/paper-scale's store lends: CNNGP14_LENDER below.)
for net in myrtle10 myrtle10-correlated; do
    configs "$net" "$net" plain flip zca zca-flip || exit $?
done
configs cnngp14 cnngp14 plain zca zca-flip || exit $?
# CNNGP-14's plain train kernel at N = 640 (lost with the stores, 2026-12-05) is the leading
# 640 × 640 block of results/paper-scale's at N = 1,280: the same network, 27 readouts, dtype and
# data, and its balanced 1,280 begin with these 640. Its committed tile archive (tile 128) is
# restored into a store that lends that block (--reuse: any tile size, a lender of more images,
# checked against the images it keeps), so CNNGP-14 + flips computes its train mirror terms and
# its test kernels only (its test kernels: paper-scale's hold one readout, so lend nothing).
CNNGP14_LENDER=$STORES/paper-scale-cnngp14-n1280.zarr
# (not once CNNGP-14 + flips is finished: a new machine then has nothing to lend to)
if [ "$DATA" = ../../../shared/data/cifar10_subset.npz ] && [ ! -f "$CNNGP14_LENDER/zarr.json" ] \
        && [ ! -f cnngp14-flip/results.json ]; then
    { date -u +%FT%TZ; echo "# restoring $CNNGP14_LENDER from ../paper-scale/archive-cnngp14-n1280"; \
      cnngp sweep --arch cnngp14 --data "$DATA" --n 1280 --dtype float32 --store "$CNNGP14_LENDER" \
        --tile 128 --yes --quiet --out "$STORES/restored-paper-scale-cnngp14" \
        --archive ../paper-scale/archive-cnngp14-n1280; echo "exit status $?"; } >> run.log 2>&1
fi
LENDER=$CNNGP14_LENDER configs cnngp14 cnngp14 flip || exit $?
# the best configuration again at N = 1,280 (CV at 160 ... 1,280, test kernels against all
# 1,280): the one whose CV-chosen readout has the highest nested CV estimate at N = 640, never a
# test score (summarize.py --best, which refuses until all 12 above are finished). The N = 640
# stores lend their tiles (run: --reuse), about 40 % of the pairs; a ZCA configuration's too, its
# whitening fitted outside the 1,280 at both N (--zca-fit-outside 1280).
best=$(python summarize.py --best) || exit $?
read -r net cfg <<< "$best"
NS=${NS_1280:-160,320,640,1280} SUFFIX=-n1280 configs "$net" "$net" "$cfg" || exit $?
python summarize.py > /dev/null

#!/usr/bin/env bash
# Issue 15's whole queue, in order: Figure 3 at N = 640, then CNNGP-14 at N = 1,280 (train,
# then the 1,000 test images). Every step is resumable; rerun this to continue after an
# interruption (stop with SIGTERM to the sweep, `pkill -TERM -f 'bin/cnngp sweep'`: finished
# tiles stay in the stores, and the queue stops there rather than moving on).
#   nohup bash results/paper-scale/run_queue.sh > /dev/null 2>&1 &
set -u
cd "$(dirname "$0")"
bash run_figure3.sh || exit $?
bash run_cnngp14.sh

#!/usr/bin/env bash
# Issue 15's whole queue, in order: Figure 3 at N = 640, then CNNGP-14 at N = 1,280 (train,
# then the 1,000 test images). Every step is resumable; rerun this to continue after an
# interruption (stop with SIGTERM: finished tiles stay in the stores).
#   nohup nice -n 19 bash results/paper-scale/run_queue.sh > /dev/null 2>&1 &
set -u
cd "$(dirname "$0")"
bash run_figure3.sh
bash run_cnngp14.sh

#!/usr/bin/env bash
# Issue 15's queue. Figure 3 at N = 640 is complete (its results are committed; its stores were
# on a machine that is gone, so `bash run_figure3.sh` would recompute them from scratch, ~4 h
# each: run it only to rebuild them). CNNGP-14 at N = 1,280 is complete too (train and test
# tile archives committed): rerunning this rebuilds its stores from the archive, computes
# nothing and repeats the cross-validation and test scoring (a few minutes). Stop with SIGTERM
# to the sweep, `pkill -TERM -f 'bin/cnngp sweep'`: finished tiles stay in the store and archive.
#   nohup bash results/paper-scale/run_queue.sh > /dev/null 2>&1 &
set -u
cd "$(dirname "$0")"
bash run_cnngp14.sh

#!/usr/bin/env bash
# Issue 15's queue. Figure 3 at N = 640 is complete (its results are committed; its stores were
# on a machine that is gone, so `bash run_figure3.sh` would recompute them from scratch, ~4 h
# each: run it only to rebuild them). What is left: CNNGP-14 at N = 1,280, resumable from its
# tile archive on any machine. Stop with SIGTERM to the sweep, `pkill -TERM -f 'bin/cnngp sweep'`:
# finished tiles stay in the store and the archive.
#   nohup bash results/paper-scale/run_queue.sh > /dev/null 2>&1 &
set -u
cd "$(dirname "$0")"
bash run_cnngp14.sh

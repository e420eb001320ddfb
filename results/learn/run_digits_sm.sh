#!/usr/bin/env bash
# Issue 14: digits, cnngp2, N = 400: the learned Matérn-3/2 λ and a learned 2-component
# spectral-mixture readout against the grid (both objectives), 4-fold CV.
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
for OBJ in mll loo; do
  CMD=(cnngp learn --arch cnngp2 --data digits --n 400 --objective $OBJ --spectral-mixture 2
       --out digits-cnngp2-n400-$OBJ-sm)
  { date -u +%FT%TZ; echo "# ${CMD[*]}"; /usr/bin/time -v "${CMD[@]}"; echo "exit status $?"; date -u +%FT%TZ; } \
      >> digits-sm.log 2>&1
done

#!/usr/bin/env bash
# A 1,000 x 1,000 Myrtle5 Gram matrix of real CIFAR-10 images on 2 local Dask workers,
# interrupted once (SIGINT after 15 min) and resumed with the same command.
# Store and inputs live outside the repository (/tmp/scale); logs land here.
set -u
cd "$(dirname "$0")"
. ../../.venv/bin/activate
mkdir -p /tmp/scale
python -c "
import numpy as np
d = np.load('../../../shared/data/cifar10_subset.npz')
np.savez('/tmp/scale/cifar1000.npz', x=d['x_train'][:1000])"
CMD=(cnngp kernel --arch myrtle5 --x1 /tmp/scale/cifar1000.npz --out /tmp/scale/K.zarr
     --workers 2 --threads-per-worker 1 --tile 128 --dtype float32)
rm -rf /tmp/scale/K.zarr
{ echo "# ${CMD[*]} --dry-run"; "${CMD[@]}" --dry-run; } > dry-run.txt 2>&1
date -u +%FT%TZ > run1.log
echo "# ${CMD[*]}   (SIGINT after 900 s)" >> run1.log
{ /usr/bin/time -v timeout --preserve-status -s INT 900 "${CMD[@]}"; echo "exit status $?"; } >> run1.log 2>&1
cnngp info /tmp/scale/K.zarr > info-after-interrupt.json 2> info-after-interrupt.txt
date -u +%FT%TZ > run2.log
echo "# ${CMD[*]}   (the same command again)" >> run2.log
{ /usr/bin/time -v "${CMD[@]}"; echo "exit status $?"; } >> run2.log 2>&1
cnngp info /tmp/scale/K.zarr > info-final.json 2> info-final.txt
date -u +%FT%TZ >> run2.log

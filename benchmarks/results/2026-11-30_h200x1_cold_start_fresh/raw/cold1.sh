#!/bin/bash
# Lone cold start of the default recipe on a fresh 1xH200 (issue 17's <= 3 minutes target).
set -u
D=/tmp/proxy
[ -e $D/proxy_val_000000.bin ] || sh .device_data/corpus/unpack.sh $D > /dev/null
nvidia-smi --query-gpu=index,name,pci.bus_id,uuid,driver_version --format=csv > $OUT/host.txt 2>&1
nproc >> $OUT/host.txt; git rev-parse HEAD >> $OUT/host.txt 2>/dev/null

python train_gpt.py --train_files="$D/proxy_train_*.bin" --val_files="$D/proxy_val_*.bin" --cycle_train_data=true \
  --target_val_loss=1.98 --val_loss_every=0 --seed=0 --num_iterations=${1:-190} --log_dir=$OUT --run_id=${2:-cold_default_1gpu} 2>&1 | tail -5

#!/bin/bash
# One device call of session 23's same-host test (plan in session 22's closing note):
#   bash .device_data/paired_call.sh LEASE_S [extra]   extra = "bf16": then also --muon_bf16_weights=true, 2 seeds
# The default and no_paired_heads at equal time (190 / 196 steps, planned from session 21's round-1 logs, one host),
# 6 seeds each, seed k on GPU k mod 2; logs in /tmp/paired (kept while the machine is warm; seeded from
# .device_data/paired/ when carried back), returned as $OUT/paired.tgz.
set -u
LEASE=$1; EXTRA=${2:-}
D=/tmp/proxy; L=/tmp/paired
[ -e $D/proxy_val_000000.bin ] || sh .device_data/corpus/unpack.sh $D > /dev/null
mkdir -p /tmp/r1 $L && tar xzf .device_data/abl190.tgz -C /tmp/r1
cp -n .device_data/paired/*.txt $L/ 2>/dev/null
nvidia-smi --query-gpu=index,name,pci.bus_id,uuid,driver_version --format=csv > $OUT/host.txt 2>&1
T0=$(date +%s)
timeout $((${LEASE%.*} + 15)) python benchmarks/ablations.py equal_time --only no_paired_heads --runs 6 \
  --logs /tmp/r1/abl190/default_0.txt /tmp/r1/abl190/default_1.txt /tmp/r1/abl190/no_paired_heads_0.txt \
  /tmp/r1/abl190/no_paired_heads_1.txt --data $D --log_dir $L --peak_tflops 779 --lease_s $LEASE \
  -- --cycle_train_data=true --val_loss_every=0 2>&1 | grep -v "^|" | tail -40
LEFT=$(( ${LEASE%.*} - $(date +%s) + T0 ))
if [ "$EXTRA" = bf16 ] && [ $LEFT -gt 200 ]; then
  timeout $((LEFT + 15)) python benchmarks/proxy_speedrun.py --data $D --runs 2 --nproc 1 --target 1.98 --log_dir $L \
    --peak_tflops 779 --lease_s $LEFT --variant "bf16w_eq190=--muon_bf16_weights=true" \
    -- --num_iterations=190 --cycle_train_data=true --val_loss_every=0 2>&1 | grep -v "^|" | tail -20
fi
tar czf $OUT/paired.tgz -C /tmp paired

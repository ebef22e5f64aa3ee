#!/bin/bash
# Session 25's device work (plan in session 24's closing note); run the same command again until every part is done.
#  A: paired heads turned on at ~150 s, at equal time, 5 seeds per arm on one host: ablations.py equal_time --at 330
#     planned from session 24's round-1 logs (carried in .device_data/abl330_r1/); logs in /tmp/pair330
#  B: the default (no paired heads) at 190 + 15 steps, 5 seeds, target 1.98, for a record folder; logs in /tmp/rec190
#  C: if time is left, XSA also on the layers paired heads freed (0, 2, 5, 9), 190 + 15 steps, 2 seeds, beside B's
#     default on the same host (the XSA layers cost little time; round 2 only if its step times differ); /tmp/rec190
# Logs persist while the machine is warm and are seeded from .device_data/pair330/ and .device_data/rec190/ (carry
# them back if it went cold). usage (device, repository root): bash .device_data/s25_call.sh LEASE_S [A|B|C|AB|ABC...]
set -u
LEASE=$1; PARTS=${2:-ABC}
D=/tmp/proxy
[ -e $D/proxy_val_000000.bin ] || sh .device_data/corpus/unpack.sh $D > /dev/null
mkdir -p /tmp/pair330 /tmp/rec190
cp -n .device_data/pair330/*.txt /tmp/pair330/ 2>/dev/null
cp -n .device_data/rec190/*.txt /tmp/rec190/ 2>/dev/null
nvidia-smi --query-gpu=index,name,pci.bus_id,uuid,driver_version --format=csv > $OUT/host.txt 2>&1
T0=$(date +%s)
left() { echo $(( ${LEASE%.*} - $(date +%s) + T0 )); }
if [[ $PARTS == *A* ]]; then
  L=$(left)
  timeout $((L + 15)) python benchmarks/ablations.py equal_time --only with_paired_heads --runs 5 --at 330 \
    --logs .device_data/abl330_r1/*.txt --data $D --log_dir /tmp/pair330 --peak_tflops 779 --lease_s $L \
    -- --cycle_train_data=true --val_loss_every=0 2>&1 | grep -v "^|" | tail -30
fi
if [[ $PARTS == *B* ]] && [ "$(left)" -gt 150 ]; then
  L=$(left)
  timeout $((L + 15)) python benchmarks/proxy_speedrun.py --data $D --runs 5 --nproc 1 --target 1.98 \
    --name default190 --log_dir /tmp/rec190 --peak_tflops 779 --lease_s $L \
    -- --num_iterations=190 --cycle_train_data=true --val_loss_every=0 2>&1 | grep -v "^|" | tail -20
fi
if [[ $PARTS == *C* ]] && [ "$(left)" -gt 250 ]; then
  L=$(left)
  timeout $((L + 15)) python benchmarks/proxy_speedrun.py --data $D --runs 2 --nproc 1 --target 1.98 \
    --variant "xsa8_190=--xsa_layers=0,1,2,3,4,5,7,9" --log_dir /tmp/rec190 --peak_tflops 779 --lease_s $L \
    -- --num_iterations=190 --cycle_train_data=true --val_loss_every=0 2>&1 | grep -v "^|" | tail -20
fi
tar czf $OUT/s25.tgz -C /tmp pair330 rec190

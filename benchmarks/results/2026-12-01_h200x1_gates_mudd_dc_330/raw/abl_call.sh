#!/bin/bash
# One device call of the ablation rounds through the repository's own tools (session 21's plan for session 22).
# usage (on the device, repository root): bash .device_data/abl_call.sh STEPS LEASE_S [round1|round2] [ablations.py flags...]
#   round2 plans from round 1 at STEPS for the budget --at STEPS; a later --at N in the flags picks another budget
#   (argparse keeps the last); pass --without_default to compare against round 1's default (budget = STEPS only)
#   STEPS: the budget's default step count (190 or 330); logs persist in /tmp/ablogs_STEPS while the machine is warm
#   and are seeded from .device_data/ablSTEPS/ (the logs of earlier calls, fetched from $OUT and carried back).
set -u
# timeout: a run the lease misjudged is killed 15 s after the lease, so the tar below always runs and the
# finished logs come back (the killed run's log is set aside as .unfinished-N by the next call)
STEPS=$1; LEASE=$2; ROUND=${3:-round1}; shift 3 || shift $#
D=/tmp/proxy; L=/tmp/ablogs_$STEPS
[ -e $D/proxy_val_000000.bin ] || sh .device_data/corpus/unpack.sh $D > /dev/null
mkdir -p $L; cp -n .device_data/abl$STEPS/*.txt $L/ 2>/dev/null
# the earlier logs may come packed (each log holds the trainer's source: 30 logs are 8 MB, 2.4 MB packed)
if [ -e .device_data/abl$STEPS.tgz ]; then mkdir -p /tmp/pack_$$ && tar xzf .device_data/abl$STEPS.tgz -C /tmp/pack_$$ \
  && cp -n /tmp/pack_$$/abl$STEPS/*.txt $L/; fi
nvidia-smi --query-gpu=index,name,pci.bus_id,uuid,driver_version --format=csv > $OUT/host.txt 2>&1
if [ "$ROUND" = round1 ]; then
  timeout $((${LEASE%.*} + 15)) python benchmarks/ablations.py run --data $D --runs 2 --log_dir $L --peak_tflops 779 --lease_s $LEASE "$@" \
    -- --num_iterations=$STEPS --cycle_train_data=true --val_loss_every=0 2>&1 | grep -v "^|" | tail -40
else
  timeout $((${LEASE%.*} + 15)) python benchmarks/ablations.py equal_time --logs $L/*.txt --at $STEPS --data $D --runs 2 --log_dir $L \
    --peak_tflops 779 --lease_s $LEASE "$@" -- --cycle_train_data=true --val_loss_every=0 2>&1 \
    | grep -v "^|" | tail -40
fi
tar czf $OUT/ablogs_$STEPS.tgz -C /tmp ablogs_$STEPS

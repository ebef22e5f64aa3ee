#!/usr/bin/env bash
# Save, resume and sample on the GPUs of this machine, on the proxy corpus in folder D (proxy_train_*.bin,
# proxy_val_*.bin): an uninterrupted run that saves at step K and at its end, a run resumed from step K, their
# final val losses side by side, the val-loss-vs-time plot of both, and a sample from the final checkpoint.
#   tools/resume_check.sh D [STEPS=200] [K=100]        # LOG_DIR (default logs/resume_check), NPROC as run.sh
# EXTRA: more trainer flags for both runs (e.g. a CPU smoke test: EXTRA="--preset=tiny ...").
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:?usage: tools/resume_check.sh DATA_DIR [STEPS] [SAVE_AT_STEP]}
STEPS=${2:-200}
K=${3:-100}
LOGS=${LOG_DIR:-logs/resume_check}
COMMON=(--train_files="$D/proxy_train_*.bin" --val_files="$D/proxy_val_*.bin" --num_iterations="$STEPS"
        --val_loss_every=25 --cycle_train_data=true --log_dir="$LOGS")
read -ra EXTRA_ARGS <<< "${EXTRA:-}"
COMMON+=("${EXTRA_ARGS[@]}")
./run.sh "${COMMON[@]}" --run_id=straight --checkpoint_every="$K" --save_checkpoint=true
./run.sh "${COMMON[@]}" --run_id=resumed --resume_from="$LOGS/straight/step_$K"
for run in straight resumed; do echo "$run: $(grep -E '^step:[0-9]+/[0-9]+ val_loss:' "$LOGS/$run.txt" | tail -n 1)"; done
grep -h -E "^(checkpoint|resumed_from): " "$LOGS/straight.txt" "$LOGS/resumed.txt"
# Draws both runs, then refuses the resumed one as a record run (exit 2): expected.
python records/verify.py "$LOGS" --plot "$LOGS/resume_check.png" || true
FINAL=$(ls -d "$LOGS"/straight/step_* | sort -V | tail -n 1)
python sample.py "$FINAL" --prompt "The meaning of life is" --tokens 60 --samples 2 \
    --vocab-bpe data/gpt2/vocab.bpe --encoder-json data/gpt2/encoder.json

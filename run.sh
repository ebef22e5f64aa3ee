#!/usr/bin/env bash
# Launch train_gpt.py with torchrun on every visible GPU; arguments pass through to the trainer.
#   ./run.sh                          # all GPUs on this node
#   NPROC=2 ./run.sh --num_iterations=200
#   TRAINER=train_gpt_medium.py ./run.sh
#   Multi-node: set TORCHRUN_ARGS, e.g. "--nnodes=2 --node_rank=0 --rdzv_backend=c10d --rdzv_endpoint=host:29500"
set -euo pipefail
cd "$(dirname "$0")"
TRAINER=${TRAINER:-train_gpt.py}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
if [ -n "${TORCHRUN_ARGS:-}" ]; then
  # shellcheck disable=SC2086  # TORCHRUN_ARGS holds several flags
  exec torchrun ${TORCHRUN_ARGS} --nproc_per_node="$NPROC" "$TRAINER" "$@"
fi
exec torchrun --standalone --nproc_per_node="$NPROC" "$TRAINER" "$@"

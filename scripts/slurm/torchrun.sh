#!/bin/bash
# celldiff without SLURM: torchrun starts one process per GPU and Lightning picks up its variables.
#   bash scripts/slurm/torchrun.sh configs/phase1.yaml 4          # 4 GPUs on this machine
set -euo pipefail
CONFIG=${1:?usage: torchrun.sh CONFIG NUM_GPUS [celldiff flags...]}
GPUS=${2:?number of GPUs}
shift 2
torchrun --standalone --nproc_per_node "${GPUS}" -m celldiff.cli fit --config "${CONFIG}" \
    --trainer.accelerator gpu --trainer.devices "${GPUS}" --trainer.strategy ddp "$@"

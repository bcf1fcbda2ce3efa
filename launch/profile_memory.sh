#!/usr/bin/env bash
# Measure the memory and speed of one training configuration: real steps, peak memory per phase
# and per kind, samples/s -> OUTPUT_DIR/profile.{json,md,png}. Any training flag works.
#
#   NPROC=1 bash launch/profile_memory.sh --data DATA --backbone MODEL --finetune-vl lora \
#       --batch-size 8 --ds-config zero2 --gpu-mem-limit 24 --output-dir runs/profile-lora-mb8
#
# NPROC processes on this machine (default: 1); on CPU it runs under gloo. Exit code 3 = out of
# memory within --gpu-mem-limit (the report is still written). See docs/memory.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
NPROC=${NPROC:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m vla_ds.profiling \
    --grad-accum-steps 1 --wandb-mode disabled "$@"

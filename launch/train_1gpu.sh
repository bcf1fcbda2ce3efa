#!/usr/bin/env bash
# Train on one GPU (24 GB: LoRA bf16 with ZeRO-2; full finetune: DS_CONFIG=ds_configs/zero2_offload.json).
#   bash launch/train_1gpu.sh --data DATASET_DIR --backbone Qwen/Qwen2.5-VL-3B-Instruct --output-dir runs/lora [flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec ${DEEPSPEED:-.venv/bin/deepspeed} --num_gpus 1 launch/train.py --mode train \
  --ds-config "${DS_CONFIG:-ds_configs/zero2.json}" "$@"

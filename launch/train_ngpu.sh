#!/usr/bin/env bash
# Train on N GPUs of one machine (default: all visible).
#   NUM_GPUS=4 bash launch/train_ngpu.sh --data DATASET_DIR --backbone MODEL_DIR --output-dir runs/lora4 [flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
n=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
exec ${DEEPSPEED:-.venv/bin/deepspeed} --num_gpus "$n" launch/train.py --mode train \
  --ds-config "${DS_CONFIG:-ds_configs/zero2.json}" "$@"

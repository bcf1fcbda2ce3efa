#!/usr/bin/env bash
# Train on CPU with 2 processes (gloo): the same code path as a GPU cluster, for laptops and CI.
#   bash launch/train_cpu.sh --data DATASET_DIR --backbone MODEL_DIR --output-dir runs/cpu [flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=cpu
PY=${PYTHON:-.venv/bin/python}
port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
exec "$PY" -m torch.distributed.run --nproc_per_node "${NPROC:-2}" --master_port "$port" launch/train.py \
  --mode train --ds-config "${DS_CONFIG:-ds_configs/zero2.json}" "$@"

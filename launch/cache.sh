#!/usr/bin/env bash
# Build the VL feature cache with every GPU of this machine (or NPROC CPU processes without GPUs).
#   bash launch/cache.sh --data DATASET_DIR --backbone MODEL_DIR --finetune-vl none [--cache-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if command -v nvidia-smi >/dev/null 2>&1; then n=${NPROC:-$(nvidia-smi -L | wc -l)}; else n=${NPROC:-2}; export OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu; fi
port=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
exec "$PY" -m torch.distributed.run --nproc_per_node "$n" --master_port "$port" launch/train.py --mode cache "$@"

#!/usr/bin/env bash
# Train on several machines with the DeepSpeed launcher and a hostfile (see launch/hostfile.example).
# Run on the first host; every host needs the same checkout, venv and data paths, and passwordless ssh.
#   HOSTFILE=launch/hostfile MASTER_ADDR=node1 bash launch/train_multinode.sh --data ... --output-dir runs/multi
set -euo pipefail
cd "$(dirname "$0")/.."
exec ${DEEPSPEED:-.venv/bin/deepspeed} --hostfile "${HOSTFILE:-launch/hostfile}" \
  --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first host}" --master_port "${MASTER_PORT:-29500}" \
  launch/train.py --mode train --ds-config "${DS_CONFIG:-ds_configs/zero3.json}" "$@"

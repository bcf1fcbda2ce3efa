#!/usr/bin/env bash
# Train on several machines (docs/training.md, "Multi-node"). Every node needs the same checkout,
# venv and data paths, and --output-dir on a filesystem that every node sees (each rank writes its
# DeepSpeed shards into the run directory, rank 0 the policy and trainer state).
#
#   bash launch/train_multinode.sh [LAUNCHER FLAGS ... --] TRAINER FLAGS ...
#
# Arguments before the first `--` go to the launcher (deepspeed or torchrun), the rest to
# launch/train.py; without a `--` they all go to launch/train.py. Relative paths are relative to
# the repository root (the script runs there), as in the other launch/ scripts.
#
# Environment:
#   LAUNCHER        deepspeed (default) or torchrun
#   NODE_RANK       this node's index, 0 .. nodes-1: run the script once on every node, no ssh.
#                   Unset with LAUNCHER=deepspeed: run it once, on the first host, and DeepSpeed
#                   starts the other hosts over passwordless ssh (pdsh)
#   MASTER_ADDR     address of node 0 that every node reaches (required)
#   MASTER_PORT     a free TCP port on node 0 (default 29500)
#   HOSTFILE        deepspeed: "<host> slots=<processes>" per node, the same file on every node
#                   (default launch/hostfile, see launch/hostfile.example)
#   NNODES          torchrun: number of nodes (required)
#   NPROC_PER_NODE  torchrun: processes per node (default: the GPUs nvidia-smi lists)
#   DS_CONFIG       DeepSpeed preset (default ds_configs/zero3.json)
#   OMP_NUM_THREADS default 1; DS_ACCELERATOR defaults to cpu where there is no nvidia-smi
#   DEEPSPEED, PYTHON  the deepspeed launcher and the python of torchrun (default: .venv's)
#
# Examples (node1 is node 0; /shared is mounted on every node):
#   # DeepSpeed launcher without ssh: on node i (0, 1, ...) of the hostfile
#   NODE_RANK=i MASTER_ADDR=node1 bash launch/train_multinode.sh --data D --backbone M --output-dir /shared/runs/multi
#   # torchrun, 2 nodes x 4 GPUs: on node i
#   LAUNCHER=torchrun NNODES=2 NPROC_PER_NODE=4 NODE_RANK=i MASTER_ADDR=node1 \
#     bash launch/train_multinode.sh --data D --backbone M --output-dir /shared/runs/multi
#   # DeepSpeed launcher over ssh, from node1 only
#   MASTER_ADDR=node1 bash launch/train_multinode.sh --data D --backbone M --output-dir /shared/runs/multi
#   # launcher flags before `--` (here torchrun's --log-dir; deepspeed's e.g. --bind_cores_to_rank)
#   LAUNCHER=torchrun NNODES=2 NPROC_PER_NODE=4 NODE_RANK=i MASTER_ADDR=node1 \
#     bash launch/train_multinode.sh --log-dir logs/node_i -- --data D --backbone M --output-dir /shared/runs/multi
set -euo pipefail
cd "$(dirname "$0")/.."

launcher_args=() trainer_args=("$@")
for ((i = 1; i <= $#; i++)); do
  if [[ ${!i} == "--" ]]; then
    launcher_args=("${@:1:i-1}") trainer_args=("${@:i+1}")
    break
  fi
done

die() { echo "train_multinode.sh: $*" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
command -v nvidia-smi >/dev/null || export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
addr=${MASTER_ADDR:?set MASTER_ADDR to an address of node 0 that every node reaches}
port=${MASTER_PORT:-29500}
trainer=(launch/train.py --mode train --ds-config "${DS_CONFIG:-ds_configs/zero3.json}")
[[ -z ${NODE_RANK:-} || ${NODE_RANK} =~ ^[0-9]+$ ]] || die "NODE_RANK=$NODE_RANK: give this node's index, 0 .. nodes-1"

case ${LAUNCHER:-deepspeed} in
  deepspeed)
    hostfile=${HOSTFILE:-launch/hostfile}
    [[ -f $hostfile ]] || die "HOSTFILE=$hostfile: no such file; copy launch/hostfile.example and list the nodes"
    no_ssh=()
    [[ -n ${NODE_RANK:-} ]] && no_ssh=(--no_ssh --node_rank "$NODE_RANK")
    exec ${DEEPSPEED:-.venv/bin/deepspeed} --hostfile "$hostfile" "${no_ssh[@]}" --master_addr "$addr" \
      --master_port "$port" "${launcher_args[@]}" "${trainer[@]}" "${trainer_args[@]}"
    ;;
  torchrun)
    [[ -n ${NODE_RANK:-} ]] || die "LAUNCHER=torchrun needs NODE_RANK (this node's index): run the script on every node"
    nnodes=${NNODES:?set NNODES to the number of nodes (LAUNCHER=torchrun)}
    nproc=${NPROC_PER_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
    [[ $nproc =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=${nproc}: set the processes per node (no GPU found)"
    exec "${PYTHON:-.venv/bin/python}" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$NODE_RANK" \
      --nproc_per_node "$nproc" --master_addr "$addr" --master_port "$port" "${launcher_args[@]}" \
      "${trainer[@]}" "${trainer_args[@]}"
    ;;
  *) die "LAUNCHER=$LAUNCHER: use deepspeed or torchrun" ;;
esac

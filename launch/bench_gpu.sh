#!/usr/bin/env bash
# The GPU benchmarks in one command, for a lent GPU machine that has torch, transformers, peft,
# matplotlib and nvcc but no registry access (the `device` tool; wandb is not needed: logging is off).
# From this repository:
#
#   bash ../shared/tools/gpu-wheels.sh          # here, once: deepspeed + bitsandbytes wheels -> .whl/
#   device run  command: bash launch/bench_gpu.sh   carry: [".whl"]   timeout_s: 600
#
# Installs .whl/ into /tmp/site, checks that deepspeed, bitsandbytes and CUDA import, then runs
#   tests/benchmarks/bench_activations.py   activation model vs the CUDA allocator (3B widths)
#   tests/benchmarks/bench_memory.py        the 3B (random bf16 weights) per configuration
# and copies docs/performance.md and both logs to $OUT. bench_memory rewrites its section after
# every row, so a run cut short keeps the rows it finished. ROW_TIMEOUT (s) caps each row.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "[bench_gpu] installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
out=${OUT:-runs/bench_gpu}
mkdir -p "$out"
"$PY" -c "import torch, deepspeed, bitsandbytes; assert torch.cuda.is_available(), 'no CUDA device'" \
  || { echo "[bench_gpu] deepspeed, bitsandbytes or CUDA missing: run ../shared/tools/gpu-wheels.sh and carry .whl" >&2; exit 1; }
work=${WORK:-/tmp/vla-ds-bench}
"$PY" -m tests.benchmarks.bench_activations --work "$work" 2>&1 | tee "$out/activations.log"
"$PY" -m tests.benchmarks.bench_memory --work "$work" --steps 2 --timeout "${ROW_TIMEOUT:-240}" 2>&1 | tee "$out/memory.log"
cp docs/performance.md "$out/"
echo "[bench_gpu] done: $out"

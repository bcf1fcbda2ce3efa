#!/usr/bin/env bash
# Install vla-ds and its dependencies into a virtual environment. Idempotent: a second run with an
# unchanged setup.cfg only checks imports and returns in a few seconds.
#
#   bash launch/setup.sh                      # creates ./.venv if absent
#   VLA_DS_VENV=/path/to/venv bash launch/setup.sh
#   VLA_DS_SYSTEM_SITE=1 bash launch/setup.sh # new venv sees the system's (e.g. CUDA) torch
#   VLA_DS_INSTALLER=pip bash launch/setup.sh # pip only (default: uv, falling back to pip)
#
# vla-ds and its dependencies are installed by uv (pip-installed into the venv first) because it
# installs the same versions ~4x faster (measured here: 23 s against 105 s of pip, mostly pip's
# serial unpacking and byte-compiling); if uv is not available or fails (e.g. a private index that
# only pip's config knows), pip does it.
#
# torch is installed (torch==2.13.0) only when none is importable in the venv, so a CUDA build
# that is already there is kept; pip is never left to resolve torch by itself, because an
# unpinned torch requirement pulls several GB of CUDA packages.
#
# Then DeepSpeed's CPU ops (shm comm, cpu_adam; ~1.5 min on an idle 2-core machine) are
# built once, by `vla-ds build-ops`, into the user's TORCH_EXTENSIONS_DIR if set, else the venv's
# own <venv>/torch_extensions: otherwise the first run compiles them silently, and venvs sharing
# ~/.cache/torch_extensions rebuild each other's. VLA_DS_BUILD_OPS=0 skips this; a later run
# builds what is missing (also when the packages are up to date). On CUDA nothing is built here.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=${VLA_DS_VENV:-$root/.venv}
py=${PYTHON:-python3}
torch_pin=${VLA_DS_TORCH:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  opts=()
  [ "${VLA_DS_SYSTEM_SITE:-0}" = 1 ] && opts+=(--system-site-packages)
  "$py" -m venv "${opts[@]}" "$venv"
fi
vpy="$venv/bin/python"
pip=("$vpy" -m pip install --disable-pip-version-check -q)

if ! "$vpy" -c "import torch" >/dev/null 2>&1; then
  echo "[setup] no torch importable: installing $torch_pin"
  "${pip[@]}" "$torch_pin"
fi

# The ops stamp holds the ops' directory and the ops still missing there: a change of either builds.
ops_stamp="$venv/.vla-ds-ops"
ops_state() {
  "$vpy" -c "from vla_ds.utils.jit import extensions_dir, missing_ops; print(extensions_dir(), *missing_ops())"
}
build_ops() {
  [ "${VLA_DS_BUILD_OPS:-1}" = 0 ] && return 0
  [ -f "$ops_stamp" ] && [ "$(cat "$ops_stamp")" = "$(ops_state)" ] && return 0
  echo "[setup] building DeepSpeed's ops once (VLA_DS_BUILD_OPS=0 skips)"
  "$vpy" -m vla_ds build-ops \
    || { echo "[setup] building DeepSpeed's ops failed (see above); VLA_DS_BUILD_OPS=0 skips it" >&2; exit 1; }
  ops_state > "$ops_stamp"
}

# The stamp holds a hash of the packaging files: unchanged files + importable packages = done.
stamp="$venv/.vla-ds-installed"
want=$(cat setup.cfg pyproject.toml | "$vpy" -c "import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
   && "$vpy" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
      ['vla_ds', 'torch', 'deepspeed', 'transformers', 'peft', 'bitsandbytes', 'wandb', 'safetensors', 'pytest']))" \
      >/dev/null 2>&1; then
  echo "[setup] up to date ($venv)"
  build_ops
  exit 0
fi
# uv may keep torch exactly as it is (the constraint), never resolve another one: where it cannot
# see the installed torch (a system one, VLA_DS_SYSTEM_SITE=1) it fails on that and pip installs.
installer=${VLA_DS_INSTALLER:-uv}
keep_torch="$venv/.vla-ds-torch.txt"
"$vpy" -c "import torch; print('torch==' + torch.__version__)" > "$keep_torch" 2>/dev/null
if [ "$installer" = uv ] && "${pip[@]}" "uv>=0.5,<1" >/dev/null 2>&1 && echo "[setup] uv pip install -e .[dev]" \
   && "$venv/bin/uv" pip install -q --python "$vpy" --constraint "$keep_torch" -e ".[dev]"; then
  :
else
  echo "[setup] pip install -e .[dev]"
  "${pip[@]}" -e ".[dev]"
fi
"$vpy" -c "import vla_ds, torch, deepspeed, transformers, peft, bitsandbytes, safetensors" >/dev/null
echo "$want" > "$stamp"
"$vpy" - <<'PY'
import importlib.metadata as md
names = ["torch", "deepspeed", "transformers", "peft", "bitsandbytes", "wandb", "safetensors", "tokenizers", "pytest"]
print("[setup] installed: " + ", ".join(f"{n} {md.version(n)}" for n in names))
PY
build_ops

"""The launch paths users have: launch/train_cpu.sh (torchrun) and the deepspeed launcher
(which passes --local_rank to every process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.conftest import SMALL, free_port

pytestmark = pytest.mark.slow


def _args(train_data, tiny_model_dir, out):
    return ["--data", str(train_data), "--backbone", str(tiny_model_dir), "--output-dir", str(out), "--max-steps", "3",
            "--batch-size", "1", "--grad-accum-steps", "2", "--val-ratio", "0", "--log-every", "1", *SMALL]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled",
                PYTHON=sys.executable, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def test_cpu_launch_script(tmp_path, train_data, tiny_model_dir, repo_root):
    out = tmp_path / "run"
    proc = subprocess.run(["bash", str(repo_root / "launch" / "train_cpu.sh"), *_args(train_data, tiny_model_dir, out)],
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()
    assert "2 process(es)" in proc.stderr


def test_deepspeed_launcher(tmp_path, train_data, tiny_model_dir, repo_root):
    out = tmp_path / "run"
    deepspeed = Path(sys.executable).parent / "deepspeed"
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()), str(repo_root / "launch" / "train.py"),
           "--mode", "train", "--ds-config", str(repo_root / "ds_configs" / "zero2.json"),
           *_args(train_data, tiny_model_dir, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=repo_root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()
    assert "--local_rank=" in proc.stdout + proc.stderr, "the launcher passed --local_rank and it was accepted"

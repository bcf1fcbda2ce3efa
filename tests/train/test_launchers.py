"""The launch paths users have on one machine: launch/train_cpu.sh (torchrun) and the deepspeed
launcher (which passes --local_rank to every process). The session's shared runs are launched
these two ways (tests/helpers/runs.py `lora_run`); here is what their launches showed."""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow


def test_cpu_launch_script(zero2_run):
    log = (zero2_run / "launch.log").read_text()
    assert (zero2_run / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()
    assert "2 process(es)" in log


def test_checkpoint_files_are_readable_by_other_users(zero2_run):
    # a robot-side service running as another user reads the policy: the umask's ordinary modes
    mask = os.umask(0)
    os.umask(mask)
    step = zero2_run / "checkpoints" / "final"
    for f in ("policy/model.safetensors", "policy/adapter/adapter_model.safetensors", "rng/rank_00001.safetensors",
              "trainer_state.json"):
        assert (step / f).stat().st_mode & 0o777 == 0o666 & ~mask, f
    assert (step / "policy").stat().st_mode & 0o777 == 0o777 & ~mask


def test_deepspeed_launcher(zero3_run):
    log = (zero3_run / "launch.log").read_text()
    assert (zero3_run / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()
    assert "2 process(es)" in log
    assert "--local_rank=" in log, "the launcher passed --local_rank and it was accepted"

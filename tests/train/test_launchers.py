"""The launch paths users have on one machine: launch/train_cpu.sh (torchrun) and the deepspeed
launcher (which passes --local_rank to every process). The session's shared runs are launched
these two ways (tests/helpers/runs.py `lora_run`); here is what their launches showed."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_cpu_launch_script(zero2_run):
    log = (zero2_run / "launch.log").read_text()
    assert (zero2_run / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()
    assert "2 process(es)" in log


def test_deepspeed_launcher(zero3_run):
    log = (zero3_run / "launch.log").read_text()
    assert (zero3_run / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()
    assert "2 process(es)" in log
    assert "--local_rank=" in log, "the launcher passed --local_rank and it was accepted"

"""Checkpoints: exact resume after SIGKILL, a crash inside a save, pointers, pruning, refusals."""
from __future__ import annotations

import json
import os

import pytest

from tests.train.conftest import SMALL, losses, run_training

pytestmark = pytest.mark.slow


def _args(data, backbone, out, *extra):
    return ["--data", str(data), "--backbone", str(backbone), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum-steps", "1", "--log-every", "1", "--lr", "2e-3", "--sensor-lr", "2e-3", "--vl-lr", "1e-3",
            "--sensor-enabled", "--finetune-vl", "lora", "--val-ratio", "0", *SMALL, *extra]


def _by_step(rows):
    return {r["step"]: r["train/loss_step"] for r in rows if "train/loss_step" in r}


def _pointer(out, name):
    return os.readlink(out / "checkpoints" / name)


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, train_data, tiny_model_dir):
    # dropout stays on (head 0.1, LoRA 0.05): exactness needs the RNG states back too
    steps = ["--max-steps", "12", "--save-every", "4"]
    _, full = run_training(_args(train_data, tiny_model_dir, tmp_path / "full", *steps))
    out = tmp_path / "killed"
    env_kill = {"VLA_DS_FAULT": "kill_at_step:6"}  # two steps after the checkpoint at 4
    proc, _ = run_training(_args(train_data, tiny_model_dir, out, *steps), expect_ok=False, env=env_kill)
    assert proc.returncode != 0
    assert _pointer(out, "latest") == "step_000004"
    proc, rows = run_training(_args(train_data, tiny_model_dir, out, *steps))  # --resume auto
    assert "resumed from" in proc.stderr and "step 4" in proc.stderr
    want, got = _by_step(full), _by_step(rows)
    assert sorted(got) == list(range(1, 13)), "metrics.jsonl reads as one uninterrupted history"
    for step in range(1, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-9), f"step {step}: {got[step]} vs {want[step]}"
    state = json.loads((out / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["step"] == 12 and _pointer(out, "final") == "step_000012"


def test_crash_inside_a_save_leaves_latest_loadable(tmp_path, train_data, tiny_model_dir):
    out = tmp_path / "run"
    steps = ["--max-steps", "8", "--save-every", "3"]
    proc, _ = run_training(_args(train_data, tiny_model_dir, out, *steps), expect_ok=False,
                           env={"VLA_DS_FAULT": "crash_in_save:6"})
    assert proc.returncode != 0
    root = out / "checkpoints"
    assert _pointer(out, "latest") == "step_000003"
    assert not (root / "step_000006").exists(), "the half-written checkpoint never took the real name"
    proc, rows = run_training(_args(train_data, tiny_model_dir, out, *steps))
    assert "step 3" in proc.stderr and sorted(_by_step(rows)) == list(range(1, 9))
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


def test_pointers_follow_validation_and_old_checkpoints_are_pruned(tmp_path, train_data, tiny_model_dir):
    out = tmp_path / "run"
    # a large lr overfits the few training episodes: validation improves first, then worsens
    _, rows = run_training(_args(train_data, tiny_model_dir, out, "--max-steps", "10", "--val-ratio", "0.3",
                                 "--val-every", "1", "--save-every", "0", "--keep-last", "2", "--lr", "2e-2",
                                 "--sensor-lr", "2e-2"))
    val = {r["step"]: r["val/loss_epoch"] for r in rows if "val/loss_epoch" in r}
    best_step = min(val, key=val.get)
    assert best_step < 10, f"validation should worsen after its best: {val}"
    assert _pointer(out, "best") == f"step_{best_step:06d}"
    assert _pointer(out, "latest") == _pointer(out, "final") == "step_000010"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert f"step_{best_step:06d}" in kept and "step_000010" in kept and len(kept) <= 3


def test_resume_refuses_another_world_size_or_model(tmp_path, train_data, tiny_model_dir):
    out = tmp_path / "run"
    run_training(_args(train_data, tiny_model_dir, out, "--max-steps", "2"))
    proc, _ = run_training(_args(train_data, tiny_model_dir, out, "--max-steps", "4"), nproc=1, expect_ok=False)
    line = [l for l in proc.stderr.splitlines() if "vla-ds train:" in l]
    assert len(line) == 1 and "2 process(es)" in line[0] and "vla-ds convert" in line[0]
    proc, _ = run_training(_args(train_data, tiny_model_dir, out, "--max-steps", "4", "--fusion-strategy", "gated"),
                           expect_ok=False)
    line = [l for l in proc.stderr.splitlines() if "vla-ds train:" in l]
    assert line and "fusion_strategy ('concat' -> 'gated')" in line[0]

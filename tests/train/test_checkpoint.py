"""Checkpoints: exact resume after SIGKILL, a crash inside a save, pointers, pruning, refusals."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.helpers.runs import SMALL, loss_by_step, metrics_rows, run_training

pytestmark = pytest.mark.slow


def _args(data, backbone, out, *extra):
    return ["--data", str(data), "--backbone", str(backbone), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum-steps", "1", "--log-every", "1", "--lr", "2e-3", "--sensor-lr", "2e-3", "--vl-lr", "1e-3",
            "--sensor-enabled", "--finetune-vl", "lora", "--val-ratio", "0", *SMALL, *extra]


def _pointer(out, name):
    return os.readlink(out / "checkpoints" / name)


KILL_STEPS = ["--max-steps", "12", "--save-every", "4"]
DAMAGED_SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
CRASH_STEPS = ["--max-steps", "8", "--save-every", "3"]


def _after_crash(proc, out) -> dict:
    root = out / "checkpoints"
    return {"returncode": proc.returncode, "latest": _pointer(out, "latest"), "entries": sorted(p.name for p in root.iterdir())}


# What a crash left, recorded before its resume: {run name: {"returncode", "latest", "entries"}}.
CRASHED: dict[str, dict] = {}
NAMES = ("full", "pointers", "killed", "crash", "refused", "flow_full", "flow_killed")
# the flow head with the robot state: its noise and times must continue as they would have
FLOW = ["--action-head", "flow", "--state-enabled", "--max-steps", "8", "--save-every", "4"]


def shared_runs(ctx) -> dict:
    """The two crashes, each in its own launch now (a crash ends its launch), then for the
    session's shared launch: the uninterrupted reference, the pointer run, both resumes, and a
    resume refused for its model (of a copy of the session's 2-process LoRA + sensor run, the
    model of _args)."""
    if not any(ctx.selected(t) for t in ("test_sigkill_then_resume_reproduces_the_uninterrupted_losses",
                                         "test_crash_inside_a_save_leaves_latest_loadable",
                                         "test_pointers_follow_validation_and_old_checkpoints_are_pruned",
                                         "test_resume_on_one_process_continues_a_two_process_run_but_refuses_another_model",
                                         "test_a_flow_head_resumes_its_noise_exactly")):
        return {}
    root, data, bb = ctx.root("checkpoint_runs"), ctx.fixture("train_data"), ctx.fixture("tiny_model_dir")
    shutil.copytree(ctx.fixture("zero2_run"), root / "refused", symlinks=True)
    # dropout stays on (head 0.1, LoRA 0.05): exactness needs the RNG states back too
    proc, _ = run_training(_args(data, bb, root / "killed", *KILL_STEPS), expect_ok=False,
                           env={"VLA_DS_FAULT": "kill_at_step:9"})  # a step after the checkpoint at 8
    CRASHED["killed"] = _after_crash(proc, root / "killed")
    # ... and then the latest checkpoint is damaged (a disk filled by another job): resume falls back to 4
    shard = root / "killed" / "checkpoints" / "step_000008" / "ds" / "step_000008" / DAMAGED_SHARD
    shard.write_bytes(shard.read_bytes()[:1000])
    proc, _ = run_training(_args(data, bb, root / "crash", *CRASH_STEPS), expect_ok=False,
                           env={"VLA_DS_FAULT": "crash_in_save:6"})
    CRASHED["crash"] = _after_crash(proc, root / "crash")
    proc, _ = run_training(_args(data, bb, root / "flow_killed", *FLOW), expect_ok=False,
                           env={"VLA_DS_FAULT": "kill_at_step:6"})  # 2 steps after the checkpoint at 4
    CRASHED["flow_killed"] = _after_crash(proc, root / "flow_killed")
    return {"full": _args(data, bb, root / "full", *KILL_STEPS),
            # a large lr overfits the few training episodes: validation improves first, then worsens
            "pointers": _args(data, bb, root / "pointers", "--max-steps", "10", "--val-ratio", "0.3", "--val-every",
                              "1", "--save-every", "0", "--keep-last", "2", "--lr", "2e-2", "--sensor-lr", "2e-2"),
            "killed": _args(data, bb, root / "killed", *KILL_STEPS),  # --resume auto
            "crash": _args(data, bb, root / "crash", *CRASH_STEPS),
            "refused": _args(data, bb, root / "refused", "--max-steps", "4", "--fusion-strategy", "gated"),
            "flow_full": _args(data, bb, root / "flow_full", *FLOW),
            "flow_killed": _args(data, bb, root / "flow_killed", *FLOW)}


@pytest.fixture(scope="module")
def runs(shared) -> dict:
    return {name: {"dir": r.dir, "rows": r.rows, "log": r.log, **CRASHED.get(name, {})}
            for name in NAMES for r in [shared.run(__name__, name)]}


def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(runs):
    # killed after step 9, its latest checkpoint (8) then truncated: resume takes the one before (the
    # epoch end at 7), says so, and keeps 8
    killed, out = runs["killed"], runs["killed"]["dir"]
    assert killed["returncode"] != 0 and killed["latest"] == "step_000008"
    skipped = [ln for ln in killed["log"].splitlines() if "skipping" in ln]
    assert len(skipped) == 1 and "step_000008" in skipped[0] and DAMAGED_SHARD in skipped[0], skipped
    before = max(int(e[5:]) for e in killed["entries"] if e.startswith("step_") and e != "step_000008")
    assert f"resumed from {out / 'checkpoints' / f'step_{before:06d}'}: step {before}," in killed["log"]
    kept = out / "checkpoints" / "step_000008.damaged" / "ds" / "step_000008" / DAMAGED_SHARD
    assert kept.stat().st_size == 1000, "the damaged checkpoint is kept aside when step 8 is saved again"
    want, got = loss_by_step(runs["full"]["rows"]), loss_by_step(killed["rows"])
    assert sorted(got) == list(range(1, 13)), "metrics.jsonl reads as one uninterrupted history"
    for step in range(1, 13):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-9), f"step {step}: {got[step]} vs {want[step]}"
    state = json.loads((out / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert state["step"] == 12 and _pointer(out, "final") == "step_000012"


def test_a_flow_head_resumes_its_noise_exactly(runs):
    killed = runs["flow_killed"]
    assert killed["returncode"] != 0 and killed["latest"] == "step_000004"
    assert "resumed from" in killed["log"] and "step 4," in killed["log"]
    want, got = loss_by_step(runs["flow_full"]["rows"]), loss_by_step(killed["rows"])
    assert sorted(got) == list(range(1, 9)) == sorted(want)
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-9), f"step {step}: {got[step]} vs {want[step]}"


def test_crash_inside_a_save_leaves_latest_loadable(runs):
    crash = runs["crash"]
    assert crash["returncode"] != 0 and crash["latest"] == "step_000003"
    assert "step_000006" not in crash["entries"], "the half-written checkpoint never took the real name"
    assert "resumed from" in crash["log"] and "step 3," in crash["log"]
    assert sorted(loss_by_step(crash["rows"])) == list(range(1, 9))
    assert not [p.name for p in (crash["dir"] / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_pointers_follow_validation_and_old_checkpoints_are_pruned(runs):
    out, rows = runs["pointers"]["dir"], runs["pointers"]["rows"]
    val = {r["step"]: r["val/loss_epoch"] for r in rows if "val/loss_epoch" in r}
    best_step = min(val, key=val.get)
    assert best_step < 10, f"validation should worsen after its best: {val}"
    assert _pointer(out, "best") == f"step_{best_step:06d}"
    assert _pointer(out, "latest") == _pointer(out, "final") == "step_000010"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert f"step_{best_step:06d}" in kept and "step_000010" in kept and len(kept) <= 3


def test_resume_on_one_process_continues_a_two_process_run_but_refuses_another_model(
        tmp_path, train_data, tiny_model_dir, zero2_run, runs, caplog, in_process_group):
    from vla_ds.cli.train import launcher_main

    out = tmp_path / "run"
    shutil.copytree(zero2_run, out, symlinks=True)  # 2 processes, LoRA + sensor, the model of _args
    # one process: the training entry inside this process, a group of one; steps 3 and 4 on it
    assert launcher_main(["--mode", "train", *_args(train_data, tiny_model_dir, out, "--max-steps", "4")]) == 0
    assert "re-sharded a checkpoint of 2 process(es)" in caplog.text and "global batch changed from 4 to 2" in caplog.text
    assert (out / "checkpoints" / "step_000002" / "universal" / "step_000002" / "zero").is_dir()
    assert sorted(loss_by_step(metrics_rows(out))) == [1, 2, 3, 4]
    refused = runs["refused"]
    line = [ln for ln in refused["log"].splitlines() if "vla-ds train:" in ln]
    assert len(line) == 1 and "fusion_strategy ('concat' -> 'gated')" in line[0]
    assert loss_by_step(refused["rows"]) == loss_by_step(metrics_rows(zero2_run)), "nothing trained, nothing logged"

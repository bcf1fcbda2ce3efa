"""What `vla-ds convert` refuses (one line, exit code 2), the pickle guard, and atomic output."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from vla_ds.cli import main
from vla_ds.convert import convert_checkpoint
from vla_ds.errors import UsageError
from vla_ds.utils.weights import is_pickle, refuse_pickle

STEP = "step_000002"
PICKLE_LINE = ("is a torch pickle, which can run code when loaded; vla-ds reads safetensors only: convert it where "
               "you trust it (torch.load + safetensors.torch.save_file) or point at a vla-ds checkpoint")


def test_the_old_trainers_pt_file_is_refused_in_one_line(tmp_path, repo_root):
    old = tmp_path / "qwen_vla_sensor.pt"
    torch.save({"expert.out.weight": torch.zeros(2, 2)}, old)  # written here, never loaded
    env = dict(os.environ, PYTHONPATH=str(repo_root))
    proc = subprocess.run([sys.executable, "-m", "vla_ds.cli", "convert", str(old), str(tmp_path / "out")],
                          cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].endswith(f"vla-ds convert: {old} {PICKLE_LINE}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["pt", "pth", "bin", "pkl", "zip_magic", "pickle_magic"])
def test_refuse_pickle_by_suffix_or_magic(tmp_path, kind):
    if kind == "zip_magic":  # torch.save's zip format under an innocent name
        path = tmp_path / "weights.safetensors"
        torch.save({"w": torch.zeros(1)}, path)
    elif kind == "pickle_magic":
        path = tmp_path / "weights.dat"
        path.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=4))
    else:
        path = tmp_path / f"model.{kind}"
        path.write_bytes(b"anything")
    assert is_pickle(path)
    with pytest.raises(UsageError, match="torch pickle") as e:
        refuse_pickle(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_safetensors_and_directories_pass_the_guard(tmp_path):
    save_file({"w": torch.zeros(3)}, str(tmp_path / "model.safetensors"))
    refuse_pickle(tmp_path / "model.safetensors")
    refuse_pickle(tmp_path)
    refuse_pickle(tmp_path / "absent.json")


@pytest.mark.parametrize("case", ["missing", "empty_dir", "safetensors_file", "policy_dir"])
def test_non_checkpoints_are_refused(tmp_path, case, caplog):
    src = tmp_path / "src"
    if case == "empty_dir":
        src.mkdir()
        (src / "notes.txt").write_text("hello")
    elif case == "safetensors_file":
        src = tmp_path / "model.safetensors"
        save_file({"w": torch.zeros(3)}, str(src))
    elif case == "policy_dir":
        src.mkdir()
        (src / "config.json").write_text("{}")
        save_file({"w": torch.zeros(3)}, str(src / "model.safetensors"))
    want = {"missing": "no such file or directory", "empty_dir": "is not a checkpoint",
            "safetensors_file": "is a file", "policy_dir": "already plain safetensors"}[case]
    with pytest.raises(UsageError, match=want) as e:
        convert_checkpoint(src, tmp_path / "out")
    assert "\n" not in str(e.value) and str(src) in str(e.value)
    assert main(["convert", str(src), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(UsageError, match="--max-shard-size 2 gigs"):
        convert_checkpoint(tmp_path, tmp_path / "out", max_shard_size="2 gigs")
    with pytest.raises(UsageError, match="--dtype int8"):
        convert_checkpoint(tmp_path, tmp_path / "out", dtype="int8")


@pytest.mark.slow
def test_checkpoint_shapes_and_their_refusals(zero2_run, tmp_path):
    step = zero2_run / "checkpoints" / STEP
    # a raw DeepSpeed directory carries no model config
    with pytest.raises(UsageError, match="raw DeepSpeed checkpoint.*--policy-config"):
        convert_checkpoint(step / "ds" / STEP, tmp_path / "raw")
    raw = tmp_path / "raw_ds"
    shutil.copytree(step / "ds", raw)
    with pytest.raises(UsageError, match="--policy-config"):
        convert_checkpoint(raw, tmp_path / "raw")
    with pytest.raises(UsageError, match=r"unknown tag 'global_step9'.*tags there: step_000002"):
        convert_checkpoint(raw, tmp_path / "raw", tag="global_step9", policy_config=step / "policy")
    with pytest.raises(UsageError, match="--policy-config .* not a vla-ds policy directory"):
        convert_checkpoint(raw, tmp_path / "raw", policy_config=tmp_path)
    manifest = convert_checkpoint(raw, tmp_path / "raw", policy_config=step / "policy", trainable_only=True)
    assert manifest["step"] is None and manifest["tag"] == STEP and manifest["zero_stage"] == 2
    # an incomplete step directory (no trainer_state.json)
    broken = tmp_path / "runs" / STEP
    shutil.copytree(step, broken, ignore=shutil.ignore_patterns("trainer_state.json"))
    with pytest.raises(UsageError, match="no trainer_state.json"):
        convert_checkpoint(broken, tmp_path / "broken")
    # OUT_DIR: never someone else's directory, never inside the checkpoint
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    with pytest.raises(UsageError, match="is not the output of vla-ds convert"):
        convert_checkpoint(step, foreign)
    assert (foreign / "important.txt").read_text() == "keep me"
    with pytest.raises(UsageError, match="overlaps the checkpoint"):
        convert_checkpoint(step, step / "converted")
    # --adapter-only: a LoRA to export, and not folded away by --merge-lora
    with pytest.raises(UsageError, match="--adapter-only and --merge-lora"):
        convert_checkpoint(step, tmp_path / "a", adapter_only=True, merge_lora=True)
    frozen = tmp_path / "frozen_policy"
    shutil.copytree(step / "policy", frozen)
    cfg = json.loads((frozen / "config.json").read_text())
    cfg["model"]["finetune_vl"] = "none"
    (frozen / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match=r"--adapter-only: .* trained no LoRA \(--finetune-vl none\)"):
        convert_checkpoint(step, tmp_path / "a", adapter_only=True, policy_config=frozen)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_a_crash_leaves_no_half_output_and_keeps_the_previous_one(zero2_run, tmp_path, monkeypatch):
    import vla_ds.model.serialization as serialization

    out = tmp_path / "out"
    first = convert_checkpoint(zero2_run, out, trainable_only=True)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the policy")

    monkeypatch.setattr(serialization, "save_policy", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_checkpoint(zero2_run, out)  # a full conversion over the earlier one
    assert json.loads((out / "convert.json").read_text()) == first  # the earlier output, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary directory left behind"
    with pytest.raises(RuntimeError):
        convert_checkpoint(zero2_run, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    second = convert_checkpoint(zero2_run, out)  # an earlier convert output is replaced
    assert json.loads((out / "convert.json").read_text()) == second and not second["trainable_only"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

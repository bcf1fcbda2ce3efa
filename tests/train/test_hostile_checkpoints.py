"""A crafted checkpoint runs no code: resume, --init-from and convert refuse its pickles in one line."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.train.test_checkpoint import _args
from vla_ds.errors import UsageError
from vla_ds.utils.integrity import write_manifest

pytestmark = pytest.mark.slow
STEP = "step_000002"


class _Payload:
    """Pickles as a call of os.system: what a checkpoint from a stranger can hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path, marker):
    torch.save({"module": {"w": torch.zeros(1)}, "payload": _Payload(marker)}, path)


def _crafted(zero2_run, tmp_path, file, marker):
    """A copy of the session's 2-process LoRA run whose latest step holds a payload in `file`, with a
    manifest to match (whoever crafts a checkpoint writes one: the manifest catches damage, not intent)."""
    out = tmp_path / "run"
    shutil.copytree(zero2_run, out, symlinks=True)
    step = out / "checkpoints" / STEP
    _plant(step / "ds" / STEP / file, marker)
    write_manifest(step)
    return out, step


def test_the_payload_is_live(tmp_path):
    # the guard is what stops it: unpickled the way DeepSpeed does, it runs
    _plant(tmp_path / "p.pt", tmp_path / "ran")
    torch.load(tmp_path / "p.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


def test_resume_refuses_a_payload_and_runs_none_of_it(zero2_run, tmp_path, train_data, tiny_model_dir, capfd,
                                                      in_process_group):
    from vla_ds.cli.train import launcher_main

    file = "mp_rank_00_model_states.pt"  # the first file DeepSpeed's load_checkpoint reads
    marker = tmp_path / "pwned"
    out, step = _crafted(zero2_run, tmp_path, file, marker)
    state = json.loads((step / "trainer_state.json").read_text())
    (step / "trainer_state.json").write_text(json.dumps(dict(state, world_size=1)))  # reaches DeepSpeed's loader
    write_manifest(step)
    assert launcher_main(["--mode", "train", *_args(train_data, tiny_model_dir, out, "--max-steps", "4")]) == 2
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "vla-ds train:" in ln]
    assert len(lines) == 1 and f"{file}: refused: it references posix.system" in lines[0], lines
    assert not marker.exists()


def test_the_resume_loader_reads_real_optimizer_states_exactly_and_refuses_payloads(zero2_run, tmp_path):
    # (DeepSpeed checks the world size before it reads the optimizer states, so the 1-process resume
    # above cannot reach them: the engine's loader on its own, on the 2-process run's files)
    from types import SimpleNamespace

    from vla_ds.train.checkpoint import safe_loading

    shard = zero2_run / "checkpoints" / STEP / "ds" / STEP / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    engine = SimpleNamespace(checkpoint_engine="DeepSpeed's own", _config=None)
    with safe_loading(engine):
        ours = engine.checkpoint_engine.load(str(shard), map_location="cpu")
        _plant(tmp_path / "p.pt", tmp_path / "pwned")
        with pytest.raises(UsageError, match="p.pt: refused: it references posix.system"):
            engine.checkpoint_engine.load(str(tmp_path / "p.pt"))
    assert engine.checkpoint_engine == "DeepSpeed's own", "the engine's own loader is back"
    assert not (tmp_path / "pwned").exists()
    theirs = torch.load(shard, map_location="cpu", weights_only=False)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and (a == b or vars(a) == vars(b))

    assert same(ours, theirs)


def test_convert_refuses_a_payload_and_runs_none_of_it(zero2_run, tmp_path):
    from vla_ds.convert import convert_checkpoint

    marker = tmp_path / "pwned"
    _, step = _crafted(zero2_run, tmp_path, "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UsageError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt: refused: .*posix.system"):
        convert_checkpoint(step, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()
    # a truncated shard: one line naming it, too
    shard = step / "ds" / STEP / "mp_rank_00_model_states.pt"
    shutil.copy2(zero2_run / "checkpoints" / STEP / "ds" / STEP / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 step / "ds" / STEP / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UsageError, match=r"mp_rank_00_model_states.pt: cannot be read .* damaged or incomplete"):
        convert_checkpoint(step, tmp_path / "out")


def test_init_from_reads_only_the_policys_safetensors(zero2_run, tmp_path):
    from vla_ds.model.policy import QwenVLA
    from vla_ds.train.init_from import load_init_weights

    marker = tmp_path / "pwned"
    _, step = _crafted(zero2_run, tmp_path, "mp_rank_00_model_states.pt", marker)
    _plant(step / "ds" / STEP / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    policy = QwenVLA.from_pretrained(step / "policy", device="cpu")
    report = load_init_weights(policy, step)
    assert report["loaded"] and not report["missing"] and not marker.exists()

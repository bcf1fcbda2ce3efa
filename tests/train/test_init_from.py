"""--init-from: stage-1 weights into a stage-2 model, missing/unexpected keys reported, shapes checked."""
from __future__ import annotations

import pytest
import torch

from vla_ds.errors import UsageError
from vla_ds.model.config import ModelConfig
from vla_ds.model.policy import QwenVLA
from vla_ds.train.init_from import load_init_weights

SMALL = dict(finetune_vl="lora", sensor_hidden_dim=32, sensor_output_dim=32, sensor_num_heads=2, expert_hidden_dim=32,
             expert_num_heads=2, expert_num_layers=2)


def test_stage_one_without_sensor_into_stage_two_with_sensor(tiny_model_dir, tmp_path):
    torch.manual_seed(1)
    stage1 = QwenVLA(ModelConfig(backbone=str(tiny_model_dir), **SMALL), device="cpu")
    stage1.save_pretrained(tmp_path / "stage1")
    torch.manual_seed(2)
    stage2 = QwenVLA(ModelConfig(backbone=str(tiny_model_dir), sensor_enabled=True, fusion_strategy="gated", **SMALL),
                     device="cpu")
    report = load_init_weights(stage2, tmp_path / "stage1")
    s1, s2 = dict(stage1.named_parameters()), dict(stage2.named_parameters())
    assert report["loaded"] and all(torch.equal(s2[n], s1[n]) for n in report["loaded"])
    assert any(n.startswith("expert.") for n in report["loaded"])
    assert any("lora_" in n for n in report["loaded"]), "the LoRA adapter carries over"
    assert report["missing"] and all(n.startswith(("sensor_encoder.", "fusion.")) for n in report["missing"])
    assert all(n.startswith("fusion.") for n in report["unexpected"])  # concat-free stage 1 fusion


def test_shape_mismatch_and_missing_file_are_refused(tiny_model_dir, tmp_path):
    a = QwenVLA(ModelConfig(backbone=str(tiny_model_dir), **SMALL), device="cpu")
    a.save_pretrained(tmp_path / "a")
    b = QwenVLA(ModelConfig(backbone=str(tiny_model_dir), **{**SMALL, "expert_hidden_dim": 64}), device="cpu")
    with pytest.raises(UsageError, match="shapes differ"):
        load_init_weights(b, tmp_path / "a")
    with pytest.raises(UsageError, match="no model.safetensors"):
        load_init_weights(b, tmp_path / "nothing")
    old = tmp_path / "qwen_vla_sensor.pt"  # what the old trainer wrote: a pickle
    torch.save({"epoch": 3, "model_state_dict": {}}, old)
    with pytest.raises(UsageError, match="pickle"):
        load_init_weights(b, old)

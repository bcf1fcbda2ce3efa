"""ModelConfig: flag-shaped names, defaults users know, one-line errors for bad combinations."""
from __future__ import annotations

from dataclasses import fields

import pytest

from vla_ds.model.config import FROZEN_VL_TOKENS, ModelConfig

# Flags of the issue and of the old trainer's guide that users already type.
FLAGS = [
    "finetune-vl", "lora-r", "lora-alpha", "lora-dropout", "lora-targets", "unfreeze-last-n", "load-in-8bit",
    "sensor-enabled", "sensor-input-channels", "sensor-temporal-length", "sensor-output-dim", "sensor-hidden-dim",
    "fusion-strategy", "gradient-checkpointing", "min-pixels", "max-pixels", "attn-implementation", "vl-tokens",
]


def test_field_names_are_the_flag_names():
    names = {f.name.replace("_", "-") for f in fields(ModelConfig)}
    assert set(FLAGS) <= names


def test_defaults_match_the_old_trainer():
    c = ModelConfig()
    assert (c.finetune_vl, c.lora_r, c.lora_alpha, c.lora_dropout, c.unfreeze_last_n) == ("lora", 16, 32, 0.05, 2)
    assert (c.sensor_enabled, c.sensor_input_channels, c.sensor_temporal_length, c.sensor_output_dim) == (
        False, 1026, 650, 3072)
    assert (c.fusion_strategy, c.horizon, c.action_dim, c.attn_implementation) == ("concat", 8, 7, "sdpa")
    assert c.lora_target_names() == ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.mark.parametrize("kwargs, message", [
    ({"load_in_8bit": True, "finetune_vl": "full"}, "--load-in-8bit requires --finetune-vl lora"),
    ({"load_in_8bit": True, "finetune_vl": "none"}, "--load-in-8bit requires --finetune-vl lora"),
    ({"finetune_vl": "partial"}, "--finetune-vl 'partial' is not one of none|lora|full"),
    ({"fusion_strategy": "sum"}, "--fusion-strategy 'sum'"),
    ({"sensor_enabled": True, "fusion_strategy": "none"}, "never uses the sensor"),
    ({"train_vision_blocks": 2, "finetune_vl": "lora"}, "requires --finetune-vl full"),
    ({"finetune_vl": "full", "unfreeze_last_n": 0}, "--unfreeze-last-n >= 1"),
    ({"expert_hidden_dim": 100, "expert_num_heads": 8}, "--expert-hidden-dim 100 is not divisible"),
    ({"min_pixels": 200, "max_pixels": 100}, "--min-pixels 200 is larger than --max-pixels 100"),
    ({"lora_targets": " , "}, "--lora-targets is empty"),
    ({"lora_targets": "all-linear,q_proj"}, "cannot be combined"),
    ({"lora_dropout": 1.0}, r"--lora-dropout must be in \[0, 1\)"),
    ({"sensor_input_channels": 1}, "channel 0 is the force"),
    ({"action_loss": "huber"}, "--action-loss 'huber'"),
    ({"horizon": 0}, "--horizon must be >= 1"),
    ({"vl_tokens": 1}, r"--vl-tokens 1: use -1 \(every VL token\), 0 \(the pooled vector\) or K >= 2"),
    ({"vl_tokens": -2}, "--vl-tokens -2: use -1"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        ModelConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_gradient_checkpointing_auto_follows_the_backbone():
    assert ModelConfig(finetune_vl="lora").use_gradient_checkpointing
    assert ModelConfig(finetune_vl="full").use_gradient_checkpointing
    assert not ModelConfig(finetune_vl="none").use_gradient_checkpointing
    assert not ModelConfig(finetune_vl="none", gradient_checkpointing=True).use_gradient_checkpointing
    assert not ModelConfig(finetune_vl="lora", gradient_checkpointing=False).use_gradient_checkpointing


def test_vl_tokens_auto_follows_the_backbone():
    # auto: every token when the backbone trains; a frozen backbone's default is what a cache stores
    assert ModelConfig(finetune_vl="lora").resolved_vl_tokens == ModelConfig(finetune_vl="full").resolved_vl_tokens == -1
    assert ModelConfig(finetune_vl="none").resolved_vl_tokens == FROZEN_VL_TOKENS == 1 + 8 * 2
    for k in (-1, 0, 2, 9):
        assert ModelConfig(finetune_vl="none", vl_tokens=k).resolved_vl_tokens == k
        assert ModelConfig(finetune_vl="lora", vl_tokens=k).resolved_vl_tokens == k


def test_without_the_sensor_every_fusion_is_vl_only():
    assert ModelConfig(fusion_strategy="gated").effective_fusion == "none"
    assert ModelConfig(fusion_strategy="gated", sensor_enabled=True).effective_fusion == "gated"


def test_dict_round_trip_and_unknown_keys():
    c = ModelConfig(finetune_vl="full", sensor_enabled=True, fusion_strategy="cross_attention", max_pixels=50176)
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match=r"policy/config.json: unknown model settings \['sensor_dim'\]"):
        ModelConfig.from_dict({**c.to_dict(), "sensor_dim": 3}, source="policy/config.json")

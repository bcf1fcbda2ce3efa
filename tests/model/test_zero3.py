"""The policy trains under DeepSpeed ZeRO-3 (one CPU process, gloo, in this process): parameters are
partitioned and re-gathered per submodule through hooks that only see tensors inside
tuples/lists/dicts, so a module returning a dataclass broke backward ("size of tensor a (0) must
match ...")."""
from __future__ import annotations

import logging

import pytest
import torch

from tests.helpers.batches import batch_of
from vla_ds.model.config import ModelConfig
from vla_ds.model.policy import QwenVLA

SMALL = dict(sensor_input_channels=17, sensor_temporal_length=64, sensor_hidden_dim=32, sensor_output_dim=48,
             sensor_conv_blocks=2, sensor_num_layers=1, sensor_num_heads=4, expert_hidden_dim=32, expert_num_layers=2,
             expert_num_heads=4, head_dropout=0.0, lora_r=4, lora_alpha=8, lora_dropout=0.0, unfreeze_last_n=1)
CASES = {"lora-cross_attention": dict(finetune_vl="lora", sensor_enabled=True, fusion_strategy="cross_attention"),
         "full-gated": dict(finetune_vl="full", sensor_enabled=True, fusion_strategy="gated")}


@pytest.mark.parametrize("case", list(CASES))
def test_policy_trains_under_zero3(case, tiny_model_dir, in_process_group, caplog, capfd):
    import deepspeed

    from vla_ds.utils.dist import init_distributed, process_group_cleanup

    with process_group_cleanup(), caplog.at_level(logging.WARNING):
        init_distributed()
        torch.manual_seed(0)
        policy = QwenVLA(ModelConfig(backbone=str(tiny_model_dir), **SMALL, **CASES[case]), device="cpu")
        optim = torch.optim.AdamW([{**g, "lr": 3e-3} for g in policy.parameter_groups(0.01)])
        engine, *_ = deepspeed.initialize(model=policy, optimizer=optim,
                                          config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}})
        batch = batch_of(2, has_sensor=[True, False])
        batch["actions"] = torch.linspace(-2, 2, 7) + 0.3 * batch["actions"]
        losses = []
        for _ in range(8):
            loss = engine(batch).per_sample_loss.mean()
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    # DeepSpeed warns when a module's inputs/outputs hide tensors from its hooks.
    assert "unknown inputs or outputs type" not in caplog.text + capfd.readouterr().out
    assert all(x == x for x in losses), f"{case}: NaN loss"
    assert losses[-1] < 0.5 * losses[0], f"{case}: loss did not fall under ZeRO-3: {losses}"

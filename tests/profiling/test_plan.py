"""`vla-ds plan` on the real Qwen2.5-VL-3B config (meta device, no weights)."""
from __future__ import annotations

import pytest

from vla_ds.cli import main
from vla_ds.model.config import ModelConfig
from vla_ds.profiling.plan import DEFAULT_BACKBONE, plan, recommend


@pytest.fixture(scope="module")
def base() -> ModelConfig:
    return ModelConfig(backbone=DEFAULT_BACKBONE)


def test_counts_only_trainable_parameters_for_optimizer_state(base):
    rows = {(r.mode, r.preset): r for r in plan(DEFAULT_BACKBONE, base, 24, modes=("lora", "full-all"),
                                                 presets=("zero2",), micro_batches=(1,))}
    lora, full = rows[("lora", "zero2")], rows[("full-all", "zero2")]
    # same 3.78 B weights on the card, but LoRA's Adam states cover ~25 M trainable parameters
    assert lora.parameters == pytest.approx(full.parameters, rel=0.01)
    assert 3.7e9 * 2 < lora.parameters < 3.85e9 * 2
    assert lora.optimizer_states < 12 * 30e6 and full.optimizer_states > 12 * 2.5e9
    assert not full.fits and lora.fits


def test_the_flow_head_and_the_state_input_are_counted(base):
    from dataclasses import replace

    from vla_ds.model.backbone import read_backbone_config
    from vla_ds.profiling.counts import count_parameters

    e, a, bb = base.expert_hidden_dim, base.action_dim, read_backbone_config(DEFAULT_BACKBONE)
    regression = count_parameters(bb, base, 0)
    flow = count_parameters(bb, replace(base, action_head="flow", state_enabled=True), 0)
    action_in, time_mlp = a * e + e, 2 * (e * e + e)
    state = (9 + 12 + 2) * e + e + e * e + e  # [features; presence flags] -> E -> E
    assert flow.head - regression.head == action_in + time_mlp + state
    assert flow.trainable - regression.trainable == action_in + time_mlp + state


@pytest.mark.parametrize("gpu_mem, preset", [(80, "zero2"), (24, "zero2_offload"), (12, "zero2_offload"),
                                             (8, "zero3_offload")])
def test_full_finetune_recommendation_follows_gpu_memory(base, gpu_mem, preset):
    rec = recommend(plan(DEFAULT_BACKBONE, base, gpu_mem, modes=("full-all",)))["full-all"]
    assert rec is not None and rec.preset == preset and rec.needed_gib <= gpu_mem


def test_smaller_card_never_gets_a_bigger_configuration(base):
    previous = None
    for gpu_mem in (80, 24, 16, 10, 6, 2):
        recs = recommend(plan(DEFAULT_BACKBONE, base, gpu_mem, modes=("lora", "lora-8bit")))
        for mode, rec in recs.items():
            if rec is not None:
                assert rec.needed_gib <= gpu_mem
            if previous is not None and previous[mode] is not None and rec is not None:
                assert rec.speed <= previous[mode].speed
        previous = recs
    # at 2 GiB only parameter offload is left, which int8 weights cannot do (refused by the trainer)
    assert previous["lora"].preset == "zero3_offload"
    assert previous["lora-8bit"] is None


def test_plan_cli(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "--gpu-mem", "24", "--modes", "lora", "--micro-batches", "1", "8", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| lora | zero2 | 8 |" in text and "- lora: zero2, micro-batch 8" in text
    assert out.with_suffix(".json").is_file() and out.with_suffix(".md").read_text().startswith("Plan for")
    assert main(["plan", "--gpu-mem", "0"]) == 2
    assert main(["plan", "--gpu-mem", "24", "--backbone", str(tmp_path / "missing")]) == 2

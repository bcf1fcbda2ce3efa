"""--finetune-vl none|lora|full and --load-in-8bit: exactly the intended parameters train, and do."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vla_ds.model.backbone import load_vl_model
from vla_ds.model.policy import QwenVLA

R = 4  # small_config's lora_r
LM = "vl.model.model.language_model."


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Parameter shapes of the untouched backbone, to count against independently."""
    model = load_vl_model(tiny_model_dir, device="cpu")
    return {n: p.shape for n, p in model.named_parameters()}, dict(model.named_modules())


def _backbone_trainable(policy) -> dict[str, int]:
    return {n: p.numel() for n, p in policy.named_parameters() if p.requires_grad and n.startswith("vl.")}


def _heads(policy) -> list:
    return [p for n, p in policy.named_parameters() if not n.startswith("vl.")]


def _lora_count(modules, leaves) -> int:
    names = [n for n, m in modules.items()
             if n.startswith("model.language_model.") and isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in leaves]
    return sum(R * (modules[n].in_features + modules[n].out_features) for n in names), len(names)


def test_none_freezes_the_whole_backbone(small_config, reference):
    shapes, _ = reference
    policy = QwenVLA(small_config(finetune_vl="none"), device="cpu")
    assert _backbone_trainable(policy) == {}
    assert all(p.requires_grad for p in _heads(policy))
    counts = policy.parameter_counts()
    backbone_total = sum(torch.Size(s).numel() for s in shapes.values())  # lm_head is tied: listed once
    assert counts["frozen_M"] * 1e6 == pytest.approx(backbone_total)
    assert counts["vl_M"] == counts["vision_M"] == 0
    assert not policy.vl.model.training, "a frozen backbone stays in eval mode"
    policy.train()
    assert not policy.vl.model.training and policy.expert.training


@pytest.mark.parametrize("targets, leaves", [
    ("q_proj,k_proj,v_proj,o_proj", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_lora_adapts_only_the_language_model_targets(small_config, reference, targets, leaves):
    _, modules = reference
    policy = QwenVLA(small_config(finetune_vl="lora", lora_targets=targets), device="cpu")
    trainable = _backbone_trainable(policy)
    expected, n_layers = _lora_count(modules, leaves)
    assert n_layers == 2 * len(leaves)  # 2 LM blocks in the tiny backbone
    assert sum(trainable.values()) == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(n.startswith(LM) for n in trainable), "LoRA must not touch the vision tower or lm_head"
    assert policy.parameter_counts()["vl_M"] * 1e6 == pytest.approx(expected)
    assert policy.vl.model.training, "a LoRA backbone trains (dropout, checkpointing)"


def test_8bit_lora_quantizes_the_language_model_only(small_config, reference):
    import bitsandbytes as bnb

    _, modules = reference
    policy = QwenVLA(small_config(finetune_vl="lora", load_in_8bit=True), device="cpu")
    model = policy.vl.model
    q_proj = model.get_submodule("model.language_model.layers.0.self_attn.q_proj")
    assert isinstance(q_proj.base_layer, bnb.nn.Linear8bitLt) and q_proj.base_layer.weight.dtype == torch.int8
    assert isinstance(model.get_submodule("model.language_model.layers.1.mlp.down_proj"), bnb.nn.Linear8bitLt)
    for name in ("model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0", "lm_head"):
        layer = model.get_submodule(name)
        assert not isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.float32, name
    expected, _ = _lora_count(modules, {"q_proj", "k_proj", "v_proj", "o_proj"})
    assert sum(_backbone_trainable(policy).values()) == expected


@pytest.mark.parametrize("vision_blocks", [0, 1])
def test_full_unfreezes_the_last_blocks(small_config, reference, vision_blocks):
    shapes, _ = reference
    policy = QwenVLA(small_config(finetune_vl="full", unfreeze_last_n=1, train_vision_blocks=vision_blocks),
                     device="cpu")
    trainable = _backbone_trainable(policy)
    lm = [n for n in shapes if n.startswith("model.language_model.layers.1.") or n == "model.language_model.norm.weight"]
    vision = [n for n in shapes if n.startswith(("model.visual.blocks.1.", "model.visual.merger."))]
    expected = {"vl.model." + n for n in lm + (vision if vision_blocks else [])}
    assert set(trainable) == expected
    counts = policy.parameter_counts()
    assert counts["vl_M"] * 1e6 == pytest.approx(sum(torch.Size(shapes[n]).numel() for n in lm))
    assert counts["vision_M"] * 1e6 == pytest.approx(
        sum(torch.Size(shapes[n]).numel() for n in vision) if vision_blocks else 0)
    with pytest.raises(ValueError, match="--unfreeze-last-n 3 exceeds the backbone's 2 LM blocks"):
        QwenVLA(small_config(finetune_vl="full", unfreeze_last_n=3), device="cpu")


def test_unknown_lora_target_is_named(small_config):
    with pytest.raises(ValueError, match="--lora-targets qkv: no such linear layer in the language model"):
        QwenVLA(small_config(finetune_vl="lora", lora_targets="q_proj,qkv"), device="cpu")


def test_parameter_groups_cover_every_trainable_parameter_once(small_config):
    policy = QwenVLA(small_config(finetune_vl="full", unfreeze_last_n=1, train_vision_blocks=1), device="cpu")
    groups = policy.parameter_groups(weight_decay=0.05)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in policy.parameters() if p.requires_grad}
    assert {g["component"] for g in groups} == {"expert", "sensor", "vl", "vision"}
    names = {id(p): n for n, p in policy.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            no_decay = p.ndim < 2 or name.endswith(("queries", "_embedding"))
            assert g["weight_decay"] == (0.0 if no_decay else 0.05), name
            assert policy.component_of(name) == g["component"]
    comp = {names[id(p)]: g["component"] for g in groups for p in g["params"]}
    assert comp["sensor_encoder.missing_embedding"] == "sensor"
    assert comp["fusion.vl_proj.1.weight"] == "expert" and comp["expert.queries"] == "expert"
    assert comp["vl.model.model.language_model.layers.1.self_attn.q_proj.weight"] == "vl"
    assert comp["vl.model.model.visual.blocks.1.attn.qkv.weight"] == "vision"


def _snapshot(policy):
    return {n: p.detach().clone().float() for n, p in policy.named_parameters() if n.startswith("vl.")
            and p.dtype.is_floating_point}


@pytest.mark.parametrize("mode", ["none", "lora", "lora-8bit", "full"])
def test_a_few_steps_reduce_the_loss(small_config, make_batch, mode):
    torch.manual_seed(0)
    cfg = small_config(finetune_vl=mode.split("-")[0], load_in_8bit=mode.endswith("8bit"), unfreeze_last_n=1)
    policy = QwenVLA(cfg, device="cpu")
    batch = make_batch(2, has_sensor=[True, False])
    # Learnable like a real chunk: a pose offset per dimension plus a per-sample variation.
    batch["actions"] = torch.linspace(-2, 2, 7) + 0.3 * batch["actions"]
    optim = torch.optim.AdamW([{**g, "lr": 3e-3} for g in policy.parameter_groups(0.01)])
    before = _snapshot(policy)
    losses = []
    for _ in range(20):
        loss = policy(batch).per_sample_loss.mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses
    changed = {n for n, p in _snapshot(policy).items() if not torch.equal(p, before[n])}
    trained = {n for n, p in policy.named_parameters() if n.startswith("vl.") and p.requires_grad}
    assert changed == trained, "exactly the trainable backbone parameters move"
    if mode != "none":
        assert changed, f"{mode}: the backbone did not train"


def _checkpointing_flags(policy) -> set:
    return {m.gradient_checkpointing for m in policy.vl.model.model.language_model.layers}


@pytest.mark.parametrize("mode, flag, expected", [
    ("lora", None, True), ("full", None, True), ("none", None, False), ("none", True, False), ("lora", False, False),
])
def test_gradient_checkpointing_is_on_exactly_when_the_backbone_trains(small_config, mode, flag, expected):
    policy = QwenVLA(small_config(finetune_vl=mode, gradient_checkpointing=flag, unfreeze_last_n=1), device="cpu")
    assert _checkpointing_flags(policy) == {expected}


def test_checkpointing_gives_the_same_gradients(small_config, make_batch):
    batch = make_batch(2)
    grads = []
    for flag in (True, False):
        torch.manual_seed(0)
        policy = QwenVLA(small_config(finetune_vl="lora", gradient_checkpointing=flag), device="cpu")
        with torch.no_grad():  # LoRA B starts at zero; give the A matrices a gradient path
            for n, p in policy.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.1)
        policy(batch).per_sample_loss.sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if ".lora_A." in n})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_frozen_parts_keep_no_graph_under_checkpointing(small_config, make_batch, mode):
    """Autograd starts at the first trainable parameter: the frozen vision tower's output and (full,
    last block only) the first LM block's output carry no graph, so they keep no activations and run no
    backward; the trained parts still get gradients."""
    policy = QwenVLA(small_config(finetune_vl=mode, unfreeze_last_n=1), device="cpu")
    model = policy.vl.model.model
    assert _checkpointing_flags(policy) == {True}
    seen = {}

    def record(name):
        def hook(module, args, output):
            out = output if isinstance(output, torch.Tensor) else output[0]  # a tuple or a ModelOutput
            seen[name] = out.requires_grad
        return hook

    model.visual.register_forward_hook(record("vision"))
    model.language_model.layers[0].register_forward_hook(record("lm block 0"))
    model.language_model.layers[1].register_forward_hook(record("lm block 1"))
    policy(make_batch(2)).per_sample_loss.sum().backward()
    assert seen["vision"] is False
    assert seen["lm block 0"] is (mode == "lora")  # LoRA adapts block 0; full trains block 1 only
    assert seen["lm block 1"] is True
    trained = [p for n, p in policy.named_parameters() if n.startswith("vl.") and p.requires_grad]
    assert trained and all(p.grad is not None for p in trained)

"""save_pretrained / from_pretrained and the robot-side predict()."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers.batches import SENSOR_C, SENSOR_T
from vla_ds.data.stats import NormStats
from vla_ds.data.synthetic import synthetic_view
from vla_ds.model.policy import QwenVLA

STATS = NormStats(
    action_mean=[0.1 * i for i in range(7)], action_std=[1.0 + 0.5 * i for i in range(7)],
    action_q01=[-3.0] * 7, action_q99=[3.0] * 7,
    sensor_mean=[0.2] * SENSOR_C, sensor_std=[2.0] * SENSOR_C,
)


def _inputs(seed=0):
    texts = ["Insert the needle slowly.", "Retract the needle carefully."]
    images = [[synthetic_view(seed), synthetic_view(seed + 1)], [synthetic_view(seed + 2)]]
    sensor = torch.randn(2, SENSOR_T, SENSOR_C, generator=torch.Generator().manual_seed(seed))
    return texts, images, sensor


def _trained(policy):
    """Move every trainable weight (LoRA B starts at zero: a fresh adapter would prove nothing)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy


MODES = {
    "none-cross_attention": dict(finetune_vl="none", fusion_strategy="cross_attention"),
    "lora-gated": dict(finetune_vl="lora", fusion_strategy="gated"),
    "full-concat": dict(finetune_vl="full", unfreeze_last_n=1, train_vision_blocks=1),
    "lora-8bit": dict(finetune_vl="lora", load_in_8bit=True),
}


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_reproduces_predictions_exactly(small_config, tmp_path, mode):
    torch.manual_seed(0)
    policy = _trained(QwenVLA(small_config(**MODES[mode]), stats=STATS, device="cpu"))
    texts, images, sensor = _inputs()
    before = policy.predict(texts, images, sensor)
    policy.save_pretrained(tmp_path / "policy")
    lora = ["adapter"] if MODES[mode]["finetune_vl"] == "lora" else []  # the PEFT copy of the LoRA
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()) == [*lora, "config.json", "model.safetensors",
                                                                        "stats.json"]

    torch.manual_seed(123)  # the loaded heads must not depend on the RNG
    loaded = QwenVLA.from_pretrained(tmp_path / "policy", device="cpu")
    assert not loaded.training
    assert NormStats.load(tmp_path / "policy") == STATS == loaded.stats
    assert torch.equal(loaded.predict(texts, images, sensor), before)

    # What was written: the heads and the trained part of the backbone, nothing frozen, no alias.
    saved = load_file(tmp_path / "policy" / "model.safetensors")
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    assert not any("lm_head" in n for n in saved)


def test_saving_a_full_state_dict_writes_each_tied_tensor_once(small_config, tmp_path):
    policy = _trained(QwenVLA(small_config(finetune_vl="full", unfreeze_last_n=1), device="cpu"))
    full = policy.state_dict()
    # The full state dict names the tied embedding twice (safetensors refuses shared tensors).
    assert full["vl.model.lm_head.weight"].data_ptr() == full["vl.model.model.language_model.embed_tokens.weight"].data_ptr()
    policy.save_pretrained(tmp_path / "a", state_dict=full)
    policy.save_pretrained(tmp_path / "b")
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A frozen tied pair loaded under its alias updates both names, and from_pretrained accepts it.
    extra = dict(a)
    extra["vl.model.lm_head.weight"] = torch.zeros_like(full["vl.model.lm_head.weight"])
    save_file(extra, tmp_path / "a" / "model.safetensors")
    loaded = QwenVLA.from_pretrained(tmp_path / "a", device="cpu")
    assert loaded.vl.model.model.language_model.embed_tokens.weight.abs().sum() == 0


def test_mismatched_weights_are_an_error_naming_the_keys(small_config, tmp_path):
    policy = QwenVLA(small_config(finetune_vl="lora", fusion_strategy="cross_attention"), device="cpu")
    policy.save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "model.safetensors"
    tensors = load_file(weights)
    lora_key = next(k for k in tensors if ".lora_B." in k)
    save_file({k: v for k, v in tensors.items() if k != lora_key}, weights)
    with pytest.raises(ValueError, match=r"missing \['" + lora_key.replace(".", r"\.")):
        QwenVLA.from_pretrained(tmp_path / "p", device="cpu")
    save_file({**tensors, "expert.not_a_weight": torch.zeros(1)}, weights)
    with pytest.raises(ValueError, match=r"unexpected \['expert\.not_a_weight'\]"):
        QwenVLA.from_pretrained(tmp_path / "p", device="cpu")
    # A config that no longer matches the weights (another fusion) is caught the same way.
    save_file(tensors, weights)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg["model"]["fusion_strategy"] = "gated"
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weights do not match the model built from .*config.json"):
        QwenVLA.from_pretrained(tmp_path / "p", device="cpu")
    with pytest.raises(FileNotFoundError, match="no policy config"):
        QwenVLA.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_the_backbone_path_can_be_overridden(small_config, tiny_model_dir, tmp_path):
    moved = tmp_path / "elsewhere" / "backbone"
    shutil.copytree(tiny_model_dir, moved)
    policy = _trained(QwenVLA(small_config(backbone=str(moved), finetune_vl="lora"), device="cpu"))
    texts, images, sensor = _inputs(3)
    before = policy.predict(texts, images, sensor)
    policy.save_pretrained(tmp_path / "policy")
    assert json.loads((tmp_path / "policy" / "config.json").read_text())["backbone"] == str(moved)
    shutil.rmtree(tmp_path / "elsewhere")  # the policy moved to a machine without that path
    with pytest.raises(FileNotFoundError, match="backbone .*elsewhere/backbone: no such directory"):
        QwenVLA.from_pretrained(tmp_path / "policy", device="cpu")
    loaded = QwenVLA.from_pretrained(tmp_path / "policy", backbone=tiny_model_dir, device="cpu")
    assert loaded.config.backbone == str(tiny_model_dir)
    assert torch.equal(loaded.predict(texts, images, sensor), before)


def test_predict_returns_denormalized_chunks(small_config, tmp_path):
    policy = QwenVLA(small_config(fusion_strategy="concat"), stats=STATS, device="cpu")
    policy.train()
    texts, images, sensor = _inputs()
    paths = []
    for i, view in enumerate(images[0]):
        view.save(tmp_path / f"v{i}.png")
        paths.append(tmp_path / f"v{i}.png")
    actions = policy.predict(texts, [paths, images[1]], sensor)
    assert actions.shape == (2, 8, 7) and actions.dtype == torch.float32 and actions.device.type == "cpu"
    assert policy.training, "predict restores the training mode"
    policy.eval()
    with torch.no_grad():
        normalized = policy({"images": images, "instructions": texts, "sensor": sensor,
                             "sensor_mask": torch.ones(2, SENSOR_T, dtype=torch.bool),
                             "has_sensor": torch.ones(2, dtype=torch.bool)}).actions
    mean, std = (torch.tensor(a) for a in STATS.action_arrays())
    torch.testing.assert_close(actions, normalized * std + mean)
    # No sensor: the same as a batch whose samples have none; a sensor reading changes the answer.
    no_sensor = policy.predict(texts, images)
    assert not torch.allclose(no_sensor, actions)
    with torch.no_grad():
        absent = policy({"images": images, "instructions": texts}).actions
    torch.testing.assert_close(no_sensor, absent * std + mean)
    with pytest.raises(ValueError, match="sensor_data must be"):
        policy.predict(texts, images, sensor[:1])


def test_predict_refuses_a_bad_sensor_window_and_never_returns_nan(small_config):
    from vla_ds.errors import UsageError

    policy = QwenVLA(small_config(fusion_strategy="concat"), stats=STATS, device="cpu").eval()
    texts, images, sensor = _inputs()
    torn = sensor.clone()
    torn[1, 10, 3] = float("nan")
    with pytest.raises(UsageError, match=r"sensor_data of sample\(s\) \[1\] holds NaN/inf"):
        policy.predict(texts, images, torn)
    # a NaN in a row the mask marks invalid is no reading at all: accepted
    mask = torch.ones(2, SENSOR_T, dtype=torch.bool)
    mask[1, 10] = False
    assert torch.isfinite(policy.predict(texts, images, torn, mask)).all()
    # treat_as_missing: sample 1 is predicted as a sample without a sensor, sample 0 unchanged
    got = policy.predict(texts, images, torn, bad_sensor="treat_as_missing")
    torch.testing.assert_close(got[0], policy.predict(texts, images, sensor)[0])
    torch.testing.assert_close(got[1], policy.predict(texts, images)[1])
    with pytest.raises(UsageError, match=f"sensor_data has {SENSOR_C + 1} channels, the policy reads {SENSOR_C}"):
        policy.predict(texts, images, torch.zeros(2, SENSOR_T, SENSOR_C + 1))
    with pytest.raises(UsageError, match="bad_sensor='drop'"):
        policy.predict(texts, images, sensor, bad_sensor="drop")
    # a diverged policy: its NaN actions are an error, never handed to the robot
    with torch.no_grad():
        next(policy.expert.parameters()).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="non-finite actions"):
        policy.predict(texts, images, sensor)


def test_predict_refuses_another_number_of_views_than_it_was_trained_on(small_config, tmp_path):
    from vla_ds.errors import UsageError

    QwenVLA(small_config(), stats=STATS, device="cpu", views=["View1", "View2"]).save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["views"] == ["View1", "View2"]
    policy = QwenVLA.from_pretrained(tmp_path / "p", device="cpu")
    assert policy.views == ["View1", "View2"]
    texts, images, _ = _inputs()  # sample 1 has one view
    with pytest.raises(UsageError, match=r"sample 1 has 1 view\(s\), the policy was trained on 2 \(View1, View2\)"):
        policy.predict(texts, images)
    three = [[*images[0], synthetic_view(9)], images[0]]
    with pytest.raises(UsageError, match="sample 0 has 3 view"):
        policy.predict(texts, three)
    assert policy.predict(texts, [images[0], images[0]]).shape[0] == 2


@pytest.mark.parametrize("vl_tokens", [5, -1])
def test_predict_attends_over_the_configured_vl_tokens(small_config, vl_tokens):
    """predict() runs the live backbone and reduces its tokens exactly as a VL cache of --vl-tokens K
    does (a policy trained from the cache sees the same memory), or keeps them all with -1."""
    policy = QwenVLA(small_config(vl_tokens=vl_tokens), stats=STATS, device="cpu")
    texts, images, sensor = _inputs()
    seen = []
    hook = policy.expert.register_forward_hook(lambda m, args, out: seen.append(tuple(a.shape for a in args)))
    try:
        policy.predict(texts, images, sensor)
    finally:
        hook.remove()
    (memory, mask), = seen
    with torch.no_grad():
        feats = policy.encode_vl({"images": images, "instructions": texts})
    if vl_tokens == 5:
        assert feats.tokens.shape == (2, 5, 64) and memory == (2, 5, 32) and mask == (2, 5)
    else:
        seq = policy.vl.processor_inputs(images, texts)["input_ids"].shape[1]
        assert feats.tokens.shape == (2, seq, 64) and memory == (2, seq, 32) and seq > 5


def test_a_config_saved_before_vl_tokens_keeps_every_vl_token(small_config, tmp_path):
    policy = QwenVLA(small_config(vl_tokens=0), stats=STATS, device="cpu")
    policy.save_pretrained(tmp_path / "policy")
    assert QwenVLA.from_pretrained(tmp_path / "policy", device="cpu").config.resolved_vl_tokens == 0
    meta = json.loads((tmp_path / "policy" / "config.json").read_text())
    del meta["model"]["vl_tokens"]
    (tmp_path / "policy" / "config.json").write_text(json.dumps(meta))
    # it was trained (live) over every VL token; auto would pool the frozen backbone's tokens
    assert QwenVLA.from_pretrained(tmp_path / "policy", device="cpu").vl.vl_tokens == -1


@pytest.mark.gpu
def test_predict_on_gpu_runs_the_backbone_in_bf16(small_config):
    policy = QwenVLA(small_config(finetune_vl="lora"), stats=STATS, device="cuda")
    assert policy.vl.model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    texts, images, sensor = _inputs()
    actions = policy.predict(texts, images, sensor)
    assert actions.shape == (2, 8, 7) and actions.dtype == torch.float32 and actions.device.type == "cpu"
    assert torch.isfinite(actions).all()
    out = policy({**{"images": images, "instructions": texts}, "actions": torch.zeros(2, 8, 7)})
    out.per_sample_loss.mean().backward()  # bf16 backbone, fp32 heads: the loss backpropagates to LoRA
    assert any(p.grad is not None for n, p in policy.named_parameters() if ".lora_" in n)

"""Fusions use the sensor (output and gradient), `none` ignores it, every submodule always runs."""
from __future__ import annotations

import pytest
import torch

from vla_ds.model.backbone import VLFeatures
from vla_ds.model.fusion import CrossAttentionFusion, NoFusion
from vla_ds.model.policy import QwenVLA
from vla_ds.model.sensor import SensorFeatures

SENSOR_FUSIONS = ["concat", "cross_attention", "gated"]


@pytest.mark.parametrize("b", [1, 4])
@pytest.mark.parametrize("fusion", SENSOR_FUSIONS)
def test_shapes_with_mixed_sensor_presence(small_config, make_batch, fusion, b):
    policy = QwenVLA(small_config(fusion_strategy=fusion), device="cpu")
    out = policy(make_batch(b))  # samples 0, 2 have a sensor; 1, 3 do not
    assert out.actions.shape == (b, 8, 7) and out.target.shape == (b, 8, 7)
    assert out.per_sample_loss.shape == (b,) and out.valid_steps.tolist() == [8] * b
    assert torch.isfinite(out.per_sample_loss).all()


@pytest.mark.parametrize("fusion", SENSOR_FUSIONS)
def test_each_fusion_uses_the_sensor(small_config, make_batch, fusion):
    torch.manual_seed(0)
    policy = QwenVLA(small_config(fusion_strategy=fusion), device="cpu")
    batch = make_batch(2, has_sensor=[True, False])
    policy.eval()
    with torch.no_grad():
        base = policy(batch).actions
        changed = policy({**batch, "sensor": batch["sensor"] + torch.randn_like(batch["sensor"])}).actions
    assert (changed[0] - base[0]).abs().max() > 1e-4, "changing the sensor must change the actions"
    torch.testing.assert_close(changed[1], base[1])  # sample 1 has no sensor: its zeros are not read

    policy.train()
    policy(batch).per_sample_loss[0].backward()  # the sample with a sensor
    grads = [p.grad.abs().sum() for p in policy.sensor_encoder.parameters() if p.grad is not None]
    conv_grad = policy.sensor_encoder.ascan_stem[0][0].weight.grad
    assert conv_grad is not None and conv_grad.abs().sum() > 0, "no gradient reaches the sensor encoder"
    assert sum(grads) > 0


@pytest.mark.parametrize("fusion", ["none", "gated"])
def test_without_the_sensor_the_policy_ignores_sensor_data(small_config, make_batch, fusion):
    cfg = small_config(fusion_strategy=fusion, sensor_enabled=False)
    policy = QwenVLA(cfg, device="cpu").eval()
    assert policy.sensor_encoder is None and isinstance(policy.fusion, NoFusion)
    batch = make_batch(2, has_sensor=[True, True])
    with torch.no_grad():
        base = policy(batch).actions
        changed = policy({**batch, "sensor": batch["sensor"] * -3 + 1}).actions
        without = policy({k: v for k, v in batch.items() if k not in ("sensor", "sensor_mask", "has_sensor")}).actions
    assert torch.equal(changed, base) and torch.equal(without, base)


def test_cross_attention_attends_over_the_sensor_token_sequence():
    # A change that keeps the pooled sensor vector fixed must still matter: the old trainer's
    # one-token "cross-attention" (softmax weight always 1) could not see it.
    torch.manual_seed(0)
    fusion = CrossAttentionFusion(vl_dim=16, sensor_dim=12, width=32, num_heads=4, dropout=0.0).eval()
    vl = VLFeatures(torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 16))
    tokens = torch.randn(1, 6, 12)
    mask = torch.ones(1, 6, dtype=torch.bool)
    sensor = SensorFeatures(tokens, mask, tokens.mean(1), torch.tensor([True]))
    shifted = tokens.clone()
    direction = torch.randn(12)
    shifted[0, 0] += direction
    shifted[0, 1] -= direction  # same mean
    moved = SensorFeatures(shifted, mask, shifted.mean(1), torch.tensor([True]))
    torch.testing.assert_close(moved.pooled, sensor.pooled)
    with torch.no_grad():
        a, _ = fusion(vl, sensor)
        b, _ = fusion(vl, moved)
    assert (a - b).abs().max() > 1e-3
    # Masked-out sensor tokens are not attended to.
    masked = torch.tensor([[True, True, True, True, False, False]])
    junk = tokens.clone()
    junk[0, 4:] = 100.0
    with torch.no_grad():
        c, _ = fusion(vl, SensorFeatures(tokens, masked, sensor.pooled, sensor.present))
        d, _ = fusion(vl, SensorFeatures(junk, masked, sensor.pooled, sensor.present))
    torch.testing.assert_close(c, d)


@pytest.mark.parametrize("fusion", SENSOR_FUSIONS)
def test_every_trainable_parameter_runs_even_without_sensor_samples(small_config, make_batch, fusion):
    # ZeRO-3 gathers each submodule's parameters in forward and reduces their gradients in
    # backward on every rank: a submodule skipped on one rank hangs the others.
    policy = QwenVLA(small_config(fusion_strategy=fusion, finetune_vl="lora"), device="cpu")
    calls = []
    policy.sensor_encoder.register_forward_hook(lambda *a: calls.append(1))
    batch = make_batch(2, has_sensor=[False, False])
    del batch["sensor"], batch["sensor_mask"], batch["has_sensor"]  # e.g. a batch from a sensorless dataset
    policy(batch).per_sample_loss.sum().backward()
    assert calls == [1]
    missing = [n for n, p in policy.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters outside the graph: {missing}"

"""--sensor-loss-weight 2 doubles a sensor sample's gradient at batch size 1 (the old trainer's
renormalization cancelled it there)."""
from __future__ import annotations

import torch

from vla_ds.data.batch import collate
from vla_ds.data.dataset import IntegratedDataset
from vla_ds.data.stats import NormStats
from vla_ds.model.config import ModelConfig
from vla_ds.model.policy import QwenVLA
from vla_ds.train.loss import sample_weights, weighted_loss


def _grads(policy, batch, weight):
    policy.zero_grad()
    out = policy(batch)
    loss = weighted_loss(out.per_sample_loss, sample_weights(batch["has_sensor"], weight, sensor_enabled=True))
    loss.backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def test_weight_two_doubles_the_gradient_of_a_sensor_sample(train_data, tiny_model_dir):
    ds = IntegratedDataset(train_data)
    cfg = ModelConfig(backbone=str(tiny_model_dir), finetune_vl="none", sensor_enabled=True, head_dropout=0.0,
                      sensor_hidden_dim=32, sensor_output_dim=32, sensor_num_heads=2, expert_hidden_dim=32,
                      expert_num_heads=2, expert_num_layers=2)
    torch.manual_seed(0)
    policy = QwenVLA(cfg, NormStats.load(train_data), device="cpu")
    sensor_i = int(ds.sample_has_sensor.nonzero()[0][0])
    plain_i = int((~ds.sample_has_sensor).nonzero()[0][0])
    one = collate([ds[sensor_i]])
    g1, g2 = _grads(policy, one, 1.0), _grads(policy, one, 2.0)
    assert g1.keys() == g2.keys() and any(k.startswith("sensor_encoder.") for k in g1)
    for k in g1:
        torch.testing.assert_close(g2[k], 2 * g1[k], rtol=1e-5, atol=1e-8)
    plain = collate([ds[plain_i]])
    p1, p2 = _grads(policy, plain, 1.0), _grads(policy, plain, 2.0)
    for k in p1:
        torch.testing.assert_close(p2[k], p1[k])

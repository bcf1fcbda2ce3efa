"""Learning-rate schedule at key steps, per-group scaling, and the sensor-weighted loss."""
from __future__ import annotations

import math

import pytest
import torch

from vla_ds.train.loss import sample_weights, weighted_loss
from vla_ds.train.schedule import GroupLRSchedule, lr_multiplier


def test_multiplier_at_key_steps():
    # 100 steps: warm-up 3 (0.03), hold 2 (0.02), cosine over the remaining 95 to floor 0.01
    f = 0.01
    m = [lr_multiplier(s, 100, 0.03, 0.02, f) for s in range(100)]
    assert m[0] == pytest.approx(1 / 3) and m[1] == pytest.approx(2 / 3) and m[2] == pytest.approx(1.0)
    assert m[3] == m[4] == 1.0  # hold
    assert m[5] == pytest.approx(1.0)  # cosine starts at the peak
    mid = 5 + 95 // 2
    assert m[mid] == pytest.approx(f + (1 - f) * 0.5 * (1 + math.cos(math.pi * (mid - 5) / 95)))
    assert lr_multiplier(100, 100, 0.03, 0.02, f) == pytest.approx(f)  # ends at --min-lr / --lr
    assert all(a >= b for a, b in zip(m[5:], m[6:])), "monotone decay after the hold"
    assert lr_multiplier(0, 10, 0.0, 0.0, 0.5) == 1.0  # no warm-up: starts at the peak


def test_every_group_scales_relative_to_its_own_base_lr():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.AdamW([{"params": [params[0]], "lr": 1e-4}, {"params": [params[1]], "lr": 5e-4},
                             {"params": [params[2]], "lr": 1e-5}])
    sched = GroupLRSchedule(opt, total=10, warmup_ratio=0.2, hold_ratio=0.0, floor=1e-6 / 1e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5e-4, 2.5e-4, 0.5e-5])
    for _ in range(10):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-6, 5e-6, 1e-7])
    # JSON state round trip restores the position
    state = sched.state_dict()
    other = GroupLRSchedule(opt, total=10, warmup_ratio=0.2, hold_ratio=0.0, floor=0.01)
    other.load_state_dict(state)
    assert other.step_count == 10 and opt.param_groups[0]["lr"] == pytest.approx(1e-4 * 0.01)


def test_sensor_weight_is_effective_at_batch_one():
    # the old trainer divided by the batch's mean weight, which cancels at batch size 1
    loss = torch.tensor([0.3])
    w2 = sample_weights(torch.tensor([True]), 2.0, sensor_enabled=True)
    assert weighted_loss(loss, w2).item() == pytest.approx(0.6)
    assert weighted_loss(loss, sample_weights(torch.tensor([False]), 2.0, True)).item() == pytest.approx(0.3)
    mixed = weighted_loss(torch.tensor([1.0, 1.0]), sample_weights(torch.tensor([True, False]), 3.0, True))
    assert mixed.item() == pytest.approx(2.0)  # (3 + 1) / 2
    # without --sensor-enabled the sensor is ignored, and so is its weight
    assert sample_weights(torch.tensor([True]), 2.0, sensor_enabled=False).item() == 1.0

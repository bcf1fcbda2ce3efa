"""Action expert and loss: no label leak, padded steps masked, zero-valid samples give 0 not NaN."""
from __future__ import annotations

import pytest
import torch

from vla_ds.data.stats import NormStats
from vla_ds.model.action_head import masked_action_loss
from vla_ds.model.policy import QwenVLA


def test_predictions_never_see_the_ground_truth(small_config, make_batch):
    policy = QwenVLA(small_config(fusion_strategy="cross_attention"), device="cpu").eval()
    batch = make_batch(3)
    other = {**batch, "actions": batch["actions"] * 10 + 5, "action_mask": torch.zeros(3, 8, dtype=torch.bool)}
    with torch.no_grad():
        a, b = policy(batch), policy(other)
        c = policy({k: v for k, v in batch.items() if k not in ("actions", "action_mask")})
    assert torch.equal(a.actions, b.actions) and torch.equal(a.actions, c.actions)
    assert not torch.allclose(a.target, b.target)
    assert c.per_sample_loss is None and c.target is None


def test_loss_formula_mask_and_empty_samples():
    pred = torch.randn(3, 8, 7)
    target = torch.randn(3, 8, 7)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False
    loss, valid = masked_action_loss(pred, target, mask)
    assert valid.tolist() == [8, 5, 0]
    torch.testing.assert_close(loss[0], (pred[0] - target[0]).square().mean())
    torch.testing.assert_close(loss[1], (pred[1, :5] - target[1, :5]).square().mean())
    assert loss[2].item() == 0.0  # no valid step: 0, not NaN
    junk = target.clone()
    junk[1, 5:] = float("nan")  # padded steps are not read, whatever they hold
    junk[2] = 1e6
    torch.testing.assert_close(masked_action_loss(pred, junk, mask)[0], loss)
    l1, _ = masked_action_loss(pred, target, mask, kind="l1")
    torch.testing.assert_close(l1[1], (pred[1, :5] - target[1, :5]).abs().mean())
    with pytest.raises(ValueError, match="--action-loss 'huber'"):
        masked_action_loss(pred, target, mask, kind="huber")


def test_policy_loss_is_in_normalized_space_and_masked(small_config, make_batch):
    stats = NormStats([1.0] * 7, [2.0] * 7, [-1.0] * 7, [1.0] * 7, sensor_mean=[0.5] * 17, sensor_std=[3.0] * 17)
    policy = QwenVLA(small_config(action_loss="l1"), stats=stats, device="cpu").eval()
    batch = make_batch(2)
    batch["action_mask"][1, 3:] = False
    with torch.no_grad():
        out = policy(batch)
    torch.testing.assert_close(out.target, (batch["actions"] - 1.0) / 2.0)
    expected = (out.actions[1, :3] - out.target[1, :3]).abs().mean()
    torch.testing.assert_close(out.per_sample_loss[1], expected)
    assert out.valid_steps.tolist() == [8, 3]
    with pytest.raises(ValueError, match=r"batch actions are \(2, 4, 7\), the model predicts \(2, 8, 7\)"):
        policy({**batch, "actions": batch["actions"][:, :4]})

"""The robot state as an input (--state-enabled): one memory token that moves the actions, absent
joints that are ignored whatever their values, normalization with the stats' per-feature numbers,
and predict's one-line refusals of a state that does not fit."""
from __future__ import annotations

import pytest
import torch

from vla_ds.data.stats import NormStats
from vla_ds.errors import UsageError
from vla_ds.model.config import ModelConfig
from vla_ds.model.policy import QwenVLA


def _policy(small_config, **kw):
    torch.manual_seed(0)
    return QwenVLA(small_config(state_enabled=True, **kw), device="cpu").eval()


def test_the_state_token_moves_the_actions_and_absent_joints_are_ignored(small_config, make_batch):
    policy = _policy(small_config)
    batch = make_batch(4)  # samples 1 and 3 have no joints recorded
    with torch.no_grad():
        base = policy(batch).actions
        moved = {**batch, "state": batch["state"] + torch.tensor([5.0] + [0] * 11)}
        assert (policy(moved).actions - base).abs().amax(dim=(1, 2)).min() > 1e-4, "every sample's pose matters"
        junk = batch["state"].clone()
        junk[:, 6:] = 77.0  # joint values: only where recorded do they count
        out = policy({**batch, "state": junk}).actions
    changed = (out - base).abs().amax(dim=(1, 2)) > 1e-6
    assert changed.tolist() == [True, False, True, False]
    memory, mask = policy.memory(batch)
    plain = QwenVLA(small_config(), device="cpu").eval()
    assert memory.shape[1] == plain.memory(batch)[0].shape[1] + 1 and mask[:, -1].all(), "one more, attended, token"
    with pytest.raises(ValueError, match=r"reads the robot state .*state_mask"):
        policy({k: v for k, v in batch.items() if k != "state"})


def test_pose_only_reads_no_joints_and_the_stats_normalize(small_config, make_batch):
    stats = NormStats([0.0] * 7, [1.0] * 7, [-1.0] * 7, [1.0] * 7, [0.5] * 17, [3.0] * 17,
                      state_mean={"pose": [100.0] * 9, "joints": [0.0] * 12},
                      state_std={"pose": [10.0] * 9, "joints": [1.0] * 12})
    torch.manual_seed(0)
    policy = QwenVLA(small_config(state_enabled=True, state_keys="pose"), stats=stats, device="cpu").eval()
    batch = make_batch(2)
    assert policy.state_encoder.net[0].in_features == 9 + 1
    with torch.no_grad():
        a = policy(batch).actions
        b = policy({**batch, "state": torch.cat([batch["state"][:, :6], batch["state"][:, 6:] + 50], 1)}).actions
    assert torch.equal(a, b), "a pose-only policy never reads the joints"
    from vla_ds.data.state import state_features

    f = state_features(batch["state"][:, :6], "pose")
    torch.testing.assert_close(policy.normalizer.normalize_state(f, "pose"), (f - 100.0) / 10.0)


def test_predict_takes_the_state_as_robot_units_and_refuses_what_does_not_fit(small_config, make_batch):
    policy = _policy(small_config, sensor_enabled=False)
    b = make_batch(2)
    texts, images = b["instructions"], b["images"]
    pose, joints = b["state"][:, :6], b["state"][:, 6:]
    with torch.no_grad():
        want = policy({"images": images, "instructions": texts, "state": b["state"], "state_mask": b["state_mask"]}).actions
    got = policy.predict(texts, images, state={"pose": pose, "joints": torch.where(b["state_mask"][:, 1:], joints, 0)})
    # predict's joints are present for both samples; the batch's sample 1 had none: equal only for sample 0
    torch.testing.assert_close(got[0], policy.normalizer.denormalize_actions(want)[0])
    absent = policy.predict(texts, images, state={"pose": pose, "joints": None})
    assert not torch.allclose(absent[0], got[0])
    for state, match in ((None, r"reads the robot state \(pose, joints"),
                         ({"pose": pose}, r"state lacks 'joints'.*or None"),
                         ({"pose": pose[:, :5], "joints": None}, r"state\['pose'\] is \(2, 5\); expected \(2, 6\)"),
                         ({"pose": pose * float("nan"), "joints": None}, r"with NaN/inf"),
                         ({"pose": None, "joints": joints}, r"state\['pose'\] is None"),
                         ({"pose": pose, "joints": None, "gripper": pose}, r"unknown key\(s\) gripper")):
        with pytest.raises(UsageError, match=match):
            policy.predict(texts, images, state=state)


@pytest.mark.parametrize("field, value, match", [
    ("state_keys", "pose,gripper", r"--state-keys 'pose,gripper'"),
    ("state_keys", "pose,pose", r"distinct names"),
    ("action_head", "diffusion", r"--action-head 'diffusion' is not one of regression\|flow"),
    ("flow_steps", 0, r"--flow-steps must be >= 1"),
])
def test_bad_head_and_state_settings_are_one_line_errors(field, value, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{field: value})

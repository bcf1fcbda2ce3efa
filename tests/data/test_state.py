"""The robot state as data: sin/cos angle features continuous across ±180°, per-key statistics in
stats.json, the frame's pose and joints in every item, and Layout-B recordings without joint
angles ingested with the joints marked absent (never zeros passed off as a reading)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vla_ds.data.dataset import IntegratedDataset
from vla_ds.data.format import EpisodeMeta, FrameTable
from vla_ds.data.ingest import IngestOptions, preprocess
from vla_ds.data.state import FEATURES, state_features, state_slice
from vla_ds.data.stats import NormStats, check_fit, compute_stats
from vla_ds.errors import UsageError


def test_angles_are_continuous_across_the_wrap():
    near = state_features(torch.tensor([[0.0, 0, 0, 179.9, -179.9, 10.0], [0.0, 0, 0, -179.9, 179.9, 10.0]]), "pose")
    assert near.shape == (2, FEATURES["pose"]) and (near[0] - near[1]).abs().max() < 0.004
    far = state_features(torch.tensor([[1.0, 2, 3, 0.0, 0, 0], [1.0, 2, 3, 90.0, 0, 0]]), "pose")
    torch.testing.assert_close(far[1], torch.tensor([1.0, 2, 3, 1, 0, 0, 1, 0, 1]), atol=1e-6, rtol=0)
    assert (far[0] - far[1]).abs().max() > 0.9
    joints = state_features(torch.tensor([[180.0] * 6, [-180.0] * 6]), "joints")
    torch.testing.assert_close(joints[0], joints[1], atol=1e-6, rtol=0)
    assert state_slice("pose") == slice(0, 6) and state_slice("joints") == slice(6, 12)


def test_items_carry_the_frames_pose_and_joints_and_stats_describe_their_features(exact_session_a, tmp_path):
    preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    ds = IntegratedDataset(tmp_path / "ds", load_images=False)
    (ep,) = (tmp_path / "ds" / "episodes").iterdir()
    frames = FrameTable.load(ep)
    for i in range(len(ds)):
        item = ds[i]
        t = int(ds.sample_id(i).rpartition(":")[2])
        np.testing.assert_allclose(item["state"].numpy(), np.r_[frames.pose[t], frames.joints[t]], rtol=1e-6)
        assert item["state_mask"].tolist() == [True, True] and item["state"].dtype == torch.float32
    stats = compute_stats([tmp_path / "ds"])
    for key in ("pose", "joints"):
        raw = np.c_[frames.pose, frames.joints][:, state_slice(key)]
        feats = state_features(torch.from_numpy(raw), key).numpy()
        np.testing.assert_allclose(stats.state_mean[key], feats.mean(0), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(stats.state_std[key], feats.std(0), rtol=1e-9, atol=1e-12)
    # the ramp's yaw crosses +180 -> -180: its sin/cos features stay bounded, their spread small
    assert max(stats.state_std["pose"][3:]) < 0.05
    back = NormStats.load(stats.save(tmp_path / "stats.json"))
    assert back.state_mean == stats.state_mean


def test_a_frame_list_without_joint_angles_is_ingested_with_the_joints_absent(exact_session_b, tmp_path, caplog):
    for js in exact_session_b.glob("*_single.json"):
        frames = json.loads(js.read_text())
        for fr in frames:
            del fr["robot_state"]["joint_angles"]
        js.write_text(json.dumps(frames))
    preprocess([str(exact_session_b)], tmp_path / "ds", IngestOptions())
    (ep,) = (tmp_path / "ds" / "episodes").iterdir()
    assert EpisodeMeta.load(ep).has_joints is False and "ingested without joints" in caplog.text
    item = IntegratedDataset(tmp_path / "ds", load_images=False)[0]
    assert item["state_mask"].tolist() == [True, False] and not item["state"][6:].any()
    stats = compute_stats([tmp_path / "ds"])
    assert set(stats.state_mean) == {"pose"}, "no joint statistics from an episode without joints"


def test_a_run_reading_the_state_refuses_stats_written_before_it(exact_session_a, tmp_path):
    preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    old = compute_stats([tmp_path / "ds"])
    old.state_mean = old.state_std = None
    old.save(tmp_path / "ds")
    dirs = sorted((tmp_path / "ds" / "episodes").iterdir())
    check_fit([str(tmp_path / "ds")], dirs, None, 7, None)  # without --state-enabled: fine
    with pytest.raises(UsageError, match=r"no robot-state statistics for pose, joints .*`vla-ds stats DATASET_DIR`"):
        check_fit([str(tmp_path / "ds")], dirs, None, 7, None, state_keys=("pose", "joints"))

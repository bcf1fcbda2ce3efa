"""Small synthetic datasets written through the real ingest (both recording layouts).

A session is ("a", seed, duration_s, frame_spacing_s): a raw recorder session with sensor, or
("b", seed, duration_s): a frame-list folder without.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

IMAGE = (48, 64)
# 2 raw sessions with sensor (1 s and 0.5 s frames) + 2 frame-list sessions without: ~28 samples
TRAIN = [("a", 0, 5.0, 1.0), ("a", 1, 4.0, 0.5), ("b", 10, 4.0), ("b", 11, 4.0)]
# a learnable task: 5 samples (2 with sensor) that a small head fits in a few dozen steps
LEARN = [("a", 3, 2.0, 1.0), ("b", 4, 1.5)]
# 16 samples: 2 raw sessions with sensor, 1 frame-list session without
CACHE = [("a", 0, 4.0, 1.0), ("a", 1, 3.0, 0.5), ("b", 10, 3.0)]


def repeat_episodes(dataset: Path, times: int) -> Path:
    """Each episode `times` times over (copies under other episode ids): the same samples, an epoch
    `times` as long. Training runs save a checkpoint at every epoch end, so on a 5-sample task an
    epoch per optimizer step would time checkpoints, not training."""
    for ep in sorted(p for p in (dataset / "episodes").iterdir() if p.is_dir()):
        for k in range(1, times):
            copy = ep.with_name(f"{ep.name}-x{k}")
            shutil.copytree(ep, copy)
            meta = json.loads((copy / "meta.json").read_text())
            meta["episode_id"] = copy.name
            (copy / "meta.json").write_text(json.dumps(meta, indent=2))
    return dataset


def make_dataset(root: Path, sessions: list[tuple], stats: bool = True, repeat: int = 1) -> Path:
    """Record `sessions` under ROOT/raw, ingest them into ROOT/dataset (images at most 64 px),
    optionally repeat its episodes, and write stats.json."""
    from vla_ds.data import synthetic
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.stats import compute_stats

    raw = root / "raw"
    for layout, seed, duration, *spacing in sessions:
        if layout == "a":
            synthetic.make_session_a(raw / "needle_insertion", seed=seed, duration_s=duration,
                                     frame_spacing_s=spacing[0], image_size=IMAGE)
        else:
            synthetic.make_session_b(raw / "retina_approach", seed=seed, duration_s=duration, image_size=IMAGE)
    dataset = root / "dataset"
    preprocess([str(raw)], dataset, IngestOptions(max_side=64))
    repeat_episodes(dataset, repeat)
    if stats:
        compute_stats([dataset]).save(dataset)
    return dataset


def _motion_task(root: Path, episodes: list, duration: float, spacing: float = 0.5) -> Path:
    """Raw sessions (Layout A) whose robot follows `pose_of(t - t0)` -> (M, 6) poses, with the sensor
    reading `force` (or none when None), every image replaced by one and the same picture after
    ingest, one instruction: what the policy can learn is only what the sensor or the robot state
    tells it. `episodes`: [(pose_of, force | None)]. Ingested into ROOT/dataset with stats.json."""
    import numpy as np

    from vla_ds.data import synthetic
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.stats import compute_stats

    raw = root / "raw"
    for k, (pose_of, force) in enumerate(episodes):
        t0 = 1761551500.0 + 1000.0 * k
        t = t0 - 0.5 + np.arange(0, duration + 1.5, 1.0 / synthetic.ROBOT_HZ)
        robot = synthetic.RobotTrack(t, pose_of(t - t0), np.zeros((len(t), 6)))
        sensor = None
        if force is not None:
            ts = t0 - 1.0 + np.arange(0, duration + 1.2, 1.0 / synthetic.SENSOR_HZ)
            sensor = synthetic.SensorTrack(ts, np.full(len(ts), force, np.float32),
                                           np.full((len(ts), synthetic.ASCAN_SAMPLES), 100.0, np.float32))
        frames = t0 + np.arange(0.0, duration + 1e-9, spacing)
        synthetic.write_session_a(raw / "needle_insertion", {"View1": frames, "View5": frames}, robot, sensor, IMAGE, k)
    dataset = root / "dataset"
    preprocess([str(raw)], dataset, IngestOptions(max_side=64))
    jpgs = sorted(dataset.glob("episodes/*/images/*/*.jpg"))
    for p in jpgs[1:]:
        shutil.copyfile(jpgs[0], p)
    compute_stats([dataset]).save(dataset)
    return dataset


def _track(x=None, z=None):
    """pose_of(s) for s = seconds since the episode start: x(s), z(s) given, everything else 0."""
    import numpy as np

    def pose_of(s):
        pose = np.zeros((len(s), 6))
        pose[:, 0] = x(s) if x else 0.0
        pose[:, 2] = z(s) if z else 0.0
        return pose

    return pose_of


def make_sensor_task(root: Path, per_sign: int = 2, duration: float = 4.0) -> Path:
    """A task only the sensor can solve: the needle advances (+z) when the force reads +1 and
    retracts (-z) when it reads -1. Without the sensor, a policy can only predict the mean (no z
    motion); with it, the direction."""
    signs = [1.0 if k % 2 == 0 else -1.0 for k in range(2 * per_sign)]
    return _motion_task(root, [(_track(z=lambda s, g=g: g * 5.0 * s / duration), g) for g in signs], duration)


# How far the bimodal task's robot moves in x per 0.5 s frame, one way or the other.
BIMODAL_STEP = 0.625


def make_bimodal_task(root: Path, per_sign: int = 3, duration: float = 8.0, spacing: float = 0.1) -> Path:
    """Demonstrations that disagree: the same picture and instruction, then +x at BIMODAL_STEP per
    frame in half the episodes and -x in the other half. A regression head can only predict their
    mean (no motion, which no demonstration did); a generative head should sample either. 80
    samples per episode at the defaults (long epochs: a run checkpoints at every epoch end)."""
    signs = [1.0 if k % 2 == 0 else -1.0 for k in range(2 * per_sign)]
    rate = BIMODAL_STEP / spacing
    return _motion_task(root, [(_track(x=lambda s, g=g: g * rate * s), None) for g in signs], duration, spacing)


def make_state_task(root: Path, episodes: int = 12, duration: float = 4.0, spacing: float = 0.25) -> Path:
    """A task only the robot state can solve: the needle moves down at 1 unit/s until it reaches
    z = 0, then stops; each episode starts at another height (0.5 .. 4). The picture never changes,
    so without the state the next motion is unknowable; x advances at 1 unit/s in every episode, so
    the state also tells the time (the progress dim)."""
    import numpy as np

    starts = np.linspace(0.5, 4.0, episodes)
    return _motion_task(root, [(_track(x=lambda s: s, z=lambda s, z0=z0: np.maximum(z0 - s, 0.0)), None)
                               for z0 in starts], duration, spacing)

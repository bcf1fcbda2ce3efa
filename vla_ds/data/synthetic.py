"""Realistic fake recordings in both input layouts, for the demo, the tests and benchmarks.

Layout A (raw recorder session, with sensor)::

    recv_all_YYYYMMDD_HHMMSS/
      View1/left/zed_<serial>_left_<unix>.jpg   View1/right/zed_<serial>_right_<unix>.jpg  ... View4
      View5/oak_<serial>_<unix>.jpg
      robot_state_<stamp>.csv      100 Hz, recv/origin/send timestamps, force, joints, pose
      sensor_data_<stamp>.npz      ~650 Hz: timestamps, send_timestamps, forces (N,), alines (N, 1025)

Layout B (pre-made frame lists): a folder of `<name>_View<k>_single.json` lists of frames
(timestamp, image, robot_state{timestamp, joint_angles, ee_pose}, time_diff_robot, and
sensor_interval when a `sensor_data_*.npz` sits beside), image paths partly absolute from
"another machine" so that path resolution is exercised.

Trajectories are smooth, the yaw angle `a` crosses the +-180 degree seam, cameras are not
synchronous (jitter), right-camera frames go missing, and frames are 0.5 s or 1 s apart. The
writers (`write_session_a`, `write_session_b`) take explicit arrays so tests can feed exact
values; `make_session_a`/`make_session_b` draw plausible ones from a seed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ASCAN_SAMPLES = 1025
ROBOT_HZ = 100.0
SENSOR_HZ = 650.0
CSV_HEADER = (
    "recv_timestamp,origin_timestamp,send_timestamp,force_placeholder,"
    + ",".join(f"joint_{i}" for i in range(1, 7))
    + ",pose_x,pose_y,pose_z,pose_a,pose_b,pose_r"
)
ROBOT_CLOCK_OFFSET = -3.25  # the robot's clock runs 3.25 s behind the host's


@dataclass
class RobotTrack:
    t: np.ndarray  # (M,) host clock
    pose: np.ndarray  # (M, 6) x y z a b r; angles in (-180, 180]
    joints: np.ndarray  # (M, 6)


@dataclass
class SensorTrack:
    t: np.ndarray  # (R,) host clock
    force: np.ndarray  # (R,)
    alines: np.ndarray  # (R, A)


def camera_image(pose: np.ndarray, seed: int, height: int = 96, width: int = 128):
    """A camera-like RGB frame whose needle position follows the pose (so actions are learnable)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 0.55 + 0.2 * np.sin(xx / width * 3.0)
    img[..., 1] = 0.45 + 0.2 * np.cos(yy / height * 2.0)
    img[..., 2] = 0.40
    # needle tip position from x, y (mm scale) and its shaft direction from the yaw angle
    cx = width * (0.5 + 0.03 * float(pose[0]))
    cy = height * (0.5 + 0.03 * float(pose[1]))
    ang = np.deg2rad(float(pose[3]))
    for s in np.linspace(0, min(height, width) * 0.45, 60):
        px, py = int(cx - s * np.cos(ang)), int(cy - s * np.sin(ang))
        if 0 <= px < width and 0 <= py < height:
            img[max(py - 1, 0) : py + 2, max(px - 1, 0) : px + 2] = 0.05
    img += rng.normal(0, 0.015, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8))


def synthetic_view(seed: int, height: int = 120, width: int = 160):
    """A camera frame at a seeded random pose (for tests that need some image)."""
    rng = np.random.default_rng(seed)
    pose = np.concatenate([rng.uniform(-5, 5, 3), rng.uniform(-180, 180, 3)])
    return camera_image(pose, seed, height, width)


def smooth_track(duration_s: float, seed: int, t0: float) -> RobotTrack:
    """A 100 Hz insertion-like trajectory whose yaw `a` crosses the +-180 degree seam."""
    rng = np.random.default_rng(seed)
    t = t0 + np.arange(0, duration_s + 1.0, 1.0 / ROBOT_HZ)  # cover frames and their future
    s = (t - t0) / max(duration_s, 1e-6)
    w = rng.uniform(0.5, 1.5, size=6)
    pose = np.stack(
        [
            2.0 * np.sin(w[0] * 2 * np.pi * s),
            1.5 * np.cos(w[1] * 2 * np.pi * s),
            -5.0 * s,  # advance along the needle axis
            179.0 + 3.0 * s * w[3],  # crosses +180 -> -180
            10.0 * np.sin(w[4] * np.pi * s),
            -170.0 + 20.0 * s,
        ],
        axis=1,
    )
    pose[:, 3:] = np.mod(pose[:, 3:] + 180.0, 360.0) - 180.0
    pose[:, 3:] = np.where(pose[:, 3:] == -180.0, 180.0, pose[:, 3:])
    joints = np.stack([30 * np.sin(w[i] * np.pi * s + i) for i in range(6)], axis=1)
    return RobotTrack(t, pose, joints)


def sensor_stream(t_start: float, t_end: float, seed: int, ascan: int = ASCAN_SAMPLES) -> SensorTrack:
    """~650 Hz OCT A-scans (a reflection peak that deepens over time) and a rising force."""
    rng = np.random.default_rng(seed)
    t = t_start + np.arange(0, t_end - t_start, 1.0 / SENSOR_HZ)
    s = (t - t_start) / max(t_end - t_start, 1e-6)
    depth = (0.2 + 0.6 * s)[:, None] * ascan
    z = np.arange(ascan, dtype=np.float32)[None, :]
    alines = (800.0 * np.exp(-((z - depth) ** 2) / 200.0) + rng.normal(100.0, 5.0, (len(t), ascan))).astype(np.float32)
    force = (0.05 + 0.4 * s**2 + rng.normal(0, 0.005, len(t))).astype(np.float32)
    return SensorTrack(t, force, alines)


def _stamp(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y%m%d_%H%M%S")


def write_robot_csv(path: Path, robot: RobotTrack) -> None:
    rows = [CSV_HEADER]
    for i in range(len(robot.t)):
        t = robot.t[i]
        vals = [t, t + ROBOT_CLOCK_OFFSET, t - 0.002, 0.0, *robot.joints[i], *robot.pose[i]]
        rows.append(",".join(f"{v:.6f}" for v in vals))
    path.write_text("\n".join(rows) + "\n")


def write_sensor_npz(path: Path, sensor: SensorTrack) -> None:
    np.savez(
        path,
        timestamps=sensor.t,
        send_timestamps=sensor.t - 0.001,
        forces=sensor.force,
        alines=sensor.alines,
    )


def write_session_a(
    root: str | os.PathLike,
    frame_times: dict[str, np.ndarray],
    robot: RobotTrack,
    sensor: SensorTrack | None,
    image_size: tuple[int, int] = (96, 128),
    seed: int = 0,
) -> Path:
    """Write a raw recorder session. `frame_times` maps view name ("View1" = ZED left,
    "View1_right", ..., "View5" = OAK) to that camera's capture times."""
    root = Path(root)
    t0 = min(float(ts[0]) for ts in frame_times.values() if len(ts))
    session = root / f"recv_all_{_stamp(t0)}"
    for view, times in frame_times.items():
        num, _, side = view.partition("_")
        if num == "View5":
            folder, prefix = session / "View5", "oak_1944301011169A4800_"
        else:
            side = side or "left"
            folder, prefix = session / num / side, f"zed_4118273{num[-1]}_{side}_"
        folder.mkdir(parents=True, exist_ok=True)
        for k, t in enumerate(times):
            pose = robot.pose[np.searchsorted(robot.t, t).clip(0, len(robot.t) - 1)]
            img = camera_image(pose, seed=seed * 7919 + k * 31 + sum(map(ord, view)), height=image_size[0], width=image_size[1])
            img.save(folder / f"{prefix}{t:.3f}.jpg", quality=85)
    write_robot_csv(session / f"robot_state_{_stamp(t0)}.csv", robot)
    if sensor is not None:
        write_sensor_npz(session / f"sensor_data_{_stamp(t0)}.npz", sensor)
    return session


def make_session_a(
    root: str | os.PathLike,
    seed: int,
    duration_s: float = 4.0,
    frame_spacing_s: float = 1.0,
    zed_views: int = 1,
    oak: bool = True,
    missing_right: float = 0.25,
    jitter_s: float = 0.02,
    image_size: tuple[int, int] = (96, 128),
    t0: float = 1761551500.0,
    ascan: int = ASCAN_SAMPLES,
) -> Path:
    """A plausible raw session: async cameras, missing right frames, sensor stream."""
    rng = np.random.default_rng(seed)
    t0 = t0 + 1000.0 * seed
    nominal = t0 + np.arange(0.0, duration_s + 1e-9, frame_spacing_s)
    times: dict[str, np.ndarray] = {}
    for v in range(1, zed_views + 1):
        times[f"View{v}"] = nominal + rng.uniform(-jitter_s, jitter_s, len(nominal))
        keep = rng.random(len(nominal)) >= missing_right
        times[f"View{v}_right"] = (nominal + rng.uniform(-jitter_s, jitter_s, len(nominal)))[keep]
    if oak:
        times["View5"] = nominal + rng.uniform(-jitter_s, jitter_s, len(nominal))
    robot = smooth_track(duration_s, seed, t0 - 0.5)
    sensor = sensor_stream(t0 - frame_spacing_s, t0 + duration_s + 0.1, seed, ascan)
    return write_session_a(root, times, robot, sensor, image_size, seed)


def write_session_b(
    folder: str | os.PathLike,
    name: str,
    frame_times: dict[str, np.ndarray],
    robot: RobotTrack,
    sensor: SensorTrack | None,
    image_size: tuple[int, int] = (96, 128),
    seed: int = 0,
    foreign_root: str = "/mnt/other-machine/NAS/VLA/dataset",
) -> Path:
    """Write a folder of per-view frame-list JSONs (+ images, + sensor npz when given).

    Every other frame's image path is written as an absolute path on another machine
    (`foreign_root/...`) that does not exist here: ingest must resolve it relative to the JSON.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for view, times in frame_times.items():
        (folder / view).mkdir(exist_ok=True)
        frames = []
        prev = None
        for k, t in enumerate(times):
            i = int(np.searchsorted(robot.t, t).clip(0, len(robot.t) - 1))
            fname = f"{name}_{view}_{t:.3f}.jpg"
            camera_image(robot.pose[i], seed=seed * 7919 + k, height=image_size[0], width=image_size[1]).save(
                folder / view / fname, quality=85
            )
            rel = f"{view}/{fname}"
            frame = {
                "timestamp": float(t),
                "image": f"{foreign_root}/{name}/{rel}" if k % 2 else rel,
                "robot_state": {
                    "timestamp": float(robot.t[i]),
                    "joint_angles": [float(x) for x in robot.joints[i]],
                    "ee_pose": [float(x) for x in robot.pose[i]],
                },
                "time_diff_robot": float(t - robot.t[i]),
            }
            if sensor is not None:
                start = float(prev if prev is not None else t - (times[1] - times[0] if len(times) > 1 else 1.0))
                frame["sensor_interval"] = {"start": start, "end": float(t), "duration": float(t) - start}
            frames.append(frame)
            prev = t
        (folder / f"{name}_{view}_single.json").write_text(json.dumps(frames, indent=1))
    if sensor is not None:
        write_sensor_npz(folder / f"sensor_data_{name}.npz", sensor)
    return folder


def make_session_b(
    root: str | os.PathLike,
    seed: int,
    duration_s: float = 4.0,
    frame_spacing_s: float = 0.5,
    views: tuple[str, ...] = ("View1", "View5"),
    with_sensor: bool = False,
    image_size: tuple[int, int] = (96, 128),
    t0: float = 1761600000.0,
    ascan: int = ASCAN_SAMPLES,
) -> Path:
    """A plausible pre-made frame-list session (no sensor by default, as most are)."""
    rng = np.random.default_rng(seed + 100_000)
    t0 = t0 + 1000.0 * seed
    nominal = t0 + np.arange(0.0, duration_s + 1e-9, frame_spacing_s)
    times = {v: nominal + rng.uniform(-0.01, 0.01, len(nominal)) for v in views}
    robot = smooth_track(duration_s, seed + 1, t0 - 0.5)
    sensor = sensor_stream(t0 - frame_spacing_s, t0 + duration_s + 0.1, seed, ascan) if with_sensor else None
    name = f"session_{seed:03d}"
    return write_session_b(Path(root) / name, name, times, robot, sensor, image_size, seed)

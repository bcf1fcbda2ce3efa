"""The vla-ds dataset format: one directory per episode, written by `vla-ds preprocess`.

```
DATASET_DIR/
  dataset.json                 {"format": "vla-ds-dataset", "version": 1}
  summary.json                 what the last ingest did: episodes, samples, sensor share, drops
  stats.json                   normalization statistics (`vla-ds stats`)
  episodes/<episode_id>/
    meta.json                  instruction, views, rates, has_sensor, source, counts (EpisodeMeta)
    frames.json                frame table: timestamp, pose, joints, per-view image paths,
                               sensor row range per frame (FrameTable)
    images/<view>/<i>.jpg      only when images were re-encoded at ingest (--max-side);
                               otherwise frames.json points at the source JPEGs
    sensor.npy                 (R, 1 + 1025) force + A-scan stream, stored once per episode,
                               uncompressed, read by memory map; float16 unless a value
                               exceeds float16's range (then float32; meta says which)
    sensor_t.npy               (R,) float64 sensor timestamps (unix seconds)
```

Poses are `x, y, z, a, b, r` with a, b, r in degrees in (-180, 180]; joints are 6 angles. A frame's
sensor window is rows `[sensor_start, sensor_end)` of `sensor.npy`: the readings between the
previous frame and this one.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vla_ds.errors import UsageError
from vla_ds.utils.io import write_json

FORMAT_NAME = "vla-ds-dataset"
FORMAT_VERSION = 1
EPISODES_DIR = "episodes"
META_FILE = "meta.json"
FRAMES_FILE = "frames.json"
SENSOR_FILE = "sensor.npy"
SENSOR_TIME_FILE = "sensor_t.npy"
POSE_DIM = 6
SENSOR_CHANNELS = 1026  # our OCT/FPI sensor's row: 1 force + 1025 A-scan samples (--sensor-input-channels default)
ANGLE_DIMS = (3, 4, 5)  # a, b, r in degrees
# float16 holds integers exactly up to 2048 and values up to 65504; beyond that we keep float32.
FLOAT16_SAFE_MAX = 60000.0


@dataclass
class EpisodeMeta:
    """Small per-episode metadata (meta.json)."""

    episode_id: str
    instruction: str
    instruction_source: str  # "flag" | "mapping:<file>" | "file:<path>" | "folder-name"
    views: list[str]
    num_frames: int
    has_sensor: bool
    sensor_samples: int  # samples (frames 0..N-2) whose sensor window holds at least one row
    source: dict  # {"layout": "A"|"B", "path": str, "fingerprint": str}
    rates: dict = field(default_factory=dict)  # {"frame_spacing_s": float, "robot_hz": float, "sensor_hz": float}
    sensor: dict | None = None  # {"rows": R, "channels": C, "dtype": "float16"}
    dropped: dict = field(default_factory=dict)  # reason -> count
    missing_views: dict = field(default_factory=dict)  # view -> frames without that view
    # False: the recording has no joint angles (Layout B frames without robot_state.joint_angles);
    # frames.json then holds zeros, and the state input sees the joints as absent
    has_joints: bool = True
    format_version: int = FORMAT_VERSION

    @classmethod
    def load(cls, episode_dir: str | os.PathLike) -> EpisodeMeta:
        path = Path(episode_dir) / META_FILE
        d = json.loads(path.read_text())
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format version {d.get('format_version')} != {FORMAT_VERSION}; re-run preprocess")
        return cls(**d)

    def save(self, episode_dir: str | os.PathLike) -> None:
        write_json(Path(episode_dir) / META_FILE, asdict(self))


@dataclass
class FrameTable:
    """Per-frame arrays of one episode (frames.json). Image paths are relative to the episode dir
    when the image was re-encoded there, absolute otherwise; None where a view has no frame."""

    timestamp: np.ndarray  # (N,) float64, unix seconds (camera clock)
    pose: np.ndarray  # (N, 6) float64
    joints: np.ndarray  # (N, 6) float64
    images: dict[str, list[str | None]]  # view -> N paths
    sensor_start: np.ndarray | None = None  # (N,) int64 row index into sensor.npy
    sensor_end: np.ndarray | None = None  # (N,) int64, exclusive

    def __post_init__(self):
        n = len(self.timestamp)
        if self.pose.shape != (n, POSE_DIM) or self.joints.shape != (n, 6):
            raise ValueError(f"frame table: pose {self.pose.shape} / joints {self.joints.shape} do not match {n} frames")
        for view, paths in self.images.items():
            if len(paths) != n:
                raise ValueError(f"frame table: view {view} has {len(paths)} images for {n} frames")

    def __len__(self) -> int:
        return len(self.timestamp)

    def to_dict(self) -> dict:
        d = {
            "timestamp": self.timestamp.tolist(),
            "pose": self.pose.tolist(),
            "joints": self.joints.tolist(),
            "images": self.images,
        }
        if self.sensor_start is not None:
            d["sensor_start"] = self.sensor_start.tolist()
            d["sensor_end"] = self.sensor_end.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FrameTable:
        has = "sensor_start" in d
        return cls(
            timestamp=np.asarray(d["timestamp"], np.float64),
            pose=np.asarray(d["pose"], np.float64).reshape(-1, POSE_DIM),
            joints=np.asarray(d["joints"], np.float64).reshape(-1, 6),
            images={k: list(v) for k, v in d["images"].items()},
            sensor_start=np.asarray(d["sensor_start"], np.int64) if has else None,
            sensor_end=np.asarray(d["sensor_end"], np.int64) if has else None,
        )

    def save(self, episode_dir: str | os.PathLike) -> None:
        write_json(Path(episode_dir) / FRAMES_FILE, self.to_dict())

    @classmethod
    def load(cls, episode_dir: str | os.PathLike) -> FrameTable:
        return cls.from_dict(json.loads((Path(episode_dir) / FRAMES_FILE).read_text()))


def wrap_degrees(x: np.ndarray) -> np.ndarray:
    """Map angles (degrees) into (-180, 180]: a -179.9 -> 179.9 step becomes -0.2, not 359.8."""
    y = np.mod(np.asarray(x, np.float64) + 180.0, 360.0) - 180.0
    return np.where(y == -180.0, 180.0, y)


def pose_deltas(pose: np.ndarray) -> np.ndarray:
    """(N, 6) poses -> (N-1, 6) step deltas, angle dims wrapped to the shortest arc."""
    d = np.diff(np.asarray(pose, np.float64), axis=0)
    d[:, list(ANGLE_DIMS)] = wrap_degrees(d[:, list(ANGLE_DIMS)])
    return d


def write_dataset_marker(dataset_dir: str | os.PathLike) -> None:
    path = Path(dataset_dir) / "dataset.json"
    if not path.exists():
        write_json(path, {"format": FORMAT_NAME, "version": FORMAT_VERSION})


def find_episode_dirs(paths: list[str | os.PathLike], flag: str = "--data") -> list[Path]:
    """Resolve dataset dirs, episode dirs or globs of either into sorted episode directories; a
    one-line UsageError naming `flag` and the path (or glob) that holds none."""
    import glob

    found: list[Path] = []
    for spec in paths:
        matches = sorted(glob.glob(str(spec)))
        if not matches and glob.has_magic(str(spec)) and not Path(spec).exists():
            raise UsageError(f"{flag} {spec}: the glob matches nothing; check the pattern (dataset directories written "
                             "by `vla-ds preprocess`, or their episode directories)")
        for m in matches or [str(spec)]:
            p = Path(m)
            if (p / META_FILE).is_file():
                found.append(p)
            elif (p / EPISODES_DIR).is_dir():
                # not the ".<episode>.*.tmp" / ".old" folders of a write that was killed (atomic_dir)
                found.extend(sorted(e for e in (p / EPISODES_DIR).iterdir()
                                    if not e.name.startswith(".") and (e / META_FILE).is_file()))
            elif not p.exists():
                raise UsageError(f"{flag} {spec}: no such file or directory; give a dataset directory written by "
                                 "`vla-ds preprocess --out`")
            else:
                raise UsageError(f"{flag} {spec}: not a vla-ds dataset (no {EPISODES_DIR}/ or {META_FILE}); run `vla-ds preprocess` first")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UsageError(f"{flag} {' '.join(map(str, paths))}: no episodes found; run `vla-ds preprocess` first")
    return unique

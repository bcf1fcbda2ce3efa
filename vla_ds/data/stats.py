"""Normalization statistics: per-dimension action stats and per-channel sensor stats.

Stored as `stats.json` beside the data (`vla-ds stats DATASET_DIR...`) and copied into every
checkpoint/policy directory, so a trained policy normalizes inputs and denormalizes actions with
exactly the numbers it was trained with.

Actions are normalized per dimension with z-scores (mean/std); q01/q99 are kept for inspection
and clipping. The sensor's channel 0 is the force and channels 1..1025 the A-scan samples: force
gets its own scalar mean/std, the A-scan per-channel mean/std, so the one force channel is not
drowned by 1025 A-scan channels in a shared statistic.

The robot state (`--state-enabled`) is normalized per feature after its angle encoding
(vla_ds/model/state.py: x, y, z and sin/cos of each angle): `state_mean` / `state_std` map a state
key (pose, joints) to its features' statistics over every frame that has it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vla_ds.errors import UsageError
from vla_ds.utils.io import write_json

STATS_FILE = "stats.json"
STATS_VERSION = 1
# A dimension that never moves (e.g. a constant 7th action dim) must not divide by ~0.
MIN_STD = 1e-6


@dataclass
class NormStats:
    """Normalization statistics. Lists, not arrays, so that the JSON is the source of truth."""

    action_mean: list[float]
    action_std: list[float]
    action_q01: list[float]
    action_q99: list[float]
    # Sensor: (C,) vectors, channel 0 = force, 1.. = A-scan. None when no sensor data was seen.
    sensor_mean: list[float] | None = None
    sensor_std: list[float] | None = None
    # Robot state: {key: per-feature list}; None in a stats.json written before vla-ds read the state.
    state_mean: dict[str, list[float]] | None = None
    state_std: dict[str, list[float]] | None = None
    counts: dict = field(default_factory=dict)
    version: int = STATS_VERSION

    def __post_init__(self):
        n = len(self.action_mean)
        for name in ("action_std", "action_q01", "action_q99"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"stats: {name} has {len(getattr(self, name))} values, action_mean has {n}")
        if (self.sensor_mean is None) != (self.sensor_std is None):
            raise ValueError("stats: sensor_mean and sensor_std must both be present or both absent")
        if self.sensor_mean is not None and len(self.sensor_mean) != len(self.sensor_std):
            raise ValueError("stats: sensor_mean and sensor_std differ in length")

    @property
    def action_dim(self) -> int:
        return len(self.action_mean)

    def action_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float32 arrays, std floored at MIN_STD."""
        return np.asarray(self.action_mean, np.float32), np.maximum(np.asarray(self.action_std, np.float32), MIN_STD)

    def sensor_arrays(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) for `channels` sensor channels; identity (0, 1) when no sensor was seen."""
        if self.sensor_mean is None:
            return np.zeros(channels, np.float32), np.ones(channels, np.float32)
        if len(self.sensor_mean) != channels:
            raise ValueError(f"stats: sensor stats have {len(self.sensor_mean)} channels, the model expects {channels}")
        return np.asarray(self.sensor_mean, np.float32), np.maximum(np.asarray(self.sensor_std, np.float32), MIN_STD)

    def state_arrays(self, key: str, features: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) of state key `key`'s `features` features; identity (0, 1) when the stats hold none."""
        if not self.state_mean or key not in self.state_mean:
            return np.zeros(features, np.float32), np.ones(features, np.float32)
        if len(self.state_mean[key]) != features:
            raise ValueError(f"stats: state {key} has {len(self.state_mean[key])} features, the model reads {features}")
        return (np.asarray(self.state_mean[key], np.float32),
                np.maximum(np.asarray(self.state_std[key], np.float32), MIN_STD))

    @classmethod
    def identity(cls, action_dim: int = 7, sensor_channels: int | None = None) -> NormStats:
        """Stats that leave values unchanged (for tests and models built before stats exist)."""
        from vla_ds.data.state import FEATURES

        zeros, ones = [0.0] * action_dim, [1.0] * action_dim
        sensor = ([0.0] * sensor_channels, [1.0] * sensor_channels) if sensor_channels else (None, None)
        return cls(zeros, ones, [-1.0] * action_dim, [1.0] * action_dim, sensor[0], sensor[1],
                   {k: [0.0] * n for k, n in FEATURES.items()}, {k: [1.0] * n for k, n in FEATURES.items()})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NormStats:
        if d.get("version", STATS_VERSION) != STATS_VERSION:
            raise ValueError(f"stats: version {d.get('version')} is not supported (expected {STATS_VERSION})")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> NormStats:
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise UsageError(f"{path}: no normalization stats; run `vla-ds stats DATASET_DIR` first") from None
        except (ValueError, TypeError, AttributeError) as e:  # bad JSON, missing fields, lengths, version
            raise UsageError(f"{path}: not a vla-ds stats file ({e}); recompute it with `vla-ds stats DATASET_DIR`") from None


def stats_path(stats: str | None, data: list[str]) -> Path | None:
    """The stats file a run normalizes with: --stats (a file, or a directory holding stats.json),
    else the stats.json of the first --data directory that has one; None: neither (computed at start)."""
    if stats:
        return Path(stats) / STATS_FILE if Path(stats).is_dir() else Path(stats)
    return next((Path(d) / STATS_FILE for d in data if (Path(d) / STATS_FILE).is_file()), None)


def check_fit(data: list[str], episode_dirs: list[Path], stats: str | None, action_dim: int,
              sensor_channels: int | None, origin: dict | None = None, state_keys: tuple[str, ...] = ()) -> None:
    """Before a run loads anything: the episodes' sensor channels and the stats file (--stats, else
    beside --data) fit a model of `action_dim` actions and `sensor_channels` sensor channels (None:
    sensor off); else a one-line UsageError naming the files, the flag and the fix. `origin` maps a
    setting to where it was set (e.g. {"sensor_input_channels": " (from --config run.yaml)"}).
    `state_keys` (--state-enabled): the stats must hold their statistics."""
    from vla_ds.data.format import EpisodeMeta

    origin, flag = origin or {}, "--sensor-input-channels"
    model = f"the model reads {flag} {sensor_channels}{origin.get('sensor_input_channels', '')}"
    for d in episode_dirs if sensor_channels is not None else []:
        try:
            meta = EpisodeMeta.load(d)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--data {d}: {e}") from None
        if meta.has_sensor and meta.sensor["channels"] != sensor_channels:
            raise UsageError(f"--data {d}: the episode holds {meta.sensor['channels']} sensor channels but {model}; "
                             f"pass {flag} {meta.sensor['channels']}")
    path = stats_path(stats, data)
    label = "--stats " if stats else ""
    if path is None:
        return
    if stats and not path.is_file():
        raise UsageError(f"--stats {stats}: no such file{' (no stats.json in that directory)' if Path(stats).is_dir() else ''}; "
                         "give the stats.json that `vla-ds stats DATASET_DIR` wrote, or leave --stats out")
    try:
        s = NormStats.load(path)
    except UsageError as e:
        raise UsageError(f"{label}{e}") from None
    if s.action_dim != action_dim:
        raise UsageError(f"{label}{path}: statistics for {s.action_dim} action dims, but the model predicts --action-dim "
                         f"{action_dim}{origin.get('action_dim', '')}; recompute them with `vla-ds stats DATASET_DIR`")
    if sensor_channels is not None and s.sensor_mean is not None and len(s.sensor_mean) != sensor_channels:
        raise UsageError(f"{label}{path}: sensor statistics for {len(s.sensor_mean)} channels, but {model} (--data "
                         f"{' '.join(map(str, data))}); recompute them with `vla-ds stats DATASET_DIR` or pass {flag} "
                         f"{len(s.sensor_mean)}")
    missing = [k for k in state_keys if k not in (s.state_mean or {})]
    if missing:
        raise UsageError(f"{label}{path}: no robot-state statistics for {', '.join(missing)} (written before vla-ds read "
                         "the state); recompute them with `vla-ds stats DATASET_DIR`, or drop --state-enabled")


def compute_stats(data: list[str | os.PathLike], chunk_rows: int = 16384) -> NormStats:
    """Action and sensor statistics over every episode under `data` (streams the sensor files)."""
    from vla_ds.data.dataset import episode_actions
    from vla_ds.data.format import FRAMES_FILE, SENSOR_FILE, EpisodeMeta, FrameTable, find_episode_dirs
    from vla_ds.data.state import state_statistics

    actions, states, n_sensor_rows = [], [], 0
    s1 = s2 = None
    episodes = find_episode_dirs(data)
    for d in episodes:
        meta = EpisodeMeta.load(d)
        frames = FrameTable.load(d)
        pose = frames.pose
        if not np.isfinite(pose).all():
            raise UsageError(f"{Path(d) / FRAMES_FILE}: NaN/inf in the pose of frame {int(np.argmin(np.isfinite(pose).all(1)))}; "
                             f"re-ingest its source ({meta.source.get('path')}) with `vla-ds preprocess`")
        actions.append(episode_actions(pose))
        states.append((pose, frames.joints if meta.has_joints else None))
        if not meta.has_sensor:
            continue
        mm = np.load(Path(d) / SENSOR_FILE, mmap_mode="r")
        if s1 is None:
            s1, s2 = np.zeros(mm.shape[1]), np.zeros(mm.shape[1])
        elif mm.shape[1] != len(s1):
            raise UsageError(f"{d}: {mm.shape[1]} sensor channels, other episodes have {len(s1)}; ingest them alike")
        for lo in range(0, len(mm), chunk_rows):
            x = np.asarray(mm[lo : lo + chunk_rows], np.float64)
            if not np.isfinite(x).all():
                raise UsageError(f"{Path(d) / SENSOR_FILE}: NaN/inf in sensor row {lo + int(np.argmin(np.isfinite(x).all(1)))}; "
                                 f"re-ingest its source ({meta.source.get('path')}) with `vla-ds preprocess`")
            s1 += x.sum(0)
            s2 += (x * x).sum(0)
        n_sensor_rows += len(mm)
    a = np.concatenate(actions)
    sensor_mean = sensor_std = None
    counts = {"episodes": len(episodes), "action_steps": int(len(a)), "sensor_rows": n_sensor_rows}
    if n_sensor_rows:
        mean = s1 / n_sensor_rows
        std = np.sqrt(np.maximum(s2 / n_sensor_rows - mean**2, 0.0))
        sensor_mean, sensor_std = mean.tolist(), std.tolist()
        counts["force_mean_std"] = [float(mean[0]), float(std[0])]
        counts["ascan_mean_std"] = [float(mean[1:].mean()), float(np.sqrt(np.mean(std[1:] ** 2)))]
    state_mean, state_std = state_statistics(states)
    return NormStats(
        action_mean=a.mean(0).tolist(),
        action_std=a.std(0).tolist(),
        action_q01=np.quantile(a, 0.01, axis=0).tolist(),
        action_q99=np.quantile(a, 0.99, axis=0).tolist(),
        sensor_mean=sensor_mean,
        sensor_std=sensor_std,
        state_mean=state_mean,
        state_std=state_std,
        counts=counts,
    )

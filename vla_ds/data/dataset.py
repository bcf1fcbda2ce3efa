"""`IntegratedDataset`: training samples from many vla-ds dataset directories, with and without sensor.

A sample is frame `t` of an episode (every frame that has a next frame). It returns:

  images        list of V (H, W, 3) uint8 tensors, decoded RGB (the chosen views, in order) [unless
                load_images=False]: from a loader worker a tensor crosses through shared memory,
                where a PIL image is pickled (measured +5 to +30 % samples/s at 2 views, 448 px)
  instruction   str
  actions       (H, 7) float32: for step k, the pose change from frame t+k to t+k+1 -- dx, dy, dz
                (robot units) and da, db, dr (degrees, wrapped to the shortest arc) -- and, as the
                7th dim, the episode progress (t+k+1)/(N-1) reached by that step (0 -> 1 over the
                episode; the robot can read it as "how close to done"). Steps past the episode end
                are zero and masked.
  action_mask   (H,) bool, False for padded steps
  sensor        (T, C) float16 (float32 if an episode had to be stored so): the sensor rows between
                the previous frame and this one, newest last; windows longer than T keep the most
                recent T rows; shorter ones are padded with zeros after the valid rows. Only for
                samples that have a sensor reading: 94.5 % of our users' samples have none, and
                a dense zero window for each was 91 % of a batch's bytes.
  sensor_mask   (T,) bool, True for valid rows (beside `sensor`)
  has_sensor    bool
  state         (12,) float32: the robot's pose (x, y, z, a, b, r) and joints (6 angles) at frame t,
                raw (vla_ds/data/state.py; the policy encodes and normalizes them)
  state_mask    (2,) bool: pose, joints present (joints False for an episode recorded without them)
  sample_id     "<episode_id>:<frame index, 6 digits>" (stable: the VL cache keys on it)
  episode_id    str

Sensor streams are memory-mapped, opened lazily in each DataLoader worker (never pickled, never
loaded whole).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vla_ds.data.format import SENSOR_CHANNELS, SENSOR_FILE, EpisodeMeta, FrameTable, find_episode_dirs, pose_deltas
from vla_ds.errors import UsageError

log = logging.getLogger(__name__)
ACTION_DIM = 7


@dataclass
class _Episode:
    dir: Path
    meta: EpisodeMeta
    frames: FrameTable
    actions: np.ndarray  # (N-1, 7) per-step action (deltas + progress)


def episode_actions(pose: np.ndarray) -> np.ndarray:
    """(N, 6) poses -> (N-1, 7) step actions: wrapped pose deltas and the progress reached."""
    n = len(pose)
    progress = (np.arange(1, n) / max(n - 1, 1))[:, None]
    return np.concatenate([pose_deltas(pose), progress], axis=1).astype(np.float32)


def _resolve_views(episodes: list[_Episode], views: list[str] | int | None) -> list[str] | None:
    if isinstance(views, int):
        return None  # per-episode: the first N of each episode's views
    if views:
        for ep in episodes:
            missing = [v for v in views if v not in ep.meta.views]
            if missing:
                raise UsageError(f"--views: episode {ep.meta.episode_id} has no view(s) {', '.join(missing)} (it has {', '.join(ep.meta.views)})")
        return list(views)
    common = [v for v in episodes[0].meta.views if all(v in ep.meta.views for ep in episodes)]
    if not common:
        raise UsageError("--views: the episodes share no camera view; name the views to use with --views")
    return common


class IntegratedDataset(Dataset):
    """Samples from the episodes under `data` (dataset dirs, episode dirs or globs)."""

    def __init__(
        self,
        data: list[str | os.PathLike] | str | os.PathLike,
        views: list[str] | int | None = None,
        horizon: int = 8,
        sensor_length: int = 650,
        sensor_channels: int | None = None,
        load_images: bool = True,
        episode_ids: list[str] | set[str] | None = None,
        load_sensor: bool = True,
    ):
        if horizon < 1 or sensor_length < 1:
            raise ValueError("horizon and sensor_length must be >= 1")
        paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        dirs = find_episode_dirs(paths)
        episodes = []
        for d in dirs:
            meta = EpisodeMeta.load(d)
            if episode_ids is not None and meta.episode_id not in episode_ids:
                continue
            frames = FrameTable.load(d)
            episodes.append(_Episode(d, meta, frames, episode_actions(frames.pose)))
        if not episodes:
            raise UsageError(f"--data {' '.join(map(str, paths))}: no episodes selected")
        self.episodes = episodes
        self.horizon, self.sensor_length, self.load_images = horizon, sensor_length, load_images
        # load_sensor=False (a policy without --sensor-enabled): items keep has_sensor but carry no
        # sensor tensors, which saves reading and moving 2.7 MB per sample
        self.load_sensor = load_sensor
        self.view_names = _resolve_views(episodes, views)
        self.num_views = views if isinstance(views, int) else len(self.view_names)
        channels = {ep.meta.sensor["channels"] for ep in episodes if ep.meta.has_sensor}
        if len(channels) > 1:
            raise UsageError(f"--data: episodes disagree on sensor channels {sorted(channels)}; ingest them alike")
        self.sensor_channels = sensor_channels or (channels.pop() if channels else SENSOR_CHANNELS)
        # the dtype windows travel in: the episodes' storage dtype (float16 unless one exceeded its range)
        stored = {ep.meta.sensor.get("dtype", "float16") for ep in episodes if ep.meta.has_sensor}
        self.sensor_dtype = np.float32 if "float32" in stored else np.float16
        self._build_index()
        self._mmaps: dict[int, np.ndarray] = {}

    def _episode_views(self, ep: _Episode) -> list[str]:
        return self.view_names if self.view_names is not None else ep.meta.views[: self.num_views]

    def _build_index(self) -> None:
        ep_idx, frame_idx, sensor = [], [], []
        self.excluded_frames = 0  # frames lacking one of the chosen views
        for e, ep in enumerate(self.episodes):
            n = len(ep.frames)
            ok = np.ones(n - 1, bool)
            for v in self._episode_views(ep):
                ok &= np.asarray([p is not None for p in ep.frames.images[v][: n - 1]])
            self.excluded_frames += int((~ok).sum())
            idx = np.nonzero(ok)[0]
            ep_idx.append(np.full(len(idx), e))
            frame_idx.append(idx)
            if ep.frames.sensor_start is not None and ep.meta.has_sensor:
                sensor.append(ep.frames.sensor_end[idx] > ep.frames.sensor_start[idx])
            else:
                sensor.append(np.zeros(len(idx), bool))
        self._ep = np.concatenate(ep_idx).astype(np.int64)
        self._frame = np.concatenate(frame_idx).astype(np.int64)
        self.sample_has_sensor = np.concatenate(sensor)
        if self.excluded_frames:
            log.info("dataset: %d frames left out because a chosen view has no image there", self.excluded_frames)

    # ------------------------------------------------------------------ introspection
    def __len__(self) -> int:
        return len(self._ep)

    @property
    def episode_ids(self) -> list[str]:
        return [ep.meta.episode_id for ep in self.episodes]

    @property
    def episode_has_sensor(self) -> list[bool]:
        return [ep.meta.has_sensor for ep in self.episodes]

    def sample_id(self, i: int) -> str:
        return f"{self.episodes[self._ep[i]].meta.episode_id}:{self._frame[i]:06d}"

    def sample_ids(self) -> list[str]:
        return [self.sample_id(i) for i in range(len(self))]

    def __getstate__(self):  # DataLoader workers re-open memory maps themselves
        state = self.__dict__.copy()
        state["_mmaps"] = {}
        return state

    # ------------------------------------------------------------------ items
    def _sensor_rows(self, e: int) -> np.ndarray:
        mm = self._mmaps.get(e)
        if mm is None:
            mm = self._mmaps[e] = np.load(self.episodes[e].dir / SENSOR_FILE, mmap_mode="r")
        return mm

    def actions(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        ep, t = self.episodes[self._ep[i]], int(self._frame[i])
        chunk = ep.actions[t : t + self.horizon]
        out = np.zeros((self.horizon, ACTION_DIM), np.float32)
        out[: len(chunk)] = chunk
        mask = np.zeros(self.horizon, bool)
        mask[: len(chunk)] = True
        return out, mask

    def sensor_window(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(window (T, C) in `sensor_dtype`, valid-row mask (T,)) of sample i, or None without a sensor.
        The memmap rows are copied straight into the window (no float32 buffer, no conversion when
        the episode is stored in the wire dtype); only the padded tail is zeroed."""
        if not self.sample_has_sensor[i]:
            return None
        e, t = int(self._ep[i]), int(self._frame[i])
        fr = self.episodes[e].frames
        start, end = int(fr.sensor_start[t]), int(fr.sensor_end[t])
        start = max(start, end - self.sensor_length)  # keep the most recent rows
        n = end - start
        out = np.empty((self.sensor_length, self.sensor_channels), self.sensor_dtype)
        out[:n] = self._sensor_rows(e)[start:end]
        out[n:] = 0
        mask = np.zeros(self.sensor_length, bool)
        mask[:n] = True
        return out, mask

    def images(self, i: int) -> list[torch.Tensor]:
        from PIL import Image

        ep, t = self.episodes[self._ep[i]], int(self._frame[i])
        out = []
        for v in self._episode_views(ep):
            p = Path(ep.frames.images[v][t])
            with Image.open(p if p.is_absolute() else ep.dir / p) as im:
                out.append(torch.from_numpy(np.array(im.convert("RGB"))))
        return out

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        ep, t = self.episodes[self._ep[i]], int(self._frame[i])
        actions, action_mask = self.actions(i)
        item = {
            "instruction": ep.meta.instruction,
            "actions": torch.from_numpy(actions),
            "action_mask": torch.from_numpy(action_mask),
            "has_sensor": bool(self.sample_has_sensor[i]),
            "state": torch.from_numpy(np.concatenate([ep.frames.pose[t], ep.frames.joints[t]]).astype(np.float32)),
            "state_mask": torch.tensor([True, ep.meta.has_joints]),
            "sample_id": self.sample_id(i),
            "episode_id": ep.meta.episode_id,
        }
        window = self.sensor_window(i) if self.load_sensor else None
        if window is not None:
            item["sensor"], item["sensor_mask"] = torch.from_numpy(window[0]), torch.from_numpy(window[1])
        if self.load_images:
            item["images"] = self.images(i)
        return item

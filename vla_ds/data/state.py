"""The robot state a policy can read (`--state-keys`) and its encoding into features.

    raw, per frame (a dataset item's "state" (12,), the layout of STATE_KEYS):
        pose   x, y, z, a, b, r     robot units and degrees
        joints j1 .. j6             degrees
    features (`state_features`), angles as sin/cos so that −179.9° and 179.9° are neighbours:
        pose   [x, y, z, sin a, cos a, sin b, cos b, sin r, cos r]        9
        joints [sin j1..j6, cos j1..j6]                                   12

`vla-ds stats` writes each key's feature statistics (`state_statistics`); the policy z-scores with
them (vla_ds/model/state.py). A key is absent where the recording has none: Layout-B episodes
recorded without joint angles (the item's "state_mask" (2,) False there, its values zero).
"""
from __future__ import annotations

import numpy as np
import torch

# The keys and their raw values per frame, in the order of a state vector.
STATE_KEYS = {"pose": 6, "joints": 6}
FEATURES = {"pose": 9, "joints": 12}  # features per key after the angle encoding
_POSITION_DIMS = 3  # pose x, y, z stay as they are; a, b, r are angles


def state_slice(key: str) -> slice:
    """Where `key`'s raw values sit in a (..., 12) state vector."""
    start = 0
    for name, dim in STATE_KEYS.items():
        if name == key:
            return slice(start, start + dim)
        start += dim
    raise KeyError(key)


def state_features(raw: torch.Tensor, key: str) -> torch.Tensor:
    """(..., dim) raw values of `key` -> (..., FEATURES[key]) features (the module docstring), fp32 (fp64 stays fp64)."""
    raw = raw.double() if raw.dtype == torch.float64 else raw.float()
    if key == "pose":
        angles = torch.deg2rad(raw[..., _POSITION_DIMS:])
        trig = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # sin a, cos a, sin b, ...
        return torch.cat([raw[..., :_POSITION_DIMS], trig], dim=-1)
    if key == "joints":
        angles = torch.deg2rad(raw)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)
    raise KeyError(key)


def state_statistics(episodes: list[tuple[np.ndarray, np.ndarray | None]]) -> tuple[dict, dict]:
    """({key: mean}, {key: std}) of the state features over the frames of `episodes`, each
    (pose (N, 6), joints (N, 6) or None when the episode has none)."""
    mean, std = {}, {}
    for i, key in enumerate(STATE_KEYS):
        parts = [state_features(torch.from_numpy(np.asarray(ep[i])), key).numpy() for ep in episodes if ep[i] is not None]
        if parts:
            x = np.concatenate(parts).astype(np.float64)
            mean[key], std[key] = x.mean(0).tolist(), x.std(0).tolist()
    return mean, std

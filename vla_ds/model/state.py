"""The robot's own state as one memory token (`--state-enabled`, `--state-keys pose,joints`).

    features (vla_ds/data/state.py: x, y, z and sin/cos of every angle) of each key read,
    z-scored per feature with the dataset's statistics (stats.json "state_mean"/"state_std"),
    zeroed where the key is absent (Layout-B episodes recorded without joint angles)
    token = MLP([features of each key read; presence flag of each key]) -> (B, 1, E), always attended

An absent key is zeros plus its presence flag, as for a missing sensor: never a silent zero reading.
The pose is in every recording.
"""
from __future__ import annotations

import torch
from torch import nn

from vla_ds.data.state import FEATURES


class StateEncoder(nn.Module):
    """[normalized features; presence flags] -> one memory token (B, 1, E)."""

    def __init__(self, keys: tuple[str, ...], width: int):
        super().__init__()
        self.keys = tuple(keys)
        in_dim = sum(FEATURES[k] for k in self.keys) + len(self.keys)
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """`features` (B, F) normalized and zero where absent, `present` (B, len(keys)) -> (B, 1, E)."""
        x = torch.cat([features, present.to(features.dtype)], dim=-1)
        return self.net(x).unsqueeze(1)

"""Normalization of actions and sensor windows with the dataset's `NormStats`, always in fp32.

The statistics are kept as plain fp32 tensors (cached per device), deliberately not as module
buffers: casting the policy to bf16 (DeepSpeed's bf16 mode does `module.bfloat16()`) would round
buffers too, and a bf16 std has 3 significant digits. They are saved as `stats.json` beside the
policy, never inside `model.safetensors`.
"""
from __future__ import annotations

import torch

from vla_ds.data.stats import NormStats


class Normalizer:
    """z-score (de)normalization of actions (per dim), sensor windows (per channel) and robot-state
    features (per feature of each key in `state_keys`)."""

    def __init__(self, stats: NormStats, action_dim: int, sensor_channels: int | None = None,
                 state_keys: tuple[str, ...] = ()):
        from vla_ds.data.state import FEATURES

        if stats.action_dim != action_dim:
            raise ValueError(f"stats: {stats.action_dim} action dims, the model predicts --action-dim {action_dim}")
        self.stats = stats
        mean, std = stats.action_arrays()
        self._cpu = {"action_mean": torch.from_numpy(mean), "action_std": torch.from_numpy(std)}
        if sensor_channels is not None:
            s_mean, s_std = stats.sensor_arrays(sensor_channels)
            self._cpu["sensor_mean"] = torch.from_numpy(s_mean)
            self._cpu["sensor_std"] = torch.from_numpy(s_std)
        for key in state_keys:
            k_mean, k_std = stats.state_arrays(key, FEATURES[key])
            self._cpu[f"state_{key}_mean"], self._cpu[f"state_{key}_std"] = torch.from_numpy(k_mean), torch.from_numpy(k_std)
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _get(self, name: str, device: torch.device) -> torch.Tensor:
        if device not in self._on:
            self._on[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return self._on[device][name]

    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        d = actions.device
        return (actions.float() - self._get("action_mean", d)) / self._get("action_std", d)

    def denormalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        d = actions.device
        return actions.float() * self._get("action_std", d) + self._get("action_mean", d)

    def normalize_sensor(self, sensor: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel, then invalid rows set to exactly zero."""
        d = sensor.device
        x = (sensor.float() - self._get("sensor_mean", d)) / self._get("sensor_std", d)
        return x.masked_fill(~valid.bool().unsqueeze(-1), 0.0)

    def normalize_state(self, features: torch.Tensor, key: str) -> torch.Tensor:
        """(B, F) features of state key `key` (vla_ds/data/state.py) -> z-scores, fp32."""
        d = features.device
        return (features.float() - self._get(f"state_{key}_mean", d)) / self._get(f"state_{key}_std", d)

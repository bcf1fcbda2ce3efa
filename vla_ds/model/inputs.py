"""`QwenVLA.predict`'s inputs checked and made into a batch: views, sensor window, robot state.

Every wrong input is a one-line `UsageError` (or `ValueError` for a malformed call) naming the
argument and what the policy expects; nothing reaches the model unchecked.
"""
from __future__ import annotations

import logging

import torch

from vla_ds.data.state import STATE_KEYS
from vla_ds.errors import UsageError

log = logging.getLogger(__name__)

BAD_SENSOR_POLICIES = ("error", "treat_as_missing")  # predict(bad_sensor=...): a window with NaN/inf


def predict_batch(policy, text_inputs: list[str], image_inputs: list[list], sensor_data, sensor_mask,
                  bad_sensor: str, state: dict | None) -> dict:
    """The batch `policy.memory` reads for `predict`'s arguments (see `QwenVLA.predict`)."""
    if bad_sensor not in BAD_SENSOR_POLICIES:
        raise UsageError(f"predict: bad_sensor={bad_sensor!r}; choose one of {', '.join(BAD_SENSOR_POLICIES)}")
    if len(text_inputs) != len(image_inputs):
        raise ValueError(f"predict: {len(text_inputs)} instructions but {len(image_inputs)} image lists")
    for b, views in enumerate(image_inputs):
        if policy.views is not None and len(views) != len(policy.views):
            raise UsageError(f"predict: sample {b} has {len(views)} view(s), the policy was trained on "
                             f"{len(policy.views)} ({', '.join(policy.views)}); give those views, in that order")
    batch = {"images": [list(v) for v in image_inputs], "instructions": list(text_inputs)}
    if sensor_data is not None:
        sensor_data = torch.as_tensor(sensor_data, dtype=torch.float32)
        if sensor_data.dim() != 3 or sensor_data.shape[0] != len(text_inputs):
            raise ValueError(f"predict: sensor_data must be (B={len(text_inputs)}, T, C), got "
                             f"{tuple(sensor_data.shape)}")
        if policy.sensor_encoder is not None and sensor_data.shape[2] != policy.config.sensor_input_channels:
            raise UsageError(f"predict: sensor_data has {sensor_data.shape[2]} channels, the policy reads "
                             f"{policy.config.sensor_input_channels} (--sensor-input-channels it was trained with)")
        mask = (torch.ones(sensor_data.shape[:2], dtype=torch.bool) if sensor_mask is None
                else torch.as_tensor(sensor_mask, dtype=torch.bool))
        # (a policy without a sensor encoder ignores the window, and its values)
        bad = (~torch.isfinite(sensor_data) & mask[..., None]).flatten(1).any(1)
        if policy.sensor_encoder is not None and bad.any():
            rows = bad.nonzero().flatten().tolist()
            if bad_sensor == "error":
                raise UsageError(f"predict: sensor_data of sample(s) {rows} holds NaN/inf; fix the window, or pass "
                                 "bad_sensor='treat_as_missing' to predict those samples without a sensor")
            sensor_data = torch.where(bad[:, None, None], 0.0, sensor_data)
            mask = mask & ~bad[:, None]
            log.warning("predict: NaN/inf in the sensor window of sample(s) %s: predicted without a sensor", rows)
        batch["sensor"] = sensor_data
        batch["sensor_mask"] = mask
    if policy.state_encoder is not None:
        batch["state"], batch["state_mask"] = state_batch(state, len(text_inputs), policy.state_encoder.keys)
    return batch


def state_batch(state: dict | None, b: int, keys: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """{"pose": (B, 6), "joints": (B, 6) | None} -> raw state (B, 12) float32 and presence (B, 2); a
    key the policy reads must be given (None: not recorded, as in its training data)."""
    if not isinstance(state, dict):
        raise UsageError(f"predict: this policy reads the robot state ({', '.join(keys)}; --state-enabled): pass "
                         "state={'pose': (B, 6), 'joints': (B, 6) or None} in robot units and degrees")
    unknown = sorted(set(state) - set(STATE_KEYS))
    if unknown:
        raise UsageError(f"predict: state has unknown key(s) {', '.join(unknown)}; the keys are {', '.join(STATE_KEYS)}")
    raw, present = torch.zeros(b, 12), torch.zeros(b, 2, dtype=torch.bool)
    start = 0
    for i, (key, dim) in enumerate(STATE_KEYS.items()):
        if key in keys and key not in state:
            raise UsageError(f"predict: state lacks {key!r}, which the policy reads; give it ({dim} values per "
                             "sample), or None where the robot does not record it")
        value = state.get(key)
        if value is not None:
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.shape != (b, dim) or not torch.isfinite(value).all():
                raise UsageError(f"predict: state[{key!r}] is {tuple(value.shape)}{' with NaN/inf' if value.shape == (b, dim) else ''}; "
                                 f"expected ({b}, {dim}) finite values")
            raw[:, start:start + dim], present[:, i] = value, True
        start += dim
    if "pose" in keys and not present[:, 0].all():
        raise UsageError("predict: state['pose'] is None; the pose is in every recording the policy trained on, give it")
    return raw, present

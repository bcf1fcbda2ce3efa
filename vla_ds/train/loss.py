"""The training objective: sensor-weighted mean of per-sample action losses.

The policy returns l_i, each sample's loss averaged over its valid (unpadded) chunk steps and
action dims, in normalized action space (MSE, or L1 with --loss l1). The batch loss is

    L = (1 / B) * sum_i w_i * l_i,     w_i = --sensor-loss-weight if sample i has a sensor reading
                                             (and --sensor-enabled), else 1

a plain mean over the B samples of the micro batch, *not* divided by the mean weight: the old
trainer divided by sum(w)/B, which cancels the weight whenever a batch holds one kind of sample
(always at batch size 1). DeepSpeed then averages over accumulation steps and ranks, so an
optimizer step minimizes the weighted mean over all micro x accum x world samples, and a sensor
sample pulls w times as hard at every batch size.
"""
from __future__ import annotations

import torch


def sample_weights(has_sensor: torch.Tensor, sensor_loss_weight: float, sensor_enabled: bool) -> torch.Tensor:
    w = torch.ones(has_sensor.shape, dtype=torch.float32, device=has_sensor.device)
    if sensor_enabled:
        w = torch.where(has_sensor.bool(), torch.full_like(w, float(sensor_loss_weight)), w)
    return w


def weighted_loss(per_sample_loss: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(1/B) * sum_i w_i * l_i."""
    return (per_sample_loss * weights.to(per_sample_loss.dtype)).mean()

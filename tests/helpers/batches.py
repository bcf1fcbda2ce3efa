"""Batches in the data package's collate format, made up or drawn from a dataset."""
from __future__ import annotations

from pathlib import Path

import torch

from vla_ds.data.synthetic import synthetic_view

# Sensor windows of the in-process policy tests are (64, 1 + 16) unless a test is about the real
# (650, 1026) shape: the code paths are the same and the tests stay fast.
SENSOR_T, SENSOR_C = 64, 17


def batch_of(b: int, has_sensor=None, seed: int = 0, views=2, t: int = SENSOR_T, c: int = SENSOR_C) -> dict:
    """A made-up batch (raw actions, raw sensor; samples without a sensor are zeros, masked out)."""
    g = torch.Generator().manual_seed(seed)
    has = torch.tensor([i % 2 == 0 for i in range(b)] if has_sensor is None else has_sensor, dtype=torch.bool)
    views = [views] * b if isinstance(views, int) else list(views)
    sensor = torch.randn(b, t, c, generator=g) * 3 + 1
    sensor_mask = torch.ones(b, t, dtype=torch.bool)
    sensor[~has] = 0
    sensor_mask[~has] = False
    return {
        "images": [[synthetic_view(seed * 100 + 10 * i + v) for v in range(views[i])] for i in range(b)],
        "instructions": [["Insert the needle slowly.", "Retract the needle carefully.", "Advance the needle."][i % 3]
                         for i in range(b)],
        "actions": torch.randn(b, 8, 7, generator=g),
        "action_mask": torch.ones(b, 8, dtype=torch.bool),
        "sensor": sensor,
        "sensor_mask": sensor_mask,
        "has_sensor": has,
        "sample_ids": [f"s{seed}-{i}" for i in range(b)],
    }


def sample_batch(data: str | Path, n: int = 4):
    """(instructions, images, sensor, sensor_mask) of n samples of `data`, with and without sensor."""
    from vla_ds.data.batch import dense_sensor
    from vla_ds.data.dataset import IntegratedDataset

    ds = IntegratedDataset(data)
    with_sensor = [i for i in range(len(ds)) if ds.sample_has_sensor[i]]
    without = [i for i in range(len(ds)) if not ds.sample_has_sensor[i]]
    idx = with_sensor[: n // 2] + without[: n - n // 2]
    items = [ds[i] for i in idx]
    return ([it["instruction"] for it in items], [it["images"] for it in items],
            *dense_sensor(items, ds.sensor_length, ds.sensor_channels))

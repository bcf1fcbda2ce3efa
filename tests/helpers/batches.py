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
    state = torch.cat([torch.randn(b, 3, generator=g) * 20, torch.rand(b, 9, generator=g) * 360 - 180], dim=1)
    state_mask = torch.tensor([[True, i % 2 == 0] for i in range(b)])  # odd samples: no joints recorded
    state[:, 6:][~state_mask[:, 1]] = 0
    return {
        "images": [[synthetic_view(seed * 100 + 10 * i + v) for v in range(views[i])] for i in range(b)],
        "instructions": [["Insert the needle slowly.", "Retract the needle carefully.", "Advance the needle."][i % 3]
                         for i in range(b)],
        "actions": torch.randn(b, 8, 7, generator=g),
        "action_mask": torch.ones(b, 8, dtype=torch.bool),
        "sensor": sensor,
        "sensor_mask": sensor_mask,
        "has_sensor": has,
        "state": state,
        "state_mask": state_mask,
        "sample_ids": [f"s{seed}-{i}" for i in range(b)],
    }


def _items(data: str | Path, n: int):
    from vla_ds.data.dataset import IntegratedDataset

    ds = IntegratedDataset(data)
    with_sensor = [i for i in range(len(ds)) if ds.sample_has_sensor[i]]
    without = [i for i in range(len(ds)) if not ds.sample_has_sensor[i]]
    return ds, [ds[i] for i in with_sensor[: n // 2] + without[: n - n // 2]]


def sample_batch(data: str | Path, n: int = 4):
    """(instructions, images, sensor, sensor_mask) of n samples of `data`, with and without sensor."""
    from vla_ds.data.batch import dense_sensor

    ds, items = _items(data, n)
    return ([it["instruction"] for it in items], [it["images"] for it in items],
            *dense_sensor(items, ds.sensor_length, ds.sensor_channels))


def sample_state(data: str | Path, n: int = 4) -> dict:
    """`predict`'s state={"pose", "joints"} of the samples `sample_batch` picks."""
    _, items = _items(data, n)
    return {"pose": torch.stack([it["state"][:6] for it in items]), "joints": torch.stack([it["state"][6:] for it in items])}

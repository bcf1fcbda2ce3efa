"""Observations made with numpy alone (no torch, no vla_ds.data): what a robot process can build."""
from __future__ import annotations

import numpy as np

VIEWS = ["view1", "view5"]
SENSOR_C = 17  # tests.helpers.batches.SENSOR_C, without importing torch


def plain_observation(seed: int, sensor_rows: int = 40) -> dict:
    rng = np.random.default_rng(seed)
    return {"instruction": "Insert the needle.",
            "images": [rng.integers(0, 256, (60, 80, 3), dtype=np.uint8) for _ in VIEWS],
            "sensor": rng.normal(size=(sensor_rows, SENSOR_C)).astype(np.float32),
            "state": {"pose": rng.uniform(-5, 5, 6).astype(np.float32), "joints": None}}

"""Fixtures for the policy tests: small head sizes on the tiny backbone, synthetic batches.

Sensor windows here are (64, 1 + 16) unless a test is about the real (650, 1026) shape: the code
paths are the same and the tests stay fast.
"""
from __future__ import annotations

import logging

import pytest
import torch

from vla_ds.demo import synthetic_view
from vla_ds.model.config import ModelConfig

SENSOR_T, SENSOR_C = 64, 17


class _DropFloat16CastWarning(logging.Filter):
    # bitsandbytes logs this on every 8-bit matmul with fp32 inputs (CPU); it is expected there.
    def filter(self, record):
        return "to float16 during quantization" not in record.getMessage()


@pytest.fixture(autouse=True, scope="session")
def _quiet_bitsandbytes():
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    f = _DropFloat16CastWarning()
    logger.addFilter(f)
    yield
    logger.removeFilter(f)




@pytest.fixture
def small_config(tiny_model_dir):
    """`small_config(**overrides)` -> a ModelConfig on the tiny backbone with small, dropout-free heads."""

    def make(**overrides) -> ModelConfig:
        fields = dict(
            backbone=str(tiny_model_dir), finetune_vl="none", sensor_enabled=True,
            sensor_input_channels=SENSOR_C, sensor_temporal_length=SENSOR_T, sensor_hidden_dim=32,
            sensor_output_dim=48, sensor_conv_blocks=2, sensor_num_layers=1, sensor_num_heads=4,
            expert_hidden_dim=32, expert_num_layers=2, expert_num_heads=4, head_dropout=0.0,
            lora_r=4, lora_alpha=8, lora_dropout=0.0,
        )
        fields.update(overrides)
        return ModelConfig(**fields)

    return make


def batch_of(b: int, has_sensor=None, seed: int = 0, views=2, t: int = SENSOR_T, c: int = SENSOR_C) -> dict:
    """A batch in the data package's collate format (raw actions, raw sensor)."""
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


@pytest.fixture
def make_batch():
    """`make_batch(b, has_sensor=None, seed=0, views=2)`: see `batch_of`."""
    return batch_of

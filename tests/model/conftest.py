"""Fixtures for the policy tests: small head sizes on the tiny backbone, synthetic batches
(tests/helpers/batches.py: sensor windows of (64, 1 + 16) unless a test is about the real shape)."""
from __future__ import annotations

import logging

import pytest

from tests.helpers.batches import SENSOR_C, SENSOR_T, batch_of
from vla_ds.model.config import ModelConfig


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


@pytest.fixture
def make_batch():
    """`make_batch(b, has_sensor=None, seed=0, views=2)`: see `batch_of`."""
    return batch_of

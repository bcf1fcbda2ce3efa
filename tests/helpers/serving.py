"""Serving test helpers: a tiny policy with a sensor, the robot state and two views; valid
observations; and `predict` called the way the server lays an observation out (tests/serve and
tests/benchmarks/bench_serve.py)."""
from __future__ import annotations

import io

import numpy as np
import torch

from tests.helpers.batches import SENSOR_C, SENSOR_T
from vla_ds.data.stats import NormStats
from vla_ds.data.synthetic import synthetic_view

VIEWS = ["view1", "view5"]


def stats() -> NormStats:
    base = NormStats.identity(7, SENSOR_C)
    return NormStats([0.1 * i for i in range(7)], [1.0 + 0.5 * i for i in range(7)], [-3.0] * 7, [3.0] * 7,
                     [0.2] * SENSOR_C, [2.0] * SENSOR_C, base.state_mean, base.state_std)


def make_policy(tiny_model_dir, **overrides):
    from vla_ds.model.config import ModelConfig
    from vla_ds.model.policy import QwenVLA

    fields = dict(backbone=str(tiny_model_dir), finetune_vl="none", sensor_enabled=True, sensor_input_channels=SENSOR_C,
                  sensor_temporal_length=SENSOR_T, sensor_hidden_dim=32, sensor_output_dim=48, sensor_conv_blocks=2,
                  sensor_num_layers=1, sensor_num_heads=4, expert_hidden_dim=32, expert_num_layers=2,
                  expert_num_heads=4, head_dropout=0.0, state_enabled=True, dtype="float32")
    fields.update(overrides)
    torch.manual_seed(0)
    policy = QwenVLA(ModelConfig(**fields), stats=stats(), device="cpu", views=VIEWS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the heads off their init, so that every input matters
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return policy.eval()


def jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def observation(seed: int, *, sensor_rows: int | None = SENSOR_T, joints: bool = True, as_jpeg: bool = False) -> dict:
    """A valid observation; `sensor_rows` None: no sensor."""
    rng = np.random.default_rng(seed)
    views = [np.asarray(synthetic_view(seed * 2 + v).convert("RGB")) for v in range(len(VIEWS))]
    obs = {"instruction": f"Insert the needle, attempt {seed}.",
           "images": [jpeg(v) for v in views] if as_jpeg else views,
           "state": {"pose": rng.uniform(-5, 5, 6).astype(np.float32),
                     "joints": rng.uniform(-90, 90, 6).astype(np.float32) if joints else None},
           "seed": seed}
    if sensor_rows is not None:
        obs["sensor"] = rng.normal(size=(sensor_rows, SENSOR_C)).astype(np.float32)
    return obs


def predict_like_the_server(policy, obs: dict) -> np.ndarray:
    """`policy.predict` of one observation as the server lays it out: JPEGs decoded, the window's most
    recent rows first then zero padding (the dataset's layout), the robot state as (1, 6) rows."""
    from vla_ds.serve.server import decode_image, window_rows

    images = [decode_image(v, "image") for v in obs["images"]]
    sensor = mask = None
    if obs.get("sensor") is not None:
        w, m = window_rows(obs["sensor"], policy.config.sensor_temporal_length)
        sensor, mask = torch.from_numpy(w[None]), torch.from_numpy(m[None])
    state = {"pose": obs["state"]["pose"][None],
             "joints": None if obs["state"]["joints"] is None else obs["state"]["joints"][None]}
    return policy.predict([obs["instruction"]], [images], sensor_data=sensor, sensor_mask=mask, state=state,
                          seed=obs.get("seed", 0))[0].numpy()

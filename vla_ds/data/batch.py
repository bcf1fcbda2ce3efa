"""The batch format: `collate` (what the DataLoader hands the trainer) and the two sensor forms.

A batch is a dict: `actions` (B, H, 7), `action_mask` (B, H), `has_sensor` (B,), `state` (B, 12) and
`state_mask` (B, 2) (the robot state, vla_ds/data/state.py), `instructions`,
`sample_ids`, `episode_ids`, and `images` (live mode) or `vl_pooled` / `vl_tokens` (cache mode).
The sensor is sparse: `sensor` (n, T, C) and `sensor_mask` (n, T) hold the windows of the n
samples that have one, in batch order, and `sensor_rows` (n,) their positions in the batch; a batch
where no sample has one carries no sensor keys at all (94.5 % of our users' samples have none).
`packed_sensor` reads either that or a dense (B, T, C) window; `dense_sensor` makes the dense form
`QwenVLA.predict` takes.

Crossing from a DataLoader worker, every tensor is moved through its own shared-memory segment
(a file descriptor sent over a socket): for the small per-sample tensors that costs more than the
data, and it halved the 2-worker loader's rate. A `Batch` pickles tensors under 64 KB by value and
the large ones (the sensor windows, cached VL tokens) through shared memory as before; it
unpickles to the same dict of tensors.
"""
from __future__ import annotations

import numpy as np
import torch

SMALL_BYTES = 64 << 10


class Batch(dict):
    """A collated batch; a plain dict of tensors and lists, but cheaper to send between processes."""

    def __reduce__(self):
        by_value = {k: v.numpy() for k, v in self.items() if _by_value(v)}
        return _rebuild, ({**self, **by_value}, sorted(by_value))

    def __copy__(self) -> Batch:
        return Batch(self)

    def pin_memory(self, device=None) -> Batch:
        """The DataLoader's pin_memory (CUDA): page-locks the tensors that go to the device; the
        images stay as they are (they go to the processor, on the CPU)."""
        return Batch({k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _by_value(v) -> bool:
    return (isinstance(v, torch.Tensor) and v.device.type == "cpu" and not v.requires_grad
            and v.dtype != torch.bfloat16 and v.numel() * v.element_size() < SMALL_BYTES)


def _rebuild(items: dict, by_value: list[str]) -> Batch:
    return Batch({**items, **{k: torch.from_numpy(np.asarray(items[k])) for k in by_value}})


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One tensor of `tensors`: a large one through `default_collate` (in a worker it stacks straight
    into shared memory), a small one in ordinary memory (it is sent by value)."""
    from torch.utils.data import default_collate

    large = sum(t.numel() * t.element_size() for t in tensors) >= SMALL_BYTES
    return default_collate(tensors) if large else torch.stack(tensors)


def _images(samples: list[dict]) -> list[list]:
    """Each sample's views. When every view of the batch is an (H, W, 3) tensor of one size (the usual
    case: the cameras re-encoded at one --max-side), they are stacked into one tensor -- in a worker,
    one shared-memory segment instead of one per view (+15 to +50 % samples/s at 2 views, 448 px) --
    and each sample gets views of it."""
    from torch.utils.data import default_collate, get_worker_info

    views = [s["images"] for s in samples]
    flat = [im for v in views for im in v]
    if (get_worker_info() is None or not flat or not all(isinstance(im, torch.Tensor) for im in flat)
            or len({im.shape for im in flat}) > 1):
        return views  # (in the main process a stack would be one more copy of every frame, for nothing)
    stacked = iter(default_collate(flat).unbind(0))
    return [[next(stacked) for _ in v] for v in views]


def collate(samples: list[dict]) -> Batch:
    """Batch samples of any mix of sensor / no-sensor; any batch size (the module docstring).

    The windows go through `default_collate`, which in a DataLoader worker stacks straight into
    shared memory, so they cross to the main process without extra copies (a plain torch.stack
    made the 2-worker loader ~5x slower); the small tensors are stacked in ordinary memory and
    sent by value (`Batch`)."""
    batch = Batch({k: _stack([s[k] for s in samples]) for k in ("actions", "action_mask", "state", "state_mask")
                   if k in samples[0]})
    sensed = [i for i, s in enumerate(samples) if "sensor" in s]
    if sensed:
        batch["sensor"] = _stack([samples[i]["sensor"] for i in sensed])
        batch["sensor_mask"] = _stack([samples[i]["sensor_mask"] for i in sensed])
        batch["sensor_rows"] = torch.tensor(sensed, dtype=torch.int64)
    batch.update({
        "instructions": [s["instruction"] for s in samples],
        "has_sensor": torch.tensor([bool(s["has_sensor"]) for s in samples]),
        "sample_ids": [s["sample_id"] for s in samples],
        "episode_ids": [s["episode_id"] for s in samples],
    })
    if "images" in samples[0]:
        batch["images"] = _images(samples)
    for key in ("vl_pooled", "vl_tokens", "vl_tokens_mask"):  # VL cache features (cache mode)
        if key in samples[0]:
            batch[key] = _stack([s[key] for s in samples])
    return batch


def packed_sensor(batch: dict, batch_size: int, length: int, channels: int):
    """(windows (n, T, C), valid rows (n, T), batch positions (n,)) of the batch's sensed samples.

    The collate format passes as it is; a dense `sensor` (B, T, C) (e.g. `predict`'s, or a hand-made
    batch) keeps the samples that `has_sensor` (else a valid row) marks; no `sensor` key: n = 0."""
    if "sensor" not in batch:
        return torch.zeros(0, length, channels), torch.zeros(0, length, dtype=torch.bool), torch.zeros(0, dtype=torch.int64)
    sensor = batch["sensor"]
    valid = batch.get("sensor_mask")
    valid = torch.ones(sensor.shape[:2], dtype=torch.bool) if valid is None else valid.bool()
    if "sensor_rows" in batch:
        rows = batch["sensor_rows"].to(torch.int64)
        if len(rows) != len(sensor) or len(set(rows.tolist())) != len(rows) or (
                len(rows) and (rows.min() < 0 or rows.max() >= batch_size)):
            raise ValueError(f"batch sensor_rows {rows.tolist()} do not index {len(sensor)} windows of a batch of "
                             f"{batch_size} (one distinct position each)")
        return sensor, valid, rows
    if sensor.shape[0] != batch_size:
        raise ValueError(f"batch sensor has {sensor.shape[0]} samples, the batch has {batch_size}")
    has = batch.get("has_sensor")
    has = valid.cpu().any(dim=1) if has is None else has.cpu().bool()
    rows = has.nonzero().flatten()
    if bool(has.all()):
        return sensor, valid, rows
    return sensor[rows.to(sensor.device)], valid[rows.to(valid.device)], rows


def dense_sensor(items: list[dict], length: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The items' windows as one float32 (B, T, C) tensor and (B, T) mask, zeros and False for an item
    without one: the dense form `QwenVLA.predict` takes."""
    sensor = torch.zeros(len(items), length, channels)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for i, item in enumerate(items):
        if "sensor" in item:
            sensor[i], mask[i] = item["sensor"].float(), item["sensor_mask"]
    return sensor, mask

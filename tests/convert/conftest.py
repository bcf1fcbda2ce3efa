"""Real DeepSpeed checkpoints to convert: ZeRO-2 and ZeRO-3 runs of 2 CPU processes (LoRA + sensor)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.conftest import SMALL, run_training, train_data  # noqa: F401  (train_data: a fixture)


def train_run(root: Path, data: Path, backbone: Path, stage: int, *extra: str) -> Path:
    """2 optimizer steps, one checkpoint at step 2. A large --vl-lr moves the LoRA adapters well away
    from their zero init in two steps, so a merge that forgot them would show."""
    out = root / f"zero{stage}"
    run_training(["--data", str(data), "--backbone", str(backbone), "--output-dir", str(out), "--batch-size", "2",
                  "--grad-accum-steps", "1", "--log-every", "1", "--val-ratio", "0", "--max-steps", "2",
                  "--save-every", "2", "--sensor-enabled", "--finetune-vl", "lora", "--lr", "2e-3",
                  "--sensor-lr", "2e-3", "--vl-lr", "5e-2", "--ds-config", f"ds_configs/zero{stage}.json", *SMALL,
                  *extra])
    return out


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory, train_data, tiny_model_dir) -> Path:  # noqa: F811
    return train_run(tmp_path_factory.mktemp("convert_runs"), train_data, tiny_model_dir, 2)


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, train_data, tiny_model_dir) -> Path:  # noqa: F811
    return train_run(tmp_path_factory.mktemp("convert_runs"), train_data, tiny_model_dir, 3)




def sample_batch(data: str | Path, n: int = 4):
    """(instructions, images, sensor, sensor_mask) of n samples of `data`, with and without sensor."""
    from vla_ds.data.dataset import IntegratedDataset

    ds = IntegratedDataset(data)
    with_sensor = [i for i in range(len(ds)) if ds.sample_has_sensor[i]]
    without = [i for i in range(len(ds)) if not ds.sample_has_sensor[i]]
    idx = with_sensor[: n // 2] + without[: n - n // 2]
    items = [ds[i] for i in idx]
    return ([it["instruction"] for it in items], [it["images"] for it in items],
            torch.stack([it["sensor"] for it in items]), torch.stack([it["sensor_mask"] for it in items]))

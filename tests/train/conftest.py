"""A small learnable dataset and a helper that runs real DeepSpeed training in subprocesses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Small head sizes: the point of these tests is the training machinery, not the model's capacity.
SMALL = [
    "--sensor-hidden-dim", "32", "--sensor-output-dim", "32", "--sensor-num-heads", "2",
    "--sensor-conv-blocks", "3", "--expert-hidden-dim", "32", "--expert-num-heads", "2", "--expert-num-layers", "2",
    "--num-workers", "0", "--wandb-mode", "disabled",
]


from vla_ds.utils.dist import free_port  # noqa: E402,F401  (re-exported for the tests here)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """2 raw sessions with sensor (1 s and 0.5 s frames) + 2 frame-list sessions without: ~28 samples."""
    from vla_ds.data import synthetic
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.stats import compute_stats

    root = tmp_path_factory.mktemp("train_data")
    raw = root / "raw"
    synthetic.make_session_a(raw / "needle_insertion", seed=0, duration_s=5.0, frame_spacing_s=1.0, image_size=(48, 64))
    synthetic.make_session_a(raw / "needle_insertion", seed=1, duration_s=4.0, frame_spacing_s=0.5, image_size=(48, 64))
    for k in range(2):
        synthetic.make_session_b(raw / "retina_approach", seed=10 + k, duration_s=4.0, image_size=(48, 64))
    ds = root / "dataset"
    preprocess([str(raw)], ds, IngestOptions(max_side=64))
    compute_stats([ds]).save(ds)
    return ds


@pytest.fixture(scope="session")
def learn_data(tmp_path_factory) -> Path:
    """A learnable task: 5 samples (2 with sensor) that a small head can fit in a few dozen steps."""
    from vla_ds.data import synthetic
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.stats import compute_stats

    root = tmp_path_factory.mktemp("learn_data")
    synthetic.make_session_a(root / "raw" / "needle_insertion", seed=3, duration_s=2.0, frame_spacing_s=1.0,
                             image_size=(48, 64))
    synthetic.make_session_b(root / "raw" / "retina_approach", seed=4, duration_s=1.5, image_size=(48, 64))
    ds = root / "dataset"
    preprocess([str(root / "raw")], ds, IngestOptions(max_side=64))
    compute_stats([ds]).save(ds)
    return ds


def run_training(args: list[str], nproc: int = 2, timeout: int = 420, expect_ok: bool = True, env: dict | None = None):
    """`torchrun --nproc_per_node N -m vla_ds.train --mode train ARGS`; returns (proc, metrics rows)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "vla_ds.train", "--mode", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out_dir = Path(args[args.index("--output-dir") + 1])
    path = out_dir / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    return proc, rows


def losses(rows: list[dict]) -> list[float]:
    return [r["train/loss_step"] for r in rows if "train/loss_step" in r]

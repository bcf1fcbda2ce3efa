"""A small synthetic dataset, configs on the tiny backbone, and reference caches built once.

16 samples (2 raw sessions with sensor, 1 frame-list session without), views View1 + View5, shards
of 4 samples, batches of 3 (so batches straddle nothing and shards end with a short batch).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARD_SIZE, BATCH, TOKENS = 4, 3, 5


from vla_ds.utils.dist import free_port  # noqa: E402,F401  (re-exported for the tests here)


@pytest.fixture(scope="session")
def cache_data(tmp_path_factory) -> Path:
    from vla_ds.data import synthetic
    from vla_ds.data.ingest import IngestOptions, preprocess

    root = tmp_path_factory.mktemp("cache_data")
    raw = root / "raw"
    synthetic.make_session_a(raw / "needle_insertion", seed=0, duration_s=4.0, frame_spacing_s=1.0, image_size=(48, 64))
    synthetic.make_session_a(raw / "needle_insertion", seed=1, duration_s=3.0, frame_spacing_s=0.5, image_size=(48, 64))
    synthetic.make_session_b(raw / "retina_approach", seed=10, duration_s=3.0, image_size=(48, 64))
    preprocess([str(raw)], root / "dataset", IngestOptions(max_side=64))
    return root / "dataset"


def make_cfg(tiny_backbone, dataset, cache_dir, **flat):
    """A TrainConfig from flat field names (like the flags), on the tiny backbone, frozen, with
    --vl-tokens TOKENS (the reference caches' K) unless given."""
    from vla_ds.config import TrainConfig

    values = dict(backbone=str(tiny_backbone), finetune_vl="none", data=[str(dataset)], batch_size=BATCH, num_workers=0,
                  cache_dir=str(cache_dir), head_dropout=0.0, vl_tokens=TOKENS)
    values.update(flat)
    return TrainConfig.from_flat(values)


@pytest.fixture
def cfg_for(tiny_model_dir, cache_data):
    """`cfg_for(cache_dir, **flags)` -> TrainConfig."""
    return lambda cache_dir, **flat: make_cfg(tiny_model_dir, cache_data, cache_dir, **flat)


@pytest.fixture
def one_thread():
    """Single-threaded torch (as under torchrun), so in-process builds compute bit-identically to
    the subprocess builds they are compared with."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build_reference(tmp_path_factory, tiny_model_dir, cache_data, name: str, dtype: str,
                     tokens: int = TOKENS) -> Path:
    from vla_ds.cache import build_cache

    cache_dir = tmp_path_factory.mktemp(name) / "cache"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cache(make_cfg(tiny_model_dir, cache_data, cache_dir, vl_tokens=tokens), shard_size=SHARD_SIZE,
                    cache_dtype=dtype)
    finally:
        torch.set_num_threads(n)
    return cache_dir


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory, tiny_model_dir, cache_data) -> Path:
    """Uninterrupted 1-process build, float16, K=5 tokens. Read-only: copy it to modify it."""
    return _build_reference(tmp_path_factory, tiny_model_dir, cache_data, "ref16", "float16")


@pytest.fixture(scope="session")
def ref_cache32(tmp_path_factory, tiny_model_dir, cache_data) -> Path:
    """The same in float32 (for exact comparisons with live features). Read-only."""
    return _build_reference(tmp_path_factory, tiny_model_dir, cache_data, "ref32", "float32")


@pytest.fixture(scope="session")
def ref_cache32_pooled(tmp_path_factory, tiny_model_dir, cache_data) -> Path:
    """float32, K=0 (pooled vector only). Read-only."""
    return _build_reference(tmp_path_factory, tiny_model_dir, cache_data, "ref32p", "float32", tokens=0)


@pytest.fixture
def copy_cache(tmp_path):
    def copy(src: Path) -> Path:
        dst = tmp_path / "cache_copy"
        shutil.copytree(src, dst)
        return dst

    return copy


def run_cache_cli(args: list[str], nproc: int = 0, env: dict | None = None, timeout: int = 180):
    """`python -m vla_ds.cache ARGS` in a subprocess (under torchrun with nproc > 0)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **(env or {}))
    launcher = (["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
                if nproc else [])
    cmd = [sys.executable, *launcher, "-m", "vla_ds.cache", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)


def cli_args(backbone, data, cache_dir, *extra) -> list[str]:
    return ["--data", str(data), "--backbone", str(backbone), "--finetune-vl", "none", "--cache-dir", str(cache_dir),
            "--batch-size", str(BATCH), "--num-workers", "0", "--shard-size", str(SHARD_SIZE),
            "--vl-tokens", str(TOKENS), *extra]

"""The VL-cache tests' settings: 16 samples, views View1 + View5, shards of 4 samples, batches of 3
(so batches straddle nothing and shards end with a short batch), K = 5 tokens."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.runs import run_module

SHARD_SIZE, BATCH, TOKENS = 4, 3, 5


def make_cfg(tiny_backbone, dataset, cache_dir, **flat):
    """A TrainConfig from flat field names (like the flags), on the tiny backbone, frozen, with
    --vl-tokens TOKENS (the reference caches' K) unless given."""
    from vla_ds.config import TrainConfig

    values = dict(backbone=str(tiny_backbone), finetune_vl="none", data=[str(dataset)], batch_size=BATCH, num_workers=0,
                  cache_dir=str(cache_dir), head_dropout=0.0, vl_tokens=TOKENS)
    values.update(flat)
    return TrainConfig.from_flat(values)


def build_reference(root: Path, tiny_model_dir, cache_data, dtype: str, tokens: int = TOKENS) -> Path:
    """An uninterrupted 1-process build, single-threaded (as under torchrun, so that it is
    bit-identical to the subprocess builds it is compared with)."""
    from vla_ds.cache import build_cache

    cache_dir = root / "cache"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build_cache(make_cfg(tiny_model_dir, cache_data, cache_dir, vl_tokens=tokens), shard_size=SHARD_SIZE,
                    cache_dtype=dtype)
    finally:
        torch.set_num_threads(n)
    return cache_dir


def run_cache_cli(args: list[str], nproc: int = 0, env: dict | None = None, timeout: int = 180):
    """`python -m vla_ds.cache ARGS` in a subprocess (under torchrun with nproc > 0)."""
    return run_module("vla_ds.cache", args, nproc=nproc, env=env, timeout=timeout)


def cli_args(backbone, data, cache_dir, *extra) -> list[str]:
    return ["--data", str(data), "--backbone", str(backbone), "--finetune-vl", "none", "--cache-dir", str(cache_dir),
            "--batch-size", str(BATCH), "--num-workers", "0", "--shard-size", str(SHARD_SIZE),
            "--vl-tokens", str(TOKENS), *extra]

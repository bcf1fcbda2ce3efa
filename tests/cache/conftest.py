"""The VL-cache tests' dataset and reference caches, built once (settings: tests/helpers/cache.py)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers.cache import build_reference, make_cfg
from tests.helpers.datasets import CACHE, make_dataset


@pytest.fixture(scope="session")
def cache_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("cache_data"), CACHE, stats=False)


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


@pytest.fixture(scope="session")
def ref_cache(tmp_path_factory, tiny_model_dir, cache_data) -> Path:
    """Uninterrupted 1-process build, float16, K=5 tokens. Read-only: copy it to modify it."""
    return build_reference(tmp_path_factory.mktemp("ref16"), tiny_model_dir, cache_data, "float16")


@pytest.fixture(scope="session")
def ref_cache32(tmp_path_factory, tiny_model_dir, cache_data) -> Path:
    """The same in float32 (for exact comparisons with live features). Read-only."""
    return build_reference(tmp_path_factory.mktemp("ref32"), tiny_model_dir, cache_data, "float32")


@pytest.fixture(scope="session")
def ref_cache32_pooled(tmp_path_factory, tiny_model_dir, cache_data) -> Path:
    """float32, K=0 (pooled vector only). Read-only."""
    return build_reference(tmp_path_factory.mktemp("ref32p"), tiny_model_dir, cache_data, "float32", tokens=0)


@pytest.fixture
def copy_cache(tmp_path):
    def copy(src: Path) -> Path:
        dst = tmp_path / "cache_copy"
        shutil.copytree(src, dst)
        return dst

    return copy

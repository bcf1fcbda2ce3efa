"""Shared fixtures: one tiny Qwen2.5-VL directory per test session, quiet and offline settings."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[1]

# Offline and quiet for every test, and one JIT-extension cache per machine so DeepSpeed's ops
# compile once per CI run, not once per test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(_REPO / ".cache" / "torch_extensions"))


def pytest_configure(config):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Directories whose tests run tiny models in-process: their ops are far too small to gain from a
# second OpenMP thread, and on a shared 2-core machine every barrier waits for a descheduled
# thread (tests/model: 23 s with one thread vs 68 s with two, under load).
ONE_THREAD_DIRS = {"model", "convert"}


@pytest.fixture(autouse=True)
def _one_intra_op_thread(request):
    import torch

    if request.node.path.parent.name not in ONE_THREAD_DIRS:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return _REPO


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL model directory (seed 0), written once per session. Read-only."""
    from vla_ds.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("backbone") / "tiny-qwen2.5-vl", seed=0)

"""Session-wide fixtures, each built once and shared read-only by every test directory: the tiny
Qwen2.5-VL, the synthetic datasets, and the expensive real runs (multi-process DeepSpeed trainings
with their checkpoints). Helpers live in tests/helpers/; a test that must modify a shared artefact
copies it first."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from vla_ds.utils.jit import use_extensions_dir

_REPO = Path(__file__).resolve().parents[1]

# Offline and quiet for every test, and one JIT-extension cache per environment so DeepSpeed's ops
# compile once per CI run, not once per test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
use_extensions_dir()  # the user's TORCH_EXTENSIONS_DIR, else this venv's: the ops launch/setup.sh built
# One ninja for every JIT build, this interpreter's (pip's ninja, a deepspeed dependency), whatever
# the caller's PATH: ninja 1.11 (Debian) and 1.13 (pip) hash commands differently, so each switch
# between them rebuilt every DeepSpeed op (measured: +120 s in the launcher test, +150 s in profile).
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


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


@pytest.fixture
def in_process_group():
    """For a test that runs a collective entry point inside pytest as a group of one
    (tests/helpers/runs.py: group_of_one)."""
    from tests.helpers.runs import group_of_one

    with group_of_one():
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return _REPO


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL model directory (seed 0), written once per session. Read-only."""
    from vla_ds.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("backbone") / "tiny-qwen2.5-vl", seed=0)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """2 raw sessions with sensor + 2 frame-list sessions without: ~28 samples."""
    from tests.helpers.datasets import TRAIN, make_dataset

    return make_dataset(tmp_path_factory.mktemp("train_data"), TRAIN)


@pytest.fixture(scope="session")
def learn_data(tmp_path_factory) -> Path:
    """A learnable task: 5 samples (2 with sensor) that a small head fits in a few dozen steps."""
    from tests.helpers.datasets import LEARN, make_dataset

    return make_dataset(tmp_path_factory.mktemp("learn_data"), LEARN)


@pytest.fixture(scope="session")
def learn_data_x4(tmp_path_factory) -> Path:
    """The same task, each episode 4 times over: 20 samples, 5 distinct; an epoch (and so an
    epoch-end checkpoint) every 5 optimizer steps at 2 processes x micro-batch 2, not every step."""
    from tests.helpers.datasets import LEARN, make_dataset

    return make_dataset(tmp_path_factory.mktemp("learn_data_x4"), LEARN, repeat=4)


@pytest.fixture(scope="session")
def shared(request, tmp_path_factory):
    """The 2-process trainings of every selected module that defines `shared_runs`, in one launch
    (tests/helpers/shared.py)."""
    from tests.helpers.shared import launch_shared

    return launch_shared(request, tmp_path_factory)


@pytest.fixture(scope="session")
def zero2_run(tmp_path_factory, train_data, tiny_model_dir) -> Path:
    """A finished ZeRO-2 run (tests/helpers/runs.py `lora_run`): RUN/checkpoints/step_000002 = latest = final. Read-only."""
    from tests.helpers.runs import lora_run

    return lora_run(tmp_path_factory.mktemp("lora_runs"), train_data, tiny_model_dir, 2)


@pytest.fixture(scope="session")
def zero3_run(tmp_path_factory, train_data, tiny_model_dir) -> Path:
    """The same under ZeRO-3, with --action-head flow and --state-enabled. Read-only."""
    from tests.helpers.runs import lora_run

    return lora_run(tmp_path_factory.mktemp("lora_runs"), train_data, tiny_model_dir, 3)

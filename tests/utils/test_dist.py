import os

import pytest

from tests.helpers.runs import LAUNCHER_VARS, group_of_one
from vla_ds.utils.dist import init_distributed, rank_world


@pytest.mark.parametrize("given", [{}, {"RANK": "0"}, {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}])
def test_an_unlaunched_process_is_a_group_of_one(in_process_group, monkeypatch, given):
    """However few of the launcher variables a plain process has (a scheduler may set RANK alone),
    the rest are filled in: DeepSpeed would otherwise try MPI discovery and fail on mpi4py."""
    import torch.distributed as dist

    for name, value in given.items():
        monkeypatch.setenv(name, value)
    assert init_distributed() == (0, 1, 0)
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    assert all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def test_group_of_one_leaves_no_launcher_variables_behind(monkeypatch):
    """What in_process_group stands on: a later subprocess (a plain `vla-ds train`) inherits
    os.environ, and a RANK left there sent it to MPI discovery. What was set before comes back."""
    import torch.distributed as dist

    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_PORT", "12345")
    with group_of_one():
        assert os.environ["MASTER_PORT"] != "12345"  # a free port of its own
        assert init_distributed() == (0, 1, 0)
    assert {name: os.environ.get(name) for name in LAUNCHER_VARS} == {
        "RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "MASTER_ADDR": None, "MASTER_PORT": "12345"}
    assert not dist.is_initialized() and rank_world() == (0, 1, 0)

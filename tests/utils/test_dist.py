import os

import pytest

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


def test_the_fixture_leaves_no_launcher_variables(in_process_group):
    """Guards the teardown above: a later subprocess (a plain `vla-ds train`) inherits os.environ."""
    init_distributed()


def test_no_launcher_variables_were_left_behind():
    assert not any(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))
    assert rank_world() == (0, 1, 0)

"""Processes, ranks and devices: what every entry point and collective of vla-ds shares.

- `device_for(local_rank)`: the one device choice (this process's GPU, else the CPU)
- `init_distributed()` (Collective): the launcher's process group, or a group of one
- `rank_world()` (Collective): (rank, world, local_rank), starting no group for a single process
- `all_sum(values, device)`, `share(obj, world)`, `gather(obj, world)` (Collective)
- `process_group_cleanup()`: destroy the group on the way out, success or not
- `free_port()` and `torchrun(module, args)`: local multi-process launches (the demo, the tests)
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from typing import Iterator

import torch

from vla_ds.utils.jit import announce_builds, extensions_dir, use_extensions_dir


def device_for(local_rank: int | None = None) -> torch.device:
    """This process's accelerator: GPU `local_rank` (None: the current one) when CUDA is there,
    else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)


def free_port() -> int:
    """A TCP port on localhost that is free right now (for MASTER_PORT of a local launch)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, int]:
    """Collective. (rank, world_size, local_rank) of the launcher's process group, created now if
    needed (NCCL on CUDA, gloo on CPU); sets this process's CUDA device. Not launched (no WORLD_SIZE,
    or 1): a group of one on a free local port, so `vla-ds train` needs no launcher."""
    import deepspeed
    import torch.distributed as dist

    if os.environ.get("WORLD_SIZE", "1") == "1":
        # Each variable on its own: DeepSpeed falls back to MPI discovery when any one is missing.
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        if not torch.cuda.is_available():  # the shm comm op compiles here on first use: say so
            announce_builds(extensions_dir(), ["deepspeed_shm_comm"])
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size(), local_rank


def rank_world() -> tuple[int, int, int]:
    """Collective. (rank, world, local_rank): the launcher's group when several processes were
    launched (or a group exists), else a plain single process (no group, no DeepSpeed import)."""
    import torch.distributed as dist

    if dist.is_available() and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return init_distributed()
    return 0, 1, int(os.environ.get("LOCAL_RANK", "0"))


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Collective. Element-wise sum over ranks (float64, so counts stay exact)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def share(obj, world: int):
    """Collective. Rank 0's `obj` on every rank (picklable objects)."""
    if world == 1:
        return obj
    import torch.distributed as dist

    buf = [obj]
    dist.broadcast_object_list(buf, src=0)
    return buf[0]


def gather(obj, world: int) -> list:
    """Collective. Every rank's `obj`, in rank order, on every rank."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def process_group_cleanup() -> Iterator[None]:
    """Destroy the default process group on the way out, success or not: without it, ~1 run in 60
    aborted at interpreter exit after success (ZeRO-3, gloo). A group DeepSpeed set up goes through
    DeepSpeed's own teardown, which also drops the sub-groups it cached: torch's alone left them
    stale, and the next run in the same process failed ("Group ... is not registered")."""
    try:
        yield
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            ds_comm = sys.modules.get("deepspeed.comm")
            if ds_comm is not None and ds_comm.is_initialized():
                ds_comm.destroy_process_group()
            else:
                dist.destroy_process_group()


def torchrun(module: str, args: list[str], nproc: int = 2, env: dict | None = None,
             timeout: float | None = None, log_file: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node NPROC -m MODULE ARGS` on this machine, output captured (text).

    A free master port; one OpenMP thread per process (as torchrun itself would set); wandb off;
    DeepSpeed's CPU accelerator where there is no GPU; TORCH_EXTENSIONS_DIR (vla-ds's per-environment
    default unless set). `env` adds to (and overrides) those.
    `nproc=0` runs `python -m MODULE ARGS` as one plain process, with no launcher at all.
    `log_file`: the output is appended there as it comes (a long run), not captured; wandb is then
    left as the run's own settings say.
    """
    # Every child builds/loads DeepSpeed's ops in the same per-environment directory as this process.
    use_extensions_dir()
    base = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **({} if log_file else {"WANDB_MODE": "disabled"})}
    if not torch.cuda.is_available():
        base["DS_ACCELERATOR"] = "cpu"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(free_port())] if nproc else []
    cmd = [sys.executable, *launcher, "-m", module, *args]
    full_env = {**os.environ, **base, **(env or {})}
    if log_file is None:
        return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    with open(log_file, "a") as out:
        return subprocess.run(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout)

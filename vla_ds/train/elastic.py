"""Resuming on another number of processes: `--resume` from a checkpoint written by W processes, on W'.

What carries over, and how exactly:

| what | how | exact? |
|---|---|---|
| weights, optimizer moments, step counts | DeepSpeed's universal checkpoint: rank 0 converts the step's `ds/` shards once into `STEP/universal/` (`to_universal`, atomic); every rank loads its new partition from it | to fp rounding |
| lr schedule, epoch, best value, wandb run id | trainer_state.json, as on any resume | yes |
| sampler | the global position in the epoch; the rest of the epoch re-sharded over W' ranks (vla_ds/data/sampler.py) | each remaining sample once; < W' wrapped duplicates to even the shards |
| flow-head noise and times | seeded per sample (vla_ds/model/flow.py) | yes |
| RNG (python, numpy, torch) | rank r continues the saved stream of rank r, or of rank r mod W when there was none | no: per-rank streams (dropout masks, a plain loop's noise) are not those of an uninterrupted run |

With `--global-batch-size G` the effective batch stays G on any W'; without it, a resume that changes
W × micro-batch × accumulation says so. The conversion needs the checkpoint's `universal_checkpoint_info`,
which vla-ds writes into every checkpoint (older ones get it injected: DeepSpeed's
`--inject_missing_state`). DeepSpeed's converter reads the shards with `torch.load`; here it reads
them through `load_torch_state` (weights only, DeepSpeed's state types), as a resume does.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
from pathlib import Path

from vla_ds.errors import UsageError

log = logging.getLogger(__name__)
UNIVERSAL = "universal"  # STEP/universal/<tag>/: the step as a DeepSpeed universal checkpoint


def universal_info() -> dict:
    """The client state that makes a DeepSpeed checkpoint convertible to the universal format."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


@contextlib.contextmanager
def _safe_torch_load():
    import torch

    from vla_ds.utils.weights import load_torch_state

    real = torch.load

    def load(f, map_location=None, **_):
        return load_torch_state(f, map_location=map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def to_universal(step_dir: Path, out: Path | None = None, what: str = "--resume") -> Path:
    """Not collective (one process). Write `step_dir`'s DeepSpeed shards as a universal checkpoint
    into `out` (default STEP/universal): `out/<tag>/` with `zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt`
    and `out/latest_universal`. Made once: an existing one is kept; a killed conversion leaves only a
    temporary directory, replaced next time. Returns `out`. `what` names the flag in errors."""
    from deepspeed.checkpoint import ds_to_universal

    step_dir = Path(step_dir)
    tag = step_dir.name
    out = Path(out) if out is not None else step_dir / UNIVERSAL
    if (out / tag / "zero").is_dir() and (out / "latest_universal").is_file():
        return out
    src = step_dir / "ds" / tag
    if not src.is_dir():
        raise UsageError(f"{what} {step_dir}: no DeepSpeed engine state in {src} to convert")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(src), output_folder=str(tmp / tag), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    log.info("converting %s to a universal checkpoint in %s (once)", src, out)
    try:
        with _safe_torch_load(), contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
    except UsageError:  # a shard refused by the safe loader: nothing is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # DeepSpeed's converter asserts; one line, and the checkpoint as it was
        shutil.rmtree(tmp, ignore_errors=True)
        why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UsageError(f"{what} {step_dir}: DeepSpeed could not convert it for another number of processes "
                         f"({why}); resume with the number of processes that wrote it") from None
    (tmp / "latest_universal").write_text(tag)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def prepare_resume(step_dir: Path | None, saved_world: int | None, ds_config: dict, rank: int, world: int) -> bool:
    """Collective. Whether resuming `step_dir` (written by `saved_world` processes) changes the world
    size; if so, rank 0 converts it (`to_universal`, once) and `ds_config` gets "checkpoint":
    {"load_universal": true}. A conversion that fails (a damaged or crafted shard) stops every rank
    with its one line."""
    from vla_ds.utils.dist import share

    if step_dir is None or saved_world == world:
        return False
    ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    failed = None
    if rank == 0:
        try:
            to_universal(step_dir)
        except UsageError as e:
            failed = str(e)
    failed = share(failed, world)
    if failed:
        raise UsageError(failed)
    return True


def reshard_notice(saved: dict, world: int, micro: int, accum: int) -> str:
    """The one line a resume on another world size logs (and a warning when the global batch moved)."""
    w, m, a = saved["world_size"], saved.get("micro_batch"), saved.get("grad_accum_steps")
    before, after = w * (m or 0) * (a or 0), world * micro * accum
    line = (f"resume: re-sharded a checkpoint of {w} process(es) (micro-batch {m} x accumulation {a}, global batch "
            f"{before}) onto {world} (micro-batch {micro} x accumulation {accum}, global batch {after}): weights and "
            f"optimizer moments through a universal checkpoint, the rest of epoch {saved['epoch']} over {world} rank(s)")
    if before and before != after:
        line += (f"; the global batch changed from {before} to {after}: pass --global-batch-size {before} to keep it")
    return line


def rng_rank(rank: int, saved_world: int) -> int:
    """Whose saved RNG state rank `rank` continues: its own, or rank mod the saved world size."""
    return rank if rank < saved_world else rank % saved_world

"""`vla-ds profile`: real training steps of any configuration, with memory per phase and per kind.

Features:
  - the training recipe itself (vla_ds/train/loop.py: same flags, same ds_configs, same model and
    data, the trainer's own micro steps), run for --warmup-steps + --steps optimizer steps, no
    checkpoints, no wandb; the phases are measured through the trainer's phase hook
  - peak memory per phase -- model load, engine init (DeepSpeed partitions and fp32 masters),
    forward, backward, optimizer step -- from the CUDA allocator (allocated and reserved) on a GPU,
    from the resident set on CPU (vla_ds/profiling/memory.py)
  - model states per kind and place counted from the engine's own tensors: parameters,
    gradients, optimizer states, other engine buffers, on the accelerator or the host (offload)
    (vla_ds/profiling/accounting.py); activations are the remainder of the forward/backward peak
  - samples/s over the measured steps (the warm-up steps, which allocate optimizer states, excluded)
  - --gpu-mem-limit G: the CUDA allocator is capped at G GiB, so "fits on a G GiB card" is proven;
    an out-of-memory error is a result (status "oom", exit code 3), not a crash
  - --memory-snapshot (GPU): a CUDA memory snapshot for pytorch.org/memory_viz
  - every rank measures itself; rank 0 writes OUTPUT_DIR/profile.json, profile.md and profile.png
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vla_ds.config import TrainConfig
from vla_ds.errors import UsageError
from vla_ds.profiling.accounting import KINDS, PLACES, merge_max, model_state_bytes
from vla_ds.profiling.memory import GIB, MemoryMeter, apply_gpu_limit, dump_snapshot, rss_peak, start_snapshot
from vla_ds.train.loop import Trainer
from vla_ds.utils.dist import device_for

log = logging.getLogger(__name__)

OOM_EXIT = 3


@dataclass
class ProfileOptions:
    """The profiler's own settings (everything else is a training flag)."""

    steps: int = 3  # measured optimizer steps
    warmup_steps: int = 1  # steps before them: counted for memory, not for samples/s
    gpu_mem_limit: float | None = None  # GiB the CUDA allocator may use (None: the whole card)
    memory_snapshot: bool = False  # GPU: dump a CUDA memory snapshot
    label: str | None = None  # row name in profile.md (default: the run directory's name)

    def __post_init__(self):
        if self.steps < 1 or self.warmup_steps < 0:
            raise UsageError("--steps must be >= 1 and --warmup-steps >= 0")
        if self.gpu_mem_limit is not None and self.gpu_mem_limit <= 0:
            raise UsageError("--gpu-mem-limit must be a positive number of GiB")


class ProfileOOM(RuntimeError):
    """The configuration ran out of accelerator memory; the report is written already."""


class _Recorder:
    """The trainer's phase hook: each phase measured by the meter; at the end of each optimizer
    step's backward (gradients complete, before the step consumes them) and after the step
    (optimizer states exist after the first one) the model states are counted, off the clock."""

    def __init__(self, meter: MemoryMeter):
        self.meter, self.trainer, self.table, self.counting = meter, None, None, 0.0

    def _count(self) -> None:
        t = time.perf_counter()
        table = model_state_bytes(self.trainer.engine)
        self.table = table if self.table is None else merge_max(self.table, table)
        self.counting += time.perf_counter() - t

    @contextlib.contextmanager
    def __call__(self, name: str):
        boundary = name == "optimizer_step" and self.trainer.engine.is_gradient_accumulation_boundary()
        if boundary:
            self._count()
        with self.meter.phase(name):
            yield
        if boundary:
            self._count()


def for_profiling(cfg: TrainConfig, opts: ProfileOptions) -> TrainConfig:
    """The run settings a profile needs: exactly its steps, nothing saved, nothing resumed."""
    cfg.optim.max_steps = opts.warmup_steps + opts.steps
    cfg.run.save_every = 0
    cfg.run.resume = "none"
    cfg.run.val_every = 0
    cfg.run.wandb_mode = "disabled"
    return cfg


def _batches(trainer: Trainer):
    """Training batches forever, epoch after epoch."""
    while True:
        trainer.sampler.set_epoch(trainer.state.epoch)
        yield from trainer.loader(trainer.train_ds, trainer.sampler)
        trainer.state.epoch += 1


def _steps(trainer: Trainer, recorder: _Recorder, opts: ProfileOptions) -> list[float]:
    """Collective. The measured optimizer steps, the trainer's own micro steps; returns their seconds
    (model-state counting excluded)."""
    recorder.trainer = trainer
    recorder._count()  # before any step: parameters (and ZeRO's buffers) alone
    batches = _batches(trainer)
    times = []
    for _ in range(opts.warmup_steps + opts.steps):
        start, recorder.counting = time.perf_counter(), 0.0
        for _ in range(trainer.cfg.optim.grad_accum_steps):
            trainer.micro_step(next(batches))
        times.append(time.perf_counter() - start - recorder.counting)
    return times


def _rank_result(rank: int, meter: MemoryMeter, table: dict | None) -> dict:
    """This rank's figures; activations are what the forward/backward peak holds beyond the
    baseline and the counted tensors (on CPU, RSS holds host and "accelerator" tensors alike)."""
    key = meter.main_key
    out = {"rank": rank, "baseline": meter.baseline, "phases": meter.phases, "phase_seconds": meter.seconds,
           "peak": meter.overall_peak(), "peak_resets": meter.peak_resets}
    if table is not None:
        out["model_states"] = table
        places = ("accelerator",) if meter.cuda else PLACES
        counted = sum(table[k][p] for k in KINDS for p in places)
        step_peak = max((meter.phases[p][key] for p in ("forward", "backward") if p in meter.phases), default=0)
        out["activations"] = max(step_peak - meter.baseline[key] - counted, 0)
    out["host_rss_peak"] = max([rss_peak()] + [p.get("rss", 0) for p in meter.phases.values()])
    return out


def _summary(cfg: TrainConfig, ds_config: dict, world: int, ranks: list[dict], times: list[float],
             opts: ProfileOptions, meter: MemoryMeter, params: dict, status: str) -> dict:
    from vla_ds.train.ds_config import offloads_optimizer, offloads_params, zero_stage

    measured = times[opts.warmup_steps:]
    per_step = cfg.data.batch_size * cfg.optim.grad_accum_steps * world
    key = meter.main_key
    peak = max(r["peak"].get(key, 0) for r in ranks)
    summary = {
        "peak_gib": peak / GIB,
        "peak_allocated_gib": max(r["peak"].get("allocated", 0) for r in ranks) / GIB if meter.cuda else None,
        "host_rss_peak_gib": max(r["host_rss_peak"] for r in ranks) / GIB,
        "samples_per_s": per_step * len(measured) / sum(measured) if measured and sum(measured) > 0 else None,
    }
    if all("model_states" in r for r in ranks):
        for kind in KINDS:
            for place in PLACES:
                summary[f"{kind}_{place}_gib"] = max(r["model_states"][kind][place] for r in ranks) / GIB
        summary["activations_gib"] = max(r["activations"] for r in ranks) / GIB
    limit = opts.gpu_mem_limit
    return {
        "format": 1,
        "label": opts.label or Path(cfg.run.output_dir).name,
        "status": status,
        "device": torch.cuda.get_device_name(meter.device) if meter.cuda else "cpu",
        "memory_source": "cuda_allocator" if meter.cuda else "process_rss",
        "world_size": world,
        "micro_batch": cfg.data.batch_size,
        "grad_accum_steps": cfg.optim.grad_accum_steps,
        "finetune_vl": cfg.model.finetune_vl,
        "load_in_8bit": cfg.model.load_in_8bit,
        "gradient_checkpointing": cfg.model.use_gradient_checkpointing,
        "ds_config": str(cfg.run.ds_config),
        "zero_stage": zero_stage(ds_config),
        "offload_optimizer": offloads_optimizer(ds_config),
        "offload_param": offloads_params(ds_config),
        "precision": "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32",
        "gpu_mem_limit_gib": limit,
        "fits": (status == "ok" and peak / GIB <= limit) if limit is not None and meter.cuda else None,
        "params": params,
        "options": asdict(opts),
        "step_seconds": times,
        "summary": summary,
        "ranks": ranks,
        "config": cfg.to_dict(),
    }


def profile(cfg: TrainConfig, opts: ProfileOptions) -> dict:
    """Collective. Profile `cfg` on every rank; rank 0 writes the reports. Returns the summary dict
    (every rank); raises ProfileOOM after writing the report when the run ran out of memory."""
    import torch.distributed as dist

    from vla_ds.profiling.report import write_reports
    from vla_ds.train.ds_config import load_ds_config

    device = device_for(int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif opts.memory_snapshot:
        raise UsageError("--memory-snapshot records the CUDA allocator and needs a GPU; leave it out on CPU")
    apply_gpu_limit(opts.gpu_mem_limit, device)
    if device.type != "cuda" and opts.gpu_mem_limit is not None:
        log.warning("--gpu-mem-limit caps the CUDA allocator: on CPU nothing is capped and no fit is reported")
    cfg = for_profiling(cfg, opts)
    meter = MemoryMeter(device)
    recorder = _Recorder(meter)
    if opts.memory_snapshot:
        start_snapshot(device)
    trainer, table, times, status, error = None, None, [], "ok", None
    try:
        trainer = Trainer(cfg, phase=recorder)
        times = _steps(trainer, recorder, opts)
        table = recorder.table
    except torch.OutOfMemoryError as e:
        status, error = "oom", f"out of memory in phase {meter.current_phase}: {str(e).splitlines()[0]}"
        log.error("%s", error)
    run_dir = Path(cfg.run.output_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if opts.memory_snapshot:
        dump_snapshot(run_dir / f"memory_snapshot_rank{rank}.pickle")
    mine = _rank_result(rank, meter, table)
    ds_config = trainer.ds_config if trainer is not None else load_ds_config(cfg.run.ds_config)
    params = trainer.param_counts if trainer is not None else {}
    if status == "ok" and dist.is_initialized():
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    else:  # after an OOM the other ranks may be stuck in a collective: report this rank alone
        ranks = [mine]
    world = dist.get_world_size() if dist.is_initialized() else 1
    result = _summary(cfg, ds_config, world, ranks, times, opts, meter, params, status)
    if error:
        result["error"] = error
    if rank == 0 or status != "ok":
        write_reports(result, run_dir, suffix="" if rank == 0 else f"_rank{rank}")
    if status != "ok":
        raise ProfileOOM(error)
    if dist.is_initialized():
        dist.barrier()  # leave together: a rank tearing down gloo while rank 0 still writes can abort it
    return result

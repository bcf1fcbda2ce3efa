"""`vla-ds plan`: estimated accelerator memory of every preset x finetune mode x micro-batch, and
the fastest configuration that fits a given card.

Model states per rank (N processes, w bytes per weight: 2 in bf16, 4 in fp32; T trainable and P
total parameters, exact from a meta-device model, vla_ds/profiling/counts.py), following what
DeepSpeed 0.19 allocates (and `vla-ds profile` counts tensor by tensor):

    preset         parameters             gradients              optimizer states (fp32 master + Adam m, v)
    zero2          P w (int8: 1 B)        T w / N + 2 buckets    12 T / N
    zero3          P w / N + persistent   T w / N + 1 bucket     12 T / N
                   (+ gathered: 2 layers or the embedding, + the prefetch bucket)
    *_offload      as above (zero3_offload: on the host)        on the host, with the fp32 gradients
    (bf16 adds the fp32 gradient partition, 4 T / N, that the optimizer step reads)

Only trainable parameters get gradients and optimizer states; DeepSpeed's own estimators
(`estimate_zero2_model_states_mem_needs_all_live`) count frozen ones too, which for LoRA is off by
two orders of magnitude. Activations are estimated (vla_ds/profiling/activations.py). A
configuration fits when states + activations + ZeRO-3's gathered layers, plus 10 % allocator slack
and 0.75 GiB for the CUDA context and kernels, are within --gpu-mem.

"Fastest" is a heuristic ranking, not a measurement: samples/s relative to ZeRO-2 at a large
micro-batch, with per-preset slowdowns (ZeRO-3 x1.15 on one GPU, x1.3 on several; optimizer
offload x1.6; parameter offload x2.5), 8-bit matmuls x1.4, and b / (b + 1) for a micro-batch b
(small batches leave the GPU idle).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from vla_ds.errors import UsageError
from vla_ds.model.config import ModelConfig
from vla_ds.profiling.activations import Workload, activation_bytes, cache_activation_bytes
from vla_ds.profiling.counts import Counts, count_parameters

GIB = 2**30
# The published config.json of Qwen2.5-VL-3B-Instruct, shipped for planning (it has no weights).
DEFAULT_BACKBONE = str(Path(__file__).resolve().parent / "configs" / "qwen2_5_vl_3b_instruct.json")
DEFAULT_BACKBONE_NAME = "Qwen2.5-VL-3B-Instruct"
PRESETS = ("zero2", "zero3", "zero2_offload", "zero3_offload")
MODES = ("cache", "none", "lora", "lora-8bit", "full", "full-all")
MICRO_BATCHES = (1, 2, 4, 8, 16)
CONTEXT_GIB = 0.75  # CUDA context + cuBLAS/cuDNN workspaces, outside the allocator's counts
SLACK = 1.10  # caching-allocator fragmentation
_PRESET_COST = {"zero2": 1.0, "zero3": 1.15, "zero2_offload": 1.6, "zero3_offload": 2.5}


@dataclass
class Estimate:
    mode: str
    preset: str
    micro_batch: int
    parameters: int
    gradients: int
    optimizer_states: int
    buffers: int  # buckets, copy-back buffers, ZeRO-3's gathered layers
    activations: int
    host: int  # offloaded model states (CPU RAM)
    host_buffers: int = 0  # offload's pinned staging buffers (CPU RAM)
    fits: bool = False
    speed: float = 0.0

    @property
    def model_states(self) -> int:
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def total(self) -> int:
        return self.model_states + self.buffers + self.activations

    @property
    def needed_gib(self) -> float:
        """What the card must have: total with allocator slack and the CUDA context."""
        return self.total * SLACK / GIB + CONTEXT_GIB


def mode_config(base: ModelConfig, mode: str, lm_layers: int) -> ModelConfig:
    """The model settings of a planner mode on top of the user's (LoRA rank, targets, head...)."""
    kw = {"load_in_8bit": False}
    if mode in ("cache", "none"):
        kw["finetune_vl"] = "none"
    elif mode in ("lora", "lora-8bit"):
        kw.update(finetune_vl="lora", load_in_8bit=mode == "lora-8bit")
    else:
        kw["finetune_vl"] = "full"
        if mode == "full-all":
            kw["unfreeze_last_n"] = lm_layers
    return dataclasses.replace(base, **kw)


def model_state_estimate(counts: Counts, preset: dict, world: int, width: int, mode: str) -> dict:
    """Per-rank model-state bytes {parameters, gradients, optimizer_states, buffers, host} of a
    resolved DeepSpeed config (see the module docstring)."""
    from vla_ds.train.ds_config import offloads_optimizer, offloads_params, zero_stage

    stage, off_opt, off_par = zero_stage(preset), offloads_optimizer(preset), offloads_params(preset)
    zero = preset.get("zero_optimization", {})
    bucket = int(zero.get("reduce_bucket_size", 5e8))
    total, trainable = counts.total, counts.trainable
    if mode == "cache":  # the backbone is never loaded
        total = trainable = counts.head
    dense = total - counts.quantized
    weights = dense * width + counts.quantized + 4 * counts.quantized_rows
    part = -(-trainable // world)  # this rank's share of the trainable parameters
    ipg = min(bucket, trainable) * width  # one gradient bucket
    fp32_grads = 4 * part if width != 4 else 0  # the fp32 gradient partition the bf16 step updates from
    out = {"parameters": 0, "gradients": 0, "optimizer_states": 12 * part, "buffers": 0, "host": 0, "host_buffers": 0}
    if stage == 3:
        out["parameters"] = -(-weights // world) + counts.persistent * width
        out["gradients"] = part * width + ipg + fp32_grads
        # gathered at once: the running layer and the prefetched next one, or the embedding before them
        gathered = max(2 * counts.largest_layer, counts.embedding) if mode != "cache" else 0
        out["buffers"] = gathered * width + int(zero.get("stage3_prefetch_bucket_size", 0)) * width
    else:
        out["parameters"] = weights
        out["gradients"] = part * width + (2 if zero.get("overlap_comm") else 1) * ipg + fp32_grads
    if off_opt:  # master weights, Adam moments and the fp32 gradients move to the host
        out["host"] += out["optimizer_states"] + 4 * part
        out["optimizer_states"] = 0
        if stage == 3:
            out["host"] += part * width  # the gradient partition buffer
            out["gradients"] = ipg
        else:  # two staging buffers of the largest parameter; a pinned bit16 copy-back buffer on the host
            out["host_buffers"] = part * width + counts.largest_trainable * width
            out["gradients"] = 2 * counts.largest_trainable * width + 2 * ipg
    if off_par and stage == 3:
        shard = -(-weights // world)
        out["host"] += shard
        out["parameters"] -= shard
    return out


def estimate(counts: Counts, bb_config, model_cfg: ModelConfig, preset_name: str, preset: dict, mode: str,
             micro_batch: int, world: int, width: int, work: Workload) -> Estimate:
    states = model_state_estimate(counts, preset, world, width, mode)
    if mode == "cache":
        from vla_ds.model.backbone import hidden_size

        acts = cache_activation_bytes(model_cfg, hidden_size(bb_config), micro_batch, width)
    else:
        acts = activation_bytes(bb_config, model_cfg, counts, micro_batch, work, width)
    est = Estimate(mode, preset_name, micro_batch, activations=acts, **states)
    cost = _PRESET_COST[preset_name] * (1.4 if mode == "lora-8bit" else 1.0)
    if preset_name == "zero3" and world > 1:
        cost = 1.3
    est.speed = micro_batch / (micro_batch + 1) / cost
    return est


def resolved_preset(name: str, hidden: int, micro_batch: int, world: int, bf16: bool) -> dict:
    from vla_ds.train.ds_config import load_ds_config, resolve_ds_config

    return resolve_ds_config(load_ds_config(name), micro_batch=micro_batch, grad_accum=1, world_size=world,
                             grad_clip=1.0, lr=1e-4, weight_decay=0.0, hidden_size=hidden, bf16=bf16,
                             on_cpu=False)  # plans are for GPUs


def plan(backbone: str, base: ModelConfig, gpu_mem: float, world: int = 1, modes=MODES, presets=PRESETS,
         micro_batches=MICRO_BATCHES, precision: str = "bf16", work: Workload | None = None) -> list[Estimate]:
    """Every combination's estimate, `fits` and `speed` filled in. No weights are read."""
    work = work or Workload()
    from vla_ds.model.backbone import hidden_size, num_lm_layers, read_backbone_config

    bb = read_backbone_config(backbone)
    hidden, width = hidden_size(bb), 2 if precision == "bf16" else 4
    rows = []
    threshold = 10 * hidden  # ZeRO-3 "auto" stage3_param_persistence_threshold
    for mode in modes:
        try:
            cfg = mode_config(base, mode, num_lm_layers(bb))
        except ValueError as e:
            raise UsageError(f"--modes {mode} with these model settings: {e}") from None
        counts = count_parameters(bb, cfg, threshold)
        for name in presets:
            for mb in micro_batches:
                preset = resolved_preset(name, hidden, mb, world, precision == "bf16")
                if mode == "lora-8bit" and (preset["zero_optimization"].get("stage") == 3):
                    continue  # refused by the trainer (vla_ds/train/engine.py check_combination)
                est = estimate(counts, bb, cfg, name, preset, mode, mb, world, width, work)
                est.fits = est.needed_gib <= gpu_mem
                rows.append(est)
    return rows


def recommend(rows: list[Estimate]) -> dict[str, Estimate | None]:
    """Per mode, the fitting configuration with the best speed score (None: nothing fits)."""
    best: dict[str, Estimate | None] = {}
    for r in rows:
        best.setdefault(r.mode, None)
        if r.fits and (best[r.mode] is None or r.speed > best[r.mode].speed):
            best[r.mode] = r
    return best


def markdown(rows: list[Estimate], recs: dict, gpu_mem: float, world: int, backbone: str) -> str:
    lines = [f"Plan for {backbone} on {world} GPU(s) with {gpu_mem:g} GiB each (estimates; see docs/memory.md).", "",
             "| mode | ds config | micro-batch | params | grads | optim | buffers | activations | needs GiB | host GiB | fits |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cells = [r.mode, r.preset, str(r.micro_batch)] + [f"{v / GIB:.2f}" for v in (
            r.parameters, r.gradients, r.optimizer_states, r.buffers, r.activations)]
        cells += [f"{r.needed_gib:.2f}", f"{(r.host + r.host_buffers) / GIB:.2f}", "yes" if r.fits else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Recommended (fastest that fits, per mode):", ""]
    for mode, r in recs.items():
        lines.append(f"- {mode}: " + (f"{r.preset}, micro-batch {r.micro_batch} (needs {r.needed_gib:.1f} GiB)"
                                      if r else f"nothing fits in {gpu_mem:g} GiB"))
    return "\n".join(lines)

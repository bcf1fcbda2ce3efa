"""DeepSpeed config files: load, check, and resolve their "auto" values from the run's flags.

The files in `ds_configs/` leave every value that depends on the run as "auto":
`train_micro_batch_size_per_gpu` (--batch-size), `gradient_accumulation_steps`
(--grad-accum-steps), `train_batch_size` (micro x accum x world), `gradient_clipping`
(--grad-clip), precision (bf16 where the device supports it, fp32 on CPU), the optimizer's lr and
weight decay, and ZeRO bucket sizes (hidden_size^2 elements, like HF's integration: for the 3B, 8 MiB
in bf16 instead of DeepSpeed's 2e8-element default, which ZeRO-2 allocates twice as gradient
buckets -- 0.8 GiB of a 24 GiB card).
On CPU an optimizer that is not offloaded runs as torch's AdamW ("torch_adam"): DeepSpeed's FusedAdam
there is a C++ op compiled at first use, for the same update.
A number written in the file is kept, but must agree with the batch rule. DeepSpeed does not
check top-level keys, so a typo there would be silently ignored: vla-ds refuses unknown keys.
Keys starting with "_" are comments (e.g. "_launch": the command to use the file) and dropped.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from vla_ds.errors import UsageError

# Top-level keys DeepSpeed 0.16-0.19 reads (runtime/config.py, runtime/constants.py).
KNOWN_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "fp16", "bf16", "bfloat16", "amp", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "steps_per_print", "wall_clock_breakdown", "dump_state", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "communication_data_type", "seq_parallel_communication_data_type",
    "activation_checkpointing", "flops_profiler", "comms_logger", "monitor_config", "tensorboard", "wandb",
    "csv_monitor", "elasticity", "aio", "checkpoint", "data_types", "memory_breakdown", "pipeline", "autotuning",
    "compression_training", "data_efficiency", "curriculum_learning", "eigenvalue", "progressive_layer_drop",
    "nebula", "weight_quantization", "hybrid_engine", "compile", "timers", "torch_autocast", "graph_harvesting",
    "disable_allgather", "load_universal_checkpoint", "use_node_local_storage", "zero_quantized_weights",
    "zero_quantized_gradients", "dataloader_drop_last", "sparse_attention", "tensor_parallel",
}


# The presets, shipped with the package (the repository's top-level ds_configs/ is the same files,
# for users to read and copy; tests/test_layout.py keeps the two identical).
PRESETS_DIR = Path(__file__).resolve().parent / "ds_configs"


def ds_config_path(spec: str | os.PathLike) -> Path:
    """A config file path as given, else a preset by name or relative path ("zero2",
    "zero3_offload.json", "ds_configs/zero3.json"), so it works from any directory and installed."""
    p = Path(spec)
    if p.is_file():
        return p
    for cand in (PRESETS_DIR / p.name, PRESETS_DIR / f"{p.name}.json"):
        if cand.is_file():
            return cand
    return p


def load_ds_config(path: str | os.PathLike) -> dict:
    """Read a DeepSpeed JSON config; one-line errors for unreadable files and unknown keys."""
    p = ds_config_path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise UsageError(f"--ds-config {p}: no such file (presets: ds_configs/zero2.json, zero2_offload.json, zero3.json, zero3_offload.json)") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--ds-config {p}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--ds-config {p}: expected a JSON object")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise UsageError(f"--ds-config {p}: unknown top-level key(s) {', '.join(unknown)} (DeepSpeed would ignore them silently); fix the spelling or remove them")
    return cfg


def zero_stage(cfg: dict) -> int:
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(cfg: dict) -> bool:
    dev = cfg.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    return dev.get("device", "none") not in ("none", None)


def param_offload_device(cfg: dict) -> str | None:
    """Where ZeRO-3 offloads the parameters: "cpu", "nvme", or None."""
    dev = (cfg.get("zero_optimization", {}).get("offload_param", {}) or {}).get("device", "none")
    return None if dev in ("none", None) else dev


def offloads_params(cfg: dict) -> bool:
    return param_offload_device(cfg) is not None


def partitioned_load(cfg: dict) -> dict | None:
    """The config to build the backbone partitioned with (ZeRO-3: no rank loads it whole), or None.
    Parameters offloaded to NVMe load whole and are partitioned by deepspeed.initialize: the shards
    would live in swap files that the loader does not write."""
    return cfg if zero_stage(cfg) == 3 and param_offload_device(cfg) != "nvme" else None


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _resolve(cfg: dict, key: str, value, source: str) -> None:
    if cfg.get(key, "auto") == "auto":
        cfg[key] = value
    elif cfg[key] != value:
        raise UsageError(f"--ds-config sets {key}={cfg[key]} but {source} gives {value}; set it to \"auto\" or change the flag")


def resolve_ds_config(
    cfg: dict,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    lr: float,
    weight_decay: float,
    hidden_size: int | None = None,
    bf16: bool | None = None,
    on_cpu: bool | None = None,
) -> dict:
    """A copy of `cfg` with every "auto" replaced; raises UsageError when explicit values clash.
    `on_cpu` (default: no CUDA here) runs an Adam/AdamW optimizer that stays on the device as torch's
    own (`torch_adam`), unless the file says otherwise: DeepSpeed's FusedAdam on CPU is a C++ op it
    compiles on first use (~80 s on 2 cores, and a compiler), for the same update. An offloaded
    optimizer keeps DeepSpeedCPUAdam, which ZeRO-Offload requires."""
    cfg = copy.deepcopy(cfg)
    _resolve(cfg, "train_micro_batch_size_per_gpu", micro_batch, "--batch-size")
    _resolve(cfg, "gradient_accumulation_steps", grad_accum, "--grad-accum-steps")
    total = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * world_size
    if cfg.get("train_batch_size", "auto") == "auto":
        cfg["train_batch_size"] = total
    elif cfg["train_batch_size"] != total:
        raise UsageError(
            f"--ds-config train_batch_size={cfg['train_batch_size']} but micro batch {cfg['train_micro_batch_size_per_gpu']} x "
            f"accumulation {cfg['gradient_accumulation_steps']} x world size {world_size} = {total}; set it to \"auto\""
        )
    _resolve(cfg, "gradient_clipping", float(grad_clip), "--grad-clip")
    use_bf16 = bf16_supported() if bf16 is None else bf16
    for key in ("bf16", "fp16"):
        section = cfg.setdefault(key, {}) if key == "bf16" else cfg.get(key)
        if section is not None and section.get("enabled", "auto") == "auto":
            section["enabled"] = use_bf16 if key == "bf16" else False
    if cfg.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise UsageError("--ds-config enables fp16, which DeepSpeed refuses on CPU; use bf16 on GPU or fp32 on CPU")
    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        if params.get("lr", "auto") == "auto":
            params["lr"] = lr
        if params.get("weight_decay", "auto") == "auto":
            params["weight_decay"] = weight_decay
        on_cpu = not torch.cuda.is_available() if on_cpu is None else on_cpu
        if on_cpu and str(opt.get("type", "")).lower() in ("adam", "adamw") and not offloads_optimizer(cfg):
            params.setdefault("torch_adam", True)
    zero = cfg.get("zero_optimization", {})
    if hidden_size:
        auto_sizes = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "allgather_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
        for key, value in auto_sizes.items():
            if zero.get(key) == "auto":
                zero[key] = value
    leftover = _find_auto(cfg)
    if leftover:
        raise UsageError(f"--ds-config: cannot resolve \"auto\" for {', '.join(leftover)}; give numbers")
    return cfg


def _find_auto(d, prefix="") -> list[str]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _find_auto(v, f"{prefix}{k}.")
    elif d == "auto":
        out.append(prefix.rstrip("."))
    return out

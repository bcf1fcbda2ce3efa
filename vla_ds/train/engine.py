"""DeepSpeed engine set-up: refused combinations, per-module optimizer groups, `deepspeed.initialize`.

The process group comes from `vla_ds.utils.dist.init_distributed`, the same under `deepspeed`,
`torchrun` and a plain single process (`vla-ds train`).
"""
from __future__ import annotations

import logging

import torch

from vla_ds.config import TrainConfig
from vla_ds.errors import UsageError
from vla_ds.train.ds_config import offloads_optimizer, offloads_params, zero_stage

log = logging.getLogger(__name__)


def check_combination(cfg: TrainConfig, ds_cfg: dict) -> None:
    """Refuse, before any model loads, combinations that cannot work (one line each)."""
    m = cfg.model
    stage = zero_stage(ds_cfg)
    if m.load_in_8bit and offloads_params(ds_cfg):
        raise UsageError("--load-in-8bit cannot be combined with parameter offload (zero3_offload): bitsandbytes "
                         "int8 weights cannot move to CPU and back; use ds_configs/zero2.json or zero2_offload.json")
    if m.load_in_8bit and stage == 3:
        raise UsageError("--load-in-8bit with ZeRO-3 would partition int8 weights; use ds_configs/zero2.json "
                         "(8-bit weights are already 4x smaller, ZeRO-3 gains little)")
    if m.load_in_8bit and not torch.cuda.is_available() and cfg.model.dtype == "bfloat16":
        raise UsageError("--load-in-8bit on CPU runs in float32; drop --dtype bfloat16")
    if ds_cfg.get("fp16", {}).get("enabled") is True and m.load_in_8bit:
        raise UsageError("--load-in-8bit with fp16 is not supported; use bf16 (\"bf16\": {\"enabled\": \"auto\"})")
    if offloads_optimizer(ds_cfg) and "optimizer" not in ds_cfg:
        raise UsageError("--ds-config offloads the optimizer but has no \"optimizer\" section: DeepSpeed needs its "
                         "own (CPU) Adam there; copy the one from ds_configs/zero2_offload.json")
    if cfg.optim.vision_lr > 0 and m.finetune_vl != "full" and m.train_vision_blocks:
        raise UsageError("--vision-lr trains vision blocks only with --finetune-vl full")
    if cfg.run.mode == "train" and m.finetune_vl != "none" and cfg.run.cache_policy == "require":
        raise UsageError(f"--cache-policy require with --finetune-vl {m.finetune_vl}: cached VL features would be "
                         "stale while the backbone trains; use --finetune-vl none or --cache-policy off")


def optimizer_groups(model, cfg: TrainConfig) -> list[dict]:
    """The policy's trainable groups with their learning rates (frozen parameters are left out)."""
    lrs = {"expert": cfg.optim.lr, "sensor": cfg.optim.sensor_lr, "vl": cfg.optim.vl_lr, "vision": cfg.optim.vision_lr}
    groups = []
    for g in model.parameter_groups(cfg.optim.weight_decay):
        lr = lrs[g["component"]]
        if lr <= 0:
            for p in g["params"]:
                p.requires_grad_(False)
            log.info("group %s frozen: its learning rate is 0", g["name"])
            continue
        groups.append({"params": g["params"], "lr": lr, "weight_decay": g["weight_decay"], "name": g["name"]})
    if not groups:
        raise UsageError("nothing to train: every parameter group is frozen or has learning rate 0")
    return groups


def build_engine(model, cfg: TrainConfig, ds_cfg: dict):
    """Collective. deepspeed.initialize with the per-module groups; returns (engine, optimizer)."""
    import deepspeed

    groups = optimizer_groups(model, cfg)
    names = [g.pop("name") for g in groups]
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_cfg)
    for g, name in zip(optimizer.param_groups, names):
        g["name"] = name  # for the lr/<group> metrics
    return engine, optimizer

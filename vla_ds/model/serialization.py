"""A saved policy directory: `config.json`, `model.safetensors`, `stats.json`.

- config.json: `{"format": "vla-ds-policy", "version": 1, "backbone": ..., "vl_dim": D, "views": [camera
  views trained on, in order] or null, "model": {ModelConfig}}`;
  a config saved before `vl_tokens` existed loads with `vl_tokens = -1` (every VL token, as then)
- model.safetensors: exactly `QwenVLA.saved_parameter_names()` -- the vla-ds-owned weights and the
  trained part of the backbone (LoRA adapters or unfrozen blocks), not the frozen backbone. Names
  come from `named_parameters()`, which lists a tied tensor once (the tiny and the 3B Qwen tie
  `lm_head.weight` to `embed_tokens.weight`), so a tied pair is never written twice -- safetensors
  refuses shared tensors -- even when the source is a full `state_dict()` that names both.
- stats.json: the `NormStats` the policy (de)normalizes with.
- adapter/ (LoRA policies only): the same LoRA as a standard PEFT adapter (adapter_config.json +
  adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, DIR/adapter)` loads
  (`vla_ds.model.adapter`); vla-ds itself reads model.safetensors.

Loading rebuilds the backbone from the saved (or overriding) backbone path and the config, then
copies the saved tensors in with strict name and shape checks (`vla_ds.utils.weights.load_strict`):
a missing or unknown key is an error that names the keys, never a silent partial load.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import torch

from vla_ds.data.stats import NormStats
from vla_ds.model.adapter import ADAPTER_DIR, save_adapter
from vla_ds.model.config import ModelConfig
from vla_ds.utils.io import atomic_dir, write_json
from vla_ds.utils.weights import load_strict

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "vla-ds-policy"
VERSION = 1


def owned_tensors(policy, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes, on CPU, from the live parameters or `state_dict`."""
    source = state_dict if state_dict is not None else dict(policy.named_parameters())
    names = policy.saved_parameter_names()
    absent = [n for n in names if n not in source]
    if absent:
        raise KeyError(f"state_dict lacks {len(absent)} policy weights, e.g. {absent[:3]}")
    return {n: source[n].detach().to("cpu").contiguous() for n in names}


def save_policy(policy, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write the policy directory atomically (a crash never leaves a half-written policy)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    tensors = owned_tensors(policy, state_dict)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "backbone": policy.config.backbone,
        "vl_dim": policy.vl_dim,
        "views": policy.views,
        "model": policy.config.to_dict(),
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(tmp / CONFIG_FILE, meta)
        policy.stats.save(tmp / "stats.json")
        save_adapter(policy.config, tensors, tmp / ADAPTER_DIR)
    log.info("saved policy (%d tensors, %.2f M parameters) to %s", len(tensors),
             sum(t.numel() for t in tensors.values()) / 1e6, out_dir)
    return out_dir


def read_policy_config(path: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """The saved metadata and `ModelConfig` of the policy directory `path`."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no policy config; is {path} a directory written by save_pretrained?")
    meta = json.loads(cfg_file.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{cfg_file}: not a vla-ds policy config (format {meta.get('format')!r}, "
                         f"version {meta.get('version')!r}; expected {FORMAT!r} version {VERSION})")
    model = dict(meta["model"])
    if "vl_tokens" not in model:
        # Saved before --vl-tokens existed, when the live policy attended over every VL token: keep
        # that (auto would now pool a frozen backbone's tokens, which this head never saw).
        model["vl_tokens"] = -1
        log.warning("%s predates --vl-tokens: the policy attends over every VL token (--vl-tokens -1), as it "
                    "did when it was saved", cfg_file)
    return meta, ModelConfig.from_dict(model, source=str(cfg_file))


def load_policy(cls, path: str | os.PathLike, backbone: str | os.PathLike | None = None,
                device: torch.device | str | None = None, load_backbone: bool = True):
    """Rebuild a `cls` (QwenVLA) from a policy directory; see `QwenVLA.from_pretrained`."""
    from safetensors.torch import load_file

    path = Path(path)
    meta, config = read_policy_config(path)
    if backbone is not None:
        config = dataclasses.replace(config, backbone=str(backbone))
    policy = cls(config, NormStats.load(path), device=device, load_backbone=load_backbone, views=meta.get("views"))
    if policy.vl_dim != meta.get("vl_dim", policy.vl_dim):
        raise ValueError(f"--backbone {config.backbone} has hidden size {policy.vl_dim}, the policy in {path} was "
                         f"trained on one of hidden size {meta['vl_dim']}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing; the policy directory is incomplete")
    targets = {**dict(policy.named_buffers()), **dict(policy.named_parameters(remove_duplicate=False))}
    load_strict(targets, load_file(str(weights)), policy.saved_parameter_names(), str(weights), str(path / CONFIG_FILE))
    return policy.eval()

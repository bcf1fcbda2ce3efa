"""Exact parameter counts of a QwenVLA configuration, from a backbone config alone.

The policy is built on the meta device (no weights, no memory) with the real code path --
`Qwen2_5_VLForConditionalGeneration` from the config, `apply_finetune` (LoRA injection or block
unfreezing), the sensor encoder, fusion and action expert -- so the trainable count is the one
training will see, not a formula. 8-bit weights cannot be made on meta; the language model's
linear weights that `--load-in-8bit` quantizes are counted instead (1 byte each plus one fp32
scale per output row, bitsandbytes' `CB` + `SCB`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from vla_ds.model.config import ModelConfig


@dataclass(frozen=True)
class Counts:
    """Parameter numbers (elements, not bytes) of one finetune mode."""

    total: int  # every parameter of the policy (backbone + head)
    trainable: int
    head: int  # the policy's own modules (sensor encoder, fusion, expert): all trainable
    quantized: int  # elements stored as int8 under --load-in-8bit (0 otherwise)
    quantized_rows: int  # their output rows (one fp32 scale each)
    persistent: int  # elements of parameters ZeRO-3 keeps whole on every rank (below the persistence threshold)
    largest_layer: int  # the largest block ZeRO-3 gathers at once (one LM decoder layer for the 3B)
    embedding: int  # the input embedding, gathered whole by ZeRO-3 before the first layer (311 M for the 3B)
    largest_trainable: int  # the largest trainable parameter (ZeRO-2 offload's gradient staging buffers)
    trained_lm_layers: int  # LM layers from the first trainable one to the last (their activations are kept)
    trained_vision_layers: int
    lm_layers: int


def _meta_backbone(bb_config):
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration._from_config(copy.deepcopy(bb_config), dtype=torch.bfloat16)


def count_parameters(bb_config, model_cfg: ModelConfig, persistence_threshold: int) -> Counts:
    """Counts of `model_cfg` (its finetune mode) on the backbone `bb_config`. No weights are read."""
    from vla_ds.model.backbone import LANGUAGE_MODEL, VISION_MODULE
    from vla_ds.model.policy import QwenVLA

    hf = _meta_backbone(bb_config)
    quantized = rows = 0
    if model_cfg.load_in_8bit:  # what BitsAndBytesConfig(llm_int8_skip_modules=[visual, lm_head]) quantizes
        for name, m in hf.named_modules():
            if name.startswith(LANGUAGE_MODEL + ".") and isinstance(m, nn.Linear):
                quantized += m.weight.numel()
                rows += m.out_features
    from vla_ds.data.stats import NormStats

    stats = NormStats.identity(model_cfg.action_dim,
                               model_cfg.sensor_input_channels if model_cfg.sensor_enabled else None)
    with torch.device("meta"):
        policy = QwenVLA(model_cfg, stats, device="meta", vl_model=hf)
    params = dict(policy.named_parameters())
    total = sum(p.numel() for p in params.values())
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    head = sum(p.numel() for n, p in params.items() if not n.startswith("vl."))
    persistent = sum(p.numel() for p in params.values() if p.numel() <= persistence_threshold)
    lm = hf.get_submodule(LANGUAGE_MODEL)
    visual = hf.get_submodule(VISION_MODULE)
    layer_sizes = [sum(p.numel() for p in layer.parameters()) for layer in list(lm.layers) + list(visual.blocks)]
    return Counts(
        total=total, trainable=trainable, head=head, quantized=quantized, quantized_rows=rows,
        persistent=persistent, largest_layer=max(layer_sizes, default=0),
        embedding=hf.get_input_embeddings().weight.numel(),
        largest_trainable=max((p.numel() for p in params.values() if p.requires_grad), default=0),
        trained_lm_layers=_trained_from_first(lm.layers), trained_vision_layers=_trained_from_first(visual.blocks),
        lm_layers=len(lm.layers),
    )


def _trained_from_first(blocks) -> int:
    """Blocks from the first one holding a trainable parameter to the end: autograd keeps their
    activations (earlier frozen blocks see no tensor that requires grad)."""
    flags = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    return len(flags) - flags.index(True) if True in flags else 0

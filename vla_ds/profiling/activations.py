"""Activation memory of one micro-batch on one rank: an estimate, in bytes.

Where `vla-ds plan` cannot count tensors it uses this model of what autograd keeps (per token, in
elements of the compute dtype), after the Megatron accounting (Korthikanti et al. 2022) adapted to
Qwen2.5-VL with SDPA attention (no attention-score matrix is kept):

- an LM decoder layer keeps ~7 H + 4 I per token (norm in/out, q/k/v, attention out, MLP gate, up,
  activation, product); LoRA dropout adds a copy of each adapted layer's input;
- with gradient checkpointing a layer keeps only its input (H per token) and the one layer being
  recomputed holds its full set twice (values and their gradients) during backward;
- layers before the first trainable one keep nothing (no tensor there requires grad), and a frozen
  backbone (finetune none) runs under no_grad: only one layer's working set is alive at a time;
- the vision tower (frozen unless full mode trains vision blocks) works on 14 px patches,
  (side / 14)^2 per view, and hands (side / 28)^2 merged tokens per view to the LM;
- the head attends over M VL tokens (every token when the backbone trains, K pooled otherwise).

It is checked against `vla-ds profile` measurements (docs/performance.md); the model-state part of
the plan is exact by construction, this part is the estimate.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """What one sample puts through the model."""

    views: int = 2  # camera views per sample
    image_side: int = 448  # pixels per side after the processor's resize
    text_tokens: int = 64  # chat template + instruction

    @property
    def patches_per_view(self) -> int:
        return (self.image_side // 14) ** 2

    @property
    def lm_tokens(self) -> int:
        return self.views * self.patches_per_view // 4 + self.text_tokens


def activation_bytes(bb_config, model_cfg, counts, micro_batch: int, work: Workload, width: int) -> int:
    """Peak activation bytes of one forward+backward (see the module docstring). `width` is the
    compute dtype's bytes per element."""
    text = getattr(bb_config, "text_config", bb_config)
    vis = bb_config.vision_config
    h, i = text.hidden_size, text.intermediate_size
    hv, iv = vis.hidden_size, vis.intermediate_size
    b, tokens, patches = micro_batch, work.lm_tokens, work.views * work.patches_per_view
    lora_copies = 0
    if model_cfg.finetune_vl == "lora" and model_cfg.lora_dropout > 0:
        lora_copies = len(model_cfg.lora_target_names())
    lm_layer = b * tokens * (7 * h + 4 * i + lora_copies * h)
    vis_layer = b * patches * (5 * hv + 3 * iv)
    checkpointing = model_cfg.use_gradient_checkpointing
    kept = 0
    for layers, layer_set, width_in in ((counts.trained_lm_layers, lm_layer, b * tokens * h),
                                        (counts.trained_vision_layers, vis_layer, b * patches * hv)):
        if layers:
            kept += layers * width_in + 2 * layer_set if checkpointing else (layers + 1) * layer_set
    transient = max(lm_layer, vis_layer)  # no-grad working set (also the frozen tower before the LM)
    memory_tokens = tokens if model_cfg.memory_tokens == -1 else max(model_cfg.memory_tokens, 1)
    e = model_cfg.expert_hidden_dim
    head = b * memory_tokens * (h + e * (12 * model_cfg.expert_num_layers + 4))
    backbone = kept if counts.trained_lm_layers or counts.trained_vision_layers else transient
    if model_cfg.finetune_vl == "none":
        backbone = transient
    # + the hidden states handed to the head (and their gradient) and the embeddings
    return int((backbone + head + 3 * b * tokens * h) * width)


def head_activation_bytes(model_cfg, hidden: int, micro_batch: int, width: int) -> int:
    """VL-cache mode: the head alone, on K cached tokens."""
    memory_tokens = max(model_cfg.memory_tokens, 1) if model_cfg.memory_tokens != -1 else 17
    e = model_cfg.expert_hidden_dim
    return int(micro_batch * memory_tokens * (hidden + e * (12 * model_cfg.expert_num_layers + 4)) * width)

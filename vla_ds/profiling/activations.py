"""Activation memory of one micro-batch on one rank: an estimate, in bytes.

Where `vla-ds plan` cannot count tensors it uses this model of what autograd keeps (per token, in
elements of the compute dtype), after the Megatron accounting (Korthikanti et al. 2022) adapted to
Qwen2.5-VL with SDPA attention (no attention-score matrix is kept), with its constants checked
against allocator measurements at the 3B's widths (tests/benchmarks/bench_activations.py,
docs/performance.md):

- an LM decoder layer keeps ~7 H + 4 I per token (norm in/out, q/k/v, attention out, MLP gate, up,
  activation, product); LoRA dropout adds a copy of each adapted layer's input (H, or I for
  down_proj); a vision block keeps ~5 H_v + 3 I_v per 14 px patch, (side / 14)^2 per view, and
  hands (side / 28)^2 merged tokens per view to the LM;
- with gradient checkpointing a layer keeps only its input (H per token); during backward the one
  layer being recomputed holds its full set again, without checkpointing every trained layer holds
  its set; on top of that backward makes one transient gradient, the larger of an activation
  gradient (I + H per token) and the largest trainable weight's gradient (full finetunes);
- layers before the first trainable one keep nothing (no tensor there requires grad) and run as
  a transient working set of one layer, as does the whole backbone when it is frozen (finetune
  none runs it under no_grad); the step's peak is the larger of that and the trained part;
- the hidden states handed to the head, their gradient and the input embeddings: 3 H per token;
- the head attends over M VL tokens (every token when the backbone trains, K pooled otherwise):
  per token H + E (F + 3 L) for a fusion costing F widths (none/concat 3, gated 8,
  cross_attention 24) and an L-layer expert, whose cross-attention keeps a key and a value (+1).

The sensor encoder (off by default; ~10 MB per sample) is not modelled. The model-state part of
the plan is exact by construction; this part is the estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

# Per-token widths (in E) a fusion keeps for backward, measured by bench_activations.py's head run.
FUSION_WIDTHS = {"none": 3, "concat": 3, "gated": 8, "cross_attention": 24}
_LORA_INPUT = {"down_proj": "I"}  # every other adapted layer's input is H wide


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


def _lora_copies(model_cfg, h: int, i: int) -> int:
    """Elements per token that LoRA dropout copies keep in one LM layer (0 without dropout)."""
    if model_cfg.finetune_vl != "lora" or model_cfg.lora_dropout <= 0:
        return 0
    from vla_ds.model.config import ALL_LINEAR

    names = model_cfg.lora_target_names()
    if names == (ALL_LINEAR,):
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return sum(i if _LORA_INPUT.get(n) == "I" else h for n in names)


def head_bytes(model_cfg, hidden: int, tokens: int, micro_batch: int, width: int) -> int:
    """The fusion + action expert over `tokens` VL tokens of width `hidden` (see the module docstring)."""
    e = model_cfg.expert_hidden_dim
    per_token = hidden + e * (FUSION_WIDTHS[model_cfg.effective_fusion] + 3 * model_cfg.expert_num_layers)
    return int(micro_batch * tokens * per_token * width)


def activation_bytes(bb_config, model_cfg, counts, micro_batch: int, work: Workload, width: int) -> int:
    """Peak activation bytes of one forward+backward (see the module docstring). `width` is the
    compute dtype's bytes per element."""
    text = getattr(bb_config, "text_config", bb_config)
    vis = bb_config.vision_config
    h, i = text.hidden_size, text.intermediate_size
    hv, iv = vis.hidden_size, vis.intermediate_size
    b, tokens, patches = micro_batch, work.lm_tokens, work.views * work.patches_per_view
    lm_layer = b * tokens * (7 * h + 4 * i + _lora_copies(model_cfg, h, i))
    vis_layer = b * patches * (5 * hv + 3 * iv)
    checkpointing = model_cfg.use_gradient_checkpointing
    trained = (  # (trained layers, a layer's set, its input, one activation gradient) of the LM and the vision tower
        (counts.trained_lm_layers, lm_layer, b * tokens * h, b * tokens * (i + h)),
        (counts.trained_vision_layers, vis_layer, b * patches * hv, b * patches * (iv + hv)),
    )
    kept = recompute = 0
    for layers, layer_set, layer_input, grad in trained:
        if layers:
            kept += layers * (layer_input if checkpointing else layer_set)
            transient = max(grad, counts.largest_trainable)
            recompute = max(recompute, (layer_set if checkpointing else 0) + transient)
    frozen = max(lm_layer, vis_layer)  # a layer's working set where nothing keeps a graph
    # finetune none trains no layer (counts come from the frozen model), so it gets the working set alone
    backbone = max(kept + recompute + 3 * b * tokens * h, frozen) if kept else frozen
    vl_tokens = tokens if model_cfg.resolved_vl_tokens == -1 else max(model_cfg.resolved_vl_tokens, 1)
    return int(backbone * width) + head_bytes(model_cfg, h, vl_tokens, b, width)


def cache_activation_bytes(model_cfg, hidden: int, micro_batch: int, width: int) -> int:
    """VL-cache mode: the head alone, on K cached tokens (17 when auto)."""
    from vla_ds.model.config import FROZEN_VL_TOKENS

    tokens = FROZEN_VL_TOKENS if model_cfg.resolved_vl_tokens == -1 else max(model_cfg.resolved_vl_tokens, 1)
    return head_bytes(model_cfg, hidden, tokens, micro_batch, width)

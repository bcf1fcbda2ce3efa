"""`--finetune-vl none|lora|full`: which backbone parameters train, applied to a loaded Qwen2.5-VL.

- none: every backbone parameter is frozen (the policy then runs the backbone without grad).
- lora: PEFT LoRA adapters on language-model linear layers (`--lora-targets`), everything else
  frozen. Adapters are injected in place (`peft.inject_adapter_in_model`), so parameter names stay
  the backbone's own plus `.lora_A/.lora_B`; there is no PeftModel wrapper to unwrap when saving.
- full: the last `--unfreeze-last-n` LM blocks and the final LM norm train; with
  `train_vision_blocks` > 0 also the last vision blocks and the patch merger.

With `--load-in-8bit` we deliberately do not call `peft.prepare_model_for_kbit_training`: it
upcasts every non-int8 weight (for the 3B, the 0.67 B-parameter vision tower and the 0.31 B
embedding) to fp32, which costs more memory than int8 saves. What we need from it -- frozen base
weights and checkpointing without the reentrant input hack -- is done here.
"""
from __future__ import annotations

import logging

from torch import nn

from vla_ds.model.backbone import LANGUAGE_MODEL, VISION_MODULE
from vla_ds.model.config import ALL_LINEAR, ModelConfig

log = logging.getLogger(__name__)


def apply_finetune(model, cfg: ModelConfig) -> None:
    """Freeze `model` (a Qwen2_5_VLForConditionalGeneration) and unfreeze/adapt per `cfg` in place."""
    model.requires_grad_(False)
    if cfg.finetune_vl == "lora":
        add_lora(model, cfg)
    elif cfg.finetune_vl == "full":
        unfreeze_last_blocks(model, cfg.unfreeze_last_n, cfg.train_vision_blocks)
    if cfg.use_gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:  # transformers >= 5.2x; gradient_checkpointing_enable is its deprecated alias
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Enabling checkpointing also hooks every input embedding (the text embedding and the vision
        # tower's patch embedding) to output tensors that require grad: the reentrant checkpoint needs
        # that, ours does not. Left on, a frozen vision tower and the frozen LM blocks before the first
        # trained one keep activations and run backward for nothing (the 3B's vision tower is ~40 % of
        # a 2-view forward). Without it, autograd starts at the first trainable parameter.
        model.disable_input_require_grads()
    elif cfg.gradient_checkpointing and not cfg.trains_backbone:
        log.info("--gradient-checkpointing has no effect with --finetune-vl none (the backbone runs without grad)")


def lora_target_modules(model, targets: tuple[str, ...]) -> list[str]:
    """Full names of the language model's linear layers selected by leaf name (or all of them).

    Full names (not leaf names) go to PEFT, so a leaf name shared with the vision tower can never
    put an adapter there.
    """
    prefix = LANGUAGE_MODEL + "."
    linear = [n for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)]
    if targets == (ALL_LINEAR,):
        return linear
    leaves = {n.rsplit(".", 1)[-1] for n in linear}
    unknown = sorted(set(targets) - leaves)
    if unknown:
        raise ValueError(f"--lora-targets {','.join(unknown)}: no such linear layer in the language model "
                         f"(it has {','.join(sorted(leaves))}, or use {ALL_LINEAR})")
    return [n for n in linear if n.rsplit(".", 1)[-1] in targets]


def add_lora(model, cfg: ModelConfig) -> None:
    """Inject LoRA adapters (trainable) into the selected language-model linear layers."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_modules(model, cfg.lora_target_names()),
        bias="none",
    )
    inject_adapter_in_model(lora, model)
    # PEFT freezes the base and unfreezes the adapters; say so explicitly rather than rely on it.
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name)


def unfreeze_last_blocks(model, lm_blocks: int, vision_blocks: int = 0) -> None:
    """Unfreeze the last `lm_blocks` LM decoder layers + the final norm, and the last
    `vision_blocks` vision blocks + the patch merger (which maps them into the LM)."""
    lm = model.get_submodule(LANGUAGE_MODEL)
    if lm_blocks > len(lm.layers):
        raise ValueError(f"--unfreeze-last-n {lm_blocks} exceeds the backbone's {len(lm.layers)} LM blocks")
    for block in list(lm.layers)[-lm_blocks:]:
        block.requires_grad_(True)
    lm.norm.requires_grad_(True)
    if vision_blocks:
        visual = model.get_submodule(VISION_MODULE)
        if vision_blocks > len(visual.blocks):
            raise ValueError(f"train_vision_blocks {vision_blocks} exceeds the backbone's {len(visual.blocks)} "
                             "vision blocks")
        for block in list(visual.blocks)[-vision_blocks:]:
            block.requires_grad_(True)
        visual.merger.requires_grad_(True)


def backbone_component(name: str) -> str:
    """The optimizer group of a backbone parameter (name relative to the HF model): vision or vl."""
    return "vision" if name.startswith(VISION_MODULE + ".") else "vl"

"""`vla-ds convert --merge-lora`: fold the trained backbone into a standalone Qwen2.5-VL directory.

LoRA adapters (injected in place by `vla_ds.model.finetune`, no PeftModel wrapper) are merged with
peft's own `LoraLayer.merge` (W <- W + (alpha/r) B A) and each adapted layer is replaced by its base
`nn.Linear`, so the backbone's parameter names become the plain Hugging Face ones. With
`--finetune-vl full` there is nothing to merge: the unfrozen blocks already are backbone weights.
The result is saved with `save_pretrained` (which writes a tied `lm_head`/`embed_tokens` once),
next to the tokenizer, image processor and chat template of the original backbone, written as the
published model has them (`vla_ds.model.processor.save_processor`), so
`Qwen2_5_VLForConditionalGeneration.from_pretrained(DIR)`, `AutoProcessor.from_pretrained(DIR)` and
`load_processor(DIR)` read it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

from vla_ds.utils.weights import parse_size

log = logging.getLogger(__name__)

# Files of a model directory that hold weights (written anew) rather than tokenizer/processor data.
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".gguf")


def merge_lora_in_place(model) -> int:
    """Merge every peft LoRA layer of `model` into its base layer and unwrap it; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.merge(safe_merge=True)  # raises if the merged weight is not finite
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
        merged += 1
    if hasattr(model, "peft_config"):  # left by inject_adapter_in_model; no adapter remains
        del model.peft_config
    return merged


def merged_config(config, backbone_dir: str | os.PathLike):
    """The `ModelConfig` of a policy whose backbone is the merged directory: frozen, float, and with
    the VL memory it was trained with made explicit (auto would pick another for a frozen one)."""
    return dataclasses.replace(
        config, backbone=str(backbone_dir), finetune_vl="none", load_in_8bit=False, gradient_checkpointing=None,
        train_vision_blocks=0, vl_tokens=config.resolved_vl_tokens,
    )


def save_backbone(model, source_backbone: str, out: Path, dtype, max_shard_size: str | int) -> Path:
    """`save_pretrained` the (merged) HF model in `dtype` + the source backbone's processor files."""
    from vla_ds.model.processor import FOREIGN_PROCESSOR_FILES, load_processor, save_processor

    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    disable()
    model.to(dtype)
    model.save_pretrained(out, max_shard_size=parse_size(max_shard_size))
    # The processor files name the stock classes (whatever the source's say), so AutoProcessor works.
    save_processor(load_processor(source_backbone), out)
    src = Path(source_backbone)
    if src.is_dir():  # the rest of the source's non-weight files (README, LICENSE, ...)
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.endswith(_WEIGHT_FILES) and not f.name.endswith(".index.json") \
                    and f.name not in FOREIGN_PROCESSOR_FILES and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
    log.info("merged backbone written (%s)", out.name)
    return out

"""The LoRA of a policy as a standard PEFT adapter: `adapter_config.json` + `adapter_model.safetensors`.

vla-ds injects its adapters in place (`peft.inject_adapter_in_model`, no PeftModel wrapper), so a
policy's `model.safetensors` holds them under vla-ds names (`vl.model.<module>.lora_A.default.weight`).
A peft user expects the directory `PeftModel.save_pretrained` writes, which these functions write
from the same tensors, without the live model (so a ZeRO-3 consolidated state dict or a
`vla-ds convert` dump serve as well):

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(BACKBONE)
    model = PeftModel.from_pretrained(base, "RUN/checkpoints/final/policy/adapter")

- names: `vl.model.<module>.lora_X.default.weight` -> `base_model.model.<module>.lora_X.weight`, as
  `get_peft_model_state_dict` saves them (the adapter name dropped, the PeftModel prefix added)
- config: a `peft.LoraConfig` of the run's r / alpha / dropout, `target_modules` the exact module
  names that carry an adapter (full names, so no vision layer can match), `base_model_name_or_path`
  the policy's backbone
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_BACKBONE = "vl.model."
_PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.(?P<adapter>[^.]+)\.weight$")


def peft_tensors(tensors: dict) -> dict:
    """The LoRA tensors of a policy state dict under peft's saved names (empty: no LoRA)."""
    out = {}
    for name, t in tensors.items():
        m = _LORA.match(name[len(_BACKBONE):]) if name.startswith(_BACKBONE) else None
        if m:
            out[f"{_PEFT_PREFIX}{m['module']}.{m['part']}.weight"] = t
    return out


def save_adapter(config, tensors: dict, out_dir: str | os.PathLike) -> Path | None:
    """Write the PEFT adapter of a LoRA policy (`config`: its ModelConfig; `tensors`: its saved
    state dict) into `out_dir`; None (nothing written) when the policy has no LoRA. Not atomic by
    itself: call it inside the `atomic_dir` of the policy or convert output."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    adapter = peft_tensors(tensors)
    if not adapter:
        return None
    modules = sorted({n[len(_PEFT_PREFIX):].rsplit(".", 2)[0] for n in adapter})
    backbone = config.backbone
    if Path(backbone).is_dir():
        backbone = str(Path(backbone).resolve())  # a relative path would mean nothing to the reader
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=modules, bias="none", base_model_name_or_path=backbone)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora.save_pretrained(str(out_dir))
    save_file({n: t.contiguous() for n, t in adapter.items()}, str(out_dir / ADAPTER_WEIGHTS),
              metadata={"format": "pt"})
    log.debug("PEFT adapter: %d LoRA layers (r=%d) -> %s", len(modules), config.lora_r, out_dir)
    return out_dir

"""The PEFT adapter beside a LoRA policy: peft loads it and computes vla-ds's backbone features."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.model.test_policy_io import STATS, _inputs, _trained
from vla_ds.model.adapter import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS
from vla_ds.model.policy import QwenVLA


def peft_hidden(backbone, adapter_dir, inputs) -> torch.Tensor:
    """The last hidden state of the stock backbone + the adapter, loaded the way a peft user does."""
    from peft import PeftModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(backbone, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True, return_dict=True).hidden_states[-1]


def vla_hidden(policy, inputs) -> torch.Tensor:
    with torch.no_grad():
        return policy.vl.model.model(**inputs, use_cache=False, return_dict=True).last_hidden_state


def test_peft_loads_the_adapter_and_computes_the_same_features(small_config, tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    policy = _trained(QwenVLA(small_config(finetune_vl="lora", lora_targets="q_proj,v_proj,down_proj"), STATS,
                              device="cpu")).eval()
    out = policy.save_pretrained(tmp_path / "policy")
    adapter = out / ADAPTER_DIR
    cfg = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert all(m.startswith("model.language_model.layers.") for m in cfg["target_modules"])
    assert {m.rsplit(".", 1)[1] for m in cfg["target_modules"]} == {"q_proj", "v_proj", "down_proj"}
    weights = load_file(str(adapter / ADAPTER_WEIGHTS))
    assert len(weights) == 2 * len(cfg["target_modules"]) and all(n.startswith("base_model.model.") for n in weights)

    texts, images, _ = _inputs()
    inputs = policy.vl.processor_inputs(images, texts)
    want = vla_hidden(policy, inputs)
    got = peft_hidden(tiny_model_dir, adapter, inputs)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    # the adapter matters: the stock backbone alone computes other features
    plain = QwenVLA(small_config(finetune_vl="none"), STATS, device="cpu").eval()
    assert (vla_hidden(plain, inputs) - want).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["none", "full"])
def test_no_adapter_without_lora(small_config, tmp_path, mode):
    policy = QwenVLA(small_config(finetune_vl=mode, unfreeze_last_n=1), STATS, device="cpu")
    assert not (policy.save_pretrained(tmp_path / "p") / ADAPTER_DIR).exists()

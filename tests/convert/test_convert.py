"""`vla-ds convert` on real ZeRO-2/3 checkpoints: exact weights, merge, no-DeepSpeed inference, dtype, shards."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.batches import sample_batch, sample_state
from tests.model.test_processor import assert_stock_processor_files
from vla_ds.cli import main
from vla_ds.model.policy import QwenVLA
from vla_ds.utils.weights import INDEX, read_state_dict

pytestmark = pytest.mark.slow
STEP = "step_000002"
PREFIX = "vl.model."


def _backbone_weights(tiny_model_dir) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


def _convert(src, out, *flags) -> dict:
    assert main(["convert", str(src), str(out), *flags]) == 0
    return json.loads((out / "convert.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_converted_weights_equal_the_live_engines(request, tmp_path, tiny_model_dir, stage):
    run = request.getfixturevalue(f"zero{stage}_run")
    # ZeRO-2: the run directory; ZeRO-3: the `latest` pointer
    src = run if stage == 2 else run / "checkpoints" / "latest"
    manifest = _convert(src, tmp_path / "out")
    assert (manifest["zero_stage"], manifest["world_size"], manifest["step"], manifest["tag"]) == (stage, 2, 2, STEP)
    dump = read_state_dict(tmp_path / "out")
    # what the trainer wrote from the live engine (gathered with ZeRO-3's consolidated state dict)
    live = load_file(str(run / "checkpoints" / STEP / "policy" / "model.safetensors"))
    assert any(".lora_B." in n for n in live) and any(n.startswith("sensor_encoder.") for n in live)
    for name, t in live.items():
        assert dump[name].dtype == torch.float32 and torch.equal(dump[name], t), name
    lora_b = [t for n, t in live.items() if ".lora_B." in n]
    assert min(t.abs().max().item() for t in lora_b) > 1e-3, "the adapters trained (a merge must matter)"
    # the frozen backbone never changed: equal to the tiny backbone's own weights
    backbone = _backbone_weights(tiny_model_dir)
    frozen = {n: t for n, t in dump.items() if n.startswith(PREFIX) and n not in live}
    assert len(frozen) == len(backbone)  # named_parameters: the tied lm_head is embed_tokens, listed once
    for name, t in frozen.items():
        assert torch.equal(t, backbone[name[len(PREFIX):].replace(".base_layer", "")]), name
    assert PREFIX + "model.language_model.embed_tokens.weight" in dump and PREFIX + "lm_head.weight" not in dump
    assert set(dump) == set(live) | set(frozen)
    # the policy written beside it holds exactly the trainer's policy weights
    policy = load_file(str(tmp_path / "out" / "policy" / "model.safetensors"))
    assert policy.keys() == live.keys() and all(torch.equal(policy[n], live[n]) for n in live)


def test_trainable_only_is_the_policys_saved_weights(zero3_run, tmp_path):
    step = zero3_run / "checkpoints" / STEP
    _convert(step, tmp_path / "out", "--trainable-only")
    dump = read_state_dict(tmp_path / "out")
    live = load_file(str(step / "policy" / "model.safetensors"))
    assert dump.keys() == live.keys() and all(torch.equal(dump[n], live[n]) for n in live)


def test_merge_lora_predicts_like_the_lora_policy(zero2_run, tmp_path, train_data, tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vla_ds.model.processor import ImageOnlyQwenVLProcessor, load_processor

    out = tmp_path / "merged"
    manifest = _convert(zero2_run / "checkpoints" / "final", out, "--merge-lora")
    assert manifest["backbone"] == "backbone"
    # a plain Hugging Face directory: the real backbone path loads it
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "backbone")
    assert not any("lora" in n for n, _ in hf.named_parameters(remove_duplicate=False))
    assert hf.lm_head.weight is hf.model.language_model.embed_tokens.weight
    assert isinstance(load_processor(out / "backbone"), ImageOnlyQwenVLProcessor)
    assert_stock_processor_files(out / "backbone")
    original = _backbone_weights(tiny_model_dir)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert (hf.get_parameter(q) - original[q]).abs().max() > 1e-4, "the LoRA delta is in the merged weight"
    # the policy: frozen merged backbone, no LoRA weights, the VL memory it trained with
    cfg = json.loads((out / "policy" / "config.json").read_text())
    assert cfg["backbone"] == str((out / "backbone").resolve())
    assert cfg["model"]["finetune_vl"] == "none" and cfg["model"]["vl_tokens"] == -1
    trained_on = json.loads((zero2_run / "checkpoints" / "final" / "policy" / "config.json").read_text())["views"]
    assert trained_on and cfg["views"] == trained_on, "the views the policy was trained on travel with it"
    weights = load_file(str(out / "policy" / "model.safetensors"))
    assert weights and not any(n.startswith("vl.") for n in weights)
    assert not any("lora" in n for n in read_state_dict(out))

    texts, images, sensor, mask = sample_batch(train_data)
    unmerged = QwenVLA.from_pretrained(zero2_run / "checkpoints" / STEP / "policy", device="cpu")
    merged = QwenVLA.from_pretrained(out / "policy", device="cpu")
    want = unmerged.predict(texts, images, sensor, mask)
    got = merged.predict(texts, images, sensor, mask)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # and the LoRA matters: the same head on the original backbone predicts differently
    plain = QwenVLA.from_pretrained(out / "policy", backbone=tiny_model_dir, device="cpu")
    assert (plain.predict(texts, images, sensor, mask) - want).abs().max() > 1e-3


def test_the_lora_exports_as_a_peft_adapter(zero2_run, tmp_path, train_data, tiny_model_dir):
    from tests.model.test_adapter import peft_hidden, vla_hidden
    from vla_ds.model.adapter import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS

    step = zero2_run / "checkpoints" / STEP
    manifest = _convert(step, tmp_path / "adapter", "--adapter-only")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                                                               "convert.json"])
    assert manifest["adapter_only"] and manifest["policy"] is None
    exported = load_file(str(tmp_path / "adapter" / ADAPTER_WEIGHTS))
    # the trainer's checkpoint carries the same adapter beside its policy
    beside = load_file(str(step / "policy" / ADAPTER_DIR / ADAPTER_WEIGHTS))
    assert exported.keys() == beside.keys() and all(torch.equal(exported[n], beside[n]) for n in beside)
    policy = QwenVLA.from_pretrained(step / "policy", device="cpu")
    texts, images, _, _ = sample_batch(train_data)
    inputs = policy.vl.processor_inputs(images, texts)
    torch.testing.assert_close(peft_hidden(tiny_model_dir, tmp_path / "adapter", inputs), vla_hidden(policy, inputs),
                               atol=1e-5, rtol=1e-5)


def test_converted_policy_predicts_without_deepspeed(zero3_run, tmp_path, train_data, repo_root):
    out = tmp_path / "out"
    _convert(zero3_run, out)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["deepspeed"] = None  # `import deepspeed` now raises ImportError
        try:
            import deepspeed
            raise SystemExit("deepspeed importable")
        except ImportError:
            pass
        import torch
        from safetensors.torch import save_file
        torch.set_num_threads(1)
        from tests.helpers.batches import sample_batch, sample_state
        from vla_ds.model.policy import QwenVLA
        policy = QwenVLA.from_pretrained({str(out / 'policy')!r}, device="cpu")
        texts, images, sensor, mask = sample_batch({str(train_data)!r})
        actions = policy.predict(texts, images, sensor, mask, state=sample_state({str(train_data)!r}), num_samples=3)
        save_file({{"actions": actions}}, {str(tmp_path / 'pred.safetensors')!r})
        assert sys.modules["deepspeed"] is None
    """)
    env = dict(os.environ, PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "pred.safetensors"))["actions"]
    texts, images, sensor, mask = sample_batch(train_data)
    ours = QwenVLA.from_pretrained(out / "policy", device="cpu").predict(texts, images, sensor, mask,
                                                                      state=sample_state(train_data), num_samples=3)
    # the ZeRO-3 run's flow head: 3 seeded samples per observation, the same in both processes
    assert theirs.shape == (4, 3, 8, 7) and (theirs[:, 0] - theirs[:, 1]).abs().max() > 1e-4
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_bfloat16_halves_the_files_and_shards_load_back(zero3_run, tmp_path):
    step = zero3_run / "checkpoints" / STEP
    _convert(step, tmp_path / "fp32")
    _convert(step, tmp_path / "bf16", "--dtype", "bfloat16")
    fp32, bf16 = read_state_dict(tmp_path / "fp32"), read_state_dict(tmp_path / "bf16")
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("fp32", "bf16")}
    ratio = size["bf16"] / size["fp32"]
    assert 0.45 < ratio < 0.55, ratio
    assert bf16.keys() == fp32.keys()
    for name, t in fp32.items():
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], t.to(torch.bfloat16)), name  # round-to-nearest, nothing else
        torch.testing.assert_close(bf16[name].float(), t, rtol=2 ** -8, atol=1e-38)
    policy_bf16 = load_file(str(tmp_path / "bf16" / "policy" / "model.safetensors"))
    assert {t.dtype for t in policy_bf16.values()} == {torch.bfloat16}
    QwenVLA.from_pretrained(tmp_path / "bf16" / "policy", device="cpu")  # loads (strict names and shapes)

    sharded = tmp_path / "sharded"
    manifest = _convert(step, sharded, "--max-shard-size", "200KB")
    index = json.loads((sharded / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert manifest["weights"] == shards + [INDEX] and not (sharded / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in fp32.values())
    back = read_state_dict(sharded)
    assert back.keys() == fp32.keys() and all(torch.equal(back[n], fp32[n]) for n in fp32)
    for shard in shards:  # each shard under the limit unless one tensor alone exceeds it
        tensors = load_file(str(sharded / shard))
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 200_000 or len(tensors) == 1, (shard, size)

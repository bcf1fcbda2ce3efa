"""The ZeRO-3 partitioned load (`vla_ds.model.zero3_load`), in this process as a group of one: the
model it builds is exactly `from_pretrained`'s (weights, buffers and their dtypes, the tied lm_head),
from a single file or a sharded checkpoint, and a checkpoint that does not fit is refused in one line.
The two-rank split, and what it saves in memory, is tests/train/test_zero3_load_memory.py."""
from __future__ import annotations

import shutil

import pytest
import torch

from vla_ds.errors import UsageError
from vla_ds.model.zero3_load import load_partitioned, module_name, partitioned

DS = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}


def _gathered(model) -> dict:
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.data.clone()
    return out


def _load(path, dtype=torch.float32):
    from vla_ds.utils.dist import init_distributed

    init_distributed()
    return load_partitioned(path, dtype, "sdpa", DS)


@pytest.mark.parametrize("dtype,sharded", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["float32-one-file", "bfloat16-sharded"])
def test_partitioned_load_equals_from_pretrained(dtype, sharded, tiny_model_dir, tmp_path, in_process_group):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vla_ds.model.backbone import load_vl_model

    path = tiny_model_dir
    if sharded:  # several safetensors files and an index, as the real 3B is published
        path = tmp_path / "sharded"
        Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).save_pretrained(path, max_shard_size="100KB")
        assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    model = _load(path, dtype)
    whole = load_vl_model(tiny_model_dir, dtype, "sdpa", "cpu")
    assert all(partitioned(p) for p in model.parameters())
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as from_pretrained ties
    got, want = _gathered(model), dict(whole.named_parameters())
    assert sorted(got) == sorted(want)
    assert [n for n in want if got[n].dtype != dtype or not torch.equal(got[n], want[n])] == []
    # the RoPE frequencies stay float32 under a bf16 zero.Init, as from_pretrained leaves them
    buffers, ref = dict(model.named_buffers()), dict(whole.named_buffers())
    assert sorted(buffers) == sorted(ref)
    assert [n for n in ref if buffers[n].dtype != ref[n].dtype or not torch.equal(buffers[n], ref[n])] == []


def test_hub_layout_keys_map_to_module_names():
    assert module_name("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    assert module_name("model.layers.3.mlp.up_proj.weight") == "model.language_model.layers.3.mlp.up_proj.weight"
    assert module_name("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert module_name("lm_head.weight") == "lm_head.weight"
    for already in ("model.language_model.norm.weight", "model.visual.merger.ln_q.weight"):
        assert module_name(already) == already


def _copy_with(src, dst, edit):
    """A copy of the model directory whose model.safetensors went through `edit(tensors)`."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tiny_model_dir, tmp_path, in_process_group):
    missing = _copy_with(tiny_model_dir, tmp_path / "missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(UsageError, match=r"no weight for 1 parameter\(s\), e.g. model.language_model.norm.weight"):
        _load(missing)

    def widen(t):
        t["visual.merger.mlp.0.bias"] = torch.zeros(t["visual.merger.mlp.0.bias"].numel() + 1)

    wrong = _copy_with(tiny_model_dir, tmp_path / "wrong", widen)
    with pytest.raises(UsageError, match="visual.merger.mlp.0.bias has shape .* the config.json does not match"):
        _load(wrong)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(UsageError, match="reads safetensors only"):
        _load(pickled)


def test_init_from_fills_a_partitioned_backbone(tiny_model_dir, tmp_path, in_process_group):
    """--init-from of a full finetune under ZeRO-3: the trained blocks land in the shards."""
    from safetensors.torch import save_file

    from vla_ds.model.config import ModelConfig
    from vla_ds.model.policy import QwenVLA
    from vla_ds.train.init_from import load_init_weights
    from vla_ds.utils.dist import init_distributed

    init_distributed()
    cfg = ModelConfig(backbone=str(tiny_model_dir), finetune_vl="full", unfreeze_last_n=1, expert_hidden_dim=32,
                      expert_num_heads=4, expert_num_layers=1, dtype="float32")
    policy = QwenVLA(cfg, device="cpu", zero3=DS)
    name = next(n for n in policy.backbone_trained if n.endswith("mlp.up_proj.weight"))
    param = dict(policy.named_parameters())[name]
    assert partitioned(param)
    value = torch.randn(tuple(param.ds_shape))
    save_file({name: value}, str(tmp_path / "model.safetensors"))
    report = load_init_weights(policy, tmp_path)
    assert report["loaded"] == [name]
    assert torch.equal(_gathered(policy)[name], value)


@pytest.mark.parametrize("chunk", [1, 7, 1 << 24])
def test_a_shard_is_read_in_chunks_of_rows_exactly(chunk, monkeypatch):
    """Any flat range of any shape, read a chunk of rows at a time, is the same elements."""
    from vla_ds.model import zero3_load

    monkeypatch.setattr(zero3_load, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    for shape in [(13,), (9, 5), (4, 3, 6), (1, 11)]:
        whole = torch.randn(shape, generator=gen)
        total = whole.numel()
        for start, count in [(0, total), (0, 1), (total - 1, 1), (3, total - 5), (total // 2, total - total // 2)]:
            dst = torch.full((count,), float("nan"))
            zero3_load._copy_range(dst, whole, shape, start, count)  # a tensor slices like safetensors' slice
            assert torch.equal(dst, whole.reshape(-1)[start:start + count]), (shape, start, count)

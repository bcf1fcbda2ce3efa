"""VL features: per-sample chat messages, padding never pooled, D from the config, VL-cache input."""
from __future__ import annotations

import json

import pytest
import torch

from vla_ds.data.synthetic import synthetic_view
from vla_ds.model.backbone import chat_message
from vla_ds.model.config import FROZEN_VL_TOKENS
from vla_ds.model.policy import QwenVLA


def _reference_hidden(policy, views, instruction, layer=-1):
    """One sample through the stock processor + HF model, independently of VLEncoder."""
    processor, model = policy.vl.processor, policy.vl.model
    text = processor.apply_chat_template(chat_message(len(views), instruction), tokenize=False,
                                         add_generation_prompt=True)
    inputs = processor(text=[text], images=views, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[layer][0]


def test_each_sample_is_its_own_message_and_padding_is_never_pooled(small_config, make_batch):
    policy = QwenVLA(small_config(vl_tokens=-1), device="cpu")  # every VL token: the whole sequence
    batch = make_batch(3, views=[1, 3, 2])  # different view counts -> different lengths -> padding
    feats = policy.encode_vl(batch)
    lengths = feats.mask.sum(1).tolist()
    assert feats.tokens.shape == (3, max(lengths), 64) and feats.pooled.shape == (3, 64)
    assert len(set(lengths)) == 3, "the samples must differ in length for this test to mean anything"
    for i in range(3):
        ref = _reference_hidden(policy, batch["images"][i], batch["instructions"][i])
        n = lengths[i]
        assert ref.shape[0] == n
        assert feats.mask[i, :n].all() and not feats.mask[i, n:].any()  # right padding
        torch.testing.assert_close(feats.tokens[i, :n], ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(feats.pooled[i], ref.mean(0), atol=1e-5, rtol=1e-4)


def test_feature_layer_selects_that_hidden_state(small_config, make_batch):
    policy = QwenVLA(small_config(vl_feature_layer=1, vl_tokens=-1), device="cpu")
    batch = make_batch(1)
    feats = policy.encode_vl(batch)
    ref = _reference_hidden(policy, batch["images"][0], batch["instructions"][0], layer=1)
    torch.testing.assert_close(feats.tokens[0], ref, atol=1e-5, rtol=1e-4)
    last = _reference_hidden(policy, batch["images"][0], batch["instructions"][0], layer=-1)
    assert not torch.allclose(feats.tokens[0], last, atol=1e-3)
    with pytest.raises(ValueError, match="--vl-feature-layer 5 is outside"):
        QwenVLA(small_config(vl_feature_layer=5), device="cpu")


def test_vl_tokens_choose_the_memory_the_expert_attends_over(small_config, make_batch):
    """-1: every token; 0: the pooled vector as one token; K: K pooled tokens (each view's image
    tokens on a grid + 1 text token). The pooled vector is the same masked mean in every case, and
    auto means every token when the backbone trains, FROZEN_VL_TOKENS when it is frozen."""
    batch = make_batch(3, views=[1, 3, 2])
    every = QwenVLA(small_config(vl_tokens=-1), device="cpu")
    full = every.encode_vl(batch)
    lengths = full.mask.sum(1)
    assert full.tokens.shape == (3, int(lengths.max()), 64) and len(set(lengths.tolist())) == 3
    for k in (0, 5):
        every.vl.vl_tokens = k  # the same backbone, reduced to k tokens
        feats = every.encode_vl(batch)
        assert feats.tokens.shape == (3, max(k, 1), 64) and feats.tokens.dtype == torch.float32
        torch.testing.assert_close(feats.pooled, full.pooled, atol=1e-6, rtol=1e-5)
        if k == 0:
            assert torch.equal(feats.tokens[:, 0], feats.pooled) and feats.mask.all()
        else:
            inputs = every.vl.processor_inputs(batch["images"], batch["instructions"])
            text = inputs["attention_mask"].bool() & (inputs["input_ids"] != every.vl.model.config.image_token_id)
            for i in range(3):  # the last slot summarises the sample's text tokens
                torch.testing.assert_close(feats.tokens[i, -1], full.tokens[i, text[i]].mean(0), atol=1e-6, rtol=1e-5)
            assert feats.mask[:, -1].all()
    assert QwenVLA(small_config(), device="cpu").vl.vl_tokens == FROZEN_VL_TOKENS
    assert QwenVLA(small_config(finetune_vl="lora"), device="cpu").vl.vl_tokens == -1
    with pytest.raises(ValueError, match=r"--vl-tokens K must be at least 1 \+ the number of views"):
        QwenVLA(small_config(vl_tokens=3), device="cpu").encode_vl(batch)  # 3 views need 4


def test_image_paths_and_pil_images_give_the_same_features(small_config, tmp_path):
    policy = QwenVLA(small_config(), device="cpu")
    views = [synthetic_view(1), synthetic_view(2)]
    paths = []
    for i, v in enumerate(views):
        v.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    a = policy.encode_vl({"images": [views], "instructions": ["go"]})
    b = policy.encode_vl({"images": [paths], "instructions": ["go"]})
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(FileNotFoundError, match="nope.png does not exist"):
        policy.encode_vl({"images": [[str(tmp_path / "nope.png")]], "instructions": ["go"]})


def test_cached_features_take_the_same_downstream_path(small_config, make_batch):
    torch.manual_seed(0)
    live = QwenVLA(small_config(), device="cpu").eval()
    batch = make_batch(3, views=[1, 2, 2])
    feats = live.encode_vl(batch)
    cache_batch = {k: v for k, v in batch.items() if k not in ("images", "instructions")}
    cache_batch.update(vl_tokens=feats.tokens, vl_tokens_mask=feats.mask, vl_pooled=feats.pooled)

    # A policy without backbone weights, same heads, fed from the cache.
    cached = QwenVLA(small_config(), device="cpu", load_backbone=False).eval()
    assert cached.vl is None
    cached.load_state_dict({k: v for k, v in live.state_dict().items() if not k.startswith("vl.")})
    with torch.no_grad():
        out_live, out_cache = live(batch), cached(cache_batch)
    torch.testing.assert_close(out_cache.actions, out_live.actions, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out_cache.per_sample_loss, out_live.per_sample_loss, atol=1e-6, rtol=1e-5)

    # The cache takes precedence over images when a batch has both; pooled-only caches work too.
    with torch.no_grad():
        both = live({**batch, "vl_tokens": feats.tokens, "vl_tokens_mask": feats.mask, "vl_pooled": feats.pooled})
        pooled_only = cached({**cache_batch, "vl_tokens": None, "vl_tokens_mask": None})
    torch.testing.assert_close(both.actions, out_live.actions, atol=1e-6, rtol=1e-5)
    assert pooled_only.actions.shape == (3, 8, 7)
    with pytest.raises(ValueError, match="must carry vl_pooled from a VL cache"):
        cached(batch)
    with pytest.raises(ValueError, match="vl_pooled is \\(3, 32\\), the backbone's features are \\(B, 64\\)"):
        cached({**cache_batch, "vl_pooled": torch.zeros(3, 32)})


def test_d_comes_from_the_backbone_config_without_loading_weights(small_config, tmp_path):
    # The published Qwen2.5-VL-3B-Instruct config layout (text fields at the top level), no weights.
    cfg = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16,
        "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "vision_config": {"depth": 32, "hidden_size": 1280, "out_hidden_size": 2048, "num_heads": 16},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    policy = QwenVLA(small_config(backbone=str(tmp_path)), device="cpu", load_backbone=False)
    assert policy.vl_dim == 2048
    assert policy.fusion.vl_proj[1].in_features == 2048
    out = policy({"vl_pooled": torch.randn(2, 2048)})
    assert out.actions.shape == (2, 8, 7) and out.per_sample_loss is None
    with pytest.raises(ValueError, match="--finetune-vl lora trains the backbone"):
        QwenVLA(small_config(backbone=str(tmp_path), finetune_vl="lora"), device="cpu", load_backbone=False)
    with pytest.raises(FileNotFoundError, match="missing: no such directory"):
        QwenVLA(small_config(backbone=str(tmp_path / "missing")), device="cpu", load_backbone=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: cannot read a Qwen2.5-VL config there"):
        QwenVLA(small_config(backbone=str(tmp_path / "empty")), device="cpu", load_backbone=False)


def test_pixel_bounds_reach_the_backbone(small_config, make_batch):
    batch = make_batch(1)
    small = QwenVLA(small_config(max_pixels=56 * 56, vl_tokens=-1), device="cpu").encode_vl(batch)
    large = QwenVLA(small_config(max_pixels=224 * 224, vl_tokens=-1), device="cpu").encode_vl(batch)
    assert small.mask.sum() < large.mask.sum()

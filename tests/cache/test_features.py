"""Cached features equal live ones; the same head trains the same from the cache as live."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.cache.conftest import TOKENS
from vla_ds.cache import _grid, encode_for_cache, pool_tokens, verify_cache
from vla_ds.cache_store import CachedDataset, CacheReader
from vla_ds.data.dataset import IntegratedDataset, collate
from vla_ds.model.config import ModelConfig
from vla_ds.model.policy import QwenVLA

HEAD = dict(finetune_vl="none", head_dropout=0.0, expert_hidden_dim=32, expert_num_layers=2, expert_num_heads=4,
            sensor_hidden_dim=32, sensor_output_dim=32, sensor_num_heads=4, sensor_conv_blocks=3, sensor_num_layers=1)


@pytest.fixture(scope="module")
def live_encoder(tiny_model_dir):
    from vla_ds.cache import _load_encoder

    return _load_encoder(ModelConfig(backbone=str(tiny_model_dir), finetune_vl="none"), torch.device("cpu"))


def test_cached_pooled_equals_the_live_encoder(ref_cache, ref_cache32, cache_data, live_encoder):
    ds = IntegratedDataset(cache_data, views=["View1", "View5"])
    idx = [0, 5, 9, 15]
    live = live_encoder([ds.images(i) for i in idx], [ds[i]["instruction"] for i in idx])  # VLEncoder.forward
    r16, r32 = CacheReader(ref_cache), CacheReader(ref_cache32)
    for b, i in enumerate(idx):
        ref = live.pooled[b].detach()
        assert torch.allclose(r32.features(ds.sample_id(i))["vl_pooled"], ref, rtol=1e-5, atol=1e-6)
        got = r16.features(ds.sample_id(i))["vl_pooled"]
        assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()  # float16 rounding only


def test_token_pooling_keeps_views_apart_and_summarises_the_text(cache_data, live_encoder):
    ds = IntegratedDataset(cache_data, views=["View1", "View5"])
    images, texts = [ds.images(0), ds.images(7)], [ds[0]["instruction"], ds[7]["instruction"]]
    inputs = live_encoder.processor_inputs(images, texts)
    with torch.no_grad():
        hidden = live_encoder.model.model(**inputs, use_cache=False, return_dict=True).last_hidden_state
    mask = inputs["attention_mask"].bool()
    image_id = live_encoder.model.config.image_token_id
    tokens, tmask = pool_tokens(hidden, mask, inputs["input_ids"], inputs["image_grid_thw"], [2, 2], image_id, 2, 5)
    assert tokens.shape == (2, 5, 64) and tmask.all()
    for b in range(2):
        is_img = (inputs["input_ids"][b] == image_id) & mask[b]
        assert inputs["image_grid_thw"][2 * b].tolist() == [1, 4, 4]  # 4 x 4 patches = 2 x 2 merged tokens
        img = hidden[b, is_img].reshape(2, 4, 64)  # 2 views x 4 merged tokens, row-major
        grid = img[0].reshape(2, 2, 64)
        # view 0 gets slots 0-1: a 1 x 2 grid (left and right half); view 1 slots 2-3
        assert torch.allclose(tokens[b, 0], grid[:, 0].mean(0), atol=1e-5)
        assert torch.allclose(tokens[b, 1], grid[:, 1].mean(0), atol=1e-5)
        assert torch.allclose(tokens[b, 2:4].mean(0), img[1].mean(0), atol=1e-5)
        assert torch.allclose(tokens[b, 4], hidden[b, mask[b] & ~is_img].mean(0), atol=1e-5)
    # 7 tokens, 2 views: 3 cells each; grids follow the image's aspect and never exceed it
    assert _grid(3, 4, 4) == (1, 3) or _grid(3, 4, 4) == (3, 1)
    assert _grid(4, 4, 4) == (2, 2) and _grid(8, 2, 8) == (1, 8) and _grid(16, 2, 2) == (2, 2)
    feats = encode_for_cache(live_encoder, images, texts, 5)
    assert torch.allclose(feats["vl_tokens"], tokens) and feats["vl_pooled"].shape == (2, 64)


def _losses(policy, batch, steps=2):
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        out = policy(batch)
        losses.append(out.per_sample_loss.detach().clone())
        opt.zero_grad()
        out.per_sample_loss.mean().backward()
        opt.step()
    return losses


@pytest.mark.parametrize("variant", ["pooled", "tokens+cross_attention"])
def test_cache_mode_and_live_mode_train_the_same(variant, ref_cache32, ref_cache, cache_data, tiny_model_dir):
    """Same initial head, same samples: the first two steps' per-sample losses (forward, backward,
    AdamW) agree between features read from the cache and features the backbone computes now."""
    sensor = variant != "pooled"
    extra = dict(sensor_enabled=True, fusion_strategy="cross_attention", sensor_input_channels=1026,
                 sensor_temporal_length=650) if sensor else {}
    config = ModelConfig(backbone=str(tiny_model_dir), **HEAD, **extra)
    torch.manual_seed(0)
    live = QwenVLA(config, device="cpu", load_backbone=True)
    head = {k: v.clone() for k, v in live.state_dict().items() if not k.startswith("vl.")}
    idx = [0, 4, 9, 13]
    live_batch = collate([IntegratedDataset(cache_data, views=["View1", "View5"], load_sensor=sensor)[i] for i in idx])
    # live: the backbone encodes the images now, reduced the way the cache reduces them
    live_batch.update(encode_for_cache(live.vl, live_batch["images"], live_batch["instructions"],
                                       TOKENS if sensor else 0))
    want = _losses(live, live_batch)
    cached = QwenVLA(config, device="cpu", load_backbone=False)  # reads only the backbone's config
    assert cached.vl is None and sum(p.numel() for p in cached.parameters()) < sum(p.numel() for p in live.parameters())
    for cache_dir, rtol in ((ref_cache32, 1e-5), (ref_cache, 2e-3)):
        cds = CachedDataset(IntegratedDataset(cache_data, views=["View1", "View5"], load_images=False,
                                              load_sensor=sensor), CacheReader(cache_dir))
        batch = collate([cds[i] for i in idx])
        assert "images" not in batch and batch["vl_pooled"].shape == (4, 64)
        if not sensor:
            del batch["vl_tokens"], batch["vl_tokens_mask"]
        cached.load_state_dict(head)
        got = _losses(cached, batch)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=rtol, atol=1e-7), (cache_dir.name, g, w)


def test_cached_dataset_in_a_worker_loader(ref_cache, cache_data):
    base = IntegratedDataset(cache_data, views=["View1", "View5"], load_images=False, load_sensor=False)
    cds = CachedDataset(base, CacheReader(ref_cache))
    assert len(cds) == len(base) == 16 and cds.episode_ids == base.episode_ids
    assert (cds.sample_has_sensor == base.sample_has_sensor).all() and cds.episode_has_sensor == base.episode_has_sensor
    assert cds.view_names == ["View1", "View5"] and cds.sample_id(3) == base.sample_id(3)
    cds[0]
    assert cds.reader._maps  # opened lazily in this process ...
    import pickle

    assert pickle.loads(pickle.dumps(cds)).reader._maps == {}  # ... and never pickled to workers
    loader = torch.utils.data.DataLoader(cds, batch_size=8, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert [b["vl_pooled"].shape for b in batches] == [(8, 64), (8, 64)]
    assert batches[0]["vl_tokens"].shape == (8, TOKENS, 64) and batches[0]["vl_tokens_mask"].dtype == torch.bool
    assert batches[0]["vl_pooled"].dtype == torch.float32
    with pytest.raises(ValueError, match="load_images=False"):
        CachedDataset(IntegratedDataset(cache_data), CacheReader(ref_cache))


def test_verify_passes_and_catches_a_corrupted_shard(ref_cache, copy_cache, cfg_for):
    assert verify_cache(cfg_for(ref_cache), num_samples=6)["ok"]
    cache = copy_cache(ref_cache)
    path = cache / "shards" / "000001.pooled.npy"
    arr = np.load(path)
    arr[:, :8] += 0.5
    np.save(path, arr)
    result = verify_cache(cfg_for(cache), num_samples=16)
    assert not result["ok"] and result["worst_sample"] in CacheReader(cache).index and result["max_rel_error"] > 0.1

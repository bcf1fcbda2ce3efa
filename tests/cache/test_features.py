"""Cached features equal live ones; the same head trains the same from the cache as live."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.cache import TOKENS
from vla_ds.cache import CachedDataset, CacheReader, encode_for_cache, open_cache_for_training, verify_cache
from vla_ds.data.batch import collate
from vla_ds.data.dataset import IntegratedDataset
from vla_ds.model.backbone import VLEncoder, VLFeatures
from vla_ds.model.config import ModelConfig
from vla_ds.model.policy import QwenVLA
from vla_ds.model.vl_tokens import _grid, pool_tokens

VIEWS = ["View1", "View5"]
HEAD = dict(finetune_vl="none", head_dropout=0.0, expert_hidden_dim=32, expert_num_layers=2, expert_num_heads=4,
            sensor_hidden_dim=32, sensor_output_dim=32, sensor_num_heads=4, sensor_conv_blocks=3, sensor_num_layers=1)


@pytest.fixture(scope="module")
def live_encoder(tiny_model_dir):
    """The frozen tiny backbone as the cache builds it, K = TOKENS."""
    from vla_ds.cache import load_encoder

    return load_encoder(ModelConfig(backbone=str(tiny_model_dir), finetune_vl="none"), torch.device("cpu"), TOKENS)


@pytest.mark.parametrize("k", [0, TOKENS])
def test_cached_features_equal_the_live_encoder(k, ref_cache, ref_cache32, ref_cache32_pooled, cache_data,
                                                live_encoder):
    encoder = VLEncoder(live_encoder.model, live_encoder.processor, vl_tokens=k)
    ds = IntegratedDataset(cache_data, views=VIEWS)
    idx = [0, 5, 9, 15]
    live = encoder([ds.images(i) for i in idx], [ds[i]["instruction"] for i in idx])  # VLEncoder.forward
    assert live.tokens.shape == (4, max(k, 1), 64) and live.tokens.dtype == live.pooled.dtype == torch.float32
    r32 = CacheReader(ref_cache32 if k else ref_cache32_pooled)
    rows = [r32.features(ds.sample_id(i)) for i in idx]
    feats = VLFeatures.from_cache({key: torch.stack([r[key] for r in rows]) for key in rows[0]}, 64)  # as encode_vl
    for got, want in zip(feats, live):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if k:  # float16 storage: rounding only
        r16 = CacheReader(ref_cache)
        for b, i in enumerate(idx):
            row = r16.features(ds.sample_id(i))
            for key, ref in (("vl_pooled", live.pooled[b]), ("vl_tokens", live.tokens[b])):
                assert (row[key] - ref).abs().max() <= 1e-3 * ref.abs().max()
            assert torch.equal(row["vl_tokens_mask"], live.mask[b])


def test_token_pooling_keeps_views_apart_and_summarises_the_text(cache_data, live_encoder):
    ds = IntegratedDataset(cache_data, views=VIEWS)
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
    feats = encode_for_cache(live_encoder, images, texts)
    assert torch.allclose(feats["vl_tokens"], tokens) and feats["vl_pooled"].shape == (2, 64)
    # fewer slots than 1 text token + 1 per view: refused, never silently misplaced
    with pytest.raises(ValueError, match=r"--vl-tokens K must be at least 1 \+ the number of views \(V\): got K = 2"):
        pool_tokens(hidden, mask, inputs["input_ids"], inputs["image_grid_thw"], [2, 2], image_id, 2, 2)
    with pytest.raises(ValueError, match="at least 1 \\+ the number of views"):
        VLEncoder(live_encoder.model, live_encoder.processor, vl_tokens=2)(images, texts)
    with pytest.raises(ValueError, match="cannot store"):
        encode_for_cache(VLEncoder(live_encoder.model, live_encoder.processor, vl_tokens=-1), images, texts)


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


@pytest.mark.parametrize("k, sensor", [(0, False), (TOKENS, True)], ids=["pooled", "tokens+cross_attention"])
def test_cache_mode_and_live_mode_are_the_same_function(k, sensor, ref_cache32, ref_cache32_pooled, ref_cache,
                                                        cache_data, tiny_model_dir, cfg_for):
    """A frozen policy with --vl-tokens K: the live backbone (a batch of images + instructions, as
    predict() runs) and a cache of K tokens give the same features and the same per-sample losses
    over the first two AdamW steps, from the same initial head; with every VL token (the old live
    behaviour) they differ."""
    extra = dict(sensor_enabled=True, fusion_strategy="cross_attention", sensor_input_channels=1026,
                 sensor_temporal_length=650) if sensor else {}
    config = ModelConfig(backbone=str(tiny_model_dir), vl_tokens=k, **HEAD, **extra)
    torch.manual_seed(0)
    live = QwenVLA(config, device="cpu", load_backbone=True)
    head = {n: v.clone() for n, v in live.state_dict().items() if not n.startswith("vl.")}
    idx = [0, 4, 9, 13]
    live_batch = collate([IntegratedDataset(cache_data, views=VIEWS, load_sensor=sensor)[i] for i in idx])
    assert "vl_pooled" not in live_batch
    with torch.no_grad():
        live_feats = live.encode_vl(live_batch)
    want = _losses(live, live_batch)

    cached = QwenVLA(config, device="cpu", load_backbone=False)  # reads only the backbone's config
    assert cached.vl is None and sum(p.numel() for p in cached.parameters()) < sum(p.numel() for p in live.parameters())
    caches = [(ref_cache32, 1e-5), (ref_cache, 2e-3)] if k else [(ref_cache32_pooled, 1e-5)]
    base = IntegratedDataset(cache_data, views=VIEWS, load_images=False, load_sensor=sensor)
    for cache_dir, rtol in caches:
        reader = open_cache_for_training(cfg_for(cache_dir, vl_tokens=k, cache_policy="require", **extra),
                                         base.sample_ids())
        batch = collate([CachedDataset(base, reader)[i] for i in idx])
        assert "images" not in batch and batch["vl_pooled"].shape == (4, 64) and ("vl_tokens" in batch) == bool(k)
        if rtol == 1e-5:
            for got, ref in zip(cached.encode_vl(batch), live_feats):
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        cached.load_state_dict(head)
        got = _losses(cached, batch)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=rtol, atol=1e-7), (cache_dir.name, g, w)

    # The old mismatch: the same head over every VL token (what live mode used to feed it) differs.
    every = QwenVLA(ModelConfig(backbone=str(tiny_model_dir), vl_tokens=-1, **HEAD, **extra), device="cpu")
    every.load_state_dict({**every.state_dict(), **head})
    with torch.no_grad():
        assert every.encode_vl(live_batch).tokens.shape[1] > max(k, 1)
        old = every(live_batch).per_sample_loss
    assert not torch.allclose(old, want[0], rtol=1e-3)


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

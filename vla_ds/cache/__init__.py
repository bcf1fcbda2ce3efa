"""VL feature cache: encode every sample once with the frozen backbone, train the head from memory maps.

- `build_cache(cfg)` (Collective): every rank encodes a disjoint share of the planned shards;
  resumable (finished shards are never re-encoded), locked against concurrent builds.
- `open_cache_for_training(cfg, sample_ids)`: `--cache-policy auto|require|off`.
- `CachedDataset(IntegratedDataset(..., load_images=False), reader)`: items carry the features.
- `verify_cache(cfg)`: re-encode a random subset and compare.
- `encode_for_cache(encoder, images, instructions)`: the features exactly as stored (pooled vector
  and, for K > 0, K tokens): `VLEncoder.encode_inputs`, the live policy's own path, as a dict.

A cache stores K = `--vl-tokens` tokens per sample (`ModelConfig.resolved_vl_tokens`, auto: 17):
the VL memory the policy attends over, computed by the same code live and cached
(`vla_ds.model.vl_tokens`), so a head trained from the cache predicts the same with the live
backbone. K is part of the cache's layout: a model with another K never uses it.

The rooms: `store` (the layout on disk, plan, shards, lock), `fingerprint` (what produced a
cache), `reader` (reading and deciding to use one), `build` (encoding and checking); see
docs/cache.md. `python -m vla_ds.cache` (also under torchrun) is `vla-ds cache`.
"""
from vla_ds.cache.build import build_cache, cache_vl_tokens, encode_for_cache, load_encoder, verify_cache
from vla_ds.cache.fingerprint import compute_fingerprint, fingerprint_diff
from vla_ds.cache.reader import CachedDataset, CacheReader, cache_dataset, open_cache_for_training
from vla_ds.cache.store import cache_dir_of

__all__ = ["build_cache", "cache_vl_tokens", "encode_for_cache", "load_encoder", "verify_cache", "compute_fingerprint",
           "fingerprint_diff", "CachedDataset", "CacheReader", "cache_dataset", "open_cache_for_training",
           "cache_dir_of"]

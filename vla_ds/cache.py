"""VL feature cache: encode every sample once with the frozen backbone, train the head from memory maps.

- `build_cache(cfg)` (Collective): every rank encodes a disjoint share of the planned shards;
  resumable (finished shards are never re-encoded), locked against concurrent builds.
- `open_cache_for_training(cfg, sample_ids)`: `--cache-policy auto|require|off`.
- `CachedDataset(IntegratedDataset(..., load_images=False), reader)`: items carry the features.
- `verify_cache(cfg)`: re-encode a random subset and compare.
- `encode_for_cache(encoder, images, instructions)`: the features exactly as stored (pooled vector
  and, for K > 0, K tokens): `VLEncoder.encode_inputs`, the live policy's own path, as a dict.

A cache stores K = `--vl-tokens` tokens per sample (`ModelConfig.memory_tokens`, auto: 17): the
VL memory the policy attends over, computed by the same code live and cached
(`vla_ds.model.vl_tokens`), so a head trained from the cache predicts the same with the live
backbone. K is part of the cache's layout: a model with another K never uses it.

What produced a cache is its fingerprint (`compute_fingerprint`, no weights loaded); per episode,
a key of its instruction and ingest fingerprint. Building is in `vla_ds.cache_build`, storage in
`vla_ds.cache_store`; see docs/cache.md.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vla_ds.cache_build import (  # noqa: F401  (build_cache, encode_for_cache, cache_dir_of: public here)
    _dataset, _load_encoder, build_cache, cache_dir_of, cache_tokens_of, encode_for_cache,
)
from vla_ds.cache_store import (  # noqa: F401  (CachedDataset, CacheReader, compute_fingerprint: public here)
    CachedDataset, CacheReader, compute_fingerprint, episode_keys, episode_of, fingerprint_diff,
)
from vla_ds.errors import UsageError
from vla_ds.model.vl_tokens import TOKEN_POOLING, pool_tokens  # noqa: F401  (pool_tokens: moved there)

log = logging.getLogger(__name__)

__all__ = ["build_cache", "build_cache_from_config", "open_cache_for_training", "CachedDataset", "CacheReader",
           "verify_cache", "encode_for_cache", "cache_tokens_of", "compute_fingerprint", "cache_dir_of", "demo_stage"]


def build_cache_from_config(cfg) -> dict:
    """Collective. `--mode cache` of the training entry: `build_cache` with the defaults."""
    return build_cache(cfg)


# ------------------------------------------------------------------------------------------ use
def _tolerance(layout_dtype: str, compute_dtype: str) -> float:
    # fp16 storage rounds to ~5e-4 relative; bf16 compute differs by batch padding at ~1e-2
    return 5e-2 if compute_dtype in ("bfloat16", "float16") else (2e-3 if layout_dtype == "float16" else 1e-4)


def verify_cache(cfg, num_samples: int = 64, seed: int = 0) -> dict:
    """Re-encode `num_samples` random cached samples and compare with the cache (not collective:
    call on one rank). Relative error = max |cached - live| / max |live| per sample and array."""
    cache_dir = cache_dir_of(cfg)
    try:
        reader = CacheReader(cache_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    ds = _dataset(cfg, load_images=True)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    fp = compute_fingerprint(cfg.model, ds.view_names, device)
    diff = fingerprint_diff(reader.fingerprint, fp)
    if diff:
        raise UsageError(f"--cache-dir {cache_dir} was built differently from these flags: {diff}")
    index = {s: i for i, s in enumerate(ds.sample_ids()) if s in reader}
    ids = sorted(index)
    rng = np.random.default_rng(seed)
    pick = [ids[j] for j in sorted(rng.choice(len(ids), min(num_samples, len(ids)), replace=False))]
    encoder = _load_encoder(cfg.model, device, reader.num_tokens)
    instructions = {ep.meta.episode_id: ep.meta.instruction for ep in ds.episodes}
    worst, worst_id = 0.0, None
    for j in range(0, len(pick), max(cfg.data.batch_size, 8)):
        chunk = pick[j : j + max(cfg.data.batch_size, 8)]
        live = encode_for_cache(encoder, [ds.images(index[s]) for s in chunk],
                                [instructions[episode_of(s)] for s in chunk])
        for b, sid in enumerate(chunk):
            cached = reader.features(sid)
            for key in ("vl_pooled", "vl_tokens"):
                if key in cached:
                    ref = live[key][b].float().cpu()
                    err = float((cached[key] - ref).abs().max() / ref.abs().max().clamp(min=1e-6))
                    if err > worst:
                        worst, worst_id = err, sid
    tol = _tolerance(reader.dtype, fp["compute_dtype"])
    result = {"checked": len(pick), "max_rel_error": worst, "worst_sample": worst_id, "tolerance": tol,
              "ok": worst <= tol}
    log.info("cache verify: %d samples re-encoded, max relative error %.2e (tolerance %.0e)%s", len(pick), worst, tol,
             "" if result["ok"] else f": MISMATCH at {worst_id}")
    return result


def open_cache_for_training(cfg, sample_ids: list[str]) -> CacheReader | None:
    """`--cache-policy`: off -> None; auto -> a reader when the cache can stand in for the backbone
    for every requested sample, else None (logged: the live backbone is used); require -> the reader
    or a UsageError with the one-line reason (--finetune-vl lora/full, --vl-tokens -1, missing
    cache, K differing from the model's --vl-tokens, differing fingerprint field, missing or stale
    samples)."""
    if cfg.run.cache_policy == "off":
        return None
    reader, why = _usable_reader(cfg, cache_dir_of(cfg), sample_ids)
    if reader is not None:
        log.info("VL cache %s: %d samples, %s, %s; the backbone's weights are not needed", reader.dir,
                 len(sample_ids), f"{reader.num_tokens} tokens + pooled" if reader.has_tokens else "pooled vector",
                 reader.dtype)
        return reader
    if cfg.run.cache_policy == "require":
        raise UsageError(f"--cache-policy require: {why}")
    log.info("VL cache not used (%s): the live backbone encodes every batch", why)
    return None


def _tokens(k: int) -> str:
    return "the pooled vector" if k == 0 else f"{k} pooled tokens"


def _usable_reader(cfg, cache_dir: Path, sample_ids: list[str]) -> tuple[CacheReader | None, str]:
    """(reader, "") when the cache can stand in for the backbone, else (None, why not)."""
    if cfg.model.finetune_vl != "none":
        return None, (f"--finetune-vl {cfg.model.finetune_vl} trains the backbone, so cached VL features would be "
                      "stale; use --finetune-vl none or --cache-policy off")
    k = cfg.model.memory_tokens
    if k == -1:
        return None, ("the model attends over every VL token (--vl-tokens -1): a cache cannot stand in; use "
                      "--vl-tokens 0 or K")
    try:
        reader = CacheReader(cache_dir)
    except (FileNotFoundError, ValueError) as e:
        return None, f"{e}; build it with `vla-ds cache` (same flags)"
    if reader.num_tokens != k:
        return None, (f"--cache-dir {cache_dir} holds {_tokens(reader.num_tokens)} per sample but the model attends "
                      f"over {_tokens(k)} (cache: --vl-tokens {reader.num_tokens}, now: --vl-tokens {k}); rebuild it "
                      f"with `vla-ds cache --vl-tokens {k}` or train with --vl-tokens {reader.num_tokens}")
    pooling = reader.info["layout"].get("token_pooling")
    if k and pooling != TOKEN_POOLING:
        return None, (f"--cache-dir {cache_dir} pooled its tokens with {pooling}, this vla-ds with {TOKEN_POOLING}; "
                      "rebuild it with `vla-ds cache`")
    ds = _dataset(cfg, load_images=False)
    diff = fingerprint_diff(reader.fingerprint, compute_fingerprint(cfg.model, ds.view_names))
    if diff:
        return None, (f"--cache-dir {cache_dir} was built differently: {diff}; rebuild it with `vla-ds cache` or "
                      "use another --cache-dir")
    missing = reader.missing(sample_ids, episode_keys(ds))
    if missing:
        bad = sum(s in reader.bad for s in missing)
        return None, (f"{len(missing)} of {len(sample_ids)} samples are not in --cache-dir {cache_dir} or are stale "
                      f"(e.g. {missing[0]}{f'; {bad} skipped as bad' if bad else ''}); run `vla-ds cache` with the "
                      "same flags")
    return reader, ""


def demo_stage(backbone, dataset, cache_dir, views: list[str]) -> dict:
    """The `vla-ds demo` cache stage: cache `dataset` with the backbone (--vl-tokens 1 + 2 per view),
    open it the way training does (--cache-policy require), batch from it, verify 8 samples."""
    from vla_ds.config import TrainConfig
    from vla_ds.data.dataset import IntegratedDataset, collate

    cfg = TrainConfig.from_flat({"backbone": str(backbone), "finetune_vl": "none", "data": [str(dataset)],
                                 "views": list(views), "batch_size": 8, "num_workers": 0,
                                 "vl_tokens": 1 + 2 * len(views), "cache_dir": str(cache_dir),
                                 "cache_policy": "require"})
    summary = build_cache(cfg, shard_size=64)
    base = IntegratedDataset(dataset, views=list(views), load_images=False, load_sensor=False)
    reader = open_cache_for_training(cfg, base.sample_ids())
    batch = collate([CachedDataset(base, reader)[i] for i in range(min(4, len(base)))])
    check = verify_cache(cfg, num_samples=8)
    log.info("      %d samples in %d shards (%.0f samples/s), %d bytes/sample; a batch carries vl_pooled %s + "
             "vl_tokens %s, no images; re-encoded 8: max relative error %.1e", summary["samples"], summary["shards"],
             summary["samples_per_s"], summary["bytes_per_sample"], tuple(batch["vl_pooled"].shape),
             tuple(batch["vl_tokens"].shape), check["max_rel_error"])
    return {**summary, "verify": check}


if __name__ == "__main__":  # `python -m vla_ds.cache ...` (also under torchrun)
    import sys

    from vla_ds.commands.cache import main

    sys.exit(main())

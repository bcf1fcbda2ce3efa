"""Building the VL feature cache: features as stored, the loader of processed batches, the collective
build (plan, encode, commit), and the check of a built cache against the live backbone.

- `cache_vl_tokens(model_cfg)`: K, the VL tokens per sample (`--vl-tokens`; auto: FROZEN_VL_TOKENS).
- `encode_for_cache(encoder, images, instructions)`: `VLEncoder.encode_inputs` as the stored dict.
- `build_cache(cfg)` (Collective): every rank encodes a disjoint share of the planned shards;
  resumable (finished shards are never re-encoded), locked against concurrent builds.
- `verify_cache(cfg)`: re-encode a random subset and compare.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from vla_ds.cache.fingerprint import compute_fingerprint, episode_keys, fingerprint_diff
from vla_ds.cache.reader import CacheReader, cache_dataset
from vla_ds.cache.store import (
    ARRAYS,
    FORMAT,
    INFO_FILE,
    PLAN_FILE,
    cache_dir_of,
    cache_lock,
    episode_of,
    layout_vl_tokens,
    plan_shards,
    read_json,
    remove_leftovers,
    write_manifest,
    write_shard,
)
from vla_ds.errors import UsageError
from vla_ds.model.config import FROZEN_VL_TOKENS
from vla_ds.model.vl_tokens import TOKEN_POOLING
from vla_ds.utils.dist import device_for, gather, rank_world, share
from vla_ds.utils.faults import fault_point
from vla_ds.utils.io import write_json

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ features
def cache_vl_tokens(model_cfg) -> int:
    """K, the VL tokens a cache for this model stores: `--vl-tokens`, auto meaning FROZEN_VL_TOKENS
    whatever --finetune-vl (a cache only ever stands in for a frozen backbone). -1 is refused."""
    k = FROZEN_VL_TOKENS if model_cfg.vl_tokens is None else int(model_cfg.vl_tokens)
    if k == -1:
        raise UsageError("--vl-tokens -1 keeps every VL token, which a cache cannot store; use --vl-tokens 0 "
                         "(pooled) or K >= 1 + views")
    return k


def encode_for_cache(encoder, images: list[list] | None = None, instructions: list[str] | None = None,
                     inputs: dict | None = None, views: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The VL features a cache of `encoder.vl_tokens` K tokens stores, in batch-key form:
    {"vl_pooled" (B, D)} and with K > 0 also "vl_tokens" (B, K, D) + "vl_tokens_mask" (B, K), on the
    encoder's device. This is `VLEncoder.encode_inputs` (the live policy's path) as a dict. `inputs`
    (already processed, e.g. in a loader worker) replace images + instructions; then give `views`."""
    if encoder.vl_tokens < 0:
        raise ValueError("encode_for_cache: the encoder keeps every VL token (--vl-tokens -1), which a cache "
                         "cannot store")
    feats = encoder(images, instructions) if inputs is None else encoder.encode_inputs(inputs, views)
    out = {"vl_pooled": feats.pooled}
    if encoder.vl_tokens > 0:
        out["vl_tokens"], out["vl_tokens_mask"] = feats.tokens, feats.mask
    return out


def load_encoder(model_cfg, device, vl_tokens: int):
    """The frozen backbone + processor as a cache build runs them, keeping K = `vl_tokens` tokens."""
    from vla_ds.model.backbone import VLEncoder, load_vl_model, resolve_dtype
    from vla_ds.model.processor import load_processor

    model = load_vl_model(model_cfg.backbone, resolve_dtype(model_cfg.dtype, device), model_cfg.attn_implementation,
                          device).requires_grad_(False)
    processor = load_processor(model_cfg.backbone, model_cfg.min_pixels, model_cfg.max_pixels)
    return VLEncoder(model, processor, model_cfg.vl_feature_layer, vl_tokens)


class _ShardBatches(torch.utils.data.Dataset):
    """Item j = batch j of this rank's shards, loaded and run through the processor (in a loader
    worker). A sample whose images fail to load is returned under "bad" with its file, not raised
    (a worker's exception would reach the user as a multi-line traceback)."""

    def __init__(self, ds, shards: list[dict], batch_size: int, processor):
        self.ds, self.processor = ds, SimpleNamespace(processor=processor)
        self.instructions = {ep.meta.episode_id: ep.meta.instruction for ep in ds.episodes}
        index = {s: i for i, s in enumerate(ds.sample_ids())}
        # (shard position, dataset indices, last batch of its shard?): batches never span shards, so
        # a shard's rows come from the same batches whatever the number of processes
        self.batches = [(pos, [index[s] for s in sh["samples"][k : k + batch_size]],
                         k + batch_size >= len(sh["samples"]))
                        for pos, sh in enumerate(shards) for k in range(0, len(sh["samples"]), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> dict:
        from vla_ds.model.backbone import VLEncoder

        pos, idx, last = self.batches[j]
        ids, images, texts, bad = [], [], [], {}
        for i in idx:
            sid = self.ds.sample_id(i)
            try:
                images.append(self.ds.images(i))
            except Exception as e:  # noqa: BLE001 - any unreadable image: reported with its file
                bad[sid] = _bad_image(self.ds, sid, e)
                continue
            ids.append(sid)
            texts.append(self.instructions[episode_of(sid)])
        # VLEncoder's own processor call (it only needs .processor): the same tokens as live training
        inputs = dict(VLEncoder.processor_inputs(self.processor, images, texts)) if ids else {}
        return {"shard": pos, "last": last, "ids": ids, "bad": bad, "inputs": inputs, "views": [len(v) for v in images]}


def _bad_image(ds, sample_id: str, error: Exception) -> str:
    from PIL import Image

    ep_id, frame = sample_id.rsplit(":", 1)
    ep = next(e for e in ds.episodes if e.meta.episode_id == ep_id)
    views = ds.view_names or ep.meta.views[: ds.num_views]
    for v in views:
        p = Path(ep.frames.images[v][int(frame)])
        p = p if p.is_absolute() else ep.dir / p
        try:
            with Image.open(p) as im:
                im.convert("RGB")
        except Exception as e:  # noqa: BLE001
            return f"{p}: unreadable image ({' '.join(str(e).split())})"
    return f"episode {ep.dir}: images failed to load ({' '.join(str(error).split())})"


# ------------------------------------------------------------------------------------------ build
def _prepare(cache_dir: Path, cfg, fp: dict, views: int, k: int, cache_dtype: str | None) -> dict:
    """Create cache.json for K = `k` tokens, or check that the existing one was made the same way
    (fingerprint, K, and `cache_dtype` if given). Returns the layout."""
    from vla_ds.model.backbone import hidden_size, read_backbone_config

    path = cache_dir / INFO_FILE
    if path.exists():
        info = read_json(path)
        diff = fingerprint_diff(info.get("fingerprint", {}), fp)
        if diff:
            raise UsageError(f"--cache-dir {cache_dir} holds features made differently: {diff}; pass another "
                             "--cache-dir or delete it to rebuild")
        layout = info["layout"]
        built = layout_vl_tokens(layout)
        if built != k:
            raise UsageError(f"--vl-tokens {k}: --cache-dir {cache_dir} was built with --vl-tokens {built}; "
                             f"pass --vl-tokens {built} to extend it, or another --cache-dir")
        if cache_dtype is not None and cache_dtype != layout["dtype"]:
            raise UsageError(f"--cache-dtype {cache_dtype}: --cache-dir {cache_dir} was built with --cache-dtype "
                             f"{layout['dtype']}; drop the flag to extend it, or pass another --cache-dir")
        return layout
    if k and k < views + 1:
        raise UsageError(f"--vl-tokens {k} must be at least 1 + the number of views ({views + 1} for {views} views: "
                         "one text token plus at least one per view), or 0 for the pooled vector only")
    dtype = cache_dtype or "float16"
    if dtype not in ("float16", "float32"):
        raise UsageError(f"--cache-dtype {dtype}: use float16 or float32")
    layout = {"dim": hidden_size(read_backbone_config(cfg.model.backbone)), "vl_tokens": int(k), "dtype": dtype,
              "token_pooling": TOKEN_POOLING if k else None}
    from vla_ds import __version__

    write_json(path, {"format": FORMAT, "fingerprint": fp, "layout": layout, "created": time.strftime("%F %T"),
                      "built_from": {"backbone": str(cfg.model.backbone), "vla_ds": __version__,
                                     "attn_implementation": cfg.model.attn_implementation,
                                     "torch": torch.__version__}})
    return layout


def build_cache(cfg, shard_size: int = 2048, skip_bad: bool = False, cache_dtype: str | None = None,
                batch_size: int | None = None, num_workers: int | None = None) -> dict:
    """Collective. Build or resume the VL cache of every sample of `cfg.data.data` (all episodes,
    train and val) in `cache_dir_of(cfg)`; returns a summary dict (the same on every rank).

    The cache stores K = `cache_vl_tokens(cfg.model)` tokens per sample besides the pooled vector
    (`--vl-tokens`; auto: FROZEN_VL_TOKENS). `cache_dtype` float16|float32 (None: existing or
    float16), `batch_size` (None: --batch-size), `num_workers` (None: --num-workers) loader
    processes per rank.
    """
    rank, world, local_rank = rank_world()
    device = device_for(local_rank)
    cache_dir = cache_dir_of(cfg)
    if shard_size < 1:
        raise UsageError("--shard-size must be >= 1")
    k = cache_vl_tokens(cfg.model)
    ds = cache_dataset(cfg, load_images=True)
    fp = compute_fingerprint(cfg.model, ds.view_names, device)
    keys = episode_keys(ds)
    samples = {s: keys[episode_of(s)] for s in ds.sample_ids()}
    lock, error, pending, layout = cache_lock(cache_dir), None, [], None
    if rank == 0:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            layout = _prepare(cache_dir, cfg, fp, len(ds.view_names), k, cache_dtype)
            pending, _ = plan_shards(cache_dir, samples, shard_size)
            remove_leftovers(cache_dir, {s["name"] for s in read_json(cache_dir / PLAN_FILE)["shards"]})
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or the others would wait forever
            error = (isinstance(e, UsageError), str(e) if isinstance(e, UsageError) else f"{type(e).__name__}: {e}")
            lock.release()
            if world == 1:
                raise
    error, pending, layout = share((error, pending, layout), world)
    if error:
        raise (UsageError if error[0] else RuntimeError)(error[1])
    t0, ok = time.perf_counter(), False
    try:
        mine = pending[rank::world]
        stats = _encode_shards(cfg, ds, mine, layout, cache_dir, device, skip_bad, rank, world,
                               batch_size or cfg.data.batch_size,
                               cfg.data.num_workers if num_workers is None else num_workers) if mine else {
            "encoded": 0, "bad": {}, "shards": 0}
        everyone = gather(stats, world)
        summary = None
        if rank == 0:
            bad = {s: why for st in everyone for s, why in st["bad"].items()}
            manifest = write_manifest(cache_dir, bad)
            seconds = time.perf_counter() - t0
            encoded = sum(st["encoded"] for st in everyone)
            reader = CacheReader(cache_dir)
            summary = {"cache_dir": str(cache_dir), "samples": len(manifest["samples"]),
                       "dataset_samples": len(samples), "encoded": encoded, "shards_written": sum(
                           st["shards"] for st in everyone), "shards": len(manifest["shards"]), "skipped_bad": len(bad),
                       "seconds": seconds, "samples_per_s": encoded / seconds if seconds > 0 else 0.0,
                       "bytes_per_sample": reader.bytes_per_sample(), "vl_tokens": layout_vl_tokens(layout), "world": world}
            log.info("VL cache %s: %d/%d samples in %d shards (%d encoded now by %d process(es), %.1f samples/s, "
                     "%d skipped as bad), %d bytes/sample", cache_dir, summary["samples"], len(samples),
                     summary["shards"], encoded, world, summary["samples_per_s"], len(bad),
                     summary["bytes_per_sample"])
        summary = share(summary, world)
        ok = True
        return summary
    finally:
        if rank == 0 and (ok or world == 1):  # a failed multi-process build: the lock's pid dies with it
            lock.release()


def _encode_shards(cfg, ds, shards, layout, cache_dir, device, skip_bad, rank, world, batch_size, num_workers) -> dict:
    from vla_ds.utils.progress import progress

    k, dtype = layout_vl_tokens(layout), np.dtype(layout["dtype"])
    encoder = load_encoder(cfg.model, device, k)
    source = _ShardBatches(ds, shards, batch_size, encoder.processor)
    workers = min(num_workers, len(source))
    loader = torch.utils.data.DataLoader(source, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=4 if workers else None)
    acc, stats = {}, {"encoded": 0, "bad": {}, "shards": 0}
    with progress(total=sum(len(s["samples"]) for s in shards), desc=f"VL cache, rank 0 of {world}",
                  unit="sample") as bar:
        for item in loader:
            a = acc.setdefault(item["shard"], {"ids": [], "bad": {}, **{w: [] for w in ARRAYS}})
            for sid, why in item["bad"].items():
                if not skip_bad:
                    raise UsageError(f"sample {sid}: {why}; fix or re-ingest it, or pass --skip-bad to skip it")
                log.warning("cache: skipping sample %s: %s", sid, why)
                a["bad"][sid] = why
            if item["ids"]:
                feats = encode_for_cache(encoder, inputs=item["inputs"], views=item["views"])
                a["ids"] += item["ids"]
                a["pooled"].append(feats["vl_pooled"].float().cpu().numpy().astype(dtype))
                if k:
                    a["tokens"].append(feats["vl_tokens"].cpu().numpy().astype(dtype))
                    a["tokens_mask"].append(feats["vl_tokens_mask"].cpu().numpy())
            bar.update(len(item["ids"]) + len(item["bad"]))
            if item["last"]:
                a, shard = acc.pop(item["shard"]), shards[item["shard"]]
                stats["bad"].update(a["bad"])
                if a["ids"]:  # a shard of only bad samples stays pending (retried next build)
                    arrays = {w: np.concatenate(a[w]) for w in ARRAYS if a[w]}
                    write_shard(cache_dir, shard["name"], arrays, a["ids"], shard["episodes"], a["bad"],
                                {"rank": rank, "world": world},
                                before_commit=lambda: fault_point("cache_mid_shard", stats["shards"]))
                    stats["shards"] += 1
                    stats["encoded"] += len(a["ids"])
                    fault_point("cache_after_shards", stats["shards"])
    return stats


# ------------------------------------------------------------------------------------------ verify
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
    ds = cache_dataset(cfg, load_images=True)
    device = device_for()
    fp = compute_fingerprint(cfg.model, ds.view_names, device)
    diff = fingerprint_diff(reader.fingerprint, fp)
    if diff:
        raise UsageError(f"--cache-dir {cache_dir} was built differently from these flags: {diff}")
    index = {s: i for i, s in enumerate(ds.sample_ids()) if s in reader}
    ids = sorted(index)
    rng = np.random.default_rng(seed)
    pick = [ids[j] for j in sorted(rng.choice(len(ids), min(num_samples, len(ids)), replace=False))]
    encoder = load_encoder(cfg.model, device, reader.vl_tokens)
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

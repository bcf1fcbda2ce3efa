"""VL feature cache: encode every sample once with the frozen backbone, train the head from memory maps.

- `build_cache(cfg)` (Collective): every rank encodes a disjoint share of the planned shards;
  resumable (finished shards are never re-encoded), locked against concurrent builds.
- `open_cache_for_training(cfg, sample_ids, need_tokens)`: `--cache-policy auto|require|off`.
- `CachedDataset(IntegratedDataset(..., load_images=False), reader)`: items carry the features.
- `verify_cache(cfg)`: re-encode a random subset and compare.
- `encode_for_cache(encoder, images, instructions, K)`: the features exactly as stored (pooled
  vector and optionally K tokens); a live policy that should match a cache-trained one uses this.

What produced a cache is its fingerprint (`compute_fingerprint`, no weights loaded); per episode,
a key of its instruction and ingest fingerprint. Storage is in `vla_ds.cache_store`; see
docs/cache.md.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from vla_ds.cache_store import (  # noqa: F401  (CachedDataset, CacheReader, compute_fingerprint: public here)
    ARRAYS, FORMAT, INFO_FILE, PLAN_FILE, CacheLock, CachedDataset, CacheReader, compute_fingerprint, episode_keys,
    episode_of, fingerprint_diff, plan_shards, read_json, remove_leftovers, write_manifest, write_shard,
)
from vla_ds.errors import UsageError
from vla_ds.utils.io import write_json

log = logging.getLogger(__name__)

__all__ = ["build_cache", "build_cache_from_config", "open_cache_for_training", "CachedDataset", "CacheReader",
           "verify_cache", "encode_for_cache", "compute_fingerprint", "cache_dir_of", "demo_stage"]

TOKEN_POOLING = "view_grid+text/v1"  # K tokens: each view's image tokens pooled on a grid + 1 text token
TOKENS_PER_VIEW_FOR_CROSS_ATTENTION = 8  # default K = 1 + 8 V for a new cache of a cross_attention run


def cache_dir_of(cfg) -> Path:
    """--cache-dir, default OUTPUT_DIR/../vl_cache (shared by the runs of one runs/ folder)."""
    return Path(cfg.run.cache_dir) if cfg.run.cache_dir else Path(cfg.run.output_dir).parent / "vl_cache"


def _dataset(cfg, load_images: bool):
    from vla_ds.data.dataset import IntegratedDataset

    try:
        return IntegratedDataset(cfg.data.data, views=cfg.data.views, load_images=load_images, load_sensor=False)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


# ------------------------------------------------------------------------------------------ features
def _grid(n: int, h: int, w: int) -> tuple[int, int]:
    """The (rows, cols) grid of at most n cells, at most h x w, with the most cells and then the
    aspect ratio closest to the image's."""
    best = (1, 1)
    for gh in range(1, min(n, h) + 1):
        gw = min(n // gh, w)
        key = (gh * gw, -abs(np.log((gh / gw) / (h / w))))
        if key > (best[0] * best[1], -abs(np.log((best[0] / best[1]) / (h / w)))):
            best = (gh, gw)
    return best


def pool_tokens(hidden, mask, input_ids, grid_thw, views: list[int], image_token_id: int, merge: int, k: int):
    """(B, K, D) float32 tokens + (B, K) mask: slots 0..K-2 split evenly over each sample's views,
    each view's image tokens average-pooled on a grid of that many cells (spatial layout kept);
    slot K-1 the mean of the sample's real non-image tokens (instruction and chat text)."""
    b, _, d = hidden.shape
    tokens = torch.zeros(b, k, d, dtype=torch.float32, device=hidden.device)
    tmask = torch.zeros(b, k, dtype=torch.bool, device=hidden.device)
    is_image = (input_ids == image_token_id) & mask
    img = 0
    for i in range(b):
        pos = is_image[i].nonzero().squeeze(1)
        start, slot = 0, 0
        for v in range(views[i]):
            cells = (k - 1) // views[i] + (1 if v < (k - 1) % views[i] else 0)
            t, gh, gw = (int(x) for x in grid_thw[img])
            gh, gw, img = gh // merge, gw // merge, img + 1
            x = hidden[i, pos[start : start + t * gh * gw]].float().reshape(t, gh, gw, d).mean(0)
            start += t * gh * gw
            rows, cols = _grid(cells, gh, gw)
            pooled = torch.nn.functional.adaptive_avg_pool2d(x.permute(2, 0, 1), (rows, cols)).flatten(1).T
            tokens[i, slot : slot + rows * cols], tmask[i, slot : slot + rows * cols] = pooled, True
            slot += cells
        if start != len(pos):
            raise ValueError(f"sample {i}: {len(pos)} image tokens but its {views[i]} views' grids hold {start}")
        text = mask[i] & ~is_image[i]
        tokens[i, k - 1], tmask[i, k - 1] = hidden[i, text].float().mean(0), True
    return tokens, tmask


def encode_for_cache(encoder, images: list[list] | None, instructions: list[str] | None, cache_tokens: int = 0,
                     inputs: dict | None = None, views: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The VL features a cache stores, in batch-key form: {"vl_pooled" (B, D)} and with
    `cache_tokens` K > 0 also "vl_tokens" (B, K, D) + "vl_tokens_mask" (B, K), on the encoder's
    device. Runs the backbone exactly like `VLEncoder.forward` (same processor call, same hidden
    state, same masked mean), so "vl_pooled" equals the live pooled vector. `inputs` (already
    processed, e.g. in a loader worker) replaces images + instructions; then give `views`."""
    from vla_ds.model.layers import masked_mean

    if inputs is None:
        inputs, views = encoder.processor_inputs(images, instructions), [len(v) for v in images]
    device = next(encoder.model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    want_all = encoder.feature_layer != -1
    with torch.no_grad() if not encoder.trains() else contextlib.nullcontext():
        out = encoder.model.model(**inputs, use_cache=False, output_hidden_states=want_all, return_dict=True)
        hidden = out.hidden_states[encoder.feature_layer] if want_all else out.last_hidden_state
        mask = inputs["attention_mask"].bool()
        feats = {"vl_pooled": masked_mean(hidden, mask)}
        if cache_tokens:
            feats["vl_tokens"], feats["vl_tokens_mask"] = pool_tokens(
                hidden, mask, inputs["input_ids"], inputs["image_grid_thw"], views,
                encoder.model.config.image_token_id, encoder.processor.image_processor.merge_size, cache_tokens)
    return feats


def _load_encoder(model_cfg, device):
    from vla_ds.model.backbone import VLEncoder, load_vl_model, resolve_dtype
    from vla_ds.model.processor import load_processor

    model = load_vl_model(model_cfg.backbone, resolve_dtype(model_cfg.dtype, device), model_cfg.attn_implementation,
                          device).requires_grad_(False)
    processor = load_processor(model_cfg.backbone, model_cfg.min_pixels, model_cfg.max_pixels)
    return VLEncoder(model, processor, model_cfg.vl_feature_layer)


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
def _distributed() -> tuple[int, int, int]:
    """Collective. (rank, world, local_rank): the launcher's group, or a plain single process (no
    process group, no DeepSpeed import) when not launched with several processes."""
    import torch.distributed as dist

    if dist.is_available() and (dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        from vla_ds.train.engine import init_distributed

        return init_distributed()
    return 0, 1, int(os.environ.get("LOCAL_RANK", "0"))


def _share(obj, world: int, gather: bool = False):
    """Collective. Rank 0's `obj` on every rank, or (gather) the list of every rank's `obj`."""
    if world == 1:
        return [obj] if gather else obj
    import torch.distributed as dist

    if gather:
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out
    buf = [obj]
    dist.broadcast_object_list(buf, src=0)
    return buf[0]


def _prepare(cache_dir: Path, cfg, fp: dict, views: int, cache_tokens: int | None, cache_dtype: str | None) -> dict:
    """Create cache.json, or check that the existing one was made the same way. Returns the layout."""
    from vla_ds.model.backbone import hidden_size, read_backbone_config

    path = cache_dir / INFO_FILE
    if path.exists():
        info = read_json(path)
        diff = fingerprint_diff(info.get("fingerprint", {}), fp)
        if diff:
            raise UsageError(f"--cache-dir {cache_dir} holds features made differently: {diff}; pass another "
                             "--cache-dir or delete it to rebuild")
        layout = info["layout"]
        for flag, asked, have in (("--cache-tokens", cache_tokens, layout["tokens"]),
                                  ("--cache-dtype", cache_dtype, layout["dtype"])):
            if asked is not None and asked != have:
                raise UsageError(f"{flag} {asked}: --cache-dir {cache_dir} was built with {flag} {have}; drop the "
                                 "flag to extend it, or pass another --cache-dir")
        return layout
    k = cache_tokens if cache_tokens is not None else (
        1 + TOKENS_PER_VIEW_FOR_CROSS_ATTENTION * views if cfg.model.effective_fusion == "cross_attention" else 0)
    if k and k < views + 1:
        raise UsageError(f"--cache-tokens {k}: give 0 (pooled vector only) or at least {views + 1} (one text token "
                         f"plus one per view for {views} views)")
    dtype = cache_dtype or "float16"
    if dtype not in ("float16", "float32"):
        raise UsageError(f"--cache-dtype {dtype}: use float16 or float32")
    layout = {"dim": hidden_size(read_backbone_config(cfg.model.backbone)), "tokens": int(k), "dtype": dtype,
              "token_pooling": TOKEN_POOLING if k else None}
    from vla_ds import __version__

    write_json(path, {"format": FORMAT, "fingerprint": fp, "layout": layout, "created": time.strftime("%F %T"),
                      "built_from": {"backbone": str(cfg.model.backbone), "vla_ds": __version__,
                                     "attn_implementation": cfg.model.attn_implementation,
                                     "torch": torch.__version__}})
    return layout


def _fault(stage: str, committed: int) -> None:
    """Test hook: VLA_DS_CACHE_FAULT=exit_after_shards:N | exit_mid_shard:N kills this process
    (os._exit, no clean-up: like a crash) after N commits, or between shard N+1's arrays and commit."""
    spec = os.environ.get("VLA_DS_CACHE_FAULT", "")
    if spec.startswith(stage + ":") and committed == int(spec.split(":")[1]):
        logging.shutdown()
        os._exit(17)


def build_cache(cfg, cache_tokens: int | None = None, shard_size: int = 2048, skip_bad: bool = False,
                cache_dtype: str | None = None, batch_size: int | None = None, num_workers: int | None = None) -> dict:
    """Collective. Build or resume the VL cache of every sample of `cfg.data.data` (all episodes,
    train and val) in `cache_dir_of(cfg)`; returns a summary dict (the same on every rank).

    `cache_tokens` K (None: the existing cache's, or 0 for a new one, or 1 + 8 V with
    cross_attention), `cache_dtype` float16|float32 (None: existing or float16), `batch_size`
    (None: --batch-size), `num_workers` (None: --num-workers) loader processes per rank.
    """
    rank, world, local_rank = _distributed()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    cache_dir = cache_dir_of(cfg)
    if shard_size < 1:
        raise UsageError("--shard-size must be >= 1")
    ds = _dataset(cfg, load_images=True)
    fp = compute_fingerprint(cfg.model, ds.view_names, device)
    keys = episode_keys(ds)
    samples = {s: keys[episode_of(s)] for s in ds.sample_ids()}
    lock, error, pending, layout = CacheLock(cache_dir), None, [], None
    if rank == 0:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            layout = _prepare(cache_dir, cfg, fp, len(ds.view_names), cache_tokens, cache_dtype)
            pending, _ = plan_shards(cache_dir, samples, shard_size)
            remove_leftovers(cache_dir, {s["name"] for s in read_json(cache_dir / PLAN_FILE)["shards"]})
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or the others would wait forever
            error = (isinstance(e, UsageError), str(e) if isinstance(e, UsageError) else f"{type(e).__name__}: {e}")
            lock.release()
            if world == 1:
                raise
    error, pending, layout = _share((error, pending, layout), world)
    if error:
        raise (UsageError if error[0] else RuntimeError)(error[1])
    t0, ok = time.perf_counter(), False
    try:
        mine = pending[rank::world]
        stats = _encode_shards(cfg, ds, mine, layout, cache_dir, device, skip_bad, rank, world,
                               batch_size or cfg.data.batch_size,
                               cfg.data.num_workers if num_workers is None else num_workers) if mine else {
            "encoded": 0, "bad": {}, "shards": 0}
        everyone = _share(stats, world, gather=True)
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
                       "bytes_per_sample": reader.bytes_per_sample(), "tokens": layout["tokens"], "world": world}
            log.info("VL cache %s: %d/%d samples in %d shards (%d encoded now by %d process(es), %.1f samples/s, "
                     "%d skipped as bad), %d bytes/sample", cache_dir, summary["samples"], len(samples),
                     summary["shards"], encoded, world, summary["samples_per_s"], len(bad),
                     summary["bytes_per_sample"])
        summary = _share(summary, world)
        ok = True
        return summary
    finally:
        if rank == 0 and (ok or world == 1):  # a failed multi-process build: the lock's pid dies with it
            lock.release()


def _encode_shards(cfg, ds, shards, layout, cache_dir, device, skip_bad, rank, world, batch_size, num_workers) -> dict:
    from vla_ds.utils.progress import progress

    encoder = _load_encoder(cfg.model, device)
    k, dtype = int(layout["tokens"]), np.dtype(layout["dtype"])
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
                feats = encode_for_cache(encoder, None, None, k, inputs=item["inputs"], views=item["views"])
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
                                before_commit=lambda: _fault("exit_mid_shard", stats["shards"]))
                    stats["shards"] += 1
                    stats["encoded"] += len(a["ids"])
                    _fault("exit_after_shards", stats["shards"])
    return stats


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
    encoder = _load_encoder(cfg.model, device)
    instructions = {ep.meta.episode_id: ep.meta.instruction for ep in ds.episodes}
    worst, worst_id = 0.0, None
    for j in range(0, len(pick), max(cfg.data.batch_size, 8)):
        chunk = pick[j : j + max(cfg.data.batch_size, 8)]
        live = encode_for_cache(encoder, [ds.images(index[s]) for s in chunk],
                                [instructions[episode_of(s)] for s in chunk], reader.num_tokens)
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


def open_cache_for_training(cfg, sample_ids: list[str], need_tokens: bool) -> CacheReader | None:
    """`--cache-policy`: off -> None; auto -> a reader when the cache is usable for every requested
    sample, else None (logged: the live backbone is used); require -> the reader or a UsageError
    with the one-line reason (missing cache, differing fingerprint field, missing or stale samples,
    --finetune-vl lora/full, tokens needed but the cache has none)."""
    if cfg.run.cache_policy == "off":
        return None
    reader, why = _usable_reader(cfg, cache_dir_of(cfg), sample_ids, need_tokens)
    if reader is not None:
        log.info("VL cache %s: %d samples, %s, %s; the backbone's weights are not needed", reader.dir,
                 len(sample_ids), f"{reader.num_tokens} tokens + pooled" if reader.has_tokens else "pooled vector",
                 reader.dtype)
        return reader
    if cfg.run.cache_policy == "require":
        raise UsageError(f"--cache-policy require: {why}")
    log.info("VL cache not used (%s): the live backbone encodes every batch", why)
    return None


def _usable_reader(cfg, cache_dir: Path, sample_ids: list[str], need_tokens: bool) -> tuple[CacheReader | None, str]:
    """(reader, "") when the cache can stand in for the backbone, else (None, why not)."""
    if cfg.model.finetune_vl != "none":
        return None, (f"--finetune-vl {cfg.model.finetune_vl} trains the backbone, so cached VL features would be "
                      "stale; use --finetune-vl none or --cache-policy off")
    try:
        reader = CacheReader(cache_dir)
    except (FileNotFoundError, ValueError) as e:
        return None, f"{e}; build it with `vla-ds cache` (same flags)"
    if need_tokens and not reader.has_tokens:
        return None, (f"--cache-dir {cache_dir} holds pooled vectors only but --fusion-strategy "
                      f"{cfg.model.fusion_strategy} needs VL tokens; rebuild it with `vla-ds cache --cache-tokens K`")
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
    """The `vla-ds demo` cache stage: cache `dataset` with the backbone (tokens for cross_attention
    too), open it the way training does (--cache-policy require), batch from it, verify 8 samples."""
    from vla_ds.config import TrainConfig
    from vla_ds.data.dataset import IntegratedDataset, collate

    cfg = TrainConfig.from_flat({"backbone": str(backbone), "finetune_vl": "none", "data": [str(dataset)],
                                 "views": list(views), "batch_size": 8, "num_workers": 0,
                                 "cache_dir": str(cache_dir), "cache_policy": "require"})
    summary = build_cache(cfg, cache_tokens=1 + 2 * len(views), shard_size=64)
    base = IntegratedDataset(dataset, views=list(views), load_images=False, load_sensor=False)
    reader = open_cache_for_training(cfg, base.sample_ids(), need_tokens=True)
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

"""Using a built VL cache: read features by sample id, wrap a dataset, decide whether a run uses it.

- `CacheReader(cache_dir)`: sample id -> features, by memory map (picklable for loader workers)
- `CachedDataset(IntegratedDataset(..., load_images=False), reader)`: items carry the features
- `open_cache_for_training(cfg, sample_ids)`: `--cache-policy auto|require|off`
- `cache_dataset(cfg, load_images)`: every sample of --data, as the cache indexes them
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from vla_ds.cache.fingerprint import compute_fingerprint, episode_keys, fingerprint_diff
from vla_ds.cache.store import (
    ARRAYS,
    FORMAT,
    INFO_FILE,
    MANIFEST_FILE,
    cache_dir_of,
    damage,
    damaged_shard,
    episode_of,
    layout_vl_tokens,
    read_json,
    shard_path,
)
from vla_ds.errors import UsageError
from vla_ds.model.vl_tokens import TOKEN_POOLING

log = logging.getLogger(__name__)


def cache_dataset(cfg, load_images: bool):
    """Every sample of --data (train and val episodes: a cache serves both), without sensor."""
    from vla_ds.data.dataset import IntegratedDataset

    try:
        return IntegratedDataset(cfg.data.data, views=cfg.data.views, load_images=load_images, load_sensor=False)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


class CacheReader:
    """Read access to a built cache: sample id -> features, by memory map.

    Picklable for DataLoader workers: memory maps are not pickled and are reopened lazily.
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        info_path, manifest_path = self.dir / INFO_FILE, self.dir / MANIFEST_FILE
        if not info_path.exists():
            raise FileNotFoundError(f"--cache-dir {self.dir}: no VL cache there (no {INFO_FILE})")
        self.info = read_json(info_path)
        if self.info.get("format") != FORMAT:
            raise ValueError(f"--cache-dir {self.dir}: cache format {self.info.get('format')} is not {FORMAT}; "
                             "rebuild it with `vla-ds cache`")
        if not manifest_path.exists():
            raise FileNotFoundError(f"--cache-dir {self.dir}: no finished build yet (no {MANIFEST_FILE}); "
                                    "run `vla-ds cache` to finish it")
        m = read_json(manifest_path)
        self.shards = [s["name"] for s in m["shards"]]
        self.index: dict[str, tuple[int, int]] = {s: (v[0], v[1]) for s, v in m["samples"].items()}
        self.episode_keys: dict[str, str] = m["episodes"]
        self.bad: dict[str, str] = m["bad"]
        layout = self.info["layout"]
        self.dim, self.vl_tokens, self.dtype = int(layout["dim"]), layout_vl_tokens(layout), layout["dtype"]
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        for name in self.shards:  # a truncated shard: one line now, not a traceback from a loader worker later
            for what in ARRAYS if self.vl_tokens else ARRAYS[:1]:
                why = damage(shard_path(self.dir, name, what))
                if why:
                    raise damaged_shard(self.dir, shard_path(self.dir, name, what), why)

    # --------------------------------------------------------------------------------- metadata
    @property
    def fingerprint(self) -> dict:
        return self.info["fingerprint"]

    @property
    def has_tokens(self) -> bool:
        return self.vl_tokens > 0

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.index

    def bytes_per_sample(self) -> int:
        return (self.dim + self.vl_tokens * self.dim) * np.dtype(self.dtype).itemsize + self.vl_tokens

    def missing(self, sample_ids, episode_keys: dict[str, str] | None = None) -> list[str]:
        """The ids that have no row, or whose episode's key differs from `episode_keys` (stale)."""
        out = []
        for s in sample_ids:
            if s not in self.index:
                out.append(s)
            elif episode_keys is not None and self.episode_keys.get(episode_of(s)) != episode_keys.get(episode_of(s)):
                out.append(s)
        return out

    # --------------------------------------------------------------------------------- rows
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _array(self, shard: int, what: str) -> np.ndarray:
        arr = self._maps.get((shard, what))
        if arr is None:
            path = shard_path(self.dir, self.shards[shard], what)
            try:
                arr = self._maps[(shard, what)] = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:  # e.g. "mmap length is greater than file size"
                raise damaged_shard(self.dir, path, damage(path) or f"unreadable ({e})") from None
        return arr

    def features(self, sample_id: str) -> dict[str, torch.Tensor]:
        """{"vl_pooled": (D,) float32, and with tokens "vl_tokens": (K, D) float32, "vl_tokens_mask": (K,) bool}."""
        try:
            shard, row = self.index[sample_id]
        except KeyError:
            why = f" (skipped as bad: {self.bad[sample_id]})" if sample_id in self.bad else ""
            raise KeyError(f"sample {sample_id} is not in the VL cache {self.dir}{why}; rebuild it with "
                           "`vla-ds cache`") from None
        out = {"vl_pooled": torch.from_numpy(np.array(self._array(shard, "pooled")[row], dtype=np.float32))}
        if self.vl_tokens:
            out["vl_tokens"] = torch.from_numpy(np.array(self._array(shard, "tokens")[row], dtype=np.float32))
            out["vl_tokens_mask"] = torch.from_numpy(np.array(self._array(shard, "tokens_mask")[row], dtype=bool))
        return out


class CachedDataset(torch.utils.data.Dataset):
    """An `IntegratedDataset` (built with `load_images=False`) whose items also carry the cached VL
    features of their sample: "vl_pooled" (D,) and, if the cache has tokens, "vl_tokens" (K, D) +
    "vl_tokens_mask" (K,). `collate` batches them; `QwenVLA.encode_vl` then skips the backbone."""

    def __init__(self, dataset, reader: CacheReader):
        if getattr(dataset, "load_images", False):
            raise ValueError("CachedDataset wraps a dataset built with load_images=False: decoding images that the "
                             "cache replaces would waste the loader's time")
        self.dataset, self.reader = dataset, reader

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        item.update(self.reader.features(item["sample_id"]))
        return item

    @property
    def sample_has_sensor(self):
        return self.dataset.sample_has_sensor

    @property
    def episode_ids(self) -> list[str]:
        return self.dataset.episode_ids

    @property
    def episode_has_sensor(self) -> list[bool]:
        return self.dataset.episode_has_sensor

    def __getattr__(self, name: str):
        # Anything else (view_names, sample_id(i), sample_ids(), ...) is the wrapped dataset's.
        if name in ("dataset", "reader") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


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
                 len(sample_ids), f"{reader.vl_tokens} tokens + pooled" if reader.has_tokens else "pooled vector",
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
    k = cfg.model.resolved_vl_tokens
    if k == -1:
        return None, ("the model attends over every VL token (--vl-tokens -1): a cache cannot stand in; use "
                      "--vl-tokens 0 or K")
    try:
        reader = CacheReader(cache_dir)
    except UsageError:
        raise  # a damaged cache is refused whatever the policy: it has to be repaired
    except (FileNotFoundError, ValueError) as e:
        return None, f"{e}; build it with `vla-ds cache` (same flags)"
    if reader.vl_tokens != k:
        return None, (f"--cache-dir {cache_dir} holds {_tokens(reader.vl_tokens)} per sample but the model attends "
                      f"over {_tokens(k)} (cache: --vl-tokens {reader.vl_tokens}, now: --vl-tokens {k}); rebuild it "
                      f"with `vla-ds cache --vl-tokens {k}` or train with --vl-tokens {reader.vl_tokens}")
    pooling = reader.info["layout"].get("token_pooling")
    if k and pooling != TOKEN_POOLING:
        return None, (f"--cache-dir {cache_dir} pooled its tokens with {pooling}, this vla-ds with {TOKEN_POOLING}; "
                      "rebuild it with `vla-ds cache`")
    ds = cache_dataset(cfg, load_images=False)
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

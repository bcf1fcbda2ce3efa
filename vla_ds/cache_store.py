"""What the VL feature cache stores and how: its fingerprint, shards, plan, manifest, lock, reader.

```
CACHE_DIR/
  cache.json             format, fingerprint (what produced the features), layout (D, K tokens, dtype)
  plan.json              every shard ever planned: name -> sample ids (fixed once planned, so a
                         resumed or N-process build encodes exactly the same batches)
  manifest.json          sample id -> (shard, row), per-episode key, bad samples; rewritten by rank 0
                         at the end of each build from the shard commits
  shards/NNNNNN.pooled.npy       (n, D)    float16 (or float32)
  shards/NNNNNN.tokens.npy       (n, K, D) only for --vl-tokens K > 0
  shards/NNNNNN.tokens_mask.npy  (n, K)    bool
  shards/NNNNNN.json     the shard's commit: its rows' sample ids, episode keys, bad samples.
                         Written (atomically) after its arrays, so a shard without it is unfinished
                         and never enters the manifest.
  .lock                  pid + host of the build holding the directory
```
Readers open `.npy` shards by memory map, lazily, in each DataLoader worker. The fingerprint
(`compute_fingerprint`) records what produced the features, from config and file metadata only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch

from vla_ds.errors import UsageError
from vla_ds.utils.io import atomic_file, write_json

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the meaning of stored features changes
INFO_FILE, PLAN_FILE, MANIFEST_FILE, LOCK_FILE, SHARDS = "cache.json", "plan.json", "manifest.json", ".lock", "shards"
ARRAYS = ("pooled", "tokens", "tokens_mask")
POOLING = "masked_mean/v1"  # pooled = mean of the hidden state over real tokens (as VLEncoder)
# Fingerprint fields compared before a cache is used, and the setting a difference points at.
COMPARED = {
    "format": "the cache format of this vla-ds", "backbone_config": "--backbone (config.json)",
    "backbone_weights": "--backbone (weight files)", "processor_files": "--backbone (tokenizer/processor files)",
    "min_pixels": "--min-pixels", "max_pixels": "--max-pixels", "views": "--views",
    "feature_layer": "--vl-feature-layer", "pooling": "the pooling", "compute_dtype": "--dtype",
}
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                   "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
                   "chat_template.jinja")
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_commit_hash")
_BLOCKS, _BLOCK = 32, 4096  # weight bytes sampled per file: cheap, yet differs between any two trainings


def episode_of(sample_id: str) -> str:
    return sample_id.rsplit(":", 1)[0]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------ fingerprint
def backbone_dir(path: str | os.PathLike) -> Path:
    """The local directory of `--backbone` (a directory, or a hub id already in the HF cache)."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception as e:  # noqa: BLE001 - any failure means "not available locally"
        raise UsageError(f"--backbone {path}: not a directory and not in the local Hugging Face cache "
                         f"({type(e).__name__})") from None


def _file_digest(path: Path) -> str:
    """Name, size, safetensors header and 32 evenly spaced 4 KiB blocks: no weights are loaded, but
    two checkpoints of the same architecture (same header) still differ in the sampled bytes."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}|{size}|".encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 1 << 27)))
        for k in range(_BLOCKS):
            f.seek(k * max(size - _BLOCK, 0) // (_BLOCKS - 1))
            h.update(f.read(_BLOCK))
    return h.hexdigest()


def compute_fingerprint(model_cfg, views: list[str], device: torch.device | str | None = None) -> dict:
    """What determines the cached features, from config and file metadata only (no weights loaded)."""
    from vla_ds.model.backbone import resolve_dtype
    from vla_ds.model.processor import load_processor

    d = backbone_dir(model_cfg.backbone)
    config = json.loads((d / "config.json").read_text())
    for k in _VOLATILE_CONFIG_KEYS:
        config.pop(k, None)
    weights = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")) + sorted(d.glob("*.index.json"))
    if not weights:
        raise UsageError(f"--backbone {model_cfg.backbone}: no weight files (*.safetensors, *.bin) in {d}")
    h = hashlib.sha256()
    for name in PROCESSOR_FILES:
        if (d / name).is_file():
            h.update(name.encode() + b"\0" + (d / name).read_bytes())
    size = load_processor(d, model_cfg.min_pixels, model_cfg.max_pixels).image_processor.size
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "format": FORMAT,
        "backbone_config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "backbone_weights": hashlib.sha256("|".join(_file_digest(w) for w in weights).encode()).hexdigest(),
        "processor_files": h.hexdigest(),
        "min_pixels": int(size["shortest_edge"]), "max_pixels": int(size["longest_edge"]),
        "views": list(views), "feature_layer": int(model_cfg.vl_feature_layer), "pooling": POOLING,
        "compute_dtype": str(resolve_dtype(model_cfg.dtype, device)).replace("torch.", ""),
    }


def fingerprint_diff(cached: dict, current: dict) -> str | None:
    """None when equal on every compared field, else a one-line description of the differences."""
    def short(v):
        return v[:12] if isinstance(v, str) and len(v) == 64 else v
    diffs = [f"{k} (cache: {short(cached.get(k))}, now: {short(current.get(k))}; {COMPARED[k]})"
             for k in COMPARED if cached.get(k) != current.get(k)]
    return ", ".join(diffs) or None


def episode_keys(dataset) -> dict[str, str]:
    """episode id -> key of what its samples' features depend on besides the fingerprint: the
    instruction text and the ingest fingerprint (source files + options, so re-ingested images)."""
    return {ep.meta.episode_id: hashlib.sha256(f"{ep.meta.instruction}\0{ep.meta.source.get('fingerprint')}"
                                               .encode()).hexdigest()[:16] for ep in dataset.episodes}


# ------------------------------------------------------------------------------------------ lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed but not yet reaped child still answers kill(0): count zombies as dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class CacheLock:
    """One build per cache directory: `.lock` is created exclusively (O_EXCL) and names its holder.

    A lock left by a process that no longer runs on this host (a killed build) is taken over; a
    live holder, or one on another host (cannot be checked), makes the build refuse.
    """

    def __init__(self, cache_dir: Path):
        self.path = Path(cache_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> "CacheLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                pid, host = holder.get("pid"), holder.get("host")
                if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                    log.warning("cache: taking over %s left by pid %d, which no longer runs", self.path, pid)
                    self.path.unlink(missing_ok=True)
                    continue
                raise UsageError(f"--cache-dir {self.path.parent}: another cache build holds it (pid {pid} on {host}, "
                                 f"since {holder.get('since')}); wait for it, or delete {self.path} if it is gone")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UsageError(f"--cache-dir {self.path.parent}: could not take {self.path}; is another build starting?")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ------------------------------------------------------------------------------------------ writing
def shard_path(cache_dir: Path, name: str, what: str) -> Path:
    return Path(cache_dir) / SHARDS / (f"{name}.json" if what == "commit" else f"{name}.{what}.npy")


def read_commit(cache_dir: Path, name: str) -> dict | None:
    path = shard_path(cache_dir, name, "commit")
    return read_json(path) if path.exists() else None


def write_shard(cache_dir: Path, name: str, arrays: dict[str, np.ndarray], sample_ids: list[str],
                episodes: dict[str, str], bad: dict[str, str], written_by: dict | None = None,
                before_commit=None) -> dict:
    """Write a shard's arrays (each atomically), then its commit. `before_commit` is a test hook
    (simulated crash between the arrays and the commit)."""
    files = {}
    for what, arr in arrays.items():
        path = shard_path(cache_dir, name, what)
        with atomic_file(path, "wb") as f:
            np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        files[path.name] = path.stat().st_size
    if before_commit is not None:
        before_commit()
    commit = {"name": name, "rows": len(sample_ids), "samples": sample_ids, "episodes": episodes, "bad": bad,
              "files": files, "written_by": written_by or {}}
    write_json(shard_path(cache_dir, name, "commit"), commit)
    return commit


def remove_leftovers(cache_dir: Path, planned: set[str]) -> int:
    """Delete temporary files of killed writers and files of shards no longer planned. Only under
    the lock (no writer is running), and once per build: never a listing per write."""
    removed = 0
    shards = Path(cache_dir) / SHARDS
    if not shards.is_dir():
        return 0
    for p in shards.iterdir():
        if p.name.startswith(".") or p.name.split(".", 1)[0] not in planned:
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def plan_shards(cache_dir: Path, samples: dict[str, str], shard_size: int) -> tuple[list[dict], list[dict]]:
    """Extend `plan.json` so that every sample of `samples` {id: episode key} (in dataset order) is
    in a committed or a pending shard; return (pending shards, commits).

    A committed row counts only if its episode key still matches (a re-ingested episode or changed
    instruction is re-encoded). A pending shard is kept as planned (so a resumed build encodes the
    same batches) unless one of its samples left the dataset or changed; then it is re-planned.
    Samples recorded bad are retried.
    """
    path = Path(cache_dir) / PLAN_FILE
    plan = read_json(path)["shards"] if path.exists() else []
    found = {shard["name"]: read_commit(cache_dir, shard["name"]) for shard in plan}
    commits = [c for c in found.values() if c is not None]
    covered = {s for c in commits for s in c["samples"] if samples.get(s) == c["episodes"].get(episode_of(s))}
    kept, pending = [shard for shard in plan if found[shard["name"]] is not None], []
    for shard in plan:
        if found[shard["name"]] is None and all(
                s in samples and s not in covered and samples[s] == shard["episodes"].get(episode_of(s))
                for s in shard["samples"]):
            kept.append(shard)
            pending.append(shard)
            covered.update(shard["samples"])
    missing = [s for s in samples if s not in covered]
    next_index = 1 + max((int(s["name"]) for s in plan), default=-1)
    for k in range(0, len(missing), shard_size):
        ids = missing[k : k + shard_size]
        shard = {"name": f"{next_index:06d}", "samples": ids,
                 "episodes": {episode_of(s): samples[s] for s in ids}}
        next_index += 1
        kept.append(shard)
        pending.append(shard)
    kept.sort(key=lambda s: s["name"])
    if kept != plan:
        write_json(path, {"shards": kept})
    return pending, commits


def write_manifest(cache_dir: Path, bad: dict[str, str]) -> dict:
    """Consolidate the commits of all planned shards into manifest.json (later shards win; rows of an
    episode whose key changed are dropped). Returns the manifest."""
    plan = read_json(Path(cache_dir) / PLAN_FILE)["shards"] if (Path(cache_dir) / PLAN_FILE).exists() else []
    shards, rows, episodes = [], {}, {}
    for shard in plan:
        commit = read_commit(cache_dir, shard["name"])
        if commit is None or not commit["rows"]:
            continue
        si = len(shards)
        shards.append({"name": commit["name"], "rows": commit["rows"]})
        episodes.update(commit["episodes"])
        for r, s in enumerate(commit["samples"]):
            rows[s] = (si, r, commit["episodes"][episode_of(s)])
    samples = {s: [si, r] for s, (si, r, key) in rows.items() if episodes.get(episode_of(s)) == key}
    manifest = {"format": FORMAT, "rows": sum(s["rows"] for s in shards), "shards": shards, "samples": samples,
                "episodes": episodes, "bad": {s: why for s, why in bad.items() if s not in samples}}
    write_json(Path(cache_dir) / MANIFEST_FILE, manifest)
    return manifest


# ------------------------------------------------------------------------------------------ reading
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
        self.dim, self.num_tokens, self.dtype = int(layout["dim"]), int(layout["tokens"]), layout["dtype"]
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    # --------------------------------------------------------------------------------- metadata
    @property
    def fingerprint(self) -> dict:
        return self.info["fingerprint"]

    @property
    def has_tokens(self) -> bool:
        return self.num_tokens > 0

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self.index

    def bytes_per_sample(self) -> int:
        return (self.dim + self.num_tokens * self.dim) * np.dtype(self.dtype).itemsize + self.num_tokens

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
            arr = self._maps[(shard, what)] = np.load(shard_path(self.dir, self.shards[shard], what), mmap_mode="r")
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
        if self.num_tokens:
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

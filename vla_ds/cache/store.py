"""How the VL feature cache is laid out on disk, and the build's writing side (plan, shards, lock).

```
CACHE_DIR/
  cache.json             format, fingerprint (what produced the features), layout (D, K = --vl-tokens
                         as "vl_tokens", dtype, token pooling)
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
Readers (vla_ds/cache/reader.py) open `.npy` shards by memory map, lazily, in each DataLoader
worker. What produced the features is the fingerprint (vla_ds/cache/fingerprint.py).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from vla_ds.errors import UsageError
from vla_ds.utils.io import atomic_file, write_json
from vla_ds.utils.lock import DirLock

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the meaning of stored features changes
INFO_FILE, PLAN_FILE, MANIFEST_FILE, SHARDS = "cache.json", "plan.json", "manifest.json", "shards"
ARRAYS = ("pooled", "tokens", "tokens_mask")


def cache_dir_of(cfg) -> Path:
    """--cache-dir, default OUTPUT_DIR/../vl_cache (shared by the runs of one runs/ folder)."""
    return Path(cfg.run.cache_dir) if cfg.run.cache_dir else Path(cfg.run.output_dir).parent / "vl_cache"


def layout_vl_tokens(layout: dict) -> int:
    """K, the VL tokens per sample of a cache.json layout (written as "tokens" before vla-ds named
    it "vl_tokens" everywhere; both read)."""
    return int(layout["vl_tokens"] if "vl_tokens" in layout else layout["tokens"])


def episode_of(sample_id: str) -> str:
    return sample_id.rsplit(":", 1)[0]


def read_json(path: Path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------ lock
def cache_lock(cache_dir: Path) -> DirLock:
    """One build per cache directory (`vla_ds.utils.lock`)."""
    return DirLock(cache_dir, "--cache-dir", "cache build")


# ------------------------------------------------------------------------------------------ writing
def shard_path(cache_dir: Path, name: str, what: str) -> Path:
    return Path(cache_dir) / SHARDS / (f"{name}.json" if what == "commit" else f"{name}.{what}.npy")


def read_commit(cache_dir: Path, name: str) -> dict | None:
    """The shard's commit, or None while it is unfinished or one of its arrays is damaged (then the
    next build encodes it again)."""
    path = shard_path(cache_dir, name, "commit")
    if not path.exists():
        return None
    commit = read_json(path)
    for file in commit.get("files", {}):
        why = damage(Path(cache_dir) / SHARDS / file)
        if why:
            log.warning("cache: shard %s: %s is %s; it is encoded again", name, file, why)
            return None
    return commit


def damage(path: Path) -> str | None:
    """What keeps the .npy file at `path` from being memory-mapped whole (missing, unreadable, or
    shorter than its header says: a truncated copy or a full disk), else None. Reads the header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, EOFError) as e:
        return f"unreadable ({' '.join(str(e).split())})"
    size = path.stat().st_size
    return f"truncated ({size} of {expected} bytes)" if size < expected else None


def damaged_shard(cache_dir: Path, path: Path, why: str) -> UsageError:
    """The one-line error for a shard file that cannot be read: which file, and how to repair it."""
    return UsageError(f"--cache-dir {cache_dir}: shard file {path} is {why}; run `vla-ds cache` with the same flags to "
                      "encode that shard again (then `vla-ds cache --verify` to check the cache)")


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



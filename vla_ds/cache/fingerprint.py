"""What produced a VL cache: its fingerprint, from config and file metadata only (no weights loaded).

A cache is used only when its fingerprint equals the one the current flags give on every field of
`COMPARED` (`fingerprint_diff` names the differing fields and the flag behind each). Per episode,
`episode_keys` adds what a sample's features depend on besides: the instruction text and the
ingest fingerprint (so a re-ingested or re-worded episode is re-encoded).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from vla_ds.cache.store import FORMAT
from vla_ds.errors import UsageError
from vla_ds.utils.dist import device_for

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
    device = device or device_for()
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


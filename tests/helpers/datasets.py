"""Small synthetic datasets written through the real ingest (both recording layouts).

A session is ("a", seed, duration_s, frame_spacing_s): a raw recorder session with sensor, or
("b", seed, duration_s): a frame-list folder without.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

IMAGE = (48, 64)
# 2 raw sessions with sensor (1 s and 0.5 s frames) + 2 frame-list sessions without: ~28 samples
TRAIN = [("a", 0, 5.0, 1.0), ("a", 1, 4.0, 0.5), ("b", 10, 4.0), ("b", 11, 4.0)]
# a learnable task: 5 samples (2 with sensor) that a small head fits in a few dozen steps
LEARN = [("a", 3, 2.0, 1.0), ("b", 4, 1.5)]
# 16 samples: 2 raw sessions with sensor, 1 frame-list session without
CACHE = [("a", 0, 4.0, 1.0), ("a", 1, 3.0, 0.5), ("b", 10, 3.0)]


def repeat_episodes(dataset: Path, times: int) -> Path:
    """Each episode `times` times over (copies under other episode ids): the same samples, an epoch
    `times` as long. Training runs save a checkpoint at every epoch end, so on a 5-sample task an
    epoch per optimizer step would time checkpoints, not training."""
    for ep in sorted(p for p in (dataset / "episodes").iterdir() if p.is_dir()):
        for k in range(1, times):
            copy = ep.with_name(f"{ep.name}-x{k}")
            shutil.copytree(ep, copy)
            meta = json.loads((copy / "meta.json").read_text())
            meta["episode_id"] = copy.name
            (copy / "meta.json").write_text(json.dumps(meta, indent=2))
    return dataset


def make_dataset(root: Path, sessions: list[tuple], stats: bool = True, repeat: int = 1) -> Path:
    """Record `sessions` under ROOT/raw, ingest them into ROOT/dataset (images at most 64 px),
    optionally repeat its episodes, and write stats.json."""
    from vla_ds.data import synthetic
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.stats import compute_stats

    raw = root / "raw"
    for layout, seed, duration, *spacing in sessions:
        if layout == "a":
            synthetic.make_session_a(raw / "needle_insertion", seed=seed, duration_s=duration,
                                     frame_spacing_s=spacing[0], image_size=IMAGE)
        else:
            synthetic.make_session_b(raw / "retina_approach", seed=seed, duration_s=duration, image_size=IMAGE)
    dataset = root / "dataset"
    preprocess([str(raw)], dataset, IngestOptions(max_side=64))
    repeat_episodes(dataset, repeat)
    if stats:
        compute_stats([dataset]).save(dataset)
    return dataset

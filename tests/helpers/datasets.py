"""Small synthetic datasets written through the real ingest (both recording layouts)."""
from __future__ import annotations

from pathlib import Path

IMAGE = (48, 64)


def ingest(raw: Path, out: Path, stats: bool = True) -> Path:
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.stats import compute_stats

    preprocess([str(raw)], out, IngestOptions(max_side=64))
    if stats:
        compute_stats([out]).save(out)
    return out


def make_train_data(root: Path) -> Path:
    """2 raw sessions with sensor (1 s and 0.5 s frames) + 2 frame-list sessions without: ~28 samples."""
    from vla_ds.data import synthetic

    raw = root / "raw"
    synthetic.make_session_a(raw / "needle_insertion", seed=0, duration_s=5.0, frame_spacing_s=1.0, image_size=IMAGE)
    synthetic.make_session_a(raw / "needle_insertion", seed=1, duration_s=4.0, frame_spacing_s=0.5, image_size=IMAGE)
    for k in range(2):
        synthetic.make_session_b(raw / "retina_approach", seed=10 + k, duration_s=4.0, image_size=IMAGE)
    return ingest(raw, root / "dataset")


def repeat_episodes(dataset: Path, times: int) -> Path:
    """Each episode `times` times over (copies under other episode ids): the same samples, an epoch
    `times` as long. Training runs save a checkpoint at every epoch end, so on a 5-sample task an
    epoch per optimizer step would time checkpoints, not training."""
    import json
    import shutil

    for ep in sorted(p for p in (dataset / "episodes").iterdir() if p.is_dir()):
        for k in range(1, times):
            copy = ep.with_name(f"{ep.name}-x{k}")
            shutil.copytree(ep, copy)
            meta = json.loads((copy / "meta.json").read_text())
            meta["episode_id"] = copy.name
            (copy / "meta.json").write_text(json.dumps(meta, indent=2))
    return dataset


def make_learn_data(root: Path, repeat: int = 1) -> Path:
    """A learnable task: 5 samples (2 with sensor) that a small head can fit in a few dozen steps;
    with `repeat` > 1 each episode that many times over (5 distinct samples, longer epochs)."""
    from vla_ds.data import synthetic
    from vla_ds.data.stats import compute_stats

    synthetic.make_session_a(root / "raw" / "needle_insertion", seed=3, duration_s=2.0, frame_spacing_s=1.0,
                             image_size=IMAGE)
    synthetic.make_session_b(root / "raw" / "retina_approach", seed=4, duration_s=1.5, image_size=IMAGE)
    dataset = ingest(root / "raw", root / "dataset", stats=False)
    repeat_episodes(dataset, repeat)
    compute_stats([dataset]).save(dataset)
    return dataset


def make_cache_data(root: Path) -> Path:
    """16 samples: 2 raw sessions with sensor, 1 frame-list session without (no stats.json)."""
    from vla_ds.data import synthetic

    raw = root / "raw"
    synthetic.make_session_a(raw / "needle_insertion", seed=0, duration_s=4.0, frame_spacing_s=1.0, image_size=IMAGE)
    synthetic.make_session_a(raw / "needle_insertion", seed=1, duration_s=3.0, frame_spacing_s=0.5, image_size=IMAGE)
    synthetic.make_session_b(raw / "retina_approach", seed=10, duration_s=3.0, image_size=IMAGE)
    return ingest(raw, root / "dataset", stats=False)

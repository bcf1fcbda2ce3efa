"""`vla-ds demo`: the whole pipeline on made-up data, small enough for a laptop CPU.

Stages so far:
  1. write the tiny Qwen2.5-VL backbone (`vla-ds tiny-model`)
  2. synthetic recordings in both input layouts (`vla_ds.data.synthetic`)
  3. ingest them into a vla-ds dataset (`vla-ds preprocess`)
  4. normalization statistics (`vla-ds stats`)
  5. a balanced, mixed sensor/no-sensor batch through the backbone's loading path
Each later stage (cache, DeepSpeed training, convert, predict) is added here as it lands, so the
demo always shows everything vla-ds can do.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from vla_ds.data.synthetic import synthetic_view  # noqa: F401  (re-exported for tests and notebooks)

log = logging.getLogger(__name__)


def backbone_forward_check(model_dir: str | Path, images: list, instruction: str) -> dict:
    """Load processor + model from `model_dir` and run one forward pass of a multi-view message."""
    from vla_ds.model.backbone import chat_message, load_vl_model
    from vla_ds.model.processor import load_processor

    processor = load_processor(model_dir)
    model = load_vl_model(model_dir, device="cpu")
    text = processor.apply_chat_template(chat_message(len(images), instruction), tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    if not torch.isfinite(hidden).all():
        raise RuntimeError(f"{model_dir}: forward pass produced non-finite hidden states")
    return {
        "tokens": int(inputs["input_ids"].shape[1]),
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "hidden_shape": tuple(hidden.shape),
        "forward_ms": (time.perf_counter() - t0) * 1e3,
        "parameters_M": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def make_recordings(root: Path, seed: int) -> list[Path]:
    """Two raw sessions with sensor (1 s and 0.5 s frames) and three frame-list sessions without."""
    from vla_ds.data import synthetic

    sessions = [
        synthetic.make_session_a(root / "needle_insertion", seed=seed, duration_s=6.0, frame_spacing_s=1.0),
        synthetic.make_session_a(root / "needle_insertion", seed=seed + 1, duration_s=4.0, frame_spacing_s=0.5),
    ]
    for k in range(3):
        sessions.append(synthetic.make_session_b(root / "retina_approach", seed=seed + 10 + k, duration_s=5.0))
    return sessions


def run_demo(out: str | Path, seed: int = 0) -> dict:
    """Run every demo stage under `out`; return where each artefact went."""
    from vla_ds.commands.preprocess import log_summary
    from vla_ds.data.dataset import IntegratedDataset, collate
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.sampler import BalancedDistributedSampler
    from vla_ds.data.stats import compute_stats
    from vla_ds.model.tiny import write_tiny_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stages = 5
    backbone, raw, dataset = out / "backbone", out / "recordings", out / "dataset"

    log.info("[1/%d] tiny Qwen2.5-VL backbone -> %s", stages, backbone)
    write_tiny_model(backbone, seed=seed)

    log.info("[2/%d] synthetic recordings (raw sessions with sensor, frame lists without) -> %s", stages, raw)
    make_recordings(raw, seed)

    log.info("[3/%d] vla-ds preprocess %s --out %s", stages, raw, dataset)
    summary = preprocess([str(raw)], dataset, IngestOptions(max_side=160))
    log_summary(summary, dataset)

    log.info("[4/%d] vla-ds stats %s", stages, dataset)
    stats = compute_stats([dataset])
    stats_path = stats.save(dataset)
    log.info("      action std %s -> %s", " ".join(f"{x:.3g}" for x in stats.action_std), stats_path)

    log.info("[5/%d] a balanced batch (--sensor-sample-ratio 0.5) through the backbone", stages)
    ds = IntegratedDataset(dataset, views=["View1", "View5"])
    sampler = BalancedDistributedSampler(ds.sample_has_sensor, sensor_ratio=0.5, num_replicas=1, rank=0, seed=seed)
    batch = collate([ds[i] for i in list(sampler)[:4]])
    log.info(
        "      %d samples (%d with sensor); actions %s, sensor %s, %d views each",
        len(batch["sample_ids"]),
        int(batch["has_sensor"].sum()),
        tuple(batch["actions"].shape),
        tuple(batch["sensor"].shape),
        len(batch["images"][0]),
    )
    check = backbone_forward_check(backbone, batch["images"][0], batch["instructions"][0])
    log.info(
        "      %d tokens (%d image tokens) -> last hidden state %s in %.1f ms (%.2f M parameters)",
        check["tokens"], check["image_tokens"], check["hidden_shape"], check["forward_ms"], check["parameters_M"],
    )
    result = {
        "backbone": str(backbone),
        "recordings": str(raw),
        "dataset": str(dataset),
        "stats": str(stats_path),
        "samples": summary["samples"],
        "sensor_share": summary["sensor_share"],
        "forward": check,
        "seconds": time.perf_counter() - t0,
    }
    log.info("demo finished in %.1f s; outputs under %s", result["seconds"], out)
    return result

"""`vla-ds demo`: the whole pipeline on made-up data, small enough for a laptop CPU.

Stages so far:
  1. write the tiny Qwen2.5-VL backbone (`vla-ds tiny-model`)
  2. synthetic recordings in both input layouts (`vla_ds.data.synthetic`)
  3. ingest them into a vla-ds dataset (`vla-ds preprocess`)
  4. normalization statistics (`vla-ds stats`)
  5. a balanced, mixed sensor/no-sensor batch through the backbone's loading path
  6. DeepSpeed ZeRO-2 training on 2 CPU processes (torchrun, gloo), LoRA + sensor, then its curves
Each later stage (cache, convert, predict) is added here as it lands, so the demo always shows
everything vla-ds can do.
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


# Small head: the demo shows the pipeline, not the model's capacity (CPU minutes, not hours).
DEMO_HEAD = [
    "--sensor-hidden-dim", "64", "--sensor-output-dim", "64", "--sensor-num-heads", "2", "--sensor-conv-blocks", "3",
    "--expert-hidden-dim", "64", "--expert-num-heads", "2", "--expert-num-layers", "2",
]


def train_on_cpu(dataset: Path, backbone: Path, run_dir: Path, steps: int, seed: int) -> dict:
    """DeepSpeed ZeRO-2 on 2 CPU processes via torchrun; returns the last metrics row."""
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        "-m", "vla_ds.train", "--mode", "train", "--ds-config", "zero2",
        "--data", str(dataset), "--backbone", str(backbone), "--output-dir", str(run_dir),
        "--finetune-vl", "lora", "--sensor-enabled", "--fusion-strategy", "concat", "--sensor-sample-ratio", "0.5",
        "--batch-size", "2", "--grad-accum-steps", "2", "--max-steps", str(steps), "--lr", "2e-3", "--sensor-lr", "2e-3",
        "--vl-lr", "1e-3", "--min-lr", "1e-4", "--warmup-ratio", "0.1", "--val-ratio", "0.2", "--log-every", "5",
        "--num-workers", "0", "--wandb-mode", "disabled", "--seed", str(seed), *DEMO_HEAD,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    log.info("      torchrun --nproc_per_node 2 %s", " ".join(cmd[6:]))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"demo training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss_step"] for r in rows if "train/loss_step" in r]
    val = [r["val/loss_epoch"] for r in rows if "val/loss_epoch" in r]
    return {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": val[-1] if val else None, "steps": steps}


def run_demo(out: str | Path, seed: int = 0, train_steps: int = 40) -> dict:
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
    stages = 6
    backbone, raw, dataset, run_dir = out / "backbone", out / "recordings", out / "dataset", out / "run"

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

    log.info("[6/%d] DeepSpeed ZeRO-2 training, 2 CPU processes, LoRA + sensor (concat) -> %s", stages, run_dir)
    trained = train_on_cpu(dataset, backbone, run_dir, train_steps, seed)
    from vla_ds.plot import plot_run

    curves = plot_run(run_dir)
    log.info("      loss %.3f -> %.3f over %d steps (val %.3f); policy %s; curves %s", trained["first_loss"],
             trained["last_loss"], trained["steps"], trained["val_loss"] or float("nan"), run_dir / "policy", curves)
    result = {
        "run": str(run_dir),
        "train": trained,
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

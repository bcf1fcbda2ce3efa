"""`vla-ds plan`'s activation model against what one forward + backward really allocates, at the
Qwen2.5-VL-3B's widths (hidden 2048, MLP 11008, vision 1280, 2 views at 448 px) with the depth cut
to a few blocks so that it runs on a CPU. Writes docs/performance.md (section activations).

The model-state half of the plan is exact by construction (tests/train/test_profile.py); this is
the half that is modelled (vla_ds/profiling/activations.py). Per layer the model is linear in
depth, so two depths give the per-layer cost and the constant part separately.

Measured: the peak of allocated tensor bytes above the step's start, on a GPU from the CUDA
allocator (`max_memory_allocated`), on CPU from the allocator events torch.profiler records
(`profile_memory=True`; the same quantity, since `max_memory_allocated` does not exist for CPU).
Gradient buffers exist before the measured step (as DeepSpeed's do), so the rise is activations.

    .venv/bin/python -m tests.benchmarks.bench_activations [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tests.benchmarks.report import machine, update_section

PUBLISHED = Path(__file__).resolve().parents[2] / "vla_ds" / "profiling" / "configs" / "qwen2_5_vl_3b_instruct.json"
SIDE = 448
VISION_DEPTH = 2
# (label, finetune mode, LM depth, micro-batch, extra ModelConfig fields)
CASES = [
    ("lora", "lora", 2, 1, {}),
    ("lora", "lora", 4, 1, {}),
    ("lora", "lora", 2, 2, {}),
    ("lora, no checkpointing", "lora", 2, 1, {"gradient_checkpointing": False}),
    ("lora all-linear", "lora", 2, 1, {"lora_targets": "all-linear"}),
    ("lora + sensor, cross_attention", "lora", 2, 1, {"sensor_enabled": True, "fusion_strategy": "cross_attention"}),
    ("full, last block", "full", 2, 1, {"unfreeze_last_n": 1}),
    ("full, last block", "full", 4, 1, {"unfreeze_last_n": 1}),
    ("full, every block", "full", 2, 1, {"unfreeze_last_n": 2}),
    ("full, every block", "full", 2, 2, {"unfreeze_last_n": 2}),
    ("none (frozen, 17 tokens)", "none", 2, 1, {}),
    ("none (frozen, 17 tokens)", "none", 2, 4, {}),
]


def backbone(work: Path, lm_layers: int, dtype: torch.dtype) -> Path:
    """The published 3B architecture with `lm_layers` LM blocks and VISION_DEPTH vision blocks."""
    from vla_ds.model.tiny import write_tiny_model

    out = work / f"qwen2.5-vl-3b-widths-{lm_layers}l"
    if not (out / "config.json").exists():
        cfg = json.loads(PUBLISHED.read_text())
        cfg["num_hidden_layers"] = lm_layers
        cfg["vision_config"].update(depth=VISION_DEPTH, fullatt_block_indexes=[VISION_DEPTH - 1])
        path = work / f"config-{lm_layers}l.json"
        path.write_text(json.dumps(cfg))
        write_tiny_model(out, config_json=path, dtype=dtype, max_pixels=SIDE * SIDE)
    return out


def peak_rise(fn, device: torch.device) -> int:
    """Peak allocated bytes above the level at the call, while `fn` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    level = peak = 0
    for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if e.name() == "[memory]":
            level += e.nbytes()
            peak = max(peak, level)
    return peak


def measure(bb: Path, mode: str, micro: int, extra: dict, device: torch.device, dtype: str) -> dict:
    from PIL import Image

    from vla_ds.data.stats import NormStats
    from vla_ds.model.backbone import hidden_size, read_backbone_config
    from vla_ds.model.config import ModelConfig
    from vla_ds.model.policy import QwenVLA
    from vla_ds.profiling.activations import Workload, activation_bytes
    from vla_ds.profiling.counts import count_parameters

    cfg = ModelConfig(backbone=str(bb), finetune_vl=mode, dtype=dtype, **extra)
    policy = QwenVLA(cfg, NormStats.identity(cfg.action_dim, cfg.sensor_input_channels if cfg.sensor_enabled else None),
                     device=device)
    policy.train()
    rng = np.random.default_rng(0)
    images = [[Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)) for _ in range(2)]
              for _ in range(micro)]
    batch = {"images": images, "instructions": ["Insert the needle into the target tissue slowly."] * micro,
             "actions": torch.randn(micro, cfg.horizon, cfg.action_dim)}
    inputs = policy.vl.processor_inputs(images[:1], batch["instructions"][:1])
    image_id = policy.vl.model.config.image_token_id
    text_tokens = int((inputs["input_ids"] != image_id).sum())

    def step():
        policy(batch).per_sample_loss.mean().backward()

    step()  # gradient buffers exist from here on, as DeepSpeed's do; the step then allocates activations only
    start = time.perf_counter()
    measured = peak_rise(step, device)
    seconds = time.perf_counter() - start
    bb_cfg = read_backbone_config(bb)
    counts = count_parameters(bb_cfg, cfg, 10 * hidden_size(bb_cfg))
    width = 2 if next(policy.vl.model.parameters()).dtype == torch.bfloat16 else 4
    planned = activation_bytes(bb_cfg, cfg, counts, micro, Workload(2, SIDE, text_tokens), width)
    return {"measured": measured, "planned": planned, "text_tokens": text_tokens, "seconds": seconds}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="keep the backbones here (default: a temp dir)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = "bfloat16" if gpu else "float32"
    if not gpu:
        torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for label, mode, layers, micro, extra in CASES:
            bb = backbone(work, layers, torch.bfloat16)
            r = measure(bb, mode, micro, extra, device, dtype)
            rows.append((label, layers, micro, r))
            print(f"{label} L={layers} mb={micro}: measured {r['measured'] / 2**20:.1f} MiB, planned "
                  f"{r['planned'] / 2**20:.1f} MiB ({r['planned'] / r['measured']:.2f}x), {r['seconds']:.1f} s")
    mib = 2**20
    body = "\n".join(
        f"| {label} | {layers} | {micro} | {r['measured'] / mib:.1f} | {r['planned'] / mib:.1f} | "
        f"{r['planned'] / r['measured']:.2f} |" for label, layers, micro, r in rows)
    where = (f"GPU ({torch.cuda.get_device_name(0)}, bf16, CUDA allocator)" if gpu else
             "CPU (fp32, allocator events from torch.profiler)")
    text_tokens = rows[0][3]["text_tokens"]
    ratios = [r["planned"] / r["measured"] for *_, r in rows]
    by_depth = {layers: r for label, layers, micro, r in rows if label == "lora" and micro == 1}
    slope = ""
    if len(by_depth) == 2:
        (la, ra), (lb, rb) = sorted(by_depth.items())
        slope = (f" Per LM block (LoRA, {la} -> {lb} blocks): measured +{(rb['measured'] - ra['measured']) / (lb - la) / 2**20:.2f}"
                 f" MiB, planned +{(rb['planned'] - ra['planned']) / (lb - la) / 2**20:.2f} MiB, which is what carries the "
                 "estimate to the 3B's 36 blocks.")
    summary = (f"\n\nplanned/measured ranges from {min(ratios):.2f} to {max(ratios):.2f}.{slope} On a CPU the attention "
               "kernel is the math one, which materializes attention scores that a GPU's SDPA kernels do not: a GPU "
               "should measure somewhat less.\n")
    md = (f"## Activation model at the 3B's widths (`tests/benchmarks/bench_activations.py`)\n\n"
          f"{machine()}; {where}. The Qwen2.5-VL-3B architecture (random weights) with its depth cut to the "
          f"listed LM blocks and {VISION_DEPTH} vision blocks, 2 views at {SIDE} px ({text_tokens} text tokens), "
          f"default head (expert 512 x 4 layers; no sensor unless listed). Measured = peak allocated bytes above the start of one "
          f"forward + backward with the gradient buffers already allocated; planned = "
          f"`vla_ds.profiling.activations.activation_bytes` for the same run.\n\n"
          "| run | LM blocks | micro-batch | measured MiB | planned MiB | planned/measured |\n"
          "|---|---:|---:|---:|---:|---:|\n" + body + summary)
    print(md)
    update_section("performance.md", "activations-gpu" if gpu else "activations", md)


if __name__ == "__main__":
    main()

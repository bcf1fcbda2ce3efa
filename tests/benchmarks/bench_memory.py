"""Memory and speed of the configurations users choose between, measured with `vla-ds profile`
and set against `vla-ds plan`'s estimate. Writes docs/performance.md (section memory-gpu or
memory-cpu) and docs/ds_configs.md's measured column source.

On a GPU: the Qwen2.5-VL-3B-Instruct architecture (vla_ds/profiling/configs, random bf16
weights), 2 views at 448 px, gradient checkpointing, one process:
  LoRA ZeRO-2 micro-batch 1/4/8, 8-bit LoRA micro-batch 8, full finetune (every LM block) with
  ZeRO-2 + CPU optimizer offload capped at 24 GiB, the same with ZeRO-3 + offload, and cache-mode
  head training. Without a GPU: the same rows on the tiny backbone in fp32 (CPU, RSS).

    .venv/bin/python -m tests.benchmarks.bench_memory [--work DIR] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from tests.benchmarks.report import machine, update_section

ROWS = [  # (label, mode for the planner, micro-batch, ds config, extra flags)
    ("lora-mb1", "lora", 1, "zero2", ["--finetune-vl", "lora"]),
    ("lora-mb4", "lora", 4, "zero2", ["--finetune-vl", "lora"]),
    ("lora-mb8", "lora", 8, "zero2", ["--finetune-vl", "lora"]),
    ("lora8bit-mb8", "lora-8bit", 8, "zero2", ["--finetune-vl", "lora", "--load-in-8bit"]),
    ("full-z2off-mb1", "full-all", 1, "zero2_offload", ["--finetune-vl", "full", "--unfreeze-last-n", "LM"]),
    ("full-z3off-mb1", "full-all", 1, "zero3_offload", ["--finetune-vl", "full", "--unfreeze-last-n", "LM"]),
    ("cache-mb8", "cache", 8, "zero2", ["--finetune-vl", "none", "--cache-policy", "require"]),
]


def make_inputs(work: Path, gpu: bool) -> tuple[Path, Path, int]:
    """(backbone dir, dataset dir, image side)."""
    from vla_ds.data import synthetic
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.stats import compute_stats
    from vla_ds.model.tiny import write_tiny_model

    side = 448 if gpu else 64
    backbone = work / ("qwen2.5-vl-3b-random" if gpu else "tiny")
    if not (backbone / "config.json").exists():
        if gpu:
            cfg = Path(__file__).resolve().parents[2] / "vla_ds" / "profiling" / "configs" / "qwen2_5_vl_3b_instruct.json"
            write_tiny_model(backbone, config_json=cfg, dtype=torch.bfloat16, max_pixels=side * side)
        else:
            write_tiny_model(backbone)
    data = work / f"data{side}"
    if not (data / "stats.json").exists():
        synthetic.make_session_a(work / f"raw{side}" / "needle", seed=0, duration_s=6.0, frame_spacing_s=0.25,
                                 image_size=(side, side))
        preprocess([str(work / f"raw{side}")], data, IngestOptions(max_side=side))
        compute_stats([data]).save(data)
    return backbone, data, side


def command(label, micro, preset, extra, backbone, data, out, steps, gpu) -> list[str]:
    from vla_ds.model.backbone import num_lm_layers, read_backbone_config

    extra = [str(num_lm_layers(read_backbone_config(backbone))) if x == "LM" else x for x in extra]
    cmd = ["--data", str(data), "--backbone", str(backbone), "--batch-size", str(micro), "--grad-accum-steps", "1",
           "--ds-config", preset, "--output-dir", str(out / label), "--label", label, "--steps", str(steps),
           "--num-workers", "2", "--val-ratio", "0", *extra]
    if gpu and preset.endswith("offload"):
        cmd += ["--gpu-mem-limit", "24"]
    return cmd


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="keep models/data/runs here (default: a temp dir)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", nargs="+", default=None, help="labels to run (default: all)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per row before it counts as failed")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        backbone, data, side = make_inputs(work, gpu)
        results = []
        for label, mode, micro, preset, extra in ROWS:
            if args.rows and label not in args.rows:
                continue
            flags = command(label, micro, preset, extra, backbone, data, work / "runs", args.steps, gpu)
            if mode == "cache":
                _run([sys.executable, "-m", "vla_ds.train", "--mode", "cache", *_cache_flags(flags)],
                     timeout=args.timeout)
            proc = _run([sys.executable, "-m", "vla_ds.profiling", *flags], check=False, timeout=args.timeout)
            path = work / "runs" / label / "profile.json"
            if not path.exists():
                print(f"{label}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
                continue
            result = json.loads(path.read_text())
            result["_plan"] = plan_for(result, mode, backbone, side, gpu)
            result["_cmd"] = "vla-ds profile " + " ".join(f.replace(str(work), "$WORK") for f in flags)
            results.append(result)
            print(row(result, gpu))
            # after every row, so that a run cut short (a device lease ending) keeps what it measured
            update_section("performance.md", "memory-gpu" if gpu else "memory-cpu", table(results, gpu, side, args.steps))
        print(table(results, gpu, side, args.steps))


def _cache_flags(flags: list[str]) -> list[str]:
    drop = {"--label", "--steps", "--cache-policy"}
    out, skip = [], False
    for f in flags:
        if skip:
            skip = False
            continue
        if f in drop:
            skip = True
            continue
        out.append(f)
    return out


def _run(cmd, check=True, timeout=None):
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout} s")
    if check and proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])}...: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def plan_for(result: dict, mode: str, backbone: Path, side: int, gpu: bool):
    from vla_ds.model.backbone import hidden_size, read_backbone_config
    from vla_ds.model.config import ModelConfig
    from vla_ds.profiling.activations import Workload
    from vla_ds.profiling.counts import count_parameters
    from vla_ds.profiling.plan import estimate, resolved_preset

    bb = read_backbone_config(backbone)
    cfg = ModelConfig.from_dict(result["config"]["model"])
    counts = count_parameters(bb, cfg, 10 * hidden_size(bb))
    preset = Path(result["ds_config"]).stem
    ds = resolved_preset(preset, hidden_size(bb), result["micro_batch"], 1, bf16=result["precision"] == "bf16")
    width = 2 if result["precision"] == "bf16" else 4
    return estimate(counts, bb, cfg, preset, ds, mode, result["micro_batch"], 1, width, Workload(2, side, 64))


def row(r: dict, gpu: bool) -> str:
    s, est = r["summary"], r["_plan"]
    gib = 2**30
    states = sum(s.get(f"{k}_accelerator_gib", 0) for k in ("parameters", "gradients", "optimizer_states"))
    planned_states = est.model_states / gib
    peak = f"{s['peak_gib']:.2f}" if r["status"] == "ok" else "OOM"
    cells = [r["label"], Path(r["ds_config"]).stem, str(r["micro_batch"]), peak,
             f"{s.get('peak_allocated_gib') or 0:.2f}" if gpu else "–", f"{states:.3f}", f"{planned_states:.3f}",
             f"{planned_states / states:.2f}" if states > 0.001 else "–",
             f"{est.needed_gib:.2f}" if gpu else "–",
             # the planner's allocator total (states + buffers + activations) against the measured peak
             f"{est.total / gib / s['peak_allocated_gib']:.2f}" if gpu and s.get("peak_allocated_gib") else "–",
             f"{s['host_rss_peak_gib']:.2f}",
             f"{s['samples_per_s']:.2f}" if s.get("samples_per_s") else "–", f"`{r['_cmd']}`"]
    return "| " + " | ".join(cells) + " |"


def table(results: list[dict], gpu: bool, side: int, steps: int) -> str:
    where = (f"GPU: {torch.cuda.get_device_name(0)}, Qwen2.5-VL-3B architecture with random bf16 weights" if gpu else
             "CPU only (no GPU was lent): tiny backbone, fp32, process RSS; the GPU table below is not yet measured")
    head = ("| run | ds config | micro-batch | peak GiB | allocated GiB | model states GiB (measured) | planned | "
            "planned/measured | plan needs GiB | planned total/allocated | host RSS GiB | samples/s | command |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    body = "\n".join(row(r, gpu) for r in results)
    return (f"### Memory by configuration (`tests/benchmarks/bench_memory.py`)\n\n{where}; {machine()}; 2 views at "
            f"{side} px, {steps} measured steps after 1 warm-up, 1 process. Peak = CUDA reserved on GPU, process RSS on "
            f"CPU (which includes ~0.4 GiB of libraries). Model states are counted tensor by tensor on the "
            f"accelerator; 'planned' is `vla-ds plan`'s figure for the same run.\n\n{head}\n{body}\n")


if __name__ == "__main__":
    main()

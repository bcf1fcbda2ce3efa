"""`vla-ds plan --gpu-mem 24 --num-gpus N [--backbone DIR|CONFIG]`: which configuration fits, estimated."""
from __future__ import annotations

import argparse
from pathlib import Path

from vla_ds.cli.common import subcommand


def add_parser(sub, name: str) -> None:
    from vla_ds.profiling.plan import DEFAULT_BACKBONE, MICRO_BATCHES, MODES, PRESETS

    p = subcommand(sub, name, run,
                   help="estimate memory of every ds config x finetune mode x micro-batch; recommend what fits",
                   description="Estimate per-GPU memory (model states exact from a meta-device model, activations "
                               "modelled) for every preset x finetune mode x micro-batch and recommend, per mode, "
                               "the fastest configuration that fits --gpu-mem. Needs only the backbone's config "
                               "(a model directory or a config.json); no weights. Measure a candidate with "
                               "`vla-ds profile --gpu-mem-limit`. See docs/memory.md.")
    p.add_argument("--gpu-mem", type=float, required=True, metavar="GIB", help="memory of one GPU in GiB (e.g. 24)")
    p.add_argument("--num-gpus", type=int, default=1, help="data-parallel processes (GPUs in total)")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help="Qwen2.5-VL model directory, hub id (cached) or config.json (default: the 3B-Instruct config)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES,
                   help="finetune modes (cache: head on cached VL features; full: the last --unfreeze-last-n LM "
                   "blocks; full-all: every LM block)")
    p.add_argument("--ds-configs", nargs="+", default=list(PRESETS), choices=PRESETS, help="ds_configs/ presets")
    p.add_argument("--micro-batches", nargs="+", type=int, default=list(MICRO_BATCHES), help="micro-batch sizes")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="training precision")
    p.add_argument("--views", type=int, default=2, help="camera views per sample")
    p.add_argument("--image-size", type=int, default=448, help="image side in pixels after the processor")
    p.add_argument("--text-tokens", type=int, default=64, help="chat template + instruction tokens")
    p.add_argument("--config", default=None, help="a run's YAML (vla-ds train --config): its model settings "
                   "(LoRA rank/targets, --unfreeze-last-n, head sizes) are planned")
    p.add_argument("--output", type=Path, default=None, help="also write the table (Markdown) and JSON here "
                   "(OUTPUT.md, OUTPUT.json)")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from vla_ds.errors import UsageError
    from vla_ds.model.config import ModelConfig
    from vla_ds.profiling.activations import Workload
    from vla_ds.profiling.plan import DEFAULT_BACKBONE, DEFAULT_BACKBONE_NAME, markdown, plan, recommend
    from vla_ds.utils.io import atomic_file

    if args.gpu_mem <= 0 or args.num_gpus < 1 or min(args.micro_batches) < 1:
        raise UsageError("--gpu-mem must be > 0, --num-gpus and --micro-batches >= 1")
    base = ModelConfig(backbone=args.backbone)
    if args.config:
        from vla_ds.config import config_from_yaml

        base = config_from_yaml(args.config, backbone=args.backbone).model
    rows = plan(args.backbone, base, args.gpu_mem, args.num_gpus, args.modes, args.ds_configs, args.micro_batches,
                args.precision, Workload(args.views, args.image_size, args.text_tokens))
    recs = recommend(rows)
    name = DEFAULT_BACKBONE_NAME if args.backbone == DEFAULT_BACKBONE else args.backbone
    text = markdown(rows, recs, args.gpu_mem, args.num_gpus, name)
    print(text)  # the command's output is the table itself
    if args.output:
        with atomic_file(args.output.with_suffix(".md")) as f:
            f.write(text + "\n")
        payload = {"gpu_mem_gib": args.gpu_mem, "num_gpus": args.num_gpus, "backbone": args.backbone,
                   "rows": [dict(dataclasses.asdict(r), needed_gib=r.needed_gib) for r in rows],
                   "recommended": {m: (dataclasses.asdict(r) if r else None) for m, r in recs.items()}}
        with atomic_file(args.output.with_suffix(".json")) as f:
            json.dump(payload, f, indent=2)
    return 0

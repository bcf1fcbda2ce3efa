"""`vla-ds tiny-model OUT_DIR`: write a tiny random Qwen2.5-VL model directory."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vla_ds.cli.common import subcommand
from vla_ds.errors import UsageError

log = logging.getLogger(__name__)


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="write a tiny randomly initialised Qwen2.5-VL model directory (for tests and the demo)",
                   description="Write a complete Hugging Face model directory (config, safetensors weights, "
                               "tokenizer with chat template, Qwen2-VL image processor) for a tiny random "
                               "Qwen2.5-VL, made offline.")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="directory to write (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (same seed, same files)")


def run(args: argparse.Namespace) -> int:
    from vla_ds.model.tiny import write_tiny_model

    out = args.out_dir
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR {out} is a file; give a directory path")
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise UsageError(f"OUT_DIR {out} is a non-empty directory that is not a model directory; choose another path")
    write_tiny_model(out, seed=args.seed)
    log.info("tiny Qwen2.5-VL written to %s", out)
    return 0

"""`vla-ds demo [--out DIR]`: run the whole pipeline on made-up data."""
from __future__ import annotations

import argparse
from pathlib import Path

from vla_ds.cli.common import HELP_FORMAT


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(
        name,
        help="run the whole pipeline on synthetic data with the tiny backbone (CPU, minutes)",
        description="Build the tiny Qwen2.5-VL backbone and run each vla-ds stage on synthetic data, "
        "printing where every artefact went.",
        formatter_class=HELP_FORMAT,
    )
    p.add_argument("--out", type=Path, default=Path("vla_ds_demo"), help="directory for all demo outputs")
    p.add_argument("--seed", type=int, default=0, help="seed for the tiny backbone and the synthetic data")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vla_ds.demo import run_demo

    run_demo(args.out, seed=args.seed)
    return 0

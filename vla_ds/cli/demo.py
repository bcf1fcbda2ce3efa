"""`vla-ds demo [--out DIR]`: run the whole pipeline on made-up data."""
from __future__ import annotations

import argparse
from pathlib import Path

from vla_ds.cli.common import subcommand


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="run the whole pipeline on synthetic data with the tiny backbone (CPU, minutes)",
                   description="Build the tiny Qwen2.5-VL backbone and run each vla-ds stage on synthetic data, "
                               "printing where every artefact went.")
    p.add_argument("--out", type=Path, default=Path("vla_ds_demo"), help="directory for all demo outputs")
    p.add_argument("--seed", type=int, default=0, help="seed for the tiny backbone and the synthetic data")
    p.add_argument("--train-steps", type=int, default=40, metavar="N",
                   help="optimizer steps of each training stage (the second is killed at step 15, so N > 15)")


def run(args: argparse.Namespace) -> int:
    from vla_ds.demo import run_demo

    run_demo(args.out, seed=args.seed, train_steps=args.train_steps)
    return 0

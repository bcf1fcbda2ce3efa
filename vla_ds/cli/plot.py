"""`vla-ds plot RUN_DIR`: render loss and lr curves to PNG."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vla_ds.cli.common import subcommand

log = logging.getLogger(__name__)


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="plot a run's loss and learning-rate curves to PNG",
                   description="Read RUN_DIR/metrics.jsonl and write loss and lr curves as a PNG.")
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a training run directory (--output-dir)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    from vla_ds.train.plot import plot_run

    out = plot_run(args.run_dir, args.out)
    log.info("curves written to %s", out)
    return 0

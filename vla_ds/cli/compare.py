"""`vla-ds compare RUN_OR_EVAL...`: several runs' eval metrics in one table and bar chart."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vla_ds.cli.common import subcommand
from vla_ds.eval.metrics import SUMMARY_KEYS

log = logging.getLogger(__name__)


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="compare the evals of several runs: one table, the settings that differ as columns",
                   description="Read each run's newest eval (RUN/eval/*/eval.json; or an eval directory) and write "
                               "compare.md, compare.json and compare.png: one row per run sorted by --metric, the "
                               "best marked, the settings that differ between the runs (from their config.yaml) "
                               "as columns, with / without a sensor, and the yardsticks. See docs/evaluation.md.")
    p.add_argument("evals", nargs="+", metavar="RUN_OR_EVAL", help="run directories or eval directories")
    p.add_argument("--metric", default="final_pos_err",
                   choices=SUMMARY_KEYS,
                   help="the metric to sort by")
    p.add_argument("--output-dir", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                   help="where compare.{md,json,png} go (unset: compare/ beside the first run)")


def run(args: argparse.Namespace) -> int:
    from vla_ds.eval.compare import compare, markdown, write_compare

    result = compare(args.evals, args.metric)
    out = getattr(args, "output_dir", None) or Path(args.evals[0]).resolve().parent / "compare"
    write_compare(result, out)
    sys.stdout.write(markdown(result))
    log.info("compare: best %s by %s; report in %s (compare.md, compare.png)", result["best"], args.metric, out)
    return 0

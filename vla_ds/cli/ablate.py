"""`vla-ds ablate --config base.yaml --vary KEY=V1,V2 ...`: train, evaluate and compare a grid of runs."""
from __future__ import annotations

import argparse
import logging
import sys

from vla_ds.cli.common import subcommand
from vla_ds.eval.metrics import SUMMARY_KEYS

log = logging.getLogger(__name__)


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="train, evaluate and compare a grid of runs (fusion x sensor x loss weight ...)",
                   description="Every combination of the --vary values on top of the base config is trained "
                               "(`vla-ds train --config`, under torchrun with --nproc > 1), evaluated (`vla-ds "
                               "eval`) and compared (`vla-ds compare`) in --output-dir. The cells share the data, "
                               "its stats and the VL cache; finished cells are skipped when run again, interrupted "
                               "ones resume. See docs/evaluation.md.")
    p.add_argument("--config", required=True, metavar="YAML",
                   help="the base settings (a `vla-ds train --config` file; its data is every cell's)")
    p.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2",
                   help="a setting and its values (repeat for more axes), e.g. fusion_strategy=concat,gated")
    p.add_argument("--output-dir", default="runs/ablation", help="where the cells' runs and the comparison go")
    p.add_argument("--nproc", type=int, default=1, help="processes per training (torchrun --nproc_per_node)")
    p.add_argument("--episodes", default="val", help="what each cell's eval scores (vla-ds eval --episodes)")
    p.add_argument("--metric", default="final_pos_err",
                   choices=SUMMARY_KEYS,
                   help="the metric the comparison sorts by")


def run(args: argparse.Namespace) -> int:
    from vla_ds.eval.ablate import AblateArgs, ablate
    from vla_ds.eval.compare import markdown

    result = ablate(AblateArgs(config=args.config, vary=args.vary, output_dir=args.output_dir, nproc=args.nproc,
                               episodes=args.episodes, metric=args.metric))
    sys.stdout.write(markdown(result))
    log.info("ablate: best %s by %s; report in %s", result["best"], args.metric, result["output_dir"])
    if result["failed"]:
        log.error("ablate: %d cell(s) failed: %s", len(result["failed"]), ", ".join(result["failed"]))
        return 1
    return 0

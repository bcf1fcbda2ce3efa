"""`vla-ds build-ops [OP ...]`: compile DeepSpeed's CPU ops now, once per environment."""
from __future__ import annotations

import argparse
import logging
import time

from vla_ds.cli.common import subcommand
from vla_ds.utils.jit import CPU_OPS, DEFAULT_OPS

log = logging.getLogger(__name__)


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="compile DeepSpeed's CPU ops now (launch/setup.sh does) instead of at a run's start",
                   description="Compile DeepSpeed's CPU ops (JIT, ~1 min each) into this environment's "
                               "$TORCH_EXTENSIONS_DIR (default: <venv>/torch_extensions), so the first "
                               "training run neither waits silently nor races other processes for them. "
                               "Ops already built are only loaded. On CUDA, DeepSpeed builds its ops at "
                               "first use; nothing is done.")
    # No `choices`: argparse checks an empty nargs="*" list against them and fails; build_ops checks.
    p.add_argument("ops", nargs="*", metavar="OP", default=list(DEFAULT_OPS),
                   help=f"ops to build, of: {', '.join(CPU_OPS)} (fused_adam: only for a ds config that "
                   "sets \"torch_adam\": false on CPU)")


def run(args: argparse.Namespace) -> int:
    from vla_ds.utils.jit import build_ops, extensions_dir

    start = time.perf_counter()
    done = build_ops(args.ops)
    for op, seconds, built in done:
        log.info("%s: %s in %.1f s", op, "built" if built else "already built, loaded", seconds)
    if done:
        log.info("DeepSpeed's ops are in %s (%.1f s in all)", extensions_dir(), time.perf_counter() - start)
    return 0

"""`vla-ds` command line: one entry, one subcommand per job.

Each subcommand lives in its own module under `vla_ds/commands/` exposing
`add_parser(subparsers, name)` (flags, with defaults shown in `--help`, and `run` set as the
handler). Those modules import torch/transformers only inside their handlers, so `vla-ds --help`
stays fast. `main(argv)` is importable and returns the exit code,
so tests call it in-process.
"""
from __future__ import annotations

import argparse
import logging
import sys

from vla_ds import __version__
from vla_ds.errors import UsageError

log = logging.getLogger("vla_ds")

SUBCOMMANDS = {
    "demo": "vla_ds.commands.demo",
    "tiny-model": "vla_ds.commands.tiny_model",
    "preprocess": "vla_ds.commands.preprocess",
    "stats": "vla_ds.commands.stats",
    "cache": "vla_ds.commands.cache",
    "train": "vla_ds.commands.train",
    "plot": "vla_ds.commands.plot",
    "convert": "vla_ds.commands.convert",
    "profile": "vla_ds.commands.profile",
    "plan": "vla_ds.commands.plan",
}


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="vla-ds",
        description="Train QwenVLA policies for robotic needle insertion with DeepSpeed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vla-ds {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging with timestamps and ranks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    return parser


def run_command(name: str, args: argparse.Namespace, run) -> int:
    """Set up logging and run `run(args)`; bad input ends as one line and exit code 2."""
    from vla_ds.utils.logging import setup_logging

    setup_logging(args.verbose)
    try:
        return int(run(args) or 0)
    except UsageError as e:
        log.error("vla-ds %s: %s", name, e)
        return 2
    except KeyboardInterrupt:
        log.error("vla-ds %s: interrupted", name)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, args, args.run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

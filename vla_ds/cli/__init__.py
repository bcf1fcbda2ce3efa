"""`vla-ds` command line: one entry, one subcommand per job. The only layer that parses argv;
nothing in the library imports it.

Each subcommand lives in its own module here exposing `add_parser(subparsers, name)` (flags, with
defaults shown in `--help`, and `run` set as the handler); the work lives in the library. Those
modules import torch/transformers only inside their handlers, so `vla-ds --help` stays fast. The
jobs that launchers start (`python -m vla_ds.train|cache|profiling`, `torchrun -m vla_ds ...`)
enter through the same modules. `main(argv)` is importable and returns the exit code, so tests
call it in-process.
"""
from __future__ import annotations

import argparse
import importlib

from vla_ds import __version__
from vla_ds.cli.common import HELP_FORMAT, add_verbose_flag, run_command
from vla_ds.errors import near_miss

SUBCOMMANDS = {
    "demo": "vla_ds.cli.demo",
    "tiny-model": "vla_ds.cli.tiny_model",
    "preprocess": "vla_ds.cli.preprocess",
    "stats": "vla_ds.cli.stats",
    "cache": "vla_ds.cli.cache",
    "train": "vla_ds.cli.train",
    "plot": "vla_ds.cli.plot",
    "eval": "vla_ds.cli.eval",
    "compare": "vla_ds.cli.compare",
    "ablate": "vla_ds.cli.ablate",
    "convert": "vla_ds.cli.convert",
    "profile": "vla_ds.cli.profile",
    "plan": "vla_ds.cli.plan",
    "serve": "vla_ds.cli.serve",
    "build-ops": "vla_ds.cli.build_ops",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vla-ds",
        description="Train QwenVLA policies for robotic needle insertion with DeepSpeed.",
        formatter_class=HELP_FORMAT,
    )
    parser.add_argument("--version", action="version", version=f"vla-ds {__version__}")
    add_verbose_flag(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub, name)
    parser.commands = sub.choices  # name -> its parser
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse would blame `vla-ds` and suggest nothing: name the subcommand and the near flag
        command = parser.commands[args.command]
        command.error(f"unrecognized arguments: {' '.join(extra)}{near_flag(command, extra)}")
    return run_command(args.command, args, args.run)


def near_flag(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """' (did you mean --batch-size?)' for the first unknown flag that is a near miss of a real one."""
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for word in extra:
        near = near_miss(word.split("=")[0], flags) if word.startswith("--") else None
        if near:
            return f" (did you mean {near}?)"
    return ""


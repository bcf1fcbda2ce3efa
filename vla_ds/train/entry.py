"""The launcher-friendly training entry (`python -m vla_ds.train`, `launch/train.py`, `vla-ds train`).

Works under `deepspeed --num_gpus N`, `torchrun --nproc_per_node N` and as a single process; the
launcher's `--local_rank` is accepted. `--mode train|cache` keeps the old trainer's command lines
working: `--mode cache` builds the VL feature cache with the same flags.
"""
from __future__ import annotations

import argparse
import sys

from vla_ds.commands import HELP_FORMAT


def build_parser(require_mode: bool, prog: str = "python -m vla_ds.train") -> argparse.ArgumentParser:
    from vla_ds.config import add_config_flags

    p = argparse.ArgumentParser(
        prog=prog,
        description="Train QwenVLA with DeepSpeed (or build its VL feature cache with --mode cache).",
        formatter_class=HELP_FORMAT,
    )
    add_config_flags(p)
    if require_mode:
        for action in p._actions:
            if action.dest == "mode":
                action.required = True
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging with timestamps and ranks")
    return p


def run(args: argparse.Namespace) -> int:
    """Collective. Resolve the config, then train (or build the cache)."""
    from vla_ds.config import resolve_config
    from vla_ds.utils.dist import process_group_cleanup

    cfg = resolve_config(args)
    with process_group_cleanup():
        if cfg.run.mode == "cache":
            from vla_ds.cache import build_cache_from_config

            build_cache_from_config(cfg)
        else:
            from vla_ds.train.loop import train

            train(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    from vla_ds.cli import run_command

    return run_command("train", build_parser(require_mode=True).parse_args(argv), run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

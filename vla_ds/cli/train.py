"""`vla-ds train [flags]`: train QwenVLA with DeepSpeed (single process, or under a launcher).

Also the launcher entry `python -m vla_ds.train --mode train|cache ...` / `launch/train.py`
(`launcher_main`), which works under `deepspeed --num_gpus N`, `torchrun --nproc_per_node N` and as
a single process; the launcher's `--local_rank` is accepted. `--mode cache` keeps the old
trainer's command lines working: it builds the VL feature cache with the same flags.

The ecosystem's spellings are accepted: `--deepspeed` alone (DeepSpeed's `add_config_arguments`;
no effect, vla-ds always trains with DeepSpeed), `--deepspeed CONFIG` (Hugging Face Trainer's: the
same as `--ds-config CONFIG`) and `--deepspeed_config CONFIG`. Flags are never abbreviated: argparse's
prefix matching made `--deepspeed` an "ambiguous option", and would let a typo pick some other flag.
"""
from __future__ import annotations

import argparse

from vla_ds.cli.common import launcher_parser, run_command, subcommand
from vla_ds.errors import UsageError

DESCRIPTION = ("Train QwenVLA with DeepSpeed (or build its VL feature cache with --mode cache). Multi-process: "
               "torchrun --nproc_per_node N -m vla_ds.train --mode train ... or deepspeed --num_gpus N "
               "launch/train.py --mode train ...")


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="train QwenVLA with DeepSpeed (flags of the old trainer; see docs/training.md)",
                   description=DESCRIPTION)
    add_training_flags(p)


def add_training_flags(p: argparse.ArgumentParser) -> None:
    """The training flags, the ecosystem's `--deepspeed`, and no prefix matching of flags."""
    from vla_ds.config import add_config_flags

    add_config_flags(p)
    p.add_argument("--deepspeed", nargs="?", const=True, default=argparse.SUPPRESS, metavar="DS_CONFIG",
                   help="accepted for compatibility: alone (DeepSpeed's flag) it has no effect, vla-ds always "
                        "trains with DeepSpeed; with a value (Hugging Face's) it is --ds-config DS_CONFIG")


def apply_deepspeed_flag(args: argparse.Namespace) -> None:
    """`--deepspeed CONFIG` -> `args.ds_config`; one-line UsageError when it disagrees with --ds-config."""
    value = vars(args).pop("deepspeed", True)
    if value is True:
        return
    if getattr(args, "ds_config", value) != value:
        raise UsageError(f"--deepspeed {value} and --ds-config {args.ds_config} name two DeepSpeed configs; "
                         "give one of them")
    args.ds_config = value


def run(args: argparse.Namespace) -> int:
    """Collective. Resolve the config, then train (or build the cache)."""
    from vla_ds.config import resolve_config
    from vla_ds.utils.dist import process_group_cleanup

    apply_deepspeed_flag(args)
    cfg = resolve_config(args)
    with process_group_cleanup():
        if cfg.run.mode == "cache":
            from vla_ds.cache import build_cache

            build_cache(cfg)
        else:
            from vla_ds.train.loop import train

            train(cfg)
    return 0


def build_launcher_parser(prog: str = "python -m vla_ds.train") -> argparse.ArgumentParser:
    """The old trainer's command line: every training flag, and --mode required."""
    p = launcher_parser(prog, DESCRIPTION)
    add_training_flags(p)
    for action in p._actions:
        if action.dest == "mode":
            action.required = True
    return p


def launcher_main(argv: list[str] | None = None) -> int:
    """`python -m vla_ds.train` and `launch/train.py`."""
    return run_command("train", build_launcher_parser().parse_args(argv), run)

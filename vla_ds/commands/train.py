"""`vla-ds train [flags]`: train QwenVLA with DeepSpeed (single process, or under a launcher)."""
from __future__ import annotations


def add_parser(sub, name: str) -> None:
    from vla_ds.commands import HELP_FORMAT
    from vla_ds.config import add_config_flags

    p = sub.add_parser(
        name,
        help="train QwenVLA with DeepSpeed (flags of the old trainer; see docs/training.md)",
        description="Train QwenVLA with DeepSpeed. Multi-process: torchrun --nproc_per_node N -m vla_ds.train "
        "--mode train ... or deepspeed --num_gpus N launch/train.py --mode train ...",
        formatter_class=HELP_FORMAT,
    )
    add_config_flags(p)
    p.set_defaults(run=_run)


def _run(args) -> int:
    from vla_ds.train.entry import run

    return run(args)

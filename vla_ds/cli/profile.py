"""`vla-ds profile [training flags]`: N real training steps with memory per phase and per kind.

Also `python -m vla_ds.profiling` (the same flags) for launchers: `torchrun --nproc_per_node N -m
vla_ds.profiling ...` or `deepspeed launch/profile.py ...`; see launch/profile_memory.sh.
"""
from __future__ import annotations

import argparse

from vla_ds.cli.common import launcher_parser, run_command, subcommand

DESCRIPTION = (
    "Run --warmup-steps + --steps real training steps of the configuration the training flags describe and report "
    "peak memory per phase (model load, engine init, forward, backward, optimizer step) and per kind (parameters, "
    "gradients, optimizer states, activations), from the CUDA allocator on a GPU or the process RSS on CPU, plus "
    "samples/s. Writes OUTPUT_DIR/profile.json, profile.md and profile.png. See docs/memory.md."
)


def add_profile_flags(p: argparse.ArgumentParser) -> None:
    from vla_ds.config import add_config_flags

    g = p.add_argument_group("profile settings")
    g.add_argument("--steps", type=int, default=3, help="measured optimizer steps")
    g.add_argument("--warmup-steps", type=int, default=1,
                   help="optimizer steps before them (in the memory peaks, not in samples/s)")
    g.add_argument("--gpu-mem-limit", type=float, default=None, metavar="GIB",
                   help="cap the CUDA allocator at this many GiB (e.g. 24), so fitting a smaller card is proven")
    g.add_argument("--memory-snapshot", action="store_true",
                   help="GPU: also write memory_snapshot_rank*.pickle for https://pytorch.org/memory_viz")
    g.add_argument("--label", default=None, help="row name in profile.md (default: the output directory's name)")
    add_config_flags(p)
    p.set_defaults(mode="train")


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="measure the memory and speed of a training configuration",
                   description=DESCRIPTION)
    add_profile_flags(p)


def options(args: argparse.Namespace):
    """The profiler's own settings from its flags (a one-line UsageError when out of range)."""
    from vla_ds.profiling.run import ProfileOptions

    return ProfileOptions(steps=args.steps, warmup_steps=args.warmup_steps, gpu_mem_limit=args.gpu_mem_limit,
                          memory_snapshot=args.memory_snapshot, label=args.label)


def run(args: argparse.Namespace) -> int:
    """Collective."""
    import logging

    from vla_ds.config import resolve_config
    from vla_ds.profiling.run import OOM_EXIT, ProfileOOM, profile
    from vla_ds.utils.dist import process_group_cleanup

    log = logging.getLogger("vla_ds")
    opts = options(args)
    cfg = resolve_config(args)
    with process_group_cleanup():
        try:
            result = profile(cfg, opts)
        except ProfileOOM as e:
            limit = f" within --gpu-mem-limit {opts.gpu_mem_limit:g} GiB" if opts.gpu_mem_limit else ""
            log.error("vla-ds profile: does not fit%s: %s (report in %s)", limit, e, cfg.run.output_dir)
            return OOM_EXIT
    s = result["summary"]
    fits = "" if result["fits"] is None else f"; fits in {opts.gpu_mem_limit:g} GiB: {result['fits']}"
    log.info("peak %.2f GiB (%s), %.2f samples/s%s; report: %s/profile.{json,md,png}", s["peak_gib"],
             result["memory_source"], s["samples_per_s"] or 0.0, fits, cfg.run.output_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vla_ds.profiling` (e.g. under torchrun): the same flags as `vla-ds profile`."""
    p = launcher_parser("python -m vla_ds.profiling", DESCRIPTION)
    add_profile_flags(p)
    return run_command("profile", p.parse_args(argv), run)

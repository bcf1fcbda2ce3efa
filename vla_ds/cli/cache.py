"""`vla-ds cache [training flags] [cache flags]`: build (or --verify) the VL feature cache.

Takes the training flags (the cache must match --backbone, --min-pixels/--max-pixels, --views,
--vl-feature-layer, --dtype and --vl-tokens of the run that uses it) plus cache-only flags.
--vl-tokens K is the number of VL tokens stored per sample besides the pooled vector (auto: 17).
Multi-process: `torchrun --nproc_per_node N -m vla_ds.cache ...` (or the training entry's `--mode cache`).
"""
from __future__ import annotations

import argparse
import logging

from vla_ds.cli.common import launcher_parser, run_command, subcommand

log = logging.getLogger("vla_ds")


def add_cache_flags(p: argparse.ArgumentParser) -> None:
    from vla_ds.config import add_config_flags

    add_config_flags(p)
    g = p.add_argument_group("cache settings")
    g.add_argument("--shard-size", type=int, default=2048, metavar="N", help="samples per shard file")
    g.add_argument("--cache-batch-size", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="samples per backbone forward (default: --batch-size)")
    g.add_argument("--cache-dtype", choices=["float16", "float32"], default=argparse.SUPPRESS,
                   help="storage dtype (default: the existing cache's, else float16)")
    g.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) samples whose images cannot be read instead of stopping")
    g.add_argument("--verify", action="store_true",
                   help="do not build: re-encode random cached samples and check they match the cache")
    g.add_argument("--verify-samples", type=int, default=64, metavar="N", help="samples re-encoded by --verify")


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="encode every sample once with the frozen backbone (VL feature cache for "
                        "--finetune-vl none)",
                   description="Build or resume the VL feature cache of all samples of --data in --cache-dir "
                               "(default: OUTPUT_DIR/../vl_cache), or check it with --verify. Multi-process: "
                               "torchrun --nproc_per_node N -m vla_ds.cache ... See docs/cache.md.")
    add_cache_flags(p)


def run(args: argparse.Namespace) -> int:
    """Collective (the build): every launched process runs it."""
    from vla_ds.cache import build_cache, verify_cache
    from vla_ds.config import resolve_config
    from vla_ds.utils.dist import process_group_cleanup
    from vla_ds.utils.logging import rank

    cfg = resolve_config(args)
    with process_group_cleanup():
        if args.verify:
            if rank() != 0:  # one process checks; the others have nothing to do
                return 0
            result = verify_cache(cfg, args.verify_samples, seed=cfg.run.seed)
            if not result["ok"]:
                log.error("vla-ds cache --verify: sample %s differs from the cache by %.2e (relative; tolerance "
                          "%.0e): rebuild the cache", result["worst_sample"], result["max_rel_error"],
                          result["tolerance"])
                return 1
            return 0
        build_cache(cfg, shard_size=args.shard_size, skip_bad=args.skip_bad,
                    cache_dtype=getattr(args, "cache_dtype", None), batch_size=getattr(args, "cache_batch_size", None))
        return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vla_ds.cache` (e.g. under torchrun): the same flags as `vla-ds cache`."""
    p = launcher_parser("python -m vla_ds.cache", __doc__)
    add_cache_flags(p)
    return run_command("cache", p.parse_args(argv), run)

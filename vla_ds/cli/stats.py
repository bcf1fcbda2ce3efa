"""`vla-ds stats DATASET_DIR...`: normalization statistics, saved as JSON beside the data."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vla_ds.cli.common import subcommand
from vla_ds.errors import UsageError

log = logging.getLogger(__name__)


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="compute action and sensor normalization statistics",
                   description="Per-dimension action stats (mean/std, q01/q99) and per-channel sensor stats "
                               "(force and A-scan channels separately) over every episode of the given datasets.")
    p.add_argument("data", nargs="+", metavar="DATASET_DIR", help="dataset directories, episode directories or globs")
    p.add_argument("--out", type=Path, default=None, help="stats file (default: DATASET_DIR/stats.json; required with several dirs)")


def run(args: argparse.Namespace) -> int:
    from vla_ds.data.format import find_episode_dirs
    from vla_ds.data.stats import STATS_FILE, compute_stats

    find_episode_dirs(args.data, flag="DATASET_DIR")  # a path or glob that holds no episodes: one line naming it
    if args.out is None:
        if len(args.data) != 1 or not Path(args.data[0]).is_dir():
            raise UsageError("--out is required when several dataset dirs or a glob are given")
        args.out = Path(args.data[0]) / STATS_FILE
    stats = compute_stats(args.data)
    path = stats.save(args.out)
    c = stats.counts
    log.info("%d episodes, %d action steps, %d sensor rows", c["episodes"], c["action_steps"], c["sensor_rows"])
    log.info("action mean %s", " ".join(f"{x:+.3g}" for x in stats.action_mean))
    log.info("action std  %s", " ".join(f"{x:.3g}" for x in stats.action_std))
    if "force_mean_std" in c:
        log.info("force mean/std %.4g / %.4g; A-scan mean/rms-std %.4g / %.4g", *c["force_mean_std"], *c["ascan_mean_std"])
    log.info("stats written to %s", path)
    return 0

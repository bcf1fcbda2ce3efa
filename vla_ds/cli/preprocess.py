"""`vla-ds preprocess SRC... --out DATASET_DIR`: ingest recordings (layouts A and B)."""
from __future__ import annotations

import argparse
from pathlib import Path

from vla_ds.cli.common import subcommand
from vla_ds.data.format import SENSOR_CHANNELS


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="ingest recorder sessions / frame-list folders into a vla-ds dataset",
                   description="Turn raw recorder sessions (recv_all_*/ with View*/, robot_state_*.csv, "
                               "sensor_data_*.npz) and pre-made frame-list folders (*_View*_single.json) into "
                               "vla-ds episodes. Idempotent: unchanged sessions are skipped.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="session folders, folders holding sessions, or globs")
    p.add_argument("--out", required=True, type=Path, help="dataset directory to write (DATASET_DIR)")
    p.add_argument("--instruction", default=None, help="one instruction for every session (overrides the others)")
    p.add_argument(
        "--instructions",
        default=None,
        metavar="FILE",
        help="JSON {folder name or glob: instruction}; else instruction.txt in the folder, else the folder's name",
    )
    p.add_argument("--max-side", type=int, default=448, help="downscale images to this longer side (0: keep originals in place)")
    p.add_argument("--tolerance", type=float, default=0.05, help="seconds within which camera frames and robot states are matched")
    p.add_argument("--sensor-dtype", choices=["float16", "float32"], default="float16", help="storage dtype of sensor.npy")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad frames/sessions instead of stopping")
    p.add_argument("--allow-external-images", action="store_true",
                   help="let frame lists name images outside their own folder (absolute paths or ../ elsewhere)")
    p.add_argument("--sensor-input-channels", type=int, default=SENSOR_CHANNELS,
                   help="sensor channels per row the policy will read (1 force + A-scan samples); a session whose "
                        "stream has another width is refused (skipped with --skip-bad)")
    p.add_argument("--workers", type=int, default=1, help="sessions ingested in parallel")


def run(args: argparse.Namespace) -> int:
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.summary import log_summary

    opts = IngestOptions(instruction=args.instruction, instructions_file=args.instructions, max_side=args.max_side,
                         tolerance_s=args.tolerance, sensor_dtype=args.sensor_dtype, skip_bad=args.skip_bad,
                         allow_external_images=args.allow_external_images, sensor_channels=args.sensor_input_channels)
    summary = preprocess(args.sources, args.out, opts, workers=args.workers)
    log_summary(summary, args.out)
    return 0

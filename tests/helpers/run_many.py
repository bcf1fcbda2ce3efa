"""`torchrun --nproc_per_node N -m tests.helpers.run_many RUNS.json`: several runs of the training
entry (or of `vla-ds profile`), one after the other, in the same launched processes.

RUNS.json is a list of ["train" | "profile", *ARGS]. Each is parsed by that entry's own parser and
run through the CLI's own `run_command` (so bad input ends as the one line `vla-ds train: ...`,
and the next run still starts; any other exception is logged, `OUTPUT_DIR: run failed: ...`, and the
next run starts too), by the same library calls as `python -m vla_ds.train --mode train
ARGS` / `python -m vla_ds.profiling ARGS`, each in its own --output-dir. Only the start-up
(imports, process group: ~15 s of a 2-process launch on 2 cores) is paid once. Rank 0's log
lines of each run also go to OUTPUT_DIR/run.log.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def _train(args) -> int:
    from vla_ds.config import resolve_config
    from vla_ds.train.loop import train

    train(resolve_config(args))
    return 0


def _profile(args) -> int:
    from vla_ds.cli.profile import options
    from vla_ds.config import resolve_config
    from vla_ds.profiling.run import profile

    opts = options(args)
    profile(resolve_config(args), opts)
    return 0


def _parser(kind: str):
    if kind == "train":
        from vla_ds.cli.train import build_launcher_parser

        return build_launcher_parser(), ["--mode", "train"], _train
    from vla_ds.cli.common import launcher_parser
    from vla_ds.cli.profile import DESCRIPTION, add_profile_flags

    p = launcher_parser("python -m vla_ds.profiling", DESCRIPTION)
    add_profile_flags(p)
    return p, [], _profile


log = logging.getLogger("vla_ds.tests.run_many")


def main(path: str) -> int:
    from vla_ds.cli.common import run_command
    from vla_ds.utils.dist import process_group_cleanup
    from vla_ds.utils.logging import rank

    root = logging.getLogger()
    with process_group_cleanup():
        for kind, *argv in json.loads(Path(path).read_text()):
            parser, prefix, fn = _parser(kind)
            args = parser.parse_args([*prefix, *argv])
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(out / "run.log", mode="a") if rank() == 0 else logging.NullHandler()
            root.addHandler(handler)
            try:
                run_command(kind, args, fn)  # its logging set-up keeps handlers that are not its own
            except Exception as e:  # noqa: BLE001 - every rank raises alike (collective code), so all go on
                log.exception("%s: run failed: %s: %s", out, type(e).__name__, e)
            finally:
                root.removeHandler(handler)
                handler.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

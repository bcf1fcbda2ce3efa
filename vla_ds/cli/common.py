"""What every `vla-ds` subcommand shares: the help format, the `-v` flag, and the one place where
an exception becomes a one-line message and an exit code."""
from __future__ import annotations

import argparse
import logging

from vla_ds.errors import UsageError

log = logging.getLogger("vla_ds")

HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter


def subcommand(sub, name: str, run, *, help: str, description: str) -> argparse.ArgumentParser:
    """The parser of subcommand `name` (defaults shown in --help), with `run(args)` as its handler."""
    # allow_abbrev=False: prefix matching made `--deepspeed` "ambiguous" and lets a typo pick another flag
    p = sub.add_parser(name, help=help, description=description, formatter_class=HELP_FORMAT, allow_abbrev=False)
    p.set_defaults(run=run)
    return p


def add_verbose_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging with timestamps and ranks")


def launcher_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The parser of a `python -m vla_ds.<job>` entry (torchrun/deepspeed launch these): the same
    flags as the subcommand, plus -v, which the top-level `vla-ds` parser holds otherwise."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HELP_FORMAT, allow_abbrev=False)
    add_verbose_flag(p)
    return p


def run_command(name: str, args: argparse.Namespace, run) -> int:
    """Set up logging and run `run(args)`; bad input (`UsageError`) ends as one line and exit code 2.

    First, DeepSpeed's op build directory (per environment, exported for child processes) is checked
    for a lock a killed build left: a run needing that op would otherwise wait forever, silently."""
    from vla_ds.utils.jit import check_stale_locks, use_extensions_dir
    from vla_ds.utils.logging import setup_logging

    setup_logging(args.verbose)
    try:
        check_stale_locks(use_extensions_dir())
        return int(run(args) or 0)
    except UsageError as e:
        log.error("vla-ds %s: %s", name, e)
        return 2
    except KeyboardInterrupt:
        log.error("vla-ds %s: interrupted", name)
        return 130

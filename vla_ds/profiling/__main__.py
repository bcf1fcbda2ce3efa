"""`python -m vla_ds.profiling [flags]`: `vla-ds profile` for launchers (torchrun, deepspeed)."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from vla_ds.cli import run_command
    from vla_ds.commands import HELP_FORMAT
    from vla_ds.commands.profile import DESCRIPTION, add_profile_flags, run

    p = argparse.ArgumentParser(prog="python -m vla_ds.profiling", description=DESCRIPTION,
                                formatter_class=HELP_FORMAT)
    add_profile_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging with timestamps and ranks")
    return run_command("profile", p.parse_args(argv), run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

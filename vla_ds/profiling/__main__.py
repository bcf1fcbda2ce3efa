"""`python -m vla_ds.profiling [flags]`: `vla-ds profile` for launchers (torchrun, deepspeed)."""
import sys

from vla_ds.cli.profile import main

sys.exit(main())

"""`python -m vla_ds.train --mode train|cache ...` (works under torchrun and deepspeed)."""
import sys

from vla_ds.cli.train import launcher_main

sys.exit(launcher_main())

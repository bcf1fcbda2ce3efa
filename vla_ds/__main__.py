"""`python -m vla_ds ...` and `torchrun --nproc_per_node N -m vla_ds train ...`: the `vla-ds` command."""
import sys

from vla_ds.cli import main

sys.exit(main())

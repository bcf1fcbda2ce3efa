"""`python -m vla_ds.cli ...`: the `vla-ds` console script."""
import sys

from vla_ds.cli import main

sys.exit(main())

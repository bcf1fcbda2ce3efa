"""`python -m vla_ds.cache ...` (also under torchrun): `vla-ds cache`, for launchers."""
import sys

from vla_ds.cli.cache import main

sys.exit(main())

"""`python -m vla_ds.train --mode train|cache ...` (works under torchrun and deepspeed)."""
import sys

from vla_ds.train.entry import main

sys.exit(main())

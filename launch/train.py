#!/usr/bin/env python3
"""Training entry script for launchers that need a file path:

    deepspeed --num_gpus 4 launch/train.py --mode train --ds-config ds_configs/zero2.json --data ... --backbone ...
    torchrun --nproc_per_node 2 launch/train.py --mode train ...
"""
import sys

from vla_ds.cli.train import launcher_main

if __name__ == "__main__":
    sys.exit(launcher_main())

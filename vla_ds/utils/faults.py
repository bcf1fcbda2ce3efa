"""One fault-injection hook, for the tests that prove a crash loses nothing.

`VLA_DS_FAULT=<point>:<n>` SIGKILLs this process when it reaches `point` with value `n`: a real
crash (no clean-up, no atexit handlers, no lock released). The points:

    kill_at_step:N         training, after optimizer step N (every rank)
    crash_in_save:N        training, rank 0, inside the save of step N: shards written, not renamed
    cache_after_shards:N   cache build, after this rank's N-th shard commit
    cache_mid_shard:N      cache build, after shard N+1's arrays, before its commit
"""
from __future__ import annotations

import logging
import os
import signal

ENV = "VLA_DS_FAULT"


def fault_point(point: str, n: int) -> None:
    """Die here, like a crash, if `VLA_DS_FAULT` names this point and value."""
    if os.environ.get(ENV, "") == f"{point}:{n}":
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)

"""One fault-injection hook, for the tests that prove a crash loses nothing, and one trace.

`VLA_DS_FAULT=<point>:<n>` SIGKILLs this process when it reaches `point` with value `n`: a real
crash (no clean-up, no atexit handlers, no lock released). The points:

    kill_at_step:N         training, after optimizer step N (every rank)
    crash_in_save:N        training, rank 0, inside the save of step N: shards written, not renamed
    cache_after_shards:N   cache build, after this rank's N-th shard commit
    cache_mid_shard:N      cache build, after shard N+1's arrays, before its commit

`VLA_DS_TRACE_SAMPLES=1` makes every training rank append, per micro-batch, one JSON line
{"step", "epoch", "rank", "ids"} to RUN_DIR/samples/rank_<r>.jsonl: which samples each optimizer
step saw (the tests of a resume on another world size check that the rest of an epoch is covered
exactly once).
"""
from __future__ import annotations

import json
import logging
import os
import signal

ENV = "VLA_DS_FAULT"
TRACE_ENV = "VLA_DS_TRACE_SAMPLES"


def fault_point(point: str, n: int) -> None:
    """Die here, like a crash, if `VLA_DS_FAULT` names this point and value."""
    if os.environ.get(ENV, "") == f"{point}:{n}":
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)


def trace_samples(run_dir, step: int, epoch: int, rank: int, sample_ids: list[str]) -> None:
    """With VLA_DS_TRACE_SAMPLES set, append this micro-batch's sample ids to RUN_DIR/samples/rank_<rank>.jsonl."""
    if os.environ.get(TRACE_ENV):
        root = os.path.join(run_dir, "samples")
        os.makedirs(root, exist_ok=True)
        with open(os.path.join(root, f"rank_{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "epoch": epoch, "rank": rank, "ids": list(sample_ids)}) + "\n")

"""Train/validation split by episode: an exact count per stratum, stable under a fixed seed.

Splitting by sample would leak: neighbouring samples of one episode share most of their action
chunk, so validation would score frames the model trained on. Episodes are grouped by sensor
presence (when per-episode `has_sensor` flags are given; else one group), and each group of n
episodes sends exactly k = round(val_ratio x n) to validation -- at least 1 when n >= 2 (so
validation measures sensor episodes even though they are rare) and at most n - 1 (so training
sees every kind); a lone episode trains. The k are the group's episodes with the smallest
`episode_hash(seed, episode_id)`, a value that depends on nothing but that pair.

So the validation set has the same size under every seed (users compare runs on it; drawing each
episode independently gave 2 or 12 validation episodes of 200 at 0.05, depending on the seed),
the same seed gives the same split in any order on any machine, and adding an episode to a group
moves at most one existing episode of it between train and val (its k-th smallest hash).
"""
from __future__ import annotations

import hashlib
import logging
import math
from typing import Sequence

log = logging.getLogger(__name__)


def episode_hash(episode_id: str, seed: int = 0) -> float:
    """Map (seed, episode_id) to a uniform value in [0, 1), the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}:{episode_id}".encode()).digest()
    # 53 bits: exactly representable as a float, so the value is < 1.0.
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def val_count(n: int, val_ratio: float) -> int:
    """How many of a group's `n` episodes go to validation: round(val_ratio x n) (halves up), at
    least 1 when n >= 2 and val_ratio > 0, at most n - 1."""
    if n < 2 or val_ratio <= 0:
        return 0
    return min(n - 1, max(1, math.floor(val_ratio * n + 0.5)))


def split_by_episode(
    episode_ids: Sequence[str],
    val_ratio: float,
    seed: int = 0,
    has_sensor: Sequence[bool] | None = None,
) -> tuple[list[str], list[str]]:
    """Split episodes into (train, val), each list in the input order.

    The groups are the sensor and no-sensor episodes when `has_sensor` (one flag per episode) is
    given, else all episodes; each sends its `val_count` episodes of smallest `episode_hash` to val.
    """
    val_ratio = float(val_ratio)
    # `not (0 <= r < 1)` also rejects NaN.
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"--val-ratio must be in [0, 1), got {val_ratio}; pass a share such as 0.05, or 0 for no validation")
    ids = list(episode_ids)
    seen: set[str] = set()
    for e in ids:
        if e in seen:
            raise ValueError(f"episode id {e!r} appears more than once; pass each episode once")
        seen.add(e)
    if has_sensor is None:
        groups = [list(range(len(ids)))]
    else:
        flags = [bool(f) for f in has_sensor]
        if len(flags) != len(ids):
            raise ValueError(f"has_sensor has {len(flags)} flags for {len(ids)} episodes; pass one flag per episode")
        groups = [[i for i, f in enumerate(flags) if f], [i for i, f in enumerate(flags) if not f]]

    hashes = [episode_hash(e, seed) for e in ids]
    is_val = [False] * len(ids)
    for group in groups:
        # ties (a 2**-53 chance) fall to the episode id, so the order never depends on the input's
        for i in sorted(group, key=lambda i: (hashes[i], ids[i]))[: val_count(len(group), val_ratio)]:
            is_val[i] = True
    train = [e for e, v in zip(ids, is_val) if not v]
    val = [e for e, v in zip(ids, is_val) if v]
    log.info("split %d episodes: %d train, %d val (val_ratio %.3f, seed %d)", len(ids), len(train), len(val), val_ratio, seed)
    return train, val

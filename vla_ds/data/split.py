"""Train/validation split by episode, stable under additions and stratified by sensor presence.

Splitting by sample would leak: neighbouring samples of one episode share most of their action
chunk, so validation would score frames the model trained on. An episode goes to validation when
a hash of (seed, episode_id) falls below `val_ratio`. The rule looks at nothing but that pair, so
adding episodes never moves an existing one between train and val.

With per-episode `has_sensor` flags the rule is applied within each group (sensor / no sensor),
and each group of >= 2 episodes gets at least one val and one train episode, so validation
measures both kinds even though sensor episodes are rare. Without flags all episodes form one
group, so a small dataset still gets a non-empty validation set. That guarantee is the one
exception to stability: an episode moved to val only because its group had none returns to train
once a new episode of that group hashes into val (and likewise the other way round).
"""
from __future__ import annotations

import hashlib
import logging
from typing import Sequence

log = logging.getLogger(__name__)


def episode_hash(episode_id: str, seed: int = 0) -> float:
    """Map (seed, episode_id) to a uniform value in [0, 1), the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}:{episode_id}".encode()).digest()
    # 53 bits: exactly representable as a float, so the value is < 1.0.
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def split_by_episode(
    episode_ids: Sequence[str],
    val_ratio: float,
    seed: int = 0,
    has_sensor: Sequence[bool] | None = None,
) -> tuple[list[str], list[str]]:
    """Split episodes into (train, val), each list in the input order.

    An episode is in val when `episode_hash(id, seed) < val_ratio`. The groups are the sensor and
    no-sensor episodes when `has_sensor` (one flag per episode) is given, else all episodes. With
    val_ratio > 0, every group of >= 2 episodes gets at least one val episode (its smallest hash)
    and one train episode (its largest hash).
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
    is_val = [h < val_ratio for h in hashes]
    if val_ratio > 0:
        for group in groups:
            if len(group) < 2:
                continue
            if not any(is_val[i] for i in group):
                # The episode closest to the threshold: the one a slightly larger ratio would pick.
                is_val[min(group, key=lambda i: hashes[i])] = True
            if all(is_val[i] for i in group):
                is_val[max(group, key=lambda i: hashes[i])] = False

    train = [e for e, v in zip(ids, is_val) if not v]
    val = [e for e, v in zip(ids, is_val) if v]
    log.info("split %d episodes: %d train, %d val (val_ratio %.3f, seed %d)", len(ids), len(train), len(val), val_ratio, seed)
    return train, val

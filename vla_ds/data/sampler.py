"""Distributed sampler with an exact per-epoch share of sensor samples, resumable mid-epoch.

Only ~5 % of the needle-insertion samples carry a sensor reading. `--sensor-sample-ratio R` asks
for a share R of sensor samples in every epoch. Each epoch draws exactly round(R * epoch_size)
sensor indices and the rest non-sensor indices. Each group is drawn by walking through seeded
permutations of that group (a fresh permutation per pass), so an oversampled group repeats every
sample floor or ceil of (draws / group size) times, and a group with enough samples is drawn
without replacement. The two draws are then shuffled together.

All randomness comes from `np.random.default_rng([seed, epoch])`, so every rank and every restart
sees the same epoch list. Ranks take interleaved positions of that list (like
`torch.utils.data.DistributedSampler`), and `state_dict`/`load_state_dict` let a crashed run skip
what was already consumed in the interrupted epoch.

The resume point is a *global* position: the first `position` entries of the epoch list are done
(every rank consumed `position / num_replicas`). The rest, `epoch list[position:]`, padded by
wrapping to the epoch's start as an uninterrupted epoch is, is sharded over however many ranks
the resumed run has: on the same world size exactly the shards the uninterrupted run had left, on
another each remaining sample once (plus at most num_replicas - 1 wrapped duplicates to even the
shards).
"""
from __future__ import annotations

import logging
import math
from typing import Iterator, Sequence

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

log = logging.getLogger(__name__)

# Fields that must match for a saved position to point at the same samples after a restart.
_STATE_MUST_MATCH = ("seed", "sensor_ratio", "epoch_size")


def _draw_cycled(group: np.ndarray, k: int, rng: np.random.Generator | None) -> np.ndarray:
    """k indices from `group`, passing through it repeatedly; a fresh permutation per pass.

    Full passes contain every member once and the last partial pass has no repeats, so each
    member appears floor(k / len) or ceil(k / len) times. rng None: passes in index order.
    """
    if k == 0:
        return np.empty(0, dtype=np.int64)
    passes = math.ceil(k / len(group))
    if rng is None:
        return np.tile(group, passes)[:k]
    return np.concatenate([rng.permutation(group) for _ in range(passes)])[:k]


def _interleave_evenly(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Merge a and b keeping each one's order, spreading each evenly over the result.

    Used for shuffle=False so that an unshuffled epoch is not all sensor draws first.
    """
    keys = np.concatenate([(np.arange(len(a)) + 0.5) / max(len(a), 1), (np.arange(len(b)) + 0.5) / max(len(b), 1)])
    merged = np.concatenate([a, b])
    return merged[np.argsort(keys, kind="stable")]


class BalancedDistributedSampler(Sampler[int]):
    """Seeded, sharded, resumable sampler with an optional exact share of sensor samples.

    Args:
        has_sensor: per dataset index, whether that sample has a sensor reading.
        sensor_ratio: share of sensor draws per epoch in [0, 1]; None samples uniformly (a plain
            permutation, like DistributedSampler).
        num_replicas, rank: default to torch.distributed's world size and rank when it is
            initialized, else 1 and 0.
        seed: base seed; the epoch list depends only on (seed, epoch).
        shuffle: False gives a deterministic order without randomness (arange for ratio None; the
            two groups in index order, interleaved evenly, for a ratio).
        epoch_size: draws per epoch over all ranks; defaults to len(has_sensor).
        drop_last: truncate the epoch list to a multiple of num_replicas instead of padding it by
            wrapping around to its start.

    `len(sampler)` is the number of indices every rank yields in a full epoch.
    """

    def __init__(
        self,
        has_sensor: Sequence[bool] | np.ndarray,
        *,
        sensor_ratio: float | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        epoch_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        flags = np.asarray(has_sensor, dtype=bool)
        if flags.ndim != 1 or len(flags) == 0:
            raise ValueError(f"has_sensor must be a non-empty 1-D sequence of bools, got shape {flags.shape}; pass one flag per dataset sample")
        self.has_sensor = flags
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}; pass the world size")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, num_replicas={num_replicas}); pass this process's rank in the world")
        if seed < 0:
            # default_rng([seed, epoch]) only takes non-negative entropy.
            raise ValueError(f"seed must be >= 0, got {seed}; pass a non-negative --seed")
        if epoch_size is None:
            epoch_size = len(flags)
        if epoch_size < 1:
            raise ValueError(f"epoch_size must be >= 1, got {epoch_size}; omit it to draw len(dataset) samples per epoch")
        if drop_last and epoch_size < num_replicas:
            raise ValueError(
                f"epoch_size {epoch_size} < num_replicas {num_replicas} with drop_last: every rank would get 0 samples; "
                "raise epoch_size or disable drop_last"
            )
        self.sensor_idx = np.flatnonzero(flags)
        self.plain_idx = np.flatnonzero(~flags)
        if sensor_ratio is not None:
            sensor_ratio = float(sensor_ratio)
            # `not (0 <= r <= 1)` also rejects NaN.
            if not 0.0 <= sensor_ratio <= 1.0:
                raise ValueError(f"--sensor-sample-ratio must be in [0, 1], got {sensor_ratio}; pass a share such as 0.5, or omit it for uniform sampling")
            if sensor_ratio > 0 and len(self.sensor_idx) == 0:
                raise ValueError(f"--sensor-sample-ratio {sensor_ratio} but the data has no sensor samples; set it to 0 or omit it")
            if sensor_ratio < 1 and len(self.plain_idx) == 0:
                raise ValueError(f"--sensor-sample-ratio {sensor_ratio} but the data has no non-sensor samples; set it to 1 or omit it")
        self.sensor_ratio = sensor_ratio
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch_size = int(epoch_size)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        # (epoch, global position) from load_state_dict, consumed by the next __iter__ of that epoch.
        self._resume: tuple[int, int] | None = None
        if self.drop_last:
            self.num_samples = self.epoch_size // self.num_replicas
        else:
            self.num_samples = math.ceil(self.epoch_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        if sensor_ratio is not None:
            n_s = self.num_sensor_draws
            log.debug(
                "sensor ratio %.3f: %d of %d draws per epoch from %d sensor samples (x%.2f each)",
                sensor_ratio, n_s, self.epoch_size, len(self.sensor_idx), n_s / max(len(self.sensor_idx), 1),
            )

    @property
    def num_sensor_draws(self) -> int | None:
        """Sensor draws per epoch (Python round, ties to even); None when sensor_ratio is None."""
        if self.sensor_ratio is None:
            return None
        return int(round(self.sensor_ratio * self.epoch_size))

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The full, un-sharded, un-padded list of `epoch_size` dataset indices for `epoch`."""
        rng = np.random.default_rng([self.seed, int(epoch)]) if self.shuffle else None
        if self.sensor_ratio is None:
            return _draw_cycled(np.arange(len(self.has_sensor)), self.epoch_size, rng)
        n_s = self.num_sensor_draws
        sensor = _draw_cycled(self.sensor_idx, n_s, rng)
        plain = _draw_cycled(self.plain_idx, self.epoch_size - n_s, rng)
        if rng is None:
            return _interleave_evenly(sensor, plain)
        return rng.permutation(np.concatenate([sensor, plain]))

    def sensor_share(self, epoch: int | None = None) -> float:
        """Realized share of sensor samples in the epoch list (default: the current epoch)."""
        indices = self.epoch_indices(self.epoch if epoch is None else epoch)
        return float(self.has_sensor[indices].mean())

    def rank_indices(self, epoch: int, position: int = 0) -> np.ndarray:
        """This rank's shard of `epoch` from global `position` on: positions position + rank,
        position + rank + R, ... of the list padded by wrapping (truncated for drop_last)."""
        indices = self.epoch_indices(epoch)
        if self.drop_last:
            rest = indices[position : self.total_size]
            rest = rest[: len(rest) // self.num_replicas * self.num_replicas]
        else:
            rest = indices[position:]
            # np.resize repeats from the start: pad by wrapping to the epoch's first samples
            rest = np.concatenate([rest, np.resize(indices, (-len(rest)) % self.num_replicas)])
        return rest[self.rank :: self.num_replicas]

    def remaining(self) -> int:
        """Indices this rank's next __iter__ yields (a resumed epoch's rest, else a full shard)."""
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        return len(self.rank_indices(self.epoch, start))

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        # The position applies to one pass only: a later pass of the same epoch is a full one.
        self._resume = None
        return iter(self.rank_indices(self.epoch, start).tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch for the next __iter__. A pending resume offset survives only for its own epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        if self._resume is not None and self._resume[0] != self.epoch:
            self._resume = None

    def state_dict(self, consumed: int, base: int = 0) -> dict:
        """JSON-serializable state; `consumed` = indices each rank used in the current epoch since
        global position `base` (where a resumed epoch started; 0 for an epoch started here)."""
        if not 0 <= consumed <= self.num_samples:
            raise ValueError(f"consumed must be in [0, {self.num_samples}] (this rank's samples per epoch), got {consumed}")
        return {
            "epoch": self.epoch,
            "position": int(base + consumed * self.num_replicas),
            "seed": self.seed,
            "sensor_ratio": self.sensor_ratio,
            "num_replicas": self.num_replicas,
            "epoch_size": self.epoch_size,
        }

    def load_state_dict(self, state: dict) -> int:
        """Restore the epoch; its next __iter__ starts at the saved global position, re-sharded over
        this sampler's ranks. Returns that position. A state of the older format (a per-rank
        `offset`) reads as position offset x its num_replicas.

        Refuses a state saved with another seed, ratio or epoch size: the position would then point
        at different samples. Another world size is fine (the rest is re-sharded).
        """
        if "position" not in state and "offset" in state and "num_replicas" in state:
            state = {**state, "position": int(state["offset"]) * int(state["num_replicas"])}
        missing = [k for k in ("epoch", "position", *_STATE_MUST_MATCH) if k not in state]
        if missing:
            raise ValueError(f"sampler state is missing {', '.join(missing)}; pass a dict from BalancedDistributedSampler.state_dict")
        for key in _STATE_MUST_MATCH:
            saved, current = state[key], getattr(self, key)
            if saved != current:
                raise ValueError(f"sampler state has {key}={saved!r} but this sampler has {key}={current!r}: "
                                 f"resume with the same {key} or start a fresh epoch")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or position < 0:
            raise ValueError(f"sampler state has epoch={epoch}, position={position}; both must be >= 0")
        self.epoch = epoch
        # (a position past the epoch's end was in the wrapped padding: nothing of the epoch is left)
        self._resume = (epoch, min(position, self.epoch_size))
        return self._resume[1]

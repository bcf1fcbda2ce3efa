"""Chunk execution on the robot: one action per control tick from a policy that answers with chunks
of H actions, the next chunk requested ahead of time, overlapping chunks blended. numpy only.

    from vla_ds.serve import ChunkExecutor, PolicyClient

    client = PolicyClient("gpu-box", 8765)
    ex = ChunkExecutor(client.infer, rate_hz=10, horizon=client.metadata["horizon"], replan_every=4)
    stats = ex.run(observe=robot.observation, act=robot.apply, ticks=600)

Timeline: the observation taken at tick k gives a chunk whose action i is for tick k + i. Every
`replan_every` ticks a new observation is sent on a background thread, so the loop never waits for
the network or the model; a chunk arriving late simply has its first actions in the past. The action
of a tick is the weighted mean of every chunk that covers it (temporal ensembling, as in ACT): with
the covering chunks numbered 0 (oldest) .. n-1 (newest), chunk j weighs exp(-decay * j), normalized.
`decay` > 0 favours the older chunks (ACT's choice: smoother), 0 is the plain mean, < 0 favours the
newer ones (more reactive); `ensemble=False` uses the newest chunk alone (plain chunk execution).

A tick no chunk covers (the policy fell more than a chunk behind) emits `idle_action` (default: all
zeros, i.e. no motion for vla-ds's delta actions) and counts as starved. Ticks are paced on an
absolute schedule (start + k / rate: no drift); a loop that falls more than a tick behind restarts
its schedule from now instead of bursting the missed ticks, and counts an overrun.
"""
from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class ChunkBlender:
    """Action chunks on a tick timeline; `action(tick)` blends the chunks covering it (see the module
    docstring)."""

    def __init__(self, horizon: int, decay: float = 0.01, ensemble: bool = True):
        if horizon < 1 or not math.isfinite(decay):
            raise ValueError(f"horizon={horizon} (>= 1), decay={decay} (finite)")
        self.horizon, self.decay, self.ensemble = horizon, decay, ensemble
        self._chunks: list[tuple[int, np.ndarray]] = []  # (start tick, (H, A)), oldest first

    def add(self, start: int, chunk) -> None:
        chunk = np.asarray(chunk, dtype=np.float64)
        if chunk.ndim != 2 or chunk.shape[0] != self.horizon:
            raise ValueError(f"a chunk of shape {chunk.shape}, expected ({self.horizon}, A)")
        self._chunks.append((start, chunk))
        self._chunks.sort(key=lambda c: c[0])

    def covering(self, tick: int) -> list[np.ndarray]:
        """The actions for `tick` of every chunk covering it, oldest chunk first."""
        return [c[tick - s] for s, c in self._chunks if s <= tick < s + self.horizon]

    def action(self, tick: int) -> np.ndarray | None:
        acts = self.covering(tick)
        if not acts:
            return None
        if not self.ensemble:
            return acts[-1]
        w = np.exp(-self.decay * np.arange(len(acts)))
        return (w[:, None] * np.stack(acts)).sum(0) / w.sum()

    def prune(self, tick: int) -> None:
        """Forget the chunks that end before `tick`."""
        self._chunks = [(s, c) for s, c in self._chunks if s + self.horizon > tick]


@dataclass
class ExecutorStats:
    ticks: int = 0
    requests: int = 0  # chunks requested (the first, synchronous one included)
    chunks: int = 0  # chunks received
    starved: int = 0  # ticks no chunk covered (idle_action emitted)
    overruns: int = 0  # times the loop fell more than a tick behind and restarted its schedule
    deferred: int = 0  # ticks a request was due while the previous one was still out


class ChunkExecutor:
    """Run a chunked policy at a fixed control rate (see the module docstring). `infer(observation)
    -> (H, A)` is e.g. `PolicyClient.infer`; `clock`/`sleep` can be replaced (tests, simulators)."""

    def __init__(self, infer: Callable, rate_hz: float, horizon: int, *, replan_every: int | None = None,
                 decay: float = 0.01, ensemble: bool = True, idle_action=None, background: bool = True,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        replan_every = replan_every or max(1, horizon // 2)
        if rate_hz <= 0 or not 1 <= replan_every <= horizon:
            raise ValueError(f"rate_hz={rate_hz} (> 0), replan_every={replan_every} (1..horizon={horizon})")
        self.infer, self.period, self.replan_every = infer, 1.0 / rate_hz, replan_every
        self.blender = ChunkBlender(horizon, decay, ensemble)
        self.idle_action, self.background = idle_action, background
        self.clock, self.sleep = clock, sleep
        self.stats = ExecutorStats()

    def _wait_until(self, target: float) -> None:
        while (left := target - self.clock()) > 0:
            self.sleep(left)

    def run(self, observe: Callable[[], dict], act: Callable[[np.ndarray], None], ticks: int | None = None,
            should_stop: Callable[[], bool] | None = None) -> ExecutorStats:
        """Observe, get the first chunk (blocking), then emit one action per tick through `act` until
        `ticks` were emitted or `should_stop()`; returns the counts (`ExecutorStats`)."""
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vla-ds-chunks") if self.background else None
        pending: tuple[int, concurrent.futures.Future] | None = None
        try:
            self.stats.requests += 1
            first = np.asarray(self.infer(observe()))
            self.blender.add(0, first)
            self.stats.chunks += 1
            idle = np.zeros(first.shape[1]) if self.idle_action is None else np.asarray(self.idle_action, float)
            last_request, start, k = 0, self.clock(), 0
            while (ticks is None or k < ticks) and not (should_stop is not None and should_stop()):
                target = start + k * self.period
                if self.clock() > target + self.period:  # more than a tick late: restart the schedule
                    self.stats.overruns += 1
                    start, target = self.clock() - k * self.period, self.clock()
                self._wait_until(target)
                if pending is not None and pending[1].done():
                    self.blender.add(pending[0], pending[1].result())
                    self.stats.chunks += 1
                    pending = None
                if k > 0 and k - last_request >= self.replan_every:
                    if pending is not None:
                        self.stats.deferred += 1
                    else:
                        obs = observe()
                        self.stats.requests += 1
                        last_request = k
                        if pool is None:  # synchronous: the chunk is there for this very tick
                            self.blender.add(k, self.infer(obs))
                            self.stats.chunks += 1
                        else:
                            pending = (k, pool.submit(self.infer, obs))
                action = self.blender.action(k)
                if action is None:
                    self.stats.starved += 1
                    action = idle
                act(action)
                self.blender.prune(k + 1)
                self.stats.ticks += 1
                k += 1
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        return self.stats

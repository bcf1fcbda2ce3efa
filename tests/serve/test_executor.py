"""ChunkExecutor: one action per tick at the configured rate, chunks requested ahead of time and
blended as documented (vla_ds/serve/executor.py). A simulated clock makes the timing exact; one run
on the real clock checks that the loop never runs ahead of its schedule."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from vla_ds.serve import ChunkBlender, ChunkExecutor


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def chunk_of(value: float, horizon: int = 4, dim: int = 2) -> np.ndarray:
    """A chunk whose action i is value + i (on every dim)."""
    return np.repeat((value + np.arange(horizon, dtype=float))[:, None], dim, 1)


def test_blending_weights_are_acts_exponential_by_age():
    b = ChunkBlender(horizon=4, decay=0.5)
    b.add(0, chunk_of(0.0))
    b.add(2, chunk_of(10.0))
    assert np.allclose(b.action(1), 1.0)  # only the first chunk covers tick 1
    # tick 3: the first chunk's action 3 (3.0) and the second's action 1 (11.0); oldest weighs exp(0)
    w = np.exp(-0.5 * np.arange(2))
    assert np.allclose(b.action(3), (w[0] * 3.0 + w[1] * 11.0) / w.sum())
    assert np.allclose(b.action(5), 13.0) and b.action(6) is None
    plain = ChunkBlender(horizon=4, decay=0.0)
    plain.add(0, chunk_of(0.0))
    plain.add(2, chunk_of(10.0))
    assert np.allclose(plain.action(3), 7.0)  # decay 0: the plain mean
    newest = ChunkBlender(horizon=4, ensemble=False)
    newest.add(0, chunk_of(0.0))
    newest.add(2, chunk_of(10.0))
    assert np.allclose(newest.action(3), 11.0)
    newest.prune(4)
    assert len(newest.covering(3)) == 1  # the first chunk (ticks 0..3) is gone
    with pytest.raises(ValueError, match="expected \\(4, A\\)"):
        newest.add(5, np.zeros((3, 2)))


def test_one_action_per_tick_on_an_absolute_schedule_with_requests_every_k_ticks():
    clock = FakeClock()
    requests, emitted = [], []

    def observe():
        return {"tick_time": clock()}

    def infer(obs):
        requests.append(obs["tick_time"])
        clock.now += 0.004  # the first (blocking) request's latency; later ones run inline here
        return chunk_of(100.0 * len(requests), horizon=8)

    ex = ChunkExecutor(infer, rate_hz=50, horizon=8, replan_every=3, decay=0.0, background=False, clock=clock,
                       sleep=clock.sleep)
    stats = ex.run(observe, lambda a: emitted.append((clock(), a)), ticks=10)
    assert (stats.ticks, len(emitted)) == (10, 10)
    start = emitted[0][0]
    times = np.array([t for t, _ in emitted]) - start
    # tick k goes out at start + k / rate (the inline requests at ticks 3, 6, 9 take 4 ms each, less than a tick)
    assert np.allclose(times[[0, 1, 2]], [0.0, 0.02, 0.04])
    assert all(abs(t - 0.02 * k) < 0.0045 for k, t in enumerate(times))
    assert stats.requests == len(requests) == 4 and stats.starved == 0  # ticks 0 (first), 3, 6, 9
    # tick 4: chunk 1 (from tick 0, action 4 = 104) and chunk 2 (from tick 3, action 1 = 201), plain mean
    assert np.allclose(emitted[4][1], (104.0 + 201.0) / 2)
    # tick 9: chunks from ticks 3 (action 6), 6 (action 3) and 9 (action 0)
    assert np.allclose(emitted[9][1], (206.0 + 303.0 + 400.0) / 3)


def test_a_policy_too_slow_for_its_chunks_emits_the_idle_action_and_says_so():
    clock = FakeClock()
    release = threading.Event()
    calls = []

    def infer(obs):
        calls.append(1)
        if len(calls) > 1:
            release.wait(30)  # the second request hangs until tick 7 below
        return chunk_of(1.0, horizon=4)

    emitted = []

    def act(a):
        emitted.append(a)
        if len(emitted) == 7:
            release.set()

    ex = ChunkExecutor(infer, rate_hz=100, horizon=4, replan_every=2, clock=clock, sleep=clock.sleep)
    stats = ex.run(lambda: {}, act, ticks=9)
    assert stats.ticks == 9 and stats.deferred >= 1
    assert [np.allclose(a, 0.0) for a in emitted[4:7]] == [True] * 3  # ticks 4-6: no chunk covers them
    assert stats.starved >= 3


def test_on_the_real_clock_no_tick_goes_out_early():
    emitted = []

    def infer(obs):
        time.sleep(0.01)  # half a tick of latency, on the background thread
        return chunk_of(0.0, horizon=8)

    ex = ChunkExecutor(infer, rate_hz=50, horizon=8, replan_every=4)
    stats = ex.run(lambda: {}, lambda a: emitted.append(time.monotonic()), ticks=25)
    assert stats.ticks == len(emitted) == 25 and stats.requests >= 2
    # tick k goes out no earlier than k periods after tick 0 (one period of slack for tick 0's own
    # lateness): a loop that fell behind restarts its schedule, it never bursts ahead of it
    assert all(emitted[k] - emitted[0] >= (k - 1) * 0.02 for k in range(25))

"""BalancedDistributedSampler: exact sensor share, determinism, sharding, mid-epoch resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from vla_ds.data.sampler import BalancedDistributedSampler


def _flags(n: int = 1000, n_sensor: int = 50) -> np.ndarray:
    """n samples with n_sensor sensor samples spread evenly (every n // n_sensor-th index)."""
    flags = np.zeros(n, dtype=bool)
    flags[:: n // n_sensor][:n_sensor] = True
    assert flags.sum() == n_sensor
    return flags


# --- share -------------------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_exact_share_even_oversampling_and_no_plain_duplicates(epoch):
    flags = _flags(1000, 50)
    s = BalancedDistributedSampler(flags, sensor_ratio=0.5, seed=3)
    idx = s.epoch_indices(epoch)
    assert len(idx) == 1000
    sensor = idx[flags[idx]]
    plain = idx[~flags[idx]]
    assert len(sensor) == 500
    # Every sensor sample exactly 10 times (500 draws / 50 samples), not by multinomial luck.
    counts = np.bincount(sensor, minlength=1000)[flags]
    assert counts.tolist() == [10] * 50
    # 500 of 950 non-sensor samples: without replacement.
    assert len(plain) == 500 and len(np.unique(plain)) == 500
    assert s.sensor_share(epoch) == 0.5
    # The final shuffle mixes the groups: sensor draws are not all at the front.
    assert flags[idx[:500]].sum() < 400


def test_uneven_oversampling_is_floor_or_ceil():
    flags = _flags(900, 30)
    s = BalancedDistributedSampler(flags, sensor_ratio=0.5, epoch_size=1000)
    idx = s.epoch_indices(0)
    counts = np.bincount(idx[flags[idx]], minlength=900)[flags]
    # 500 / 30 = 16.67: 20 samples drawn 17 times, 10 drawn 16 times.
    assert counts.sum() == 500
    assert sorted(set(counts.tolist())) == [16, 17]
    # Non-sensor: 500 draws from 870 samples, without replacement.
    plain = idx[~flags[idx]]
    assert len(np.unique(plain)) == len(plain) == 500


def test_undersampled_sensor_group_has_no_repeats():
    flags = _flags(1000, 50)
    s = BalancedDistributedSampler(flags, sensor_ratio=0.02)
    idx = s.epoch_indices(0)
    sensor = idx[flags[idx]]
    assert len(sensor) == 20 and len(np.unique(sensor)) == 20
    assert len(idx) == 1000


def test_epoch_size_sets_number_of_draws():
    flags = _flags(1000, 50)
    s = BalancedDistributedSampler(flags, sensor_ratio=0.25, epoch_size=200, num_replicas=4, rank=1)
    idx = s.epoch_indices(0)
    assert len(idx) == 200 and flags[idx].sum() == 50
    assert len(s) == 50 and len(list(s)) == 50


def test_epoch_larger_than_data_cycles_fresh_permutations():
    s = BalancedDistributedSampler(_flags(100, 5), epoch_size=250, seed=1)
    idx = s.epoch_indices(0)
    assert sorted(set(np.bincount(idx, minlength=100).tolist())) == [2, 3]
    # Each pass is a full permutation, and the second pass is not a copy of the first.
    assert sorted(idx[:100].tolist()) == sorted(idx[100:200].tolist()) == list(range(100))
    assert idx[:100].tolist() != idx[100:200].tolist()


# --- determinism -------------------------------------------------------------------------------


@pytest.fixture
def restore_global_rng():
    """The test reseeds the global RNGs on purpose; put them back for the tests after it."""
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    yield
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)


def test_deterministic_across_restarts_and_ignores_global_rng(restore_global_rng):
    flags = _flags()
    np.random.seed(1)
    torch.manual_seed(1)
    a = BalancedDistributedSampler(flags, sensor_ratio=0.5, seed=11)
    a.set_epoch(4)
    first = list(a)
    np.random.seed(2)
    torch.manual_seed(2)
    np.random.rand(10)
    b = BalancedDistributedSampler(flags, sensor_ratio=0.5, seed=11)
    b.set_epoch(4)
    assert list(b) == first
    assert np.array_equal(a.epoch_indices(4), b.epoch_indices(4))
    assert not np.array_equal(a.epoch_indices(4), a.epoch_indices(5))
    c = BalancedDistributedSampler(flags, sensor_ratio=0.5, seed=12)
    assert not np.array_equal(a.epoch_indices(4), c.epoch_indices(4))
    # Different epochs also pick different non-sensor subsets, not just a different order.
    plain = lambda e: set(a.epoch_indices(e)[~flags[a.epoch_indices(e)]].tolist())  # noqa: E731
    assert plain(4) != plain(5)


def test_ratio_none_is_seeded_permutation_and_shuffle_false_is_arange():
    flags = _flags(100, 5)
    s = BalancedDistributedSampler(flags, seed=5)
    idx = s.epoch_indices(0)
    assert sorted(idx.tolist()) == list(range(100))
    assert idx.tolist() != list(range(100))
    assert not np.array_equal(idx, s.epoch_indices(1))
    ordered = BalancedDistributedSampler(flags, shuffle=False)
    assert ordered.epoch_indices(0).tolist() == list(range(100))
    assert list(ordered) == list(range(100))


def test_shuffle_false_with_ratio_is_fixed_exact_and_interleaved():
    flags = _flags(100, 5)
    s = BalancedDistributedSampler(flags, sensor_ratio=0.2, shuffle=False, seed=1)
    idx = s.epoch_indices(0)
    assert np.array_equal(idx, s.epoch_indices(3))
    assert np.array_equal(idx, BalancedDistributedSampler(flags, sensor_ratio=0.2, shuffle=False, seed=9).epoch_indices(0))
    assert flags[idx].sum() == 20
    # Evenly interleaved: every block of 5 holds exactly one sensor draw.
    assert flags[idx].reshape(20, 5).sum(axis=1).tolist() == [1] * 20
    assert idx[flags[idx]].tolist() == np.flatnonzero(flags).tolist() * 4


# --- sharding ----------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("ratio", [None, 0.5])
def test_shards_are_disjoint_cover_the_epoch_and_have_equal_length(replicas, ratio):
    flags = _flags(1000, 50)
    full = BalancedDistributedSampler(flags, sensor_ratio=ratio, seed=2).epoch_indices(6)
    shards = []
    for rank in range(replicas):
        s = BalancedDistributedSampler(flags, sensor_ratio=ratio, seed=2, num_replicas=replicas, rank=rank)
        s.set_epoch(6)
        shards.append(list(s))
        assert len(shards[-1]) == len(s)
    assert len({len(x) for x in shards}) == 1
    n = len(shards[0])
    assert n == -(-1000 // replicas)
    # Interleaving the shards back position by position reproduces the list padded from its start:
    # so the ranks' positions are disjoint and together cover every position exactly once.
    woven = np.empty(n * replicas, dtype=np.int64)
    for rank, shard in enumerate(shards):
        woven[rank::replicas] = shard
    pad = n * replicas - 1000
    assert woven.tolist() == full.tolist() + full[:pad].tolist()
    assert (pad == 0) == (replicas == 2)


def test_drop_last_truncates_to_a_multiple():
    flags = _flags(1000, 50)
    full = BalancedDistributedSampler(flags, sensor_ratio=0.5).epoch_indices(0)
    shards = [list(BalancedDistributedSampler(flags, sensor_ratio=0.5, num_replicas=3, rank=r, drop_last=True)) for r in range(3)]
    assert [len(x) for x in shards] == [333] * 3
    woven = np.empty(999, dtype=np.int64)
    for rank, shard in enumerate(shards):
        woven[rank::3] = shard
    assert woven.tolist() == full[:999].tolist()


def test_rank_and_world_size_default_from_torch_distributed(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 4)
    monkeypatch.setattr(dist, "get_rank", lambda *a, **k: 2)
    s = BalancedDistributedSampler(_flags(), sensor_ratio=0.5)
    assert (s.num_replicas, s.rank, len(s)) == (4, 2, 250)
    assert list(s) == s.epoch_indices(0)[2::4].tolist()


def test_rank_and_world_size_default_to_single_process():
    s = BalancedDistributedSampler(_flags())
    assert (s.num_replicas, s.rank, len(s)) == (1, 0, 1000)


# --- resume ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 7, 250])
def test_resume_mid_epoch_yields_exactly_the_rest(k):
    flags = _flags()
    kw = dict(sensor_ratio=0.5, seed=4, num_replicas=2, rank=0)
    a = BalancedDistributedSampler(flags, **kw)
    a.set_epoch(3)
    it = iter(a)
    head = [next(it) for _ in range(k)]
    rest = list(it)
    state = json.loads(json.dumps(a.state_dict(k)))
    assert state == {"epoch": 3, "position": 2 * k, "seed": 4, "sensor_ratio": 0.5, "num_replicas": 2, "epoch_size": 1000}

    b = BalancedDistributedSampler(flags, **kw)
    b.load_state_dict(state)
    # A training loop calls set_epoch(start_epoch) after loading: that must keep the offset.
    b.set_epoch(3)
    assert b.epoch == 3
    assert list(b) == rest
    assert head + rest == list(a)
    # The offset is one-shot: a later pass of the same epoch is full, and the next epoch starts at 0.
    assert list(b) == head + rest
    b.set_epoch(4)
    a.set_epoch(4)
    assert list(b) == list(a) and len(list(b)) == len(b) == 500


def test_resume_offset_dropped_when_moving_to_another_epoch():
    flags = _flags()
    s = BalancedDistributedSampler(flags, sensor_ratio=0.5)
    s.load_state_dict({"epoch": 2, "position": 10, "seed": 0, "sensor_ratio": 0.5, "num_replicas": 1, "epoch_size": 1000})
    s.set_epoch(3)
    assert list(s) == s.epoch_indices(3).tolist()


@pytest.mark.parametrize(
    "field, other",
    [("seed", dict(seed=1)), ("sensor_ratio", dict(sensor_ratio=0.3)), ("epoch_size", dict(epoch_size=500))],
)
def test_resume_refuses_mismatched_state(field, other):
    flags = _flags()
    kw = dict(sensor_ratio=0.5, seed=0, num_replicas=2, rank=0)
    state = BalancedDistributedSampler(flags, **kw).state_dict(5)
    with pytest.raises(ValueError, match=field):
        BalancedDistributedSampler(flags, **{**kw, **other}).load_state_dict(state)


@pytest.mark.parametrize("before, after, k", [(2, 1, 7), (1, 2, 13), (2, 3, 100), (4, 2, 0), (3, 2, 333)])
def test_resume_on_another_world_size_covers_the_rest_of_the_epoch_once(before, after, k):
    # 1001 draws: the shards of 2 and 4 ranks are padded by wrapping, 3 and 1 are not
    flags = _flags(1001)
    kw = dict(sensor_ratio=0.5, seed=4)
    old = [BalancedDistributedSampler(flags, num_replicas=before, rank=r, **kw) for r in range(before)]
    done = [i for r in range(before) for i in list(old[r].rank_indices(3))[:k]]
    for s in old:
        s.set_epoch(3)
    state = json.loads(json.dumps(old[0].state_dict(k)))
    assert state["position"] == k * before
    new = [BalancedDistributedSampler(flags, num_replicas=after, rank=r, **kw) for r in range(after)]
    for s in new:
        assert s.load_state_dict(state) == min(k * before, 1001)
        s.set_epoch(3)
    left = {s.remaining() for s in new}
    rest = [list(s) for s in new]
    assert len(left) == 1 and [len(r) for r in rest] == [left.pop()] * after, "equal shards, as announced"
    epoch = old[0].epoch_indices(3).tolist()
    remaining = epoch[k * before:]
    got = [i for shard in zip(*rest) for i in shard]  # the global order the new ranks consume it in
    pad = (-len(remaining)) % after
    assert got == remaining + epoch[:pad], "each remaining draw once, in order; padding wraps to the epoch's start"
    assert sorted(done + remaining) == sorted(epoch)
    for s in new:  # the next epoch is a full one, on the new ranks
        s.set_epoch(4)
    assert sorted(i for s in new for i in s) == sorted(epoch_of(new[0], 4, after))


def epoch_of(sampler, epoch, world):
    e = sampler.epoch_indices(epoch).tolist()
    return e + e[: (-len(e)) % world]


def test_an_older_state_with_a_per_rank_offset_reads_as_a_position():
    flags = _flags()
    s = BalancedDistributedSampler(flags, sensor_ratio=0.5, num_replicas=1, rank=0)
    assert s.load_state_dict({"epoch": 1, "offset": 6, "seed": 0, "sensor_ratio": 0.5, "num_replicas": 2,
                              "epoch_size": 1000}) == 12
    s.set_epoch(1)
    assert list(s) == s.epoch_indices(1).tolist()[12:]


def test_state_dict_rejects_bad_offsets():
    s = BalancedDistributedSampler(_flags(), num_replicas=2, rank=1)
    with pytest.raises(ValueError, match="consumed"):
        s.state_dict(501)
    state = s.state_dict(500)
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({**state, "position": -1})
    with pytest.raises(ValueError, match="missing epoch"):
        s.load_state_dict({k: v for k, v in state.items() if k != "epoch"})


# --- DataLoader --------------------------------------------------------------------------------


def test_works_with_dataloader_and_resumes_by_batches():
    flags = _flags(100, 5)
    data = torch.arange(100)
    kw = dict(sensor_ratio=0.5, num_replicas=2, rank=1, seed=8)
    s = BalancedDistributedSampler(flags, **kw)
    s.set_epoch(1)
    batches = [b.tolist() for b in DataLoader(data, batch_size=4, sampler=s, num_workers=0)]
    assert [len(b) for b in batches] == [4] * 12 + [2]
    flat = sum(batches, [])
    assert flat == s.epoch_indices(1)[1::2].tolist()
    assert flags[s.epoch_indices(1)].sum() == 50

    r = BalancedDistributedSampler(flags, **kw)
    r.load_state_dict(s.state_dict(consumed=3 * 4))
    resumed = [b.tolist() for b in DataLoader(data, batch_size=4, sampler=r, num_workers=0)]
    assert resumed == batches[3:]


# --- errors ------------------------------------------------------------------------------------


def test_impossible_ratios_have_clear_errors():
    with pytest.raises(ValueError, match="--sensor-sample-ratio 0.5 but the data has no sensor samples; set it to 0 or omit it"):
        BalancedDistributedSampler(np.zeros(10, bool), sensor_ratio=0.5)
    with pytest.raises(ValueError, match="no non-sensor samples"):
        BalancedDistributedSampler(np.ones(10, bool), sensor_ratio=0.5)
    with pytest.raises(ValueError, match=r"--sensor-sample-ratio must be in \[0, 1\]"):
        BalancedDistributedSampler(_flags(), sensor_ratio=1.5)
    with pytest.raises(ValueError, match="sensor-sample-ratio"):
        BalancedDistributedSampler(_flags(), sensor_ratio=float("nan"))
    # The edge ratios are fine when the needed group exists.
    assert BalancedDistributedSampler(np.ones(10, bool), sensor_ratio=1.0).sensor_share(0) == 1.0
    assert BalancedDistributedSampler(np.zeros(10, bool), sensor_ratio=0.0).sensor_share(0) == 0.0


def test_bad_rank_world_size_and_sizes_are_refused():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        BalancedDistributedSampler(_flags(), num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas"):
        BalancedDistributedSampler(_flags(), num_replicas=0, rank=0)
    with pytest.raises(ValueError, match="has_sensor"):
        BalancedDistributedSampler([])
    with pytest.raises(ValueError, match="seed must be >= 0"):
        BalancedDistributedSampler(_flags(), seed=-1)
    with pytest.raises(ValueError, match="drop_last"):
        BalancedDistributedSampler(_flags(), epoch_size=3, num_replicas=4, rank=0, drop_last=True)

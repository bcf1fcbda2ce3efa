"""split_by_episode: disjoint, complete, stable under additions, stratified by sensor presence."""
from __future__ import annotations

import random

import pytest

from vla_ds.data.split import episode_hash, split_by_episode


def _ids(start: int, stop: int) -> list[str]:
    return [f"ep{i:04d}" for i in range(start, stop)]


def test_disjoint_complete_in_input_order_and_near_the_ratio():
    ids = _ids(0, 1000)
    random.Random(0).shuffle(ids)
    train, val = split_by_episode(ids, 0.2, seed=1)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(ids)
    assert train == [e for e in ids if e in set(train)]
    assert val == [e for e in ids if e in set(val)]
    # Binomial(1000, 0.2): sd ~ 12.6, so +-50 is ~4 sd.
    assert 150 <= len(val) <= 250


def test_deterministic_and_depends_on_seed():
    ids = _ids(0, 200)
    assert split_by_episode(ids, 0.3, seed=5) == split_by_episode(list(ids), 0.3, seed=5)
    assert split_by_episode(ids, 0.3, seed=5)[1] != split_by_episode(ids, 0.3, seed=6)[1]
    # Assignment depends on the episode, not on its position in the list.
    shuffled = list(reversed(ids))
    assert set(split_by_episode(shuffled, 0.3, seed=5)[1]) == set(split_by_episode(ids, 0.3, seed=5)[1])


def test_assignment_follows_the_hash_threshold():
    ids = _ids(0, 300)
    train, val = split_by_episode(ids, 0.25, seed=2)
    assert val == [e for e in ids if episode_hash(e, 2) < 0.25]
    assert all(0.0 <= episode_hash(e, 2) < 1.0 for e in ids)


@pytest.mark.parametrize("stratified", [False, True])
def test_adding_episodes_never_moves_existing_ones(stratified):
    old, new = _ids(0, 300), _ids(300, 700)
    flags_of = lambda ids: [int(e[2:]) % 10 == 0 for e in ids] if stratified else None  # noqa: E731
    train0, val0 = split_by_episode(old, 0.2, seed=3, has_sensor=flags_of(old))
    ids = old + new
    random.Random(1).shuffle(ids)
    train1, val1 = split_by_episode(ids, 0.2, seed=3, has_sensor=flags_of(ids))
    assert set(train0) <= set(train1)
    assert set(val0) <= set(val1)
    assert set(val1) - set(val0)  # some of the new episodes did go to val


def test_stratified_val_has_both_sensor_and_plain_episodes():
    # 3 sensor episodes at val_ratio 0.1: the hash rule alone often puts none of them in val.
    ids = _ids(0, 60)
    flags = [i < 3 for i in range(60)]
    sensor = set(ids[:3])
    for seed in range(20):
        train, val = split_by_episode(ids, 0.1, seed=seed, has_sensor=flags)
        assert set(val) & sensor and set(train) & sensor, seed
        assert set(val) - sensor and set(train) - sensor, seed
        assert sorted(train + val) == sorted(ids)
    # Without the flags the rule gives no sensor episode to val for at least one of those seeds.
    assert any(not set(split_by_episode(ids, 0.1, seed=s)[1]) & sensor for s in range(20))


def test_minimum_picks_are_the_extreme_hashes():
    ids = _ids(0, 2)
    # With ratio 0.9 both would hash into val for many seeds; the largest hash returns to train.
    for seed in range(10):
        train, val = split_by_episode(ids, 0.9, seed=seed, has_sensor=[True, True])
        assert len(train) == len(val) == 1
        assert train == [max(ids, key=lambda e: episode_hash(e, seed))]
    # With a tiny ratio none hashes into val; the smallest hash of each group goes to val.
    ids = _ids(0, 8)
    for seed in range(5):
        _, val = split_by_episode(ids, 1e-9, seed=seed, has_sensor=[i < 4 for i in range(8)])
        picks = {min(ids[:4], key=lambda e: episode_hash(e, seed)), min(ids[4:], key=lambda e: episode_hash(e, seed))}
        assert set(val) == picks


def test_without_flags_all_episodes_are_one_group_with_a_val_episode():
    ids = _ids(0, 5)
    for seed in range(5):
        train, val = split_by_episode(ids, 1e-9, seed=seed)
        assert val == [min(ids, key=lambda e: episode_hash(e, seed))]
        assert len(train) == 4
    # A single episode cannot be both: the hash rule alone decides.
    for seed in range(5):
        _, val = split_by_episode(ids[:1], 0.5, seed=seed)
        assert (val == ids[:1]) == (episode_hash(ids[0], seed) < 0.5)


def test_single_episode_group_is_left_to_the_hash_rule():
    ids = _ids(0, 50)
    flags = [i == 0 for i in range(50)]
    for seed in range(5):
        _, val = split_by_episode(ids, 0.05, seed=seed, has_sensor=flags)
        assert ("ep0000" in val) == (episode_hash("ep0000", seed) < 0.05)


def test_val_ratio_zero_is_all_train():
    ids = _ids(0, 100)
    assert split_by_episode(ids, 0.0) == (ids, [])
    assert split_by_episode(ids, 0.0, has_sensor=[i % 2 == 0 for i in range(100)]) == (ids, [])
    assert split_by_episode([], 0.2) == ([], [])


def test_invalid_arguments_are_refused():
    ids = _ids(0, 10)
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"--val-ratio must be in \[0, 1\)"):
            split_by_episode(ids, bad)
    with pytest.raises(ValueError, match="has_sensor has 3 flags for 10 episodes"):
        split_by_episode(ids, 0.1, has_sensor=[True] * 3)
    with pytest.raises(ValueError, match="'ep0001' appears more than once"):
        split_by_episode(ids + ["ep0001"], 0.1)

"""split_by_episode: disjoint, complete, an exact count per sensor stratum, stable under a seed and additions."""
from __future__ import annotations

import random

import pytest

from vla_ds.data.split import episode_hash, split_by_episode, val_count


def _ids(start: int, stop: int) -> list[str]:
    return [f"ep{i:04d}" for i in range(start, stop)]


def test_disjoint_complete_in_input_order_and_exactly_the_ratio():
    ids = _ids(0, 1000)
    random.Random(0).shuffle(ids)
    train, val = split_by_episode(ids, 0.2, seed=1)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(ids)
    assert train == [e for e in ids if e in set(train)]
    assert val == [e for e in ids if e in set(val)]
    assert len(val) == 200


def test_the_validation_set_has_the_same_size_under_every_seed():
    # the case: 200 episodes at 0.05 gave 2 with one seed and 12 with another
    ids = _ids(0, 200)
    assert {len(split_by_episode(ids, 0.05, seed=s)[1]) for s in range(30)} == {10}
    flags = [i % 20 == 0 for i in range(200)]  # 10 sensor episodes, 190 without
    for seed in range(30):
        _, val = split_by_episode(ids, 0.05, seed=seed, has_sensor=flags)
        sensor = [e for e in val if int(e[2:]) % 20 == 0]
        assert len(sensor) == 1 and len(val) - len(sensor) == 10, seed  # round(0.5) -> 1 and round(9.5) -> 10


@pytest.mark.parametrize("n, ratio, k", [(2, 0.05, 1), (3, 0.05, 1), (37, 0.05, 2), (20, 0.1, 2), (2, 0.9, 1),
                                         (10, 0.25, 3), (1, 0.9, 0), (5, 0.0, 0)])
def test_val_count_rounds_with_at_least_one_and_leaves_one_to_train(n, ratio, k):
    assert val_count(n, ratio) == k
    assert len(split_by_episode(_ids(0, n), ratio, seed=4)[1]) == k


def test_deterministic_and_depends_on_seed():
    ids = _ids(0, 200)
    assert split_by_episode(ids, 0.3, seed=5) == split_by_episode(list(ids), 0.3, seed=5)
    assert split_by_episode(ids, 0.3, seed=5)[1] != split_by_episode(ids, 0.3, seed=6)[1]
    # Assignment depends on the episode, not on its position in the list.
    shuffled = list(reversed(ids))
    assert set(split_by_episode(shuffled, 0.3, seed=5)[1]) == set(split_by_episode(ids, 0.3, seed=5)[1])


def test_val_is_each_groups_smallest_hashes():
    ids = _ids(0, 300)
    _, val = split_by_episode(ids, 0.25, seed=2)
    assert set(val) == set(sorted(ids, key=lambda e: episode_hash(e, 2))[:75])
    assert all(0.0 <= episode_hash(e, 2) < 1.0 for e in ids)
    flags = [i < 40 for i in range(300)]
    _, val = split_by_episode(ids, 0.25, seed=2, has_sensor=flags)
    by_hash = lambda group: sorted(group, key=lambda e: episode_hash(e, 2))  # noqa: E731
    assert set(val) == set(by_hash(ids[:40])[:10]) | set(by_hash(ids[40:])[:65])


@pytest.mark.parametrize("stratified", [False, True])
def test_adding_an_episode_moves_at_most_one_existing_one(stratified):
    flags_of = lambda ids: [int(e[2:]) % 10 == 0 for e in ids] if stratified else None  # noqa: E731
    ids = _ids(0, 300)
    _, val0 = split_by_episode(ids, 0.2, seed=3, has_sensor=flags_of(ids))
    for extra in range(300, 330):
        ids = ids + _ids(extra, extra + 1)
        _, val1 = split_by_episode(ids, 0.2, seed=3, has_sensor=flags_of(ids))
        moved = (set(val0) - set(val1)) | ((set(val1) - set(val0)) - {ids[-1]})
        assert len(moved) <= 1, (extra, moved)
        val0 = val1


def test_stratified_val_has_both_sensor_and_plain_episodes():
    # 3 sensor episodes at val_ratio 0.1: one pooled group often puts none of them in val.
    ids = _ids(0, 60)
    flags = [i < 3 for i in range(60)]
    sensor = set(ids[:3])
    for seed in range(20):
        train, val = split_by_episode(ids, 0.1, seed=seed, has_sensor=flags)
        assert len(set(val) & sensor) == 1 and set(train) & sensor, seed
        assert len(set(val) - sensor) == 6 and set(train) - sensor, seed
        assert sorted(train + val) == sorted(ids)
    # Without the flags the split gives no sensor episode to val for at least one of those seeds.
    assert any(not set(split_by_episode(ids, 0.1, seed=s)[1]) & sensor for s in range(20))


def test_a_lone_episode_trains():
    ids = _ids(0, 50)
    flags = [i == 0 for i in range(50)]
    for seed in range(5):
        train, val = split_by_episode(ids, 0.5, seed=seed, has_sensor=flags)
        assert "ep0000" in train and len(val) == 25
    assert split_by_episode(ids[:1], 0.9) == (ids[:1], [])


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

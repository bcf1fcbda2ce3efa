"""The open-loop metrics on chunks whose answers are known by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from vla_ds.eval.metrics import dim_step_errors, integrated, mean_chunk, score, summary


def _chunks(n=6, h=4, seed=0):
    rng = np.random.default_rng(seed)
    target = rng.normal(size=(n, h, 7))
    mask = np.ones((n, h), bool)
    mask[0, 2:] = False  # a chunk that ends at the episode's end
    return target, mask


def test_an_oracle_scores_zero_and_zero_motion_scores_the_true_motion():
    target, mask = _chunks()
    perfect = summary(target.copy(), target, mask, tol=0.01)
    assert perfect["pos_mae"] == perfect["ang_mae"] == perfect["final_pos_err"] == 0.0
    assert perfect["within_tol"] == 1.0
    zero = summary(np.zeros_like(target), target, mask, tol=0.01)
    valid = target[mask]  # (pairs, 7)
    assert zero["pos_mae"] == pytest.approx(np.abs(valid[:, :3]).mean())
    assert zero["ang_mae"] == pytest.approx(np.abs(valid[:, 3:6]).mean())
    assert zero["progress_mae"] == pytest.approx(np.abs(valid[:, 6]).mean())
    # after the chunk, zero motion is off by exactly the distance the tool really moved
    moved = [np.linalg.norm(target[i, mask[i], :3].sum(axis=0)) for i in range(len(target))]
    assert zero["final_pos_err"] == pytest.approx(np.mean(moved))


def test_padded_steps_never_count():
    target, mask = _chunks()
    pred = target.copy()
    pred[~mask] = 1e6  # garbage where the episode has ended
    s = summary(pred, target, mask, tol=0.5)
    assert s["pos_mae"] == 0.0 and s["final_pos_err"] == 0.0 and s["within_tol"] == 1.0
    errs = dim_step_errors(pred, target, mask)
    assert np.all(errs["mae"] == 0) and errs["count"].tolist() == [6, 6, 5, 5]


def test_integrated_error_accumulates_a_constant_bias():
    target, mask = _chunks(n=2, h=5)
    mask[:] = True
    pred = target + np.array([0.3, 0.4, 0, 0, 0, 0, 0])  # 0.5 units off per step
    pos = integrated((pred - target)[..., :3], mask)
    assert pos[0].tolist() == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])
    s = summary(pred, target, mask, tol=1.0)
    assert s["final_pos_err"] == pytest.approx(2.5) and s["pos_mae"] == pytest.approx(0.7 / 3)
    assert s["within_tol"] == pytest.approx(2 / 5)  # steps 1 and 2 are within 1.0


def test_dim_step_rmse_and_empty_steps():
    target = np.zeros((2, 3, 7))
    pred = np.zeros((2, 3, 7))
    pred[0, :, 0], pred[1, :, 0] = 1.0, 3.0
    mask = np.array([[True, True, False], [True, False, False]])
    e = dim_step_errors(pred, target, mask)
    assert e["mae"][0, 0] == 2.0 and e["rmse"][0, 0] == pytest.approx(math.sqrt(5))
    assert e["mae"][1, 0] == 1.0 and np.isnan(e["mae"][2]).all()


def test_mean_chunk_ignores_padding_and_score_splits_by_sensor_and_episode():
    target, mask = _chunks(n=4, h=3)
    chunk = mean_chunk(target, mask)
    assert chunk[0] == pytest.approx(target[:, 0].mean(axis=0))
    assert chunk[2] == pytest.approx(target[1:, 2].mean(axis=0))  # sample 0 is padded there
    has = np.array([True, False, False, True])
    eps = ["a", "a", "b", "b"]
    r = score(target + 0.1, target, mask, has, eps, chunk, tol=1.0)
    assert set(r["by_sensor"]) == {"sensor", "no_sensor"} and r["by_sensor"]["sensor"]["policy"]["samples"] == 2
    assert list(r["per_episode"]) == ["a", "b"] and r["per_episode"]["b"]["has_sensor"]
    assert r["summary"]["policy"]["pos_mae"] == pytest.approx(0.1)
    assert r["summary"]["mean_chunk"]["pos_mae"] > 0.1  # the yardstick is worse than a 0.1 bias here
    only_unsensed = score(target, target, mask, np.zeros(4, bool), eps, chunk, tol=1.0)
    assert set(only_unsensed["by_sensor"]) == {"no_sensor"}

"""The action heads and the robot state on the tasks they exist for, trained end to end in the
session's shared launch (2 processes, ZeRO-2, from a VL cache of the frozen tiny backbone):

- demonstrations that disagree (the same picture, then +x in half the episodes, -x in the other):
  the regression head predicts their mean, a motion no demonstration made; the flow head's
  samples land on one mode or the other, both modes hit;
- a task only the robot state solves (move down until z = 0, then stop; every frame looks the
  same): learned with --state-enabled, not without (validation loss).

The figures at more steps are in docs/model.md ("Action heads").
"""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.runs import SMALL

pytestmark = pytest.mark.slow

HEAD = ["--batch-size", "16", "--grad-accum-steps", "1", "--finetune-vl", "none", "--cache-policy", "require",
        "--head-dropout", "0", "--lr", "2e-3", "--warmup-ratio", "0.05", "--log-every", "50", "--save-every", "0", *SMALL]
# within 30 % of a mode's step, over the whole chunk: a sample "lands on" that mode
HIT = 0.3


def _cached(ctx, root, data) -> str:
    """A VL cache of `data` beside the runs (ROOT/vl_cache, where the trainer looks by default)."""
    from vla_ds.cache import build_cache
    from vla_ds.config import TrainConfig

    build_cache(TrainConfig.from_flat({"backbone": str(ctx.fixture("tiny_model_dir")), "finetune_vl": "none",
                                       "data": [str(data)], "num_workers": 0, "cache_dir": str(root / "vl_cache")}))
    return str(root / "vl_cache")


def shared_runs(ctx) -> dict:
    from tests.helpers.datasets import make_bimodal_task, make_state_task

    backbone, runs = str(ctx.fixture("tiny_model_dir")), {}
    if ctx.selected("test_the_flow_head_samples_both_modes_where_regression_predicts_their_mean") or ctx.selected(
            "test_eval_scores_a_seeded_sample_per_observation_the_same_at_any_batch_size"):
        root = ctx.root("bimodal")
        data = make_bimodal_task(root)
        common = ["--data", str(data), "--backbone", backbone, "--cache-dir", _cached(ctx, root, data),
                  "--val-ratio", "0", *HEAD]
        runs["regression"] = [*common, "--output-dir", str(root / "regression"), "--max-steps", "150"]
        runs["flow"] = [*common, "--output-dir", str(root / "flow"), "--max-steps", "800", "--action-head", "flow"]
    if ctx.selected("test_a_task_only_the_state_solves_is_learned_with_the_state_not_without"):
        root = ctx.root("state_task")
        data = make_state_task(root, episodes=24)
        common = ["--data", str(data), "--backbone", backbone, "--cache-dir", _cached(ctx, root, data),
                  "--val-ratio", "0.25", "--max-steps", "150", *HEAD]
        runs["with_state"] = [*common, "--output-dir", str(root / "with"), "--state-enabled"]
        runs["without_state"] = [*common, "--output-dir", str(root / "without")]
    return runs


def _first_observation(run_dir):
    from vla_ds.data.dataset import IntegratedDataset
    from vla_ds.model.policy import QwenVLA

    policy = QwenVLA.from_pretrained(run_dir / "checkpoints" / "final" / "policy", device="cpu")
    item = IntegratedDataset(policy_data(run_dir), views=policy.views)[0]
    return policy, [item["instruction"]], [item["images"]]


def policy_data(run_dir) -> list[str]:
    from vla_ds.config import config_from_yaml

    return config_from_yaml(run_dir / "config.yaml").data.data


def test_the_flow_head_samples_both_modes_where_regression_predicts_their_mean(shared):
    from tests.helpers.datasets import BIMODAL_STEP

    def distance_to(dx, sign):  # mean |error| over the chunk's x steps, in units of the step
        return np.abs(dx - sign * BIMODAL_STEP).mean(-1) / BIMODAL_STEP

    policy, texts, images = _first_observation(shared.run(__name__, "regression").dir)
    dx = policy.predict(texts, images)[0, :, 0].numpy()
    assert abs(dx.mean()) < 0.2 * BIMODAL_STEP, f"regression: the mean of the modes, {dx.mean():.3f}"
    assert min(distance_to(dx, 1), distance_to(dx, -1)) > 0.7, "regression lands on neither mode"

    policy, texts, images = _first_observation(shared.run(__name__, "flow").dir)
    dx = policy.predict(texts, images, num_samples=200)[0, :, :, 0].numpy()  # (K, H)
    plus, minus = distance_to(dx, 1), distance_to(dx, -1)
    hit = np.minimum(plus, minus) <= HIT
    # 72 to 94 % across sessions at this budget (the draws follow the sample ids, which hash the data's
    # path); bench_heads measures 91.5 % at 600 steps and 97.5 % at 1500 (docs/model.md)
    assert hit.mean() >= 0.6, f"flow: {hit.mean():.0%} of the samples on a mode"
    for name, share in (("+x", (hit & (plus < minus)).mean()), ("-x", (hit & (minus < plus)).mean())):
        assert share >= 0.2, f"flow: mode {name} gets {share:.0%} of the samples"


def test_a_task_only_the_state_solves_is_learned_with_the_state_not_without(shared):
    final = {}
    for name in ("with_state", "without_state"):
        rows = shared.run(__name__, name).rows
        final[name] = [r["val/loss_epoch"] for r in rows if "val/loss_epoch" in r][-1]
    assert final["with_state"] <= 0.5 * final["without_state"], final


def test_eval_scores_a_seeded_sample_per_observation_the_same_at_any_batch_size(shared, tmp_path):
    from vla_ds.errors import UsageError
    from vla_ds.eval.run import EvalArgs, evaluate

    run = shared.run(__name__, "flow").dir
    kw = dict(policy=str(run), data=policy_data(run), episodes="all", num_workers=0, max_samples=40)

    def scored(name, **extra):
        r = evaluate(EvalArgs(output_dir=str(tmp_path / name), **kw, **extra))
        return r, np.load(tmp_path / name / "predictions.npz")["pred"]

    (a, pa), (_, pb), (_, pc) = scored("a", batch_size=16), scored("b", batch_size=5), scored("c", seed=1)
    assert (a["action_head"], a["flow_steps"], a["seed"], a["vl_source"][:8]) == ("flow", 10, 0, "VL cache")
    np.testing.assert_allclose(pa, pb, atol=1e-5, rtol=1e-5)
    assert np.abs(pa - pc).max() > 0.1, "another seed, other samples"
    # the scored chunks are samples on one mode or the other: a regression-like mean would be ~0 everywhere
    assert (np.abs(pa[:, 0, 0]) > 0.5 * 0.625).mean() >= 0.8
    r, _ = scored("d", flow_steps=2)
    assert r["flow_steps"] == 2
    with pytest.raises(UsageError, match="--flow-steps: .* has a regression head"):
        evaluate(EvalArgs(policy=str(shared.run(__name__, "regression").dir), data=kw["data"], episodes="all",
                          num_workers=0, flow_steps=4, output_dir=str(tmp_path / "e")))

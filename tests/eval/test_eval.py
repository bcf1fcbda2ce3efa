"""`vla-ds eval` end to end on real runs of the tiny backbone (trained in the session's shared launch):
the run's own validation split, predictions identical to `QwenVLA.predict`, the recorded motion as
the zero-motion yardstick, 2 ranks = 1 process, VL-cache mode = live, the PNGs, a task only the
sensor can solve scored lower with the sensor than without, and the one-line refusals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.helpers.runs import SMALL
from vla_ds.cli import main
from vla_ds.errors import UsageError
from vla_ds.eval.run import EvalArgs, evaluate

pytestmark = pytest.mark.slow

HEAD = ["--batch-size", "2", "--grad-accum-steps", "1", "--head-dropout", "0", "--views", "View1", "View5",
        "--finetune-vl", "none", "--cache-policy", "off", *SMALL]
FAST = ["--max-steps", "30", "--lr", "3e-3", "--sensor-lr", "3e-3", "--warmup-ratio", "0.1", "--hold-ratio", "0.0",
        "--min-lr", "3e-4", "--val-ratio", "0"]


def shared_runs(ctx) -> dict:
    backbone = str(ctx.fixture("tiny_model_dir"))
    runs = {}
    if ctx.uses("train_data"):  # 4 episodes, half of each group held out
        runs["val"] = ["--data", str(ctx.fixture("train_data")), "--backbone", backbone, "--output-dir",
                       str(ctx.root("eval_val") / "run"), "--max-steps", "4", "--val-ratio", "0.5",
                       "--sensor-enabled", "--eval-every", "2", "--eval-max-samples", "0", "--best-metric",
                       "eval/final_pos_err", "--save-every", "2", *HEAD]
    if ctx.selected("test_a_task_only_the_sensor_solves_scores_lower_with_the_sensor") or ctx.selected(
            "test_a_run_without_validation_episodes_says_what_to_pass"):
        from tests.helpers.datasets import make_sensor_task

        root = ctx.root("eval_sensor_task")
        data = make_sensor_task(root)
        for name, extra in (("with", ["--sensor-enabled"]), ("without", [])):
            runs[name] = ["--data", str(data), "--backbone", backbone, "--output-dir", str(root / name), *FAST,
                          *HEAD, *extra]
    return runs


def _eval(run, tmp_path, name="out", **kw):
    return evaluate(EvalArgs(policy=str(run), output_dir=str(tmp_path / name), num_workers=0, **kw))


def _val_split(run_dir):
    from vla_ds.config import config_from_yaml
    from vla_ds.data.dataset import IntegratedDataset
    from vla_ds.data.split import split_by_episode

    cfg = config_from_yaml(run_dir / "config.yaml")
    full = IntegratedDataset(cfg.data.data, load_images=False, load_sensor=False)
    return split_by_episode(full.episode_ids, cfg.data.val_ratio, cfg.run.seed, full.episode_has_sensor), cfg


def test_eval_scores_the_runs_validation_episodes_as_predict_does(shared, train_data, tmp_path):
    run = shared.run(__name__, "val").dir
    (train_ids, val_ids), cfg = _val_split(run)
    assert len(val_ids) == 2 and not set(train_ids) & set(val_ids)
    r = _eval(run, tmp_path)
    out = tmp_path / "out"
    assert r["episode_ids"] == val_ids and r["checkpoint"].startswith("best -> step_00000")
    assert json.loads((out / "eval.json").read_text())["metrics"]["summary"]["policy"]["samples"] == r["samples"]
    preds = np.load(out / "predictions.npz")
    assert set(np.char.rpartition(preds["sample_ids"].astype(str), ":")[:, 0]) == set(val_ids)

    # the recorded chunks are the dataset's physical actions, and zero motion misses them entirely
    from vla_ds.data.dataset import IntegratedDataset
    from vla_ds.model.policy import QwenVLA

    ds = IntegratedDataset(cfg.data.data, views=cfg.data.views, episode_ids=set(val_ids))
    index = {ds.sample_id(i): i for i in range(len(ds))}
    assert len(index) == r["samples"]
    for k, sid in enumerate(preds["sample_ids"].astype(str)):
        np.testing.assert_allclose(preds["target"][k], ds.actions(index[sid])[0], rtol=0, atol=1e-6)
    zero = r["metrics"]["summary"]["zero_motion"]
    moved = [np.linalg.norm(t[m][:, :3].sum(0)) for t, m in zip(preds["target"], preds["mask"])]
    assert zero["final_pos_err"] == pytest.approx(np.mean(moved))

    # the policy's numbers are those of the robot-side API on the same samples
    policy = QwenVLA.from_pretrained(run / "checkpoints" / "best" / "policy", device="cpu")
    for k in (0, len(index) - 1):
        item = ds[index[preds["sample_ids"][k]]]
        sensor = [item["sensor"].float()[None], item["sensor_mask"][None]] if "sensor" in item else [None, None]
        want = policy.predict([item["instruction"]], [item["images"]], *sensor)[0]
        np.testing.assert_allclose(preds["pred"][k], want.numpy(), rtol=1e-5, atol=1e-5)

    # the pictures: one trajectory per episode, nothing blank
    pngs = [out / "error_by_step.png", out / "error_hist.png", *sorted((out / "trajectories").glob("*.png"))]
    assert len(pngs) == 2 + len(val_ids)
    for p in pngs:
        with Image.open(p) as im:
            assert im.size[0] > 400 and np.asarray(im.convert("L")).std() > 10
    md = (out / "eval.md").read_text()
    assert "| policy |" in md and "| zero_motion |" in md and val_ids[0] in md


def test_two_ranks_give_what_one_process_gives(shared, train_data, tmp_path):
    from vla_ds.utils.dist import torchrun

    run = shared.run(__name__, "val").dir
    one = _eval(run, tmp_path, "one")
    proc = torchrun("vla_ds", ["eval", str(run), "--output-dir", str(tmp_path / "two"), "--num-workers", "0"],
                    nproc=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert two["samples"] == one["samples"] and two["episode_ids"] == one["episode_ids"]
    a, b = np.load(tmp_path / "one" / "predictions.npz"), np.load(tmp_path / "two" / "predictions.npz")
    assert a["sample_ids"].tolist() == b["sample_ids"].tolist()
    np.testing.assert_allclose(a["pred"], b["pred"], rtol=1e-6, atol=1e-6)
    for model, want in one["metrics"]["summary"].items():
        assert two["metrics"]["summary"][model] == pytest.approx(want, rel=1e-6)


def test_vl_cache_mode_scores_as_the_live_backbone(shared, train_data, tmp_path):
    run = shared.run(__name__, "val").dir
    assert main(["cache", "--config", str(run / "config.yaml"), "--cache-dir", str(tmp_path / "cache")]) == 0
    live = _eval(run, tmp_path, "live", cache_policy="off")
    cached = _eval(run, tmp_path, "cached", cache_policy="require", cache_dir=str(tmp_path / "cache"))
    assert live["vl_source"] == "live backbone" and cached["vl_source"].startswith("VL cache")
    for key, want in live["metrics"]["summary"]["policy"].items():  # the cache stores fp16 features
        assert cached["metrics"]["summary"]["policy"][key] == pytest.approx(want, rel=1e-2, abs=1e-3)


def test_a_task_only_the_sensor_solves_scores_lower_with_the_sensor(shared, tmp_path):
    scores = {name: _eval(shared.run(__name__, name).dir, tmp_path, name, episodes="all")["metrics"]["summary"]
              for name in ("with", "without")}
    with_s, without = scores["with"]["policy"], scores["without"]["policy"]
    # without the sensor the best guess is no z motion at all: the mean chunk
    assert without["final_pos_err"] == pytest.approx(scores["without"]["mean_chunk"]["final_pos_err"], rel=0.1)
    assert with_s["final_pos_err"] < 0.2 * without["final_pos_err"]
    assert with_s["within_tol"] > without["within_tol"]

    # the ablation report: the setting that differs is a column, the sensor run comes first
    from vla_ds.eval.compare import compare

    evals = [str(tmp_path / "without"), str(tmp_path / "with")]
    for metric in ("final_pos_err", "within_tol"):  # lower is better, then higher is better
        result = compare(evals, metric)
        assert [r["label"] for r in result["rows"]] == ["with", "without"] and result["comparable"]
    assert "sensor_enabled" in result["columns"] and "output_dir" not in result["columns"]
    assert [r["settings"]["sensor_enabled"] for r in result["rows"]] == [True, False]
    assert main(["compare", *evals, "--output-dir", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md.index("| ★ | with |") < md.index("|  | without |")
    with Image.open(tmp_path / "cmp" / "compare.png") as im:
        assert np.asarray(im.convert("L")).std() > 10
    with pytest.raises(UsageError, match="no evaluation there.*run `vla-ds eval"):
        compare([str(tmp_path / "with"), str(shared.run(__name__, "with").dir)])  # trained, never evaluated


def test_bad_input_is_one_line(shared, train_data, learn_data, tmp_path):
    run = shared.run(__name__, "val").dir

    def refused(match, **kw):
        with pytest.raises(UsageError, match=match) as e:
            _eval(kw.pop("policy", run), tmp_path, kw.pop("name", "out"), **kw)
        assert "\n" not in str(e.value)

    refused("no episode nope in --data", episodes="nope")
    refused("reads the run's validation split of its own --data", data=[str(learn_data)])
    refused(r"differs from the stats the policy was trained with.*--other-stats", data=[str(learn_data)],
            episodes="all")
    assert _eval(run, tmp_path, "other", data=[str(learn_data)], episodes="all", other_stats=True)["samples"] > 0
    loose = tmp_path / "loose_policy"
    shutil.copytree(run / "checkpoints" / "best" / "policy", loose)
    refused("is not inside a training run", policy=loose, data=[str(train_data)])
    refused("no such directory", policy=tmp_path / "missing")
    one_view = tmp_path / "one_view"  # the policy's View5 camera missing from the data
    shutil.copytree(train_data, one_view)
    for meta in one_view.glob("episodes/*/meta.json"):
        m = json.loads(meta.read_text())
        m["views"] = [v for v in m["views"] if v != "View5"]
        meta.write_text(json.dumps(m))
    refused(r"has no view\(s\) View5 .*the policy .* was trained on View1, View5", data=[str(one_view)],
            episodes="all")
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(UsageError, match="is not an eval directory"):
        evaluate(EvalArgs(policy=str(run), output_dir=str(run), num_workers=0))
    assert sorted(p.name for p in run.iterdir()) == before  # the run directory is untouched
    assert main(["eval", str(run), "--episodes", "nope", "--output-dir", str(tmp_path / "cli")]) == 2
    assert not (tmp_path / "cli").exists()


def test_a_run_without_validation_episodes_says_what_to_pass(shared, tmp_path):
    with pytest.raises(UsageError, match="--val-ratio 0 and has no validation episodes; pass --episodes all") as e:
        _eval(shared.run(__name__, "with").dir, tmp_path)
    assert "\n" not in str(e.value)


def test_the_trainers_eval_is_vla_ds_eval_and_best_follows_it(shared, train_data, tmp_path):
    from tests.helpers.runs import metrics_rows
    from vla_ds.config import BEST_METRICS
    from vla_ds.eval.metrics import SUMMARY_KEYS

    assert BEST_METRICS == ("val/loss_epoch", *(f"eval/{k}" for k in SUMMARY_KEYS))
    run = shared.run(__name__, "val").dir
    logged = {r["step"]: r for r in metrics_rows(run) if "eval/final_pos_err" in r}
    assert sorted(logged) == [2, 4]
    for step in (2, 4):  # --eval-max-samples 0: every validation sample, as `vla-ds eval` scores them
        r = _eval(run / "checkpoints" / f"step_{step:06d}", tmp_path, f"s{step}")["metrics"]
        for key in SUMMARY_KEYS:
            assert logged[step][f"eval/{key}"] == pytest.approx(r["summary"]["policy"][key], rel=1e-5, abs=1e-7)
        assert logged[step]["eval/zero_motion/final_pos_err"] == pytest.approx(
            r["summary"]["zero_motion"]["final_pos_err"], rel=1e-6)
        assert logged[step]["eval/sensor/final_pos_err"] == pytest.approx(
            r["by_sensor"]["sensor"]["policy"]["final_pos_err"], rel=1e-5)
    best = min(logged, key=lambda k: logged[k]["eval/final_pos_err"])
    assert (run / "checkpoints" / "best").resolve().name == f"step_{best:06d}"


def test_eval_flags_of_training_are_checked_before_anything_is_written(train_data, tiny_model_dir, tmp_path):
    base = ["train", "--data", str(train_data), "--backbone", str(tiny_model_dir), "--output-dir",
            str(tmp_path / "run"), "--wandb-mode", "disabled"]
    assert main([*base, "--val-ratio", "0", "--eval-every", "2"]) == 2  # no validation episodes to score
    assert main([*base, "--best-metric", "eval/within_tol"]) == 2  # an eval metric without evals
    assert not (tmp_path / "run").exists()

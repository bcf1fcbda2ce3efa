"""The reliability table's data and config rows: `vla-ds preprocess`, `vla-ds stats` and the
refusals of `vla-ds train` before anything loads. Each data case first ingests good recordings
into a dataset, then breaks one source: the refused rerun must leave that dataset as it was."""
from __future__ import annotations

import json
import os
import socket

import numpy as np

from tests.helpers.runs import SMALL
from tests.reliability.harness import Case, Env, Scenario
from vla_ds.data import synthetic
from vla_ds.data.ingest import IngestOptions, preprocess


def _recorded(env: Env):
    """(raw dir, dataset dir): one recorder session (with sensor) and one frame-list folder, ingested."""
    raw = env.tmp / "raw"
    synthetic.make_session_a(raw / "needle_insertion", seed=0, duration_s=3.0, frame_spacing_s=1.0,
                             image_size=(48, 64))
    synthetic.make_session_b(raw / "retina_approach", seed=1, duration_s=2.0, image_size=(48, 64))
    out = env.tmp / "dataset"
    preprocess([str(raw)], out, IngestOptions(max_side=64))
    return raw, out


def _session_a(raw):
    return next((raw / "needle_insertion").glob("recv_all_*"))


def _preprocess(raw, out, *names, extra=()) -> Scenario:
    return Scenario(argv=["preprocess", str(raw), "--out", str(out), "--max-side", "64", *extra],
                    names=[str(n) for n in names], keep=[raw, out])


def _npz(env, change) -> Scenario:
    raw, out = _recorded(env)
    npz = next(_session_a(raw).glob("sensor_data_*.npz"))
    z = dict(np.load(npz))
    keys = change(z)
    np.savez(npz, **z)
    return _preprocess(raw, out, npz, *keys)


def truncated_jpeg(env):
    raw, out = _recorded(env)
    img = sorted((_session_a(raw) / "View1" / "left").glob("*.jpg"))[1]
    img.write_bytes(img.read_bytes()[:200])
    return _preprocess(raw, out, img, "unreadable image", "--skip-bad")


def npz_without_alines(env):
    return _npz(env, lambda z: [z.pop("alines"), "alines"][1:])


def npz_with_objects(env):
    def change(z):
        z["alines"] = np.array([np.zeros(3)] * len(z["alines"]), dtype=object)
        return ["alines", "object"]
    return _npz(env, change)


def npz_other_width(env):
    def change(z):
        z["alines"] = z["alines"][:, :1000]
        return ["1001 sensor channels", "pass --sensor-input-channels 1001"]
    return _npz(env, change)


def nan_in_sensor(env):
    def change(z):
        z["alines"][len(z["alines"]) // 2, 3] = np.nan
        return ["NaN", "--skip-bad"]
    return _npz(env, change)


def _csv(env, change, *names):
    raw, out = _recorded(env)
    csv = next(_session_a(raw).glob("robot_state_*.csv"))
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(change(lines)) + "\n")
    return _preprocess(raw, out, csv, *names)


def csv_without_column(env):
    return _csv(env, lambda lines: [",".join(x for i, x in enumerate(ln.split(",")) if i != 13) for ln in lines],
                "pose_a")


def nan_in_csv(env):
    def change(lines):
        cells = lines[5].split(",")
        cells[8] = "nan"
        return lines[:5] + [",".join(cells)] + lines[6:]
    return _csv(env, change, "line 6", "--skip-bad")


def empty_session_beside_good_ones(env):
    raw, out = _recorded(env)
    empty = raw / "needle_insertion" / "recv_all_20251027_235959"
    empty.mkdir()
    return _preprocess(raw, out, empty, "empty session")


def _frame_list(raw):
    return next((raw / "retina_approach").glob("*/*View5_single.json"))


def frame_list_not_a_list(env):
    raw, out = _recorded(env)
    bad = _frame_list(raw)
    bad.write_text(json.dumps({"frames": []}))
    return _preprocess(raw, out, bad, "expected a JSON list")


def frame_list_image_elsewhere(env):
    raw, out = _recorded(env)
    bad = _frame_list(raw)
    frames = json.loads(bad.read_text())
    (env.tmp / "elsewhere.jpg").write_bytes((raw / "retina_approach").glob("*/View5/*.jpg").__next__().read_bytes())
    frames[0]["image"] = str(env.tmp / "elsewhere.jpg")
    bad.write_text(json.dumps(frames))
    return _preprocess(raw, out, bad, env.tmp / "elsewhere.jpg", "--allow-external-images")


def killed_preprocess_leftovers(env):
    raw, out = _recorded(env)
    episodes = sorted((out / "episodes").iterdir())
    stale = out / "episodes" / f".{episodes[0].name}.k3j2a_9x.tmp"
    (stale / "images").mkdir(parents=True)
    (stale / "meta.json").write_text("{}")

    def after():
        assert not stale.exists() and sorted((out / "episodes").iterdir()) == episodes

    return Scenario(argv=["preprocess", str(raw), "--out", str(out), "--max-side", "64"], exit=0,
                    names=["removed", stale.name, "interrupted"], keep=[raw, *episodes], after=after)


def concurrent_preprocess(env):
    raw, out = _recorded(env)
    (out / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "now"}))
    return _preprocess(raw, out, f"--out {out}", "another preprocess holds it", f"pid {os.getppid()}")


def broken_instructions_file(env):
    raw, out = _recorded(env)
    (env.tmp / "instructions.json").write_text("{'needle': 'Insert'")
    return _preprocess(raw, out, f"--instructions {env.tmp / 'instructions.json'}", "unreadable",
                       extra=["--instructions", str(env.tmp / "instructions.json")])


def negative_max_side(env):
    raw, out = _recorded(env)
    return Scenario(argv=["preprocess", str(raw), "--out", str(out), "--max-side", "-1"], names=["--max-side", ">= 0"],
                    keep=[raw, out])


def stats_of_a_missing_dir(env):
    return Scenario(argv=["stats", str(env.tmp / "missing")], names=[f"DATASET_DIR {env.tmp / 'missing'}"],
                    absent=[env.tmp / "missing"])


def stats_with_a_nan_pose(env):
    _, out = _recorded(env)
    frames = next((out / "episodes").glob("*/frames.json"))
    table = json.loads(frames.read_text())
    table["pose"][1][0] = float("nan")
    frames.write_text(json.dumps(table))
    return Scenario(argv=["stats", str(out)], names=[str(frames), "NaN", "vla-ds preprocess"], keep=[out],
                    absent=[out / "stats.json"])


def stats_of_two_dirs_without_out(env):
    _, out = _recorded(env)
    return Scenario(argv=["stats", str(out), str(out)], names=["--out is required"], keep=[out],
                    absent=[out / "stats.json"])


# --------------------------------------------------------------------------------------------- config
def _train(env: Env, *flags, names) -> Scenario:
    """`vla-ds train` on the session's dataset with one bad setting: refused before a run dir exists."""
    data = env.fixture("train_data")
    run = env.tmp / "run"
    argv = ["train", "--data", str(data), "--backbone", str(env.fixture("tiny_model_dir")), "--output-dir", str(run),
            *SMALL, *flags]
    return Scenario(argv=argv, names=[str(n) for n in names], keep=[data], absent=[run])


def _yaml(env, text, *names):
    y = env.tmp / "run.yaml"
    y.write_text(text)
    return _train(env, "--config", str(y), names=[y, *names])


def yaml_value_of_another_type(env):
    return _yaml(env, "lr: fast\n", "lr: 'fast' is not a number")


def yaml_unknown_key(env):
    return _yaml(env, "lr: 0.001\nsensor_hiden_dim: 3\n", "sensor_hiden_dim (did you mean sensor_hidden_dim?)")


def yaml_syntax_error(env):
    return _yaml(env, "lr: [0.1\n", "not valid YAML (line 2")


def ds_config_missing(env):
    return _train(env, "--ds-config", str(env.tmp / "nope.json"), names=["--ds-config", env.tmp / "nope.json"])


def ds_config_typo(env):
    p = env.tmp / "ds.json"
    p.write_text(json.dumps({"train_batch_size": "auto", "zero_optimisation": {"stage": 2}}))
    return _train(env, "--ds-config", str(p), names=[p, "zero_optimisation"])


def stats_without_state(env):
    """A dataset whose stats.json was written before vla-ds read the robot state."""
    from vla_ds.data.stats import NormStats, compute_stats

    _, out = _recorded(env)
    stats = compute_stats([out])
    stats.state_mean = stats.state_std = None
    stats.save(out)
    before = NormStats.load(out)
    argv = ["train", "--data", str(out), "--backbone", str(env.fixture("tiny_model_dir")), "--output-dir",
            str(env.tmp / "run"), *SMALL, "--state-enabled"]
    assert before.state_mean is None
    return Scenario(argv=argv, names=[str(out / "stats.json"), "no robot-state statistics", "vla-ds stats"],
                    keep=[out], absent=[env.tmp / "run"])


CASES = [
    Case("data-01", "a truncated JPEG in a recorder session", truncated_jpeg),
    Case("data-02", "a sensor npz without its `alines` array", npz_without_alines),
    Case("data-03", "a sensor npz holding Python objects (a pickle inside)", npz_with_objects),
    Case("data-04", "a sensor npz 1000 A-scan samples wide (the model reads 1025)", npz_other_width),
    Case("data-05", "NaN in the sensor stream", nan_in_sensor),
    Case("data-06", "a robot CSV missing a column", csv_without_column),
    Case("data-07", "NaN in a robot CSV row", nan_in_csv),
    Case("data-08", "an empty recv_all_* folder beside good sessions", empty_session_beside_good_ones),
    Case("data-09", "a frame list that is not a JSON list", frame_list_not_a_list),
    Case("data-10", "a frame list naming an image outside its folder", frame_list_image_elsewhere),
    Case("data-11", "the temporary folder of a preprocess killed mid-episode (recovered)", killed_preprocess_leftovers),
    Case("data-12", "a second preprocess into a dataset another one is writing", concurrent_preprocess),
    Case("data-13", "an --instructions file that is not JSON", broken_instructions_file),
    Case("data-14", "--max-side -1", negative_max_side),
    Case("data-15", "`vla-ds stats` of a directory that does not exist", stats_of_a_missing_dir),
    Case("data-16", "`vla-ds stats` of an episode whose frames.json holds a NaN pose", stats_with_a_nan_pose),
    Case("data-17", "`vla-ds stats` of two datasets without --out", stats_of_two_dirs_without_out),
    Case("config-01", "a YAML value of the wrong type (`lr: fast`)", yaml_value_of_another_type),
    Case("config-02", "a misspelt YAML key", yaml_unknown_key),
    Case("config-03", "a YAML file that does not parse", yaml_syntax_error),
    Case("config-04", "--val-ratio 1.5", lambda env: _train(env, "--val-ratio", "1.5", names=["--val-ratio"])),
    Case("config-05", "--batch-size 0", lambda env: _train(env, "--batch-size", "0", names=["--batch-size"])),
    Case("config-06", "a misspelt flag (`--batchsize`)",
         lambda env: _train(env, "--batchsize", "4", names=["vla-ds train: error", "did you mean --batch-size?"])),
    Case("config-07", "--ds-config naming a missing file", ds_config_missing),
    Case("config-08", "a DeepSpeed config with a misspelt key", ds_config_typo),
    Case("config-09", "--load-in-8bit with --finetune-vl full",
         lambda env: _train(env, "--load-in-8bit", "--finetune-vl", "full", names=["--load-in-8bit", "lora"])),
    Case("config-10", "--backbone naming a missing directory",
         lambda env: _train(env, "--backbone", str(env.tmp / "qwen"), names=["--backbone", env.tmp / "qwen"])),
    Case("config-11", "--sensor-input-channels 514 for episodes of 1026 channels",
         lambda env: _train(env, "--sensor-enabled", "--sensor-input-channels", "514",
                            names=["--sensor-input-channels 514", "pass --sensor-input-channels 1026"])),
    Case("config-12", "--state-enabled with a stats.json written before vla-ds read the robot state",
         stats_without_state),
]
SLOW: set[str] = set()

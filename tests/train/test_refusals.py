"""Every combination that cannot work is refused in one line before any model loads."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.runs import SMALL
from vla_ds.config import TrainConfig
from vla_ds.errors import UsageError
from vla_ds.train.ds_config import load_ds_config
from vla_ds.train.engine import check_combination


def _cfg(**model):
    return TrainConfig.from_flat({"data": ["d"], **model})


@pytest.mark.parametrize(
    "preset, settings, message",
    [
        ("zero3_offload", {"finetune_vl": "lora", "load_in_8bit": True}, "parameter offload"),
        ("zero3", {"finetune_vl": "lora", "load_in_8bit": True}, "ZeRO-3"),
        ("zero2", {"finetune_vl": "lora", "cache_policy": "require"}, "stale"),
    ],
)
def test_refused_with_a_preset(repo_root, preset, settings, message):
    ds = load_ds_config(repo_root / "ds_configs" / f"{preset}.json")
    with pytest.raises(UsageError, match=message) as e:
        check_combination(_cfg(**settings), ds)
    assert "\n" not in str(e.value)


def test_offload_without_a_deepspeed_optimizer_is_refused(tmp_path):
    cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    with pytest.raises(UsageError, match="optimizer"):
        check_combination(_cfg(), cfg)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"load_in_8bit": True, "finetune_vl": "none"}, "--load-in-8bit requires --finetune-vl lora"),
        ({"load_in_8bit": True, "finetune_vl": "full"}, "--load-in-8bit requires --finetune-vl lora"),
        ({"sensor_enabled": True, "fusion_strategy": "none"}, "--fusion-strategy none"),
        ({"finetune_vl": "full", "unfreeze_last_n": 0}, "--unfreeze-last-n"),
        ({"warmup_ratio": 0.7, "hold_ratio": 0.5}, "--warmup-ratio"),
        ({"sensor_sample_ratio": 1.5}, "--sensor-sample-ratio"),
    ],
)
def test_refused_by_the_config(settings, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**settings)


def _weightless_backbone(root: Path) -> Path:
    """A backbone directory whose config.json passes the path checks but that holds no weights:
    a run that got as far as loading the model would fail differently."""
    d = root / "weightless-backbone"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return d


def test_refusal_happens_before_the_model_loads(tmp_path, train_data, repo_root, capfd, in_process_group):
    """8-bit + zero3_offload through the training entry (`python -m vla_ds.train`, in this process):
    exit code 2, one line, in seconds, no run dir, no process group."""
    import torch.distributed as dist

    from vla_ds.cli.train import launcher_main

    t0 = time.perf_counter()
    rc = launcher_main(["--mode", "train", "--data", str(train_data), "--backbone", str(_weightless_backbone(tmp_path)),
                        "--output-dir", str(tmp_path / "run"), "--load-in-8bit",
                        "--ds-config", str(repo_root / "ds_configs/zero3_offload.json"), *SMALL])
    err = capfd.readouterr().err
    assert rc == 2 and not dist.is_initialized()
    lines = [ln for ln in err.splitlines() if ln.strip() and "waiting for the build of " not in ln]
    assert len(lines) == 1 and lines[0].startswith("vla-ds train: --load-in-8bit") and "parameter offload" in lines[0]
    assert "resolved config" not in err, "refused before the run even starts"
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - t0 < 10


def shared_runs(ctx) -> dict:
    """A run whose normalization stats make every target NaN, for the session's shared launch."""
    if not ctx.selected("test_non_finite_loss_stops_every_rank_with_step_and_samples"):
        return {}
    root, data = ctx.root("non_finite"), ctx.fixture("train_data")
    stats = json.loads((data / "stats.json").read_text())
    stats["action_mean"][0] = float("nan")  # every normalized target becomes NaN
    (root / "stats.json").write_text(json.dumps(stats))
    return {"nan": ["--data", str(data), "--backbone", str(ctx.fixture("tiny_model_dir")), "--stats",
                    str(root / "stats.json"), "--output-dir", str(root / "run"), "--max-steps", "3", "--batch-size",
                    "1", "--grad-accum-steps", "1", "--finetune-vl", "none", "--cache-policy", "off", *SMALL]}


@pytest.mark.slow
def test_non_finite_loss_stops_every_rank_with_step_and_samples(shared):
    run = shared.run(__name__, "nan")
    assert not run.rows or "train/loss_step" not in run.rows[-1], "nothing trained"
    # each rank stops at the same step, naming its own offending samples
    for rank in (0, 1):
        line = [ln for ln in shared.output.splitlines() if f"{run.dir}: run failed: FloatingPointError" in ln
                and f"on rank {rank}:" in ln]
        assert line and "non-finite loss at step 0" in line[0] and "samples ['" in line[0], rank


def _bad_paths(tmp: Path, data: Path) -> dict:
    """case -> (extra `vla-ds train` flags, what the one line must hold). Every path is bad in
    another way; the rest of the command line is fine."""
    (tmp / "empty").mkdir()
    (tmp / "a_file").write_text("x")
    (tmp / "no_config").mkdir()
    (tmp / "broken.json").write_text("{")
    stats = json.loads((data / "stats.json").read_text())
    stats["sensor_mean"], stats["sensor_std"] = stats["sensor_mean"][:514], stats["sensor_std"][:514]
    (tmp / "stats514.json").write_text(json.dumps(stats))
    (tmp / "run.yaml").write_text("sensor_enabled: true\nsensor_input_channels: 514\n")
    e, f = tmp / "empty", tmp / "a_file"
    return {
        "data_missing": (["--data", str(tmp / "nope")], ["--data", str(tmp / "nope"), "no such file or directory",
                                                          "vla-ds preprocess"]),
        "data_glob_matches_nothing": (["--data", str(tmp / "runs-*")], ["--data", str(tmp / "runs-*"),
                                                                        "the glob matches nothing"]),
        "data_not_a_dataset": (["--data", str(e)], ["--data", str(e), "not a vla-ds dataset", "vla-ds preprocess"]),
        "backbone_missing": (["--backbone", str(tmp / "nope")], ["--backbone", str(tmp / "nope"), "no such directory",
                                                                 "Qwen2.5-VL model directory"]),
        "backbone_a_file": (["--backbone", str(f)], ["--backbone", str(f), "not a directory"]),
        "backbone_no_config": (["--backbone", str(tmp / "no_config")], ["--backbone", str(tmp / "no_config"),
                                                                        "no config.json"]),
        "backbone_hub_id_offline": (["--backbone", "no-such-org/no-such-model"],
                                    ["--backbone no-such-org/no-such-model", "local Hugging Face cache"]),
        "stats_missing": (["--stats", str(tmp / "nope.json")], ["--stats", str(tmp / "nope.json"), "no such file",
                                                                "vla-ds stats"]),
        "stats_broken": (["--stats", str(tmp / "broken.json")], ["--stats", str(tmp / "broken.json"),
                                                                 "not a vla-ds stats file", "vla-ds stats"]),
        "stats_other_sensor_channels": (
            ["--stats", str(tmp / "stats514.json"), "--sensor-enabled"],
            ["--stats", str(tmp / "stats514.json"), "514 channels", "--sensor-input-channels 1026", str(data),
             "--sensor-input-channels 514"]),
        "episodes_other_sensor_channels": (
            ["--config", str(tmp / "run.yaml")],
            [f"--data {data}/episodes/", "1026 sensor channels", "--sensor-input-channels 514 (from --config "
             f"{tmp / 'run.yaml'})", "pass --sensor-input-channels 1026"]),
        "init_from_missing": (["--init-from", str(tmp / "nope")], ["--init-from", str(tmp / "nope"),
                                                                   "no such file or directory", "policy directory"]),
        "init_from_no_weights": (["--init-from", str(e)], ["--init-from", str(e), "no model.safetensors"]),
        "resume_missing": (["--resume", str(tmp / "nope")], ["--resume", str(tmp / "nope"),
                                                             "no such file or directory", "--resume auto"]),
        "resume_not_a_checkpoint": (["--resume", str(e)], ["--resume", str(e), "not a checkpoint",
                                                           "step directory or a run directory"]),
        "cache_dir_a_file": (["--cache-dir", str(f)], ["--cache-dir", str(f), "not a directory"]),
        "cache_dir_under_a_file": (["--cache-dir", str(f / "cache")], ["--cache-dir", str(f / "cache"),
                                                                       f"{f} is a file"]),
    }


BAD_PATH_CASES = ["data_missing", "data_glob_matches_nothing", "data_not_a_dataset", "backbone_missing",
                  "backbone_a_file", "backbone_no_config", "backbone_hub_id_offline", "stats_missing", "stats_broken",
                  "stats_other_sensor_channels", "episodes_other_sensor_channels", "init_from_missing",
                  "init_from_no_weights", "resume_missing", "resume_not_a_checkpoint", "cache_dir_a_file",
                  "cache_dir_under_a_file"]


@pytest.mark.parametrize("case", BAD_PATH_CASES)
def test_bad_paths_are_one_line_before_anything_loads(case, tmp_path, train_data, capfd, in_process_group,
                                                      monkeypatch):
    """`vla-ds train` in this process: every bad path of --data, --backbone, --stats, --init-from,
    --resume, --cache-dir ends in exit code 2 and one line naming the flag, the path and the fix,
    before a process group starts or a run directory appears."""
    import torch.distributed as dist

    from vla_ds.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags, needles = _bad_paths(tmp_path, train_data)[case]
    # a flag given twice: the later wins, so each case's flags replace these good ones
    assert main(["train", "--data", str(train_data), "--backbone", str(_weightless_backbone(tmp_path)),
                 "--output-dir", str(tmp_path / "run"), *SMALL, *flags]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "resolved config" not in err and not dist.is_initialized()
    lines = [ln for ln in err.splitlines() if ln.startswith("vla-ds train:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "run").exists()


def test_the_launcher_entry_refuses_a_missing_data_dir_in_one_line(tmp_path):
    """`python -m vla_ds.train` (what torchrun and deepspeed start on every rank), as a process:
    --data /nonexistent is exit code 2 and one line, no traceback, before any weights or group."""
    proc = subprocess.run([sys.executable, "-m", "vla_ds.train", "--mode", "train", "--data", "/nonexistent",
                           "--output-dir", str(tmp_path / "run"), "--wandb-mode", "disabled"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "resolved config" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("vla-ds train:")]
    assert len(lines) == 1 and lines[0].startswith("vla-ds train: --data /nonexistent: no such file or directory")
    assert not (tmp_path / "run").exists()

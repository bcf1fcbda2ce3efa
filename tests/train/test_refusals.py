"""Every combination that cannot work is refused in one line before any model loads."""
from __future__ import annotations

import json
import time

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


def test_refusal_happens_before_the_model_loads(tmp_path, train_data, repo_root, capfd, in_process_group):
    """8-bit + zero3_offload through the training entry (`python -m vla_ds.train`, in this process):
    exit code 2, one line, in seconds, no run dir, no process group."""
    import torch.distributed as dist

    from vla_ds.cli.train import launcher_main

    t0 = time.perf_counter()
    rc = launcher_main(["--mode", "train", "--data", str(train_data), "--backbone", str(tmp_path / "no-such-backbone"),
                        "--output-dir", str(tmp_path / "run"), "--load-in-8bit",
                        "--ds-config", str(repo_root / "ds_configs/zero3_offload.json"), *SMALL])
    err = capfd.readouterr().err
    assert rc == 2 and not dist.is_initialized()
    lines = [ln for ln in err.splitlines() if ln.strip()]
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

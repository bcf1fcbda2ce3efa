"""Real DeepSpeed training on 2 CPU processes with the tiny backbone: ZeRO-2/3 x finetune modes x
sensor/fusion, loss falling on a learnable synthetic task, per-group learning rates."""
from __future__ import annotations

import pytest

from tests.train.conftest import SMALL, losses, run_training

pytestmark = pytest.mark.slow

FAST_LR = ["--lr", "3e-3", "--sensor-lr", "3e-3", "--vl-lr", "1e-3", "--vision-lr", "1e-3", "--warmup-ratio", "0.1",
           "--hold-ratio", "0.0", "--min-lr", "3e-4"]


def _train(tmp_path, train_data, tiny_model_dir, *extra, steps=40):
    out = tmp_path / "run"
    args = ["--data", str(train_data), "--backbone", str(tiny_model_dir), "--output-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "2", "--grad-accum-steps", "1", "--log-every", "1",
            "--val-ratio", "0", "--head-dropout", "0", "--views", "View1", "View5", *FAST_LR, *SMALL, *extra]
    return run_training(args)


def _assert_learns(rows):
    l = losses(rows)
    assert len(l) >= 30
    first, last = sum(l[:5]) / 5, sum(l[-5:]) / 5
    assert last < 0.5 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"


CASES = {
    "zero2-lora-sensor-concat": ("zero2", ["--finetune-vl", "lora", "--sensor-enabled", "--fusion-strategy", "concat"]),
    "zero3-lora-sensor-cross_attention": ("zero3", ["--finetune-vl", "lora", "--sensor-enabled", "--fusion-strategy", "cross_attention"]),
    "zero2-lora8bit-sensor-gated": ("zero2", ["--finetune-vl", "lora", "--load-in-8bit", "--sensor-enabled", "--fusion-strategy", "gated"]),
    "zero3-full-nosensor": ("zero3", ["--finetune-vl", "full", "--vision-lr", "0"]),
    "zero2-full-vision-sensor-concat": ("zero2", ["--finetune-vl", "full", "--sensor-enabled"]),
    "zero3-none-sensor-gated": ("zero3", ["--finetune-vl", "none", "--sensor-enabled", "--fusion-strategy", "gated", "--cache-policy", "off"]),
    "zero2-none-nosensor": ("zero2", ["--finetune-vl", "none", "--cache-policy", "off"]),
    # the presets docs/training.md recommends for a full finetune on one GPU and for the largest runs:
    # DeepSpeedCPUAdam on offloaded optimizer state (and parameters)
    "zero2_offload-full-sensor-concat": ("zero2_offload", ["--finetune-vl", "full", "--sensor-enabled", "--vision-lr", "0"]),
    "zero3_offload-lora-nosensor": ("zero3_offload", ["--finetune-vl", "lora"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_falls(case, tmp_path, learn_data, tiny_model_dir, repo_root):
    preset, extra = CASES[case]
    proc, rows = _train(tmp_path, learn_data, tiny_model_dir, "--ds-config", str(repo_root / f"ds_configs/{preset}.json"), *extra)
    _assert_learns(rows)
    assert (tmp_path / "run" / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()
    last = [r for r in rows if "train/loss_step" in r][-1]
    assert last["train/lr"] == pytest.approx(3e-4)  # decayed to --min-lr
    groups = {k: v for k, v in last.items() if k.startswith("lr/")}
    if "--sensor-enabled" in extra:
        assert groups["lr/sensor"] == pytest.approx(3e-4)  # 3e-3 x (3e-4 / 3e-3)
    if extra[1] in ("lora", "full"):
        assert groups["lr/vl"] == pytest.approx(1e-4)  # 1e-3 x 0.1: every group on the same curve
    else:
        assert "lr/vl" not in groups
    if case == "zero2-full-vision-sensor-concat":
        assert groups["lr/vision"] == pytest.approx(1e-4)
    if extra[1] == "lora":
        assert "lora/avg_weight_abs" in last
    params = [r for r in rows if "params/trainable_M" in r][0]
    assert params["params/trainable_M"] > 0 and params["params/frozen_M"] > 0

"""DeepSpeed does what the batch arithmetic says: 1 process x micro 4 == 2 processes x micro 2, and
micro 1 x accum 4 == micro 4 x accum 1 (fp32, CPU, dropout off).

Adam divides by sqrt(v) + eps, so a gradient that is zero in exact arithmetic (the key bias of an
attention layer: softmax ignores a constant shift) but 1e-12 of rounding noise in practice becomes
a full +-lr step whose sign is noise. The runs here use eps = 1e-3 (a copy of zero2.json) so that
only real gradients move weights and the comparison is tight.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.train.conftest import SMALL, run_training

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--head-dropout", "0", "--lora-dropout", "0", "--val-ratio", "0", "--max-steps", "4",
                 "--lr", "1e-3", "--sensor-lr", "1e-3", "--vl-lr", "1e-3", "--sensor-enabled", "--finetune-vl", "lora",
                 "--grad-clip", "0"]


def _weights(out):
    return load_file(str(out / "checkpoints" / "final" / "policy" / "model.safetensors"))


@pytest.fixture
def ds_config(tmp_path, repo_root):
    cfg = json.loads((repo_root / "ds_configs" / "zero2.json").read_text())
    cfg["optimizer"]["params"]["eps"] = 1e-3
    path = tmp_path / "zero2_eps.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _run(tmp_path, name, train_data, tiny_model_dir, nproc, micro, accum, ds_config, *extra):
    out = tmp_path / name
    _, rows = run_training(["--data", str(train_data), "--backbone", str(tiny_model_dir), "--output-dir", str(out),
                            "--batch-size", str(micro), "--grad-accum-steps", str(accum), "--log-every", "1",
                            "--ds-config", ds_config, *DETERMINISTIC, *SMALL, *extra], nproc=nproc)
    return _weights(out), [r["train/loss_step"] for r in rows if "train/loss_step" in r]


def _assert_same(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < atol, f"max weight difference {worst:.2e}"


def test_data_parallel_equals_bigger_micro_batch(tmp_path, train_data, tiny_model_dir, ds_config):
    one, l1 = _run(tmp_path, "one", train_data, tiny_model_dir, 1, 4, 1, ds_config)
    two, l2 = _run(tmp_path, "two", train_data, tiny_model_dir, 2, 2, 1, ds_config)
    assert l1 == pytest.approx(l2, rel=1e-5) and len(l1) == 4
    _assert_same(one, two, atol=1e-5)


def test_accumulation_equals_bigger_micro_batch(tmp_path, train_data, tiny_model_dir, ds_config):
    accum, la = _run(tmp_path, "accum", train_data, tiny_model_dir, 1, 1, 4, ds_config)
    micro, lm = _run(tmp_path, "micro", train_data, tiny_model_dir, 1, 4, 1, ds_config)
    assert la == pytest.approx(lm, rel=1e-5)
    _assert_same(accum, micro, atol=1e-5)
    # training moved the weights: with a smaller lr they end elsewhere (were they untouched, both
    # runs would equal the seeded initialisation and the comparison above would prove nothing)
    slow, _ = _run(tmp_path, "slow", train_data, tiny_model_dir, 1, 4, 1, ds_config, "--lr", "1e-5")
    assert max((slow[k] - micro[k]).abs().max().item() for k in micro) > 1e-4

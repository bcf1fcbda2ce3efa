"""One typed config: old trainer flags and defaults, YAML + flag precedence, validation, ds configs."""
from __future__ import annotations

import json

import pytest
import torch

from vla_ds.cli.train import build_launcher_parser
from vla_ds.config import TrainConfig, config_from_args, field_owners, load_yaml, save_config
from vla_ds.errors import UsageError
from vla_ds.train.ds_config import load_ds_config, resolve_ds_config

OLD_DEFAULTS = {
    "lr": 1e-4, "min_lr": 1e-6, "warmup_ratio": 0.03, "hold_ratio": 0.02, "grad_accum_steps": 8, "sched_on": "step",
    "batch_size": 1, "num_workers": 4, "finetune_vl": "lora", "vl_lr": 1e-5, "vision_lr": 5e-6, "lora_r": 16,
    "lora_alpha": 32, "lora_dropout": 0.05, "unfreeze_last_n": 2, "sensor_enabled": False,
    "sensor_input_channels": 1026, "sensor_temporal_length": 650, "sensor_output_dim": 3072,
    "fusion_strategy": "concat", "sensor_lr": 5e-4, "sensor_loss_weight": 2.0,
}


def _parse(argv):
    return config_from_args(build_launcher_parser().parse_args(argv))


def test_old_trainer_command_line_parses_with_old_defaults():
    cfg = _parse(["--mode", "train", "--data", "d", "--local_rank=0"])
    flat = cfg.flat()
    for k, v in OLD_DEFAULTS.items():
        assert flat[k] == v, k
    cfg = _parse(["--mode", "train", "--data", "d", "--sensor-enabled", "--fusion-strategy", "gated",
                  "--sensor-loss-weight", "5", "--deepspeed_config", "ds_configs/zero3.json", "--loss", "l1"])
    assert cfg.model.sensor_enabled and cfg.model.fusion_strategy == "gated"
    assert cfg.run.ds_config == "ds_configs/zero3.json" and cfg.model.action_loss == "l1"


def test_mode_is_required_like_the_old_trainer(capsys):
    with pytest.raises(SystemExit):
        build_launcher_parser().parse_args(["--data", "d"])
    assert "--mode" in capsys.readouterr().err


def test_yaml_then_flags_override(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("model:\n  finetune_vl: none\n  lora_r: 8\noptim:\n  lr: 0.002\nbatch-size: 4\ndata: [a, b]\n")
    cfg = _parse(["--mode", "train", "--config", str(y), "--lr", "0.003"])
    assert cfg.model.finetune_vl == "none" and cfg.model.lora_r == 8 and cfg.data.batch_size == 4
    assert cfg.optim.lr == 0.003 and cfg.data.data == ["a", "b"]
    # the saved config reads back to the same settings
    save_config(cfg, tmp_path / "saved.yaml")
    assert TrainConfig.from_flat(load_yaml(tmp_path / "saved.yaml")) == cfg
    y.write_text("lr: 0.1\ntypo_setting: 3\n")
    with pytest.raises(ValueError, match="typo_setting"):
        _parse(["--mode", "train", "--data", "d", "--config", str(y)])


def test_yaml_values_take_the_fields_types(tmp_path):
    # PyYAML reads 1e-4 as a string (YAML 1.1 floats need a dot) and `views: View1` as a scalar
    y = tmp_path / "run.yaml"
    y.write_text("lr: 1e-4\nmodel:\n  head_dropout: 1e-1\n  lora_r: 8.0\nviews: View1\nsensor_enabled: 'yes'\n"
                 "max_steps: '20'\n")
    cfg = _parse(["--mode", "train", "--data", "d", "--config", str(y)])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.head_dropout == 0.1 and cfg.model.lora_r == 8 and isinstance(cfg.model.lora_r, int)
    assert cfg.data.views == ["View1"] and cfg.model.sensor_enabled is True and cfg.optim.max_steps == 20
    for text, match in [("lr: fast\n", r"lr: 'fast' is not a number"), ("lora_r: 8.5\n", r"lora_r: 8.5 is not a number \(an integer\)"),
                        ("sensor_enabled: maybe\n", r"sensor_enabled: 'maybe' is not a bool"),
                        ("batch_size: true\n", r"batch_size: True is not a number")]:
        y.write_text(text)
        with pytest.raises(UsageError, match=rf"--config {y}: {match}"):
            from vla_ds.config import resolve_config

            resolve_config(build_launcher_parser().parse_args(["--mode", "train", "--config", str(y)]))


def test_field_names_are_unique_and_validation_names_the_flag():
    assert len(field_owners()) > 40
    with pytest.raises(ValueError, match="--warmup-ratio"):
        _parse(["--mode", "train", "--data", "d", "--warmup-ratio", "0.9", "--hold-ratio", "0.5"])
    with pytest.raises(ValueError, match="--load-in-8bit requires --finetune-vl lora"):
        _parse(["--mode", "train", "--data", "d", "--load-in-8bit", "--finetune-vl", "full"])
    with pytest.raises(ValueError, match="--data is required"):
        _parse(["--mode", "train"])
    # --vision-lr > 0 in full mode trains the vision tower's last blocks
    assert _parse(["--mode", "train", "--data", "d", "--finetune-vl", "full"]).model.train_vision_blocks == 2
    assert _parse(["--mode", "train", "--data", "d", "--finetune-vl", "full", "--vision-lr", "0"]).model.train_vision_blocks == 0


@pytest.mark.parametrize("name", ["zero2", "zero2_offload", "zero3", "zero3_offload"])
def test_presets_resolve_every_auto(repo_root, name):
    raw = load_ds_config(repo_root / "ds_configs" / f"{name}.json")
    cfg = resolve_ds_config(raw, micro_batch=2, grad_accum=4, world_size=3, grad_clip=1.0, lr=1e-4,
                            weight_decay=0.01, hidden_size=64, bf16=False)
    assert cfg["train_batch_size"] == 24 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] is False and cfg["optimizer"]["params"]["lr"] == 1e-4
    assert "auto" not in json.dumps(cfg)
    assert raw["train_batch_size"] == "auto", "the loaded file is not modified"


def test_ds_config_errors(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_batch_size": 16, "zero_optimisation": {"stage": 2}}))
    with pytest.raises(UsageError, match="zero_optimisation"):
        load_ds_config(p)
    with pytest.raises(UsageError, match="no such file"):
        load_ds_config(tmp_path / "missing.json")
    p.write_text(json.dumps({"train_batch_size": 16, "_launch": "deepspeed ...", "zero_optimization": {"stage": 2}}))
    raw = load_ds_config(p)
    assert "_launch" not in raw
    with pytest.raises(UsageError, match="micro batch 1 x accumulation 8 x world size 2 = 16") as e:
        resolve_ds_config({"train_batch_size": 32}, micro_batch=1, grad_accum=8, world_size=2, grad_clip=1,
                          lr=1e-4, weight_decay=0.0)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="--grad-accum-steps"):
        resolve_ds_config({"gradient_accumulation_steps": 2}, micro_batch=1, grad_accum=8, world_size=1,
                          grad_clip=1, lr=1e-4, weight_decay=0.0)


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero2_offload"])
def test_on_cpu_a_device_optimizer_is_torchs_adamw(repo_root, name):
    """On CPU DeepSpeed's FusedAdam is a C++ op compiled at first use; torch's AdamW is the same update.
    An offloaded optimizer keeps DeepSpeedCPUAdam (ZeRO-Offload refuses others), a GPU keeps FusedAdam,
    and a file that chooses keeps its choice."""
    raw = load_ds_config(repo_root / "ds_configs" / f"{name}.json")
    kw = dict(micro_batch=1, grad_accum=1, world_size=1, grad_clip=1.0, lr=1e-4, weight_decay=0.0, hidden_size=8,
              bf16=False)
    on_cpu = resolve_ds_config(raw, on_cpu=True, **kw)["optimizer"]["params"]
    assert on_cpu.get("torch_adam") is (None if "offload" in name else True)
    assert "torch_adam" not in resolve_ds_config(raw, on_cpu=False, **kw)["optimizer"]["params"]
    raw["optimizer"]["params"]["torch_adam"] = False
    assert resolve_ds_config(raw, on_cpu=True, **kw)["optimizer"]["params"]["torch_adam"] is False


def test_a_cpu_engine_steps_with_torchs_adamw(repo_root, in_process_group):
    import deepspeed

    from vla_ds.utils.dist import init_distributed, process_group_cleanup

    cfg = resolve_ds_config(load_ds_config(repo_root / "ds_configs" / "zero2.json"), micro_batch=2, grad_accum=1,
                            world_size=1, grad_clip=1.0, lr=1e-2, weight_decay=0.0, hidden_size=8)
    with process_group_cleanup():
        init_distributed()
        model = torch.nn.Linear(8, 1)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
        assert type(optimizer.optimizer) is torch.optim.AdamW
        before = model.weight.detach().clone()
        engine.backward(engine(torch.ones(2, 8)).pow(2).mean())
        engine.step()
        assert not torch.equal(before, model.weight.detach())


@pytest.mark.parametrize("world, micro, accum", [(1, 2, 8), (2, 2, 4), (4, 4, 1), (8, 1, 2)])
def test_the_global_batch_size_sets_the_accumulation_for_the_world_size(world, micro, accum):
    from vla_ds.config import with_world

    cfg = TrainConfig.from_flat({"data": ["d"], "batch_size": micro, "global_batch_size": 16, "grad_accum_steps": 3})
    got = with_world(cfg, world)
    assert got.optim.grad_accum_steps == accum and world * micro * accum == 16
    assert with_world(TrainConfig.from_flat({"data": ["d"], "grad_accum_steps": 3}), world).optim.grad_accum_steps == 3


def test_a_global_batch_size_that_does_not_divide_is_one_line():
    from vla_ds.config import with_world

    cfg = TrainConfig.from_flat({"data": ["d"], "batch_size": 2, "global_batch_size": 12})
    with pytest.raises(UsageError, match=r"--global-batch-size 12 is not a multiple of 4 process\(es\) x --batch-size 2 = 8"):
        with_world(cfg, 4)
    with pytest.raises(ValueError, match="--global-batch-size must be >= 1"):
        TrainConfig.from_flat({"data": ["d"], "global_batch_size": 0})

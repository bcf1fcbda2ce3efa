"""`vla-ds profile` on the tiny backbone, 2 CPU processes, real DeepSpeed: the measured numbers are
sane and consistent, and `vla-ds plan`'s model-state estimate agrees with them."""
from __future__ import annotations

import json
import logging

import pytest

from tests.helpers.runs import SMALL

PRESETS = ("zero2", "zero3", "zero2_offload", "zero3_offload")
PHASES = ("model_load", "engine_init", "forward", "backward", "optimizer_step")


def shared_profiles(ctx) -> dict:
    """One profile per preset, in the session's shared launch (tests/helpers/shared.py): full
    finetune (every tiny LM block trains), micro-batch 2, fp32 (`python -m vla_ds.profiling` as a
    process of its own: test_the_profiling_entry)."""
    if not ctx.uses("profiles"):
        return {}
    root = ctx.root("profiles")
    return {preset: _args(root / preset, ctx.fixture("train_data"), ctx.fixture("tiny_model_dir"), preset)
            for preset in PRESETS}


@pytest.fixture(scope="module")
def profiles(shared) -> dict[str, dict]:
    out = {}
    for preset in PRESETS:
        run = shared.run(__name__, preset)
        result = json.loads((run.dir / "profile.json").read_text())
        result["_dir"] = run.dir
        result["_log"] = run.log
        out[preset] = result
    return out


def _args(out, train_data, tiny_model_dir, preset: str) -> list[str]:
    # zero2_offload is the preset one proves fits a 24 GiB card with; on CPU there is nothing to cap
    limit = ["--gpu-mem-limit", "24"] if preset == "zero2_offload" else []
    return ["--data", str(train_data), "--backbone", str(tiny_model_dir), "--finetune-vl", "full", "--batch-size", "2",
            "--grad-accum-steps", "1", "--ds-config", preset, "--output-dir", str(out), "--steps", "2",
            "--warmup-steps", "1", *limit, *SMALL]


def test_the_profiling_entry(tmp_path, train_data, tiny_model_dir, in_process_group, caplog):
    """`python -m vla_ds.profiling` (what launch/profile_memory.sh runs) as a process of one, here."""
    from vla_ds.cli.profile import main

    out = tmp_path / "profile"
    with caplog.at_level(logging.INFO):
        assert main([*_args(out, train_data, tiny_model_dir, "zero2"), "--steps", "1", "--warmup-steps", "0"]) == 0
    result = json.loads((out / "profile.json").read_text())
    assert result["status"] == "ok" and result["world_size"] == 1 and len(result["step_seconds"]) == 1
    assert (out / "profile.md").is_file() and (out / "profile.png").is_file()
    assert f"samples/s; report: {out}/profile." in caplog.text, "the entry's closing line"


def states(result: dict, kind: str, place: str, rank: int = 0) -> int:
    return result["ranks"][rank]["model_states"][kind][place]


def test_reports_are_written_and_sane(profiles):
    for preset, r in profiles.items():
        assert r["status"] == "ok" and r["world_size"] == 2 and r["memory_source"] == "process_rss"
        assert r["zero_stage"] == (3 if "zero3" in preset else 2)
        assert [x["rank"] for x in r["ranks"]] == [0, 1]
        for rank in r["ranks"]:
            assert set(PHASES) <= set(rank["phases"]), rank["phases"].keys()
            for phase in PHASES:
                # a peak is at least what the process held before the run started
                assert rank["phases"][phase]["rss"] >= rank["baseline"]["rss"] * 0.5 > 0
            assert rank["activations"] >= 0
        assert r["summary"]["samples_per_s"] > 0
        assert len(r["step_seconds"]) == 3
        # the two ranks hold the same share of a data-parallel model (ZeRO partitions are equal)
        for kind in ("parameters", "optimizer_states"):
            a = sum(states(r, kind, p, 0) for p in ("accelerator", "host"))
            b = sum(states(r, kind, p, 1) for p in ("accelerator", "host"))
            assert a == pytest.approx(b, rel=0.1), (preset, kind)
        row = (r["_dir"] / "profile.md").read_text().splitlines()
        assert row[0].startswith("| run |") and row[2].startswith(f"| {preset} | full | {preset} | 2 | 2 | fp32 |")
        assert (r["_dir"] / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_zero3_partitions_parameters(profiles):
    z2 = states(profiles["zero2"], "parameters", "accelerator")
    z3 = states(profiles["zero3"], "parameters", "accelerator")
    # two ranks: each holds half of every parameter, plus the few small ones ZeRO-3 keeps whole
    assert z3 < 0.6 * z2
    assert z3 > 0.45 * z2


def test_offload_moves_optimizer_state_off_the_accelerator(profiles):
    on = profiles["zero2"]
    off = profiles["zero2_offload"]
    assert states(on, "optimizer_states", "accelerator") > 0 and states(on, "optimizer_states", "host") == 0
    assert states(off, "optimizer_states", "accelerator") == 0
    # the same fp32 masters + Adam moments, now on the host; torch's AdamW (a CPU run that does not
    # offload) also holds each flat group's step as a 4-byte tensor, DeepSpeedCPUAdam a Python int
    extra = states(on, "optimizer_states", "accelerator") - states(off, "optimizer_states", "host")
    assert 0 <= extra <= 4 * 16 and extra % 4 == 0, extra
    # parameter offload (zero3_offload) moves the parameter partitions too
    z3, z3off = profiles["zero3"], profiles["zero3_offload"]
    assert states(z3off, "parameters", "host") > 0
    assert states(z3off, "parameters", "accelerator") < 0.1 * states(z3, "parameters", "accelerator")


def test_planner_within_20_percent_of_measured_model_states(profiles, tiny_model_dir):
    from vla_ds.model.backbone import hidden_size, read_backbone_config
    from vla_ds.model.config import ModelConfig
    from vla_ds.profiling.activations import Workload
    from vla_ds.profiling.counts import count_parameters
    from vla_ds.profiling.plan import estimate, resolved_preset

    bb = read_backbone_config(tiny_model_dir)
    for preset, r in profiles.items():
        model_cfg = ModelConfig.from_dict(r["config"]["model"])
        counts = count_parameters(bb, model_cfg, 10 * hidden_size(bb))
        ds = resolved_preset(preset, hidden_size(bb), 2, 2, bf16=False)
        est = estimate(counts, bb, model_cfg, preset, ds, "full", 2, 2, 4, Workload())
        measured = sum(states(r, k, p) for k in ("parameters", "gradients", "optimizer_states")
                       for p in ("accelerator", "host"))
        planned = est.model_states + est.host
        assert planned == pytest.approx(measured, rel=0.2), (preset, planned, measured)
        accel = sum(states(r, k, "accelerator") for k in ("parameters", "gradients", "optimizer_states"))
        assert est.model_states == pytest.approx(accel, rel=0.2), (preset, est, accel)


def test_gpu_mem_limit_on_cpu_says_it_caps_nothing(profiles):
    capped, plain = profiles["zero2_offload"], profiles["zero2"]
    assert capped["gpu_mem_limit_gib"] == 24 and capped["fits"] is None  # no fit claimed from an uncapped RSS
    assert "on CPU nothing is capped" in capped["_log"]
    assert plain["gpu_mem_limit_gib"] is None and plain["fits"] is None and "nothing is capped" not in plain["_log"]

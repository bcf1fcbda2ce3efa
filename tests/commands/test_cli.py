"""The `vla-ds` entry point: installed console script, subcommands, one-line errors."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pytest

from vla_ds.cli import SUBCOMMANDS, build_parser, main


def test_console_script_lists_subcommands():
    exe = shutil.which("vla-ds", path=os.path.dirname(sys.executable)) or shutil.which("vla-ds")
    assert exe, "the vla-ds console script is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("module", ["vla_ds", "vla_ds.cli"])
def test_python_dash_m_is_the_same_command(module):
    """`python -m vla_ds` (also what `torchrun -m vla_ds train ...` runs) and `python -m vla_ds.cli`."""
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert out.startswith("usage: vla-ds ") and all(name in out for name in SUBCOMMANDS)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_help_shows_defaults(name, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([name, "--help"])
    assert e.value.code == 0
    assert "(default:" in capsys.readouterr().out


def test_tiny_model_command_writes_a_loadable_directory(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    assert main(["tiny-model", str(tmp_path / "m"), "--seed", "3"]) == 0
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert model.config.text_config.hidden_size == 64


def test_tiny_model_refuses_a_file_path_in_one_line(tmp_path, capfd):
    target = tmp_path / "weights.bin"
    target.write_text("not a directory")
    assert main(["tiny-model", str(target)]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "OUT_DIR" in err[0] and str(target) in err[0]
    assert "Traceback" not in err[0]
    assert target.read_text() == "not a directory"


def test_tiny_model_refuses_to_replace_an_unrelated_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    assert main(["tiny-model", str(tmp_path)]) == 2
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        # 16 steps a stage instead of 40, the fewest that still kill at 15 and resume: every stage,
        # in 40 % of the training time
        assert main(["demo", "--out", str(tmp_path / "demo"), "--train-steps", "16"]) == 0
    demo = tmp_path / "demo"
    assert (demo / "backbone" / "model.safetensors").is_file()
    assert (demo / "dataset" / "stats.json").is_file() and (demo / "vl_cache").is_dir()
    for run in ("run_lora", "run_cached_head"):
        assert (demo / run / "checkpoints" / "final" / "policy" / "model.safetensors").exists()
        assert (demo / run / "curves.png").is_file()
    assert (demo / "converted" / "policy" / "config.json").is_file()
    # killed at step 15: it resumes from the last checkpoint before (--save-every 10, or a later epoch
    # end; where epochs end depends on the episode split, which hashes the recordings' paths)
    latest = int(re.search(r"killed \(exit -?\d+\); checkpoints/latest -> step_(\d+)", caplog.text).group(1))
    assert 10 <= latest < 15 and f"resumed from step {latest} and finished" in caplog.text
    assert "predicted step 1" in caplog.text
    # it ends with an eval of the head with and without the sensor, and their comparison
    for run in ("run_cached_head", "run_cached_head_nosensor"):
        report = json.loads(next((demo / run / "eval").glob("*/eval.json")).read_text())
        assert report["episodes"] == "val" and report["vl_source"].startswith("VL cache")
    compared = json.loads((demo / "compare" / "compare.json").read_text())
    assert compared["comparable"] and "sensor_enabled" in compared["columns"]
    assert f"report {demo / 'compare' / 'compare.md'}" in caplog.text
    assert "demo finished" in caplog.text

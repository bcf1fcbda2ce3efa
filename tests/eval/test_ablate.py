"""`vla-ds ablate` on the tiny backbone: the grid trained, evaluated and compared, a cell that
repeats another skipped, nothing redone when run again, bad grids refused before any training."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from tests.helpers.runs import SMALL
from vla_ds.cli import main
from vla_ds.errors import UsageError
from vla_ds.eval.ablate import AblateArgs, ablate, parse_vary

pytestmark = pytest.mark.slow


def _base(tmp_path, train_data, tiny_model_dir):
    flags = dict(zip(SMALL[::2], SMALL[1::2]))
    base = {"data": [str(train_data)], "backbone": str(tiny_model_dir), "views": ["View1", "View5"], "max_steps": 3,
            "batch_size": 2, "grad_accum_steps": 1, "val_ratio": 0.5, "finetune_vl": "none", "cache_policy": "off",
            "save_every": 0, **{k[2:].replace("-", "_"): v for k, v in flags.items()}}
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_the_grid_is_trained_evaluated_compared_and_not_redone(tmp_path, train_data, tiny_model_dir):
    base = _base(tmp_path, train_data, tiny_model_dir)
    out = tmp_path / "abl"
    argv = ["ablate", "--config", str(base), "--vary", "sensor_enabled=false,true", "--vary",
            "fusion_strategy=concat,gated", "--output-dir", str(out)]
    assert main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    names = [c["name"] for c in plan["cells"]]
    assert len(names) == 4
    repeated = {c["name"]: c["same_as"] for c in plan["cells"] if c["same_as"]}
    assert repeated == {"sensor_enabled-False__fusion_strategy-gated": "sensor_enabled-False__fusion_strategy-concat"}
    trained = [n for n in names if n not in repeated]
    for name in trained:
        assert (out / name / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()
        assert list((out / name / "eval").glob("*/eval.json"))
    assert not (out / "sensor_enabled-False__fusion_strategy-gated").exists()
    result = json.loads((out / "compare" / "compare.json").read_text())
    assert sorted(r["label"] for r in result["rows"]) == sorted(trained) and result["comparable"]
    assert {"sensor_enabled", "fusion_strategy"} <= set(result["columns"])
    assert (out / "compare" / "compare.png").stat().st_size > 5000

    # run again: nothing is trained or evaluated again; a missing eval is redone alone
    finals = {n: (out / n / "checkpoints" / "final" / "policy" / "model.safetensors").stat().st_mtime_ns
              for n in trained}
    evals = {n: next((out / n / "eval").glob("*/eval.json")) for n in trained}
    kept = {n: p.stat().st_mtime_ns for n, p in evals.items()}
    redo = trained[0]
    shutil.rmtree(evals[redo].parent)  # the user removes one eval to have it redone
    again = ablate(AblateArgs(config=str(base), vary=[argv[4], argv[6]], output_dir=str(out)))
    assert not again["failed"] and len(again["rows"]) == 3
    for n in trained:
        assert (out / n / "checkpoints" / "final" / "policy" / "model.safetensors").stat().st_mtime_ns == finals[n]
        if n != redo:
            assert evals[n].stat().st_mtime_ns == kept[n]
    assert evals[redo].is_file()


def test_bad_grids_are_refused_before_anything_trains(tmp_path, train_data, tiny_model_dir):
    base = _base(tmp_path, train_data, tiny_model_dir)
    with pytest.raises(UsageError, match=r"no setting fusion_strategi \(did you mean fusion_strategy\?\)"):
        parse_vary(["fusion_strategi=concat"])
    with pytest.raises(UsageError, match="sensor_loss_weight.*not a number"):
        parse_vary(["sensor_loss_weight=1.0,heavy"])
    with pytest.raises(UsageError, match="write KEY=V1,V2"):
        parse_vary(["fusion_strategy"])
    with pytest.raises(UsageError, match="--vary cell sensor_enabled-True__fusion_strategy-none: ") as e:
        ablate(AblateArgs(config=str(base), vary=["sensor_enabled=true", "fusion_strategy=concat,none"],
                          output_dir=str(tmp_path / "abl")))
    assert "\n" not in str(e.value)
    assert not list((tmp_path / "abl").glob("*/checkpoints"))

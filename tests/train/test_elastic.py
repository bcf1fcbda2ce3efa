"""Resuming on another number of processes (vla_ds/train/elastic.py), for real, under ZeRO-2 and
ZeRO-3: 2 processes -> 1 and 1 -> 2, from the step-2 checkpoint of an uninterrupted run, with
--global-batch-size fixed. The resumed run continues the other world size's losses and learning
rate (the optimizer moments came along: a lost moment or step count moves the next update), and
covers the rest of the epoch exactly as the uninterrupted run did: each remaining sample once
(RUN/samples/, VLA_DS_TRACE_SAMPLES)."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from tests.helpers.runs import SMALL, metrics_rows, run_many
from vla_ds.cli import main

pytestmark = pytest.mark.slow

STAGES = (2, 3)
# one epoch of the 29 training samples at a global batch of 4 (7 steps), a checkpoint at step 2
COMMON = ["--batch-size", "2", "--global-batch-size", "4", "--log-every", "1", "--val-ratio", "0", "--max-steps", "7",
          "--save-every", "2", "--keep-last", "0", "--head-dropout", "0", "--lora-dropout", "0", "--sensor-enabled",
          "--finetune-vl", "lora", "--lr", "2e-3", "--sensor-lr", "2e-3", "--vl-lr", "1e-3", "--wandb-mode",
          "disabled", *SMALL]
TRACE = {"VLA_DS_TRACE_SAMPLES": "1"}


def _eps_config(repo_root, root, stage):
    """The preset with Adam eps 1e-3 (tests/train/test_equivalence.py says why: zero-gradient biases)."""
    cfg = json.loads((repo_root / "ds_configs" / f"zero{stage}.json").read_text())
    cfg["optimizer"]["params"]["eps"] = 1e-3
    path = root / f"zero{stage}_eps.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_data, tiny_model_dir, repo_root) -> dict:
    """{(stage, world): uninterrupted run dir, (stage, "from", world): its resume on the other world}."""
    root = tmp_path_factory.mktemp("elastic")
    ds = {stage: _eps_config(repo_root, root, stage) for stage in STAGES}

    def train(out, stage, *extra):
        return ["train", "--data", str(train_data), "--backbone", str(tiny_model_dir), "--output-dir", str(root / out),
                "--ds-config", ds[stage], *COMMON, *extra]

    out = {}
    # the 2-process runs, then on 1 process their resumes and the 1-process runs, then the latter's resumes on 2
    run_many([train(f"two_z{s}", s) for s in STAGES], root / "a.json", nproc=2, env=TRACE)
    out.update({(s, 2): root / f"two_z{s}" for s in STAGES})
    step = "checkpoints/step_000002"
    run_many([*(train(f"two_to_one_z{s}", s, "--resume", str(out[s, 2] / step)) for s in STAGES),
              *(train(f"one_z{s}", s) for s in STAGES)], root / "b.json", nproc=1, env=TRACE)
    out.update({(s, 1): root / f"one_z{s}" for s in STAGES})
    out.update({(s, "from", 2): root / f"two_to_one_z{s}" for s in STAGES})
    # ZeRO-3's 1 -> 2 resume reads a universal checkpoint made ahead of time by `vla-ds convert --universal`
    assert main(["convert", str(out[3, 1] / step), "--universal"]) == 0
    run_many([train(f"one_to_two_z{s}", s, "--resume", str(out[s, 1] / step)) for s in STAGES], root / "c.json",
             nproc=2, env=TRACE)
    out.update({(s, "from", 1): root / f"one_to_two_z{s}" for s in STAGES})
    return out


def _by_step(run, key):
    return {r["step"]: r[key] for r in metrics_rows(run) if key in r}


def _samples(run) -> dict[int, list[str]]:
    """step -> every sample id of that optimizer step, over all ranks."""
    steps: dict[int, list[str]] = {}
    for f in sorted((run / "samples").glob("rank_*.jsonl")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            steps.setdefault(row["step"], []).extend(row["ids"])
    return steps


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("before", [2, 1], ids=["2-to-1", "1-to-2"])
def test_a_run_resumes_on_another_world_size_where_it_left_off(runs, stage, before, train_data):
    from vla_ds.data.dataset import IntegratedDataset

    source, resumed = runs[stage, before], runs[stage, "from", before]
    log = (resumed / "run.log").read_text() if (resumed / "run.log").exists() else ""
    after = 3 - before
    assert f"re-sharded a checkpoint of {before} process(es)" in log and f"onto {after}" in log, log[-2000:]
    assert "global batch changed" not in log
    # made on the resume's rank 0, or beforehand by `vla-ds convert --universal` (ZeRO-3, 1 -> 2)
    assert ("converting" in log) == (not (stage == 3 and before == 1)), log[-2000:]
    assert (source / "checkpoints" / "step_000002" / "universal" / "latest_universal").is_file()
    # the same schedule and, step by step, the same losses as the uninterrupted run on the other world size
    want, got = _by_step(source, "train/loss_step"), _by_step(resumed, "train/loss_step")
    assert sorted(got) == list(range(3, 8)), "the resumed run's own metrics start after the checkpoint"
    for s in range(3, 8):
        assert got[s] == pytest.approx(want[s], rel=2e-5), f"step {s}: {got[s]} vs {want[s]}"
    lr = _by_step(source, "train/lr")
    assert _by_step(resumed, "train/lr") == pytest.approx({s: lr[s] for s in range(3, 8)}, rel=1e-9)
    state = json.loads((resumed / "checkpoints" / "final" / "trainer_state.json").read_text())
    assert (state["step"], state["world_size"]) == (7, after)
    # the rest of the epoch: each remaining sample once, the steps the uninterrupted run made of it
    trained, seen = _samples(resumed), _samples(source)
    assert sorted(trained) == list(range(3, 8))
    for s in range(3, 8):
        assert Counter(trained[s]) == Counter(seen[s]), f"step {s}"
    epoch = [i for s in range(1, 8) for i in (seen if s < 3 else trained)[s]]
    everything = set(IntegratedDataset(train_data, load_images=False).sample_ids())
    # 29 samples: 7 whole steps of 4, the epoch's last draw is the tail every layout drops
    assert len(everything) == 29 and len(epoch) == len(set(epoch)) == 28 and set(epoch) < everything


def test_convert_universal_refuses_what_it_cannot_make(runs, tmp_path):
    step = runs[2, 2] / "checkpoints" / "step_000002"
    assert main(["convert", str(step), str(tmp_path / "out"), "--universal"]) == 2  # OUT_DIR: not with --universal
    assert main(["convert", str(step), "--universal", "--merge-lora"]) == 2
    assert main(["convert", str(step)]) == 2  # no OUT_DIR, no --universal
    assert main(["convert", str(step / "ds"), "--universal"]) == 0  # a step's ds/ is its step
    assert not (tmp_path / "out").exists()

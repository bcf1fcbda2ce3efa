"""The action heads and the robot state on the tasks they exist for, at the test's budget and longer
(tests/train/test_heads.py trains the short ones in CI): `vla-ds train` end to end, 1 process, ZeRO-2,
the frozen tiny backbone through a VL cache, the small heads of the tests.

- bimodal: the same picture, then +x (0.625 per frame) in half the episodes and -x in the other.
  Per head: K = 200 samples of the first observation; a sample "lands on a mode" when its x steps
  are within 30 % of that mode's step on average over the chunk.
- state: move down at 1 unit/s until z = 0, then stop, from 24 starting heights, every frame the
  same picture: the validation loss with --state-enabled and without (6 held-out episodes).

Writes the "heads" section of docs/model.md.

    .venv/bin/python -m tests.benchmarks.bench_heads [--long 1500]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.benchmarks.report import machine, publish
from tests.helpers.datasets import BIMODAL_STEP, make_bimodal_task, make_state_task
from tests.helpers.runs import SMALL, run_training

COMMON = ["--grad-accum-steps", "1", "--finetune-vl", "none", "--cache-policy", "require", "--head-dropout", "0",
          "--lr", "2e-3", "--warmup-ratio", "0.05", "--log-every", "50", "--save-every", "0", "--resume", "none",
          "--batch-size", "32", *SMALL]


def _cache(root: Path, data: Path, backbone: Path) -> None:
    from vla_ds.cache import build_cache
    from vla_ds.config import TrainConfig

    build_cache(TrainConfig.from_flat({"backbone": str(backbone), "finetune_vl": "none", "data": [str(data)],
                                       "num_workers": 0, "cache_dir": str(root / "vl_cache")}))


def _train(out: Path, data: Path, backbone: Path, steps: int, *extra: str) -> tuple[list[dict], float]:
    t = time.perf_counter()
    _, rows = run_training(["--data", str(data), "--backbone", str(backbone), "--output-dir", str(out),
                            "--max-steps", str(steps), *COMMON, *extra], nproc=1, timeout=3600)
    return rows, time.perf_counter() - t


def _modes(run: Path, data: Path, flow_steps: int | None) -> dict:
    from vla_ds.data.dataset import IntegratedDataset
    from vla_ds.model.policy import QwenVLA

    policy = QwenVLA.from_pretrained(run / "checkpoints" / "final" / "policy", device="cpu")
    item = IntegratedDataset(data, views=policy.views)[0]
    dx = policy.predict([item["instruction"]], [item["images"]], num_samples=200, flow_steps=flow_steps)[0, :, :, 0].numpy()
    plus = np.abs(dx - BIMODAL_STEP).mean(-1) / BIMODAL_STEP
    minus = np.abs(dx + BIMODAL_STEP).mean(-1) / BIMODAL_STEP
    hit = np.minimum(plus, minus) <= 0.3
    return {"hit": hit.mean(), "plus": (hit & (plus < minus)).mean(), "minus": (hit & (minus < plus)).mean(),
            "mean_dx": float(dx.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=600, help="flow steps of the test's budget (regression: a quarter)")
    ap.add_argument("--long", type=int, default=1500, help="the longer budget")
    args = ap.parse_args()
    from vla_ds.model.tiny import write_tiny_model

    lines = ["Measured by `tests/benchmarks/bench_heads.py` on " + machine() + ": `vla-ds train`, 1 process, ZeRO-2, "
             "the tiny backbone frozen behind a VL cache, heads of width 32 (the tests' sizes), batch 32, lr 2e-3.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        backbone = write_tiny_model(root / "backbone", seed=0)
        bimodal = make_bimodal_task(root / "bimodal")
        _cache(root / "bimodal", bimodal, backbone)
        lines += ["| head | optimizer steps | train s | samples on a mode (10 / 20 Euler steps) | on +x | on −x | "
                  "mean x step |", "|---|---:|---:|---:|---:|---:|---:|"]
        for head, steps in (("regression", args.short // 4), ("regression", args.long), ("flow", args.short),
                            ("flow", args.long)):
            run = root / "bimodal" / f"{head}_{steps}"
            _, secs = _train(run, bimodal, backbone, steps, "--val-ratio", "0", "--action-head", head)
            m10 = _modes(run, bimodal, None)
            m20 = _modes(run, bimodal, 20) if head == "flow" else m10
            lines.append(f"| {head} | {steps} | {secs:.0f} | {m10['hit']:.1%} / {m20['hit']:.1%} | {m10['plus']:.1%} | "
                         f"{m10['minus']:.1%} | {m10['mean_dx']:+.3f} (modes ±{BIMODAL_STEP}) |")
        state = make_state_task(root / "state", episodes=24)
        _cache(root / "state", state, backbone)
        lines += ["", "| robot state | optimizer steps | final val loss | with / without |", "|---|---:|---:|---:|"]
        for steps in (args.short // 4, args.long // 4):
            val = {}
            for name, extra in (("with", ["--state-enabled"]), ("without", [])):
                rows, _ = _train(root / "state" / f"{name}_{steps}", state, backbone, steps, "--val-ratio", "0.25", *extra)
                val[name] = [r["val/loss_epoch"] for r in rows if "val/loss_epoch" in r][-1]
            for name in ("with", "without"):
                ratio = f"{val['with'] / val['without']:.3f}" if name == "with" else ""
                lines.append(f"| {'--state-enabled' if name == 'with' else 'without'} | {steps} | {val[name]:.4f} | {ratio} |")
    publish("heads", lines, page="model.md")


if __name__ == "__main__":
    main()

"""`vla-ds demo`: the whole pipeline on made-up data, small enough for a laptop CPU (~2 minutes).

  1. the tiny Qwen2.5-VL backbone (`vla-ds tiny-model`)
  2. synthetic recordings in both input layouts (`vla_ds.data.synthetic`)
  3. ingest them into a vla-ds dataset (`vla-ds preprocess`)
  4. normalization statistics (`vla-ds stats`)
  5. the VL feature cache of the frozen backbone (`vla-ds cache`, checked with --verify)
  6. DeepSpeed ZeRO-2 on 2 CPU processes: LoRA + sensor, live backbone, balanced sampling
  7. the frozen-backbone head trained from the cache, killed with SIGKILL mid-run, then resumed
  8. `vla-ds convert` of the final checkpoint to plain safetensors + a policy directory
  9. `policy.predict` with the converted policy on recorded frames, next to the true actions
 10. the same head trained without the sensor; `vla-ds eval` of both on their validation episodes
 11. `vla-ds compare` of the two: with vs without the sensor, in robot units
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

# Small head: the demo shows the pipeline, not the model's capacity (CPU minutes, not hours).
DEMO_HEAD = [
    "--sensor-hidden-dim", "64", "--sensor-output-dim", "64", "--sensor-num-heads", "2", "--sensor-conv-blocks", "3",
    "--expert-hidden-dim", "64", "--expert-num-heads", "2", "--expert-num-layers", "2",
    "--num-workers", "0", "--wandb-mode", "disabled", "--views", "View1", "View5",
]
STAGES = 11


def make_recordings(root: Path, seed: int) -> list[Path]:
    """Two raw sessions with sensor (1 s and 0.5 s frames) and three frame-list sessions without."""
    from vla_ds.data import synthetic

    sessions = [
        synthetic.make_session_a(root / "needle_insertion", seed=seed, duration_s=6.0, frame_spacing_s=1.0),
        synthetic.make_session_a(root / "needle_insertion", seed=seed + 1, duration_s=4.0, frame_spacing_s=0.5),
    ]
    for k in range(3):
        sessions.append(synthetic.make_session_b(root / "retina_approach", seed=seed + 10 + k, duration_s=5.0))
    return sessions


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None):
    """`torchrun --nproc_per_node N -m vla_ds.train ARGS` on CPU, logged as the user would type it."""
    from vla_ds.utils.dist import torchrun as launch

    log.info("      torchrun --nproc_per_node %d -m vla_ds.train %s", nproc, " ".join(args))
    return launch("vla_ds.train", args, nproc=nproc, env=env)


def _losses(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss_step"] for r in rows if "train/loss_step" in r]
    val = [r["val/loss_epoch"] for r in rows if "val/loss_epoch" in r]
    return {"first_loss": losses[0], "last_loss": losses[-1], "val_loss": val[-1] if val else float("nan"),
            "steps": rows[-1]["step"]}


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"demo {what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


KILL_AT = 15  # the second training stage is SIGKILLed after this optimizer step, then resumed


def run_demo(out: str | Path, seed: int = 0, train_steps: int = 40) -> dict:
    """Run every demo stage under `out`; return where each artefact went."""
    from vla_ds.errors import UsageError

    if train_steps <= KILL_AT:
        raise UsageError(f"--train-steps {train_steps}: the demo kills its second run at step {KILL_AT} and resumes "
                         f"it, so give more than {KILL_AT} steps")
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.stats import compute_stats
    from vla_ds.data.summary import log_summary
    from vla_ds.model.tiny import write_tiny_model
    from vla_ds.train.plot import plot_run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    backbone, raw, dataset, cache = out / "backbone", out / "recordings", out / "dataset", out / "vl_cache"
    lora_run, head_run, converted = out / "run_lora", out / "run_cached_head", out / "converted"

    log.info("[1/%d] tiny Qwen2.5-VL backbone -> %s", STAGES, backbone)
    write_tiny_model(backbone, seed=seed)

    log.info("[2/%d] synthetic recordings (raw sessions with sensor, frame lists without) -> %s", STAGES, raw)
    make_recordings(raw, seed)

    log.info("[3/%d] vla-ds preprocess %s --out %s", STAGES, raw, dataset)
    summary = preprocess([str(raw)], dataset, IngestOptions(max_side=160))
    log_summary(summary, dataset)

    log.info("[4/%d] vla-ds stats %s", STAGES, dataset)
    stats_path = compute_stats([dataset]).save(dataset)
    log.info("      -> %s", stats_path)

    log.info("[5/%d] vla-ds cache --data %s --backbone %s --finetune-vl none --vl-tokens 5 --cache-dir %s", STAGES,
             dataset, backbone, cache)
    cached = cache_stage(backbone, dataset, cache, ["View1", "View5"])

    common = ["--mode", "train", "--ds-config", "zero2", "--data", str(dataset), "--backbone", str(backbone),
              "--sensor-enabled", "--sensor-sample-ratio", "0.5", "--batch-size", "2", "--grad-accum-steps", "2",
              "--lr", "2e-3", "--sensor-lr", "2e-3", "--vl-lr", "1e-3", "--min-lr", "1e-4", "--warmup-ratio", "0.1",
              "--val-ratio", "0.2", "--log-every", "5", "--seed", str(seed), *DEMO_HEAD]
    log.info("[6/%d] DeepSpeed ZeRO-2, 2 CPU processes, LoRA + sensor (concat), live backbone -> %s", STAGES, lora_run)
    _check(torchrun([*common, "--output-dir", str(lora_run), "--finetune-vl", "lora", "--max-steps", str(train_steps)]),
           "LoRA training")
    lora = _losses(lora_run)
    log.info("      loss %.3f -> %.3f over %d steps (val %.3f); curves %s", lora["first_loss"], lora["last_loss"],
             lora["steps"], lora["val_loss"], plot_run(lora_run))

    head_args = [*common, "--output-dir", str(head_run), "--finetune-vl", "none", "--vl-tokens", "5",
                 "--cache-dir", str(cache), "--cache-policy", "require", "--fusion-strategy", "cross_attention",
                 "--max-steps", str(train_steps), "--save-every", "10"]
    log.info("[7/%d] frozen backbone, head trained from the VL cache; SIGKILL at step %d, then resumed", STAGES,
             KILL_AT)
    killed = torchrun(head_args, env={"VLA_DS_FAULT": f"kill_at_step:{KILL_AT}"})
    if killed.returncode == 0:
        raise RuntimeError("demo: the injected crash did not happen")
    latest = os.readlink(head_run / "checkpoints" / "latest")
    log.info("      killed (exit %d); checkpoints/latest -> %s", killed.returncode, latest)
    resumed = torchrun(head_args)  # --resume auto continues from latest
    _check(resumed, "resumed training")
    if "resumed from" not in resumed.stderr:
        raise RuntimeError("demo: the second run did not resume from the checkpoint")
    head = _losses(head_run)
    head["resumed_at"] = int(latest.removeprefix("step_"))
    log.info("      resumed from step %s and finished: loss %.3f -> %.3f over %d steps; curves %s", head["resumed_at"],
             head["first_loss"], head["last_loss"], head["steps"], plot_run(head_run))

    result = {
        "backbone": str(backbone), "recordings": str(raw), "dataset": str(dataset), "stats": str(stats_path),
        "cache": cached, "samples": summary["samples"], "sensor_share": summary["sensor_share"],
        "lora_run": str(lora_run), "lora": lora, "head_run": str(head_run), "head": head,
    }
    result.update(convert_and_predict(head_run, converted, dataset))
    no_sensor = [a for a in head_args if a != "--sensor-enabled"]
    no_sensor[no_sensor.index("--fusion-strategy") + 1] = "none"
    no_sensor[no_sensor.index("--output-dir") + 1] = str(out / "run_cached_head_nosensor")
    result.update(eval_and_compare([head_run, out / "run_cached_head_nosensor"], no_sensor, out / "compare"))
    result["seconds"] = time.perf_counter() - t0
    log.info("demo finished in %.0f s; outputs under %s", result["seconds"], out)
    return result


def cache_stage(backbone, dataset, cache_dir, views: list[str]) -> dict:
    """The `vla-ds demo` cache stage: cache `dataset` with the backbone (--vl-tokens 1 + 2 per view),
    open it the way training does (--cache-policy require), batch from it, verify 8 samples."""
    from vla_ds.cache import CachedDataset, build_cache, open_cache_for_training, verify_cache
    from vla_ds.config import TrainConfig
    from vla_ds.data.batch import collate
    from vla_ds.data.dataset import IntegratedDataset

    cfg = TrainConfig.from_flat({"backbone": str(backbone), "finetune_vl": "none", "data": [str(dataset)],
                                 "views": list(views), "batch_size": 8, "num_workers": 0,
                                 "vl_tokens": 1 + 2 * len(views), "cache_dir": str(cache_dir),
                                 "cache_policy": "require"})
    summary = build_cache(cfg, shard_size=64)
    base = IntegratedDataset(dataset, views=list(views), load_images=False, load_sensor=False)
    reader = open_cache_for_training(cfg, base.sample_ids())
    batch = collate([CachedDataset(base, reader)[i] for i in range(min(4, len(base)))])
    check = verify_cache(cfg, num_samples=8)
    log.info("      %d samples in %d shards (%.0f samples/s), %d bytes/sample; a batch carries vl_pooled %s + "
             "vl_tokens %s, no images; re-encoded 8: max relative error %.1e", summary["samples"], summary["shards"],
             summary["samples_per_s"], summary["bytes_per_sample"], tuple(batch["vl_pooled"].shape),
             tuple(batch["vl_tokens"].shape), check["max_rel_error"])
    return {**summary, "verify": check}


def convert_and_predict(run_dir: Path, out: Path, dataset: Path) -> dict:
    """Stages 8 and 9: convert the final checkpoint, load the policy like a robot would, predict."""
    import numpy as np

    from vla_ds.convert import convert_checkpoint
    from vla_ds.data.batch import dense_sensor
    from vla_ds.data.dataset import IntegratedDataset
    from vla_ds.model.policy import QwenVLA

    log.info("[8/%d] vla-ds convert %s %s", STAGES, run_dir / "checkpoints" / "final", out)
    convert_checkpoint(run_dir / "checkpoints" / "final", out)
    log.info("      -> %s (plain safetensors), %s (policy)", out, out / "policy")

    log.info("[9/%d] QwenVLA.from_pretrained(%s).predict(instructions, images, sensor)", STAGES, out / "policy")
    policy = QwenVLA.from_pretrained(out / "policy", device="cpu")
    ds = IntegratedDataset(dataset, views=["View1", "View5"])
    idx = [int(np.nonzero(ds.sample_has_sensor)[0][0]), int(np.nonzero(~ds.sample_has_sensor)[0][0])]
    items = [ds[i] for i in idx]
    sensor, mask = dense_sensor(items, ds.sensor_length, ds.sensor_channels)
    actions = policy.predict([it["instruction"] for it in items], [it["images"] for it in items], sensor,
                             sensor_mask=mask)
    for it, pred in zip(items, actions):
        log.info("      %s (sensor: %s)\n        predicted step 1: %s\n        recorded  step 1: %s", it["sample_id"],
                 it["has_sensor"], np.array2string(pred[0].numpy(), precision=3, suppress_small=True),
                 np.array2string(it["actions"][0].numpy(), precision=3, suppress_small=True))
    return {"converted": str(out), "policy": str(out / "policy"), "predicted_shape": tuple(actions.shape)}


def eval_and_compare(runs: list[Path], train_args: list[str], compare_dir: Path) -> dict:
    """Stages 10 and 11: train runs[1] with `train_args`, evaluate both runs on their (identical)
    validation episodes, compare them."""
    from vla_ds.eval.compare import compare, write_compare
    from vla_ds.eval.run import EvalArgs, evaluate

    log.info("[10/%d] the same head without the sensor -> %s; vla-ds eval of both", STAGES, runs[1])
    _check(torchrun(train_args), "training without the sensor")
    evals = {}
    for run in runs:
        log.info("      vla-ds eval %s", run)
        r = evaluate(EvalArgs(policy=str(run), num_workers=0))
        s = r["metrics"]["summary"]
        log.info("      -> %s: final position error %.3f units (zero motion %.3f, mean chunk %.3f), %.0f%% of steps "
                 "within %.1f", r["output_dir"], s["policy"]["final_pos_err"], s["zero_motion"]["final_pos_err"],
                 s["mean_chunk"]["final_pos_err"], 100 * s["policy"]["within_tol"], r["tol"])
        evals[run.name] = r["output_dir"]
    log.info("[11/%d] vla-ds compare %s", STAGES, " ".join(map(str, runs)))
    result = compare([str(r) for r in runs])
    write_compare(result, compare_dir)
    log.info("      best: %s; report %s (compare.md, compare.png)", result["best"], compare_dir / "compare.md")
    return {"evals": evals, "compare": str(compare_dir), "best": result["best"]}

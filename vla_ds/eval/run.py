"""`vla-ds eval`: open-loop evaluation of a policy on held-out episodes, in physical units.

Features:
  - takes a run, a checkpoint, a policy or a converted directory (`vla_ds.eval.locate`); by default
    the run's own validation episodes, recomputed from its config.yaml (no episode leaks from training)
  - the policy's predictions against the recorded chunks, and the same metrics for two yardsticks
    (zero motion; the training split's mean chunk): `vla_ds.eval.metrics`
  - by sensor / no sensor and per episode; per action dim and horizon step
  - one process or torchrun: episodes split across ranks, predictions gathered, identical results
  - VL-cache mode when the policy's backbone is frozen and a matching cache exists (`--cache-policy`)
  - eval.json, eval.md, predictions.npz and PNGs in one directory, written atomically (`report`)
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from vla_ds.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalArgs:
    """What to evaluate and how (the `vla-ds eval` flags)."""

    policy: str  # POLICY_OR_RUN
    data: list[str] = field(default_factory=list)  # default: the run's --data
    episodes: str = "val"  # val | all | ID,ID,...
    output_dir: str | None = None  # default: RUN/eval/<step>, else beside the policy
    batch_size: int = 16
    num_workers: int = 2
    tol: float = 1.0  # robot units: the "within tolerance" radius of the integrated position error
    max_samples: int = 0  # 0: every sample; else an evenly spaced subset of about that many
    backbone: str | None = None  # override the policy's saved backbone path
    cache_policy: str = "auto"  # auto | off | require (VL cache instead of the backbone)
    cache_dir: str | None = None  # default: the run's
    other_stats: bool = False  # evaluate although --data's stats.json differs from the policy's
    max_plots: int = 12  # trajectory PNGs (one per episode)
    seed: int = 0  # a flow head's starting noise, per sample (vla_ds/model/flow.py sample_noise)
    flow_steps: int | None = None  # a flow head's Euler steps (default: the policy's --flow-steps)

    def __post_init__(self):
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.tol <= 0:
            raise UsageError(f"--tol must be > 0 (robot units), got {self.tol}")
        if self.cache_policy not in ("auto", "off", "require"):
            raise UsageError(f"--cache-policy {self.cache_policy}: choose auto, off or require")
        if self.flow_steps is not None and self.flow_steps < 1:
            raise UsageError(f"--flow-steps must be >= 1, got {self.flow_steps}")
        if self.max_samples < 0 or self.num_workers < 0 or self.max_plots < 0:
            raise UsageError("--max-samples, --num-workers and --max-plots must be >= 0")


class Predictions(NamedTuple):
    """Per sample, sorted by sample id: physical-unit predictions and recorded chunks."""

    sample_ids: list[str]
    episode_ids: list[str]
    has_sensor: np.ndarray  # (N,) bool
    pred: np.ndarray  # (N, H, A) float64
    target: np.ndarray  # (N, H, A) float64
    mask: np.ndarray  # (N, H) bool

    @classmethod
    def empty(cls) -> Predictions:
        return cls([], [], np.zeros(0, bool), np.zeros((0, 0, 0)), np.zeros((0, 0, 0)), np.zeros((0, 0), bool))

    @classmethod
    def concat(cls, parts: list[Predictions], horizon: int, dim: int) -> Predictions:
        ids = [s for p in parts for s in p.sample_ids]
        order = sorted(range(len(ids)), key=ids.__getitem__)

        def cat(name, shape, dtype):
            arrays = [getattr(p, name) for p in parts if len(p.sample_ids)]
            return (np.concatenate(arrays) if arrays else np.zeros(shape, dtype))[order]

        return cls([ids[i] for i in order], [[e for p in parts for e in p.episode_ids][i] for i in order],
                   cat("has_sensor", (0,), bool), cat("pred", (0, horizon, dim), np.float64),
                   cat("target", (0, horizon, dim), np.float64), cat("mask", (0, horizon), bool))


def subsample(n: int, max_samples: int) -> list[int]:
    """Evenly spaced indices of about `max_samples` of n (all when 0 or n is smaller)."""
    if not max_samples or n <= max_samples:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, max_samples).round().astype(int).tolist()))


@torch.no_grad()
def predict_dataset(policy, dataset, batch_size: int, num_workers: int, indices: list[int] | None = None,
                    desc: str = "eval", forward=None, seed: int = 0) -> Predictions:
    """The policy's denormalized chunks for `dataset` (items with recorded actions), batched, in eval
    mode (bf16 autocast on CUDA); the recorded actions are kept aside, never shown to the policy.
    `forward` (default: the policy) runs a batch: the trainer passes its DeepSpeed engine. A flow
    head starts each sample from noise seeded by (`seed`, sample id): any batching or world size
    gives the same chunks."""
    from torch.utils.data import DataLoader, Subset

    from vla_ds.data.batch import collate
    from vla_ds.model.flow import sample_noise
    from vla_ds.utils.progress import progress

    indices = list(range(len(dataset))) if indices is None else indices
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if policy.device.type == "cuda"
                else contextlib.nullcontext())
    was_training = policy.training
    policy.eval()
    parts: dict[str, list] = {k: [] for k in ("ids", "eps", "sensor", "pred", "target", "mask")}
    try:
        with progress(total=len(indices), desc=desc, unit="sample") as bar:
            for batch in loader:
                target, mask = batch.pop("actions"), batch.pop("action_mask")
                if policy.config.action_head == "flow":
                    batch["flow_noise"] = sample_noise(batch["sample_ids"], *target.shape[1:], seed)
                with autocast:
                    out = (forward or policy)(batch)
                pred = policy.normalizer.denormalize_actions(out.actions).cpu()
                if not torch.isfinite(pred).all():
                    raise RuntimeError(f"eval: the policy predicted NaN/inf for {batch['sample_ids'][0]}...; check its "
                                       "weights (a diverged training?)")
                for key, value in (("ids", batch["sample_ids"]), ("eps", batch["episode_ids"])):
                    parts[key] += list(value)
                parts["sensor"].append(batch["has_sensor"].numpy())
                parts["pred"].append(pred.double().numpy())
                parts["target"].append(target.double().numpy())
                parts["mask"].append(mask.numpy())
                bar.update(len(target))
    finally:
        policy.train(was_training)
    if not parts["ids"]:
        return Predictions.empty()
    return Predictions(parts["ids"], parts["eps"], *(np.concatenate(parts[k]) for k in ("sensor", "pred", "target",
                                                                                           "mask")))


def gather_predictions(mine: Predictions, world: int, horizon: int, dim: int) -> Predictions:
    """Collective. Every rank's predictions, merged and sorted by sample id (so any world size gives
    the same arrays as one process)."""
    from vla_ds.utils.dist import gather

    return Predictions.concat(gather(mine, world), horizon, dim)


def default_output_dir(located) -> Path:
    if located.run_dir is not None:
        return located.run_dir / "eval" / located.checkpoint.split(" -> ")[-1].replace(" ", "_")
    return located.policy_dir.resolve().parent / "eval"


def evaluate(args: EvalArgs) -> dict:
    """Collective (under torchrun). Evaluate, write the report on rank 0, return eval.json's content."""
    from vla_ds.eval.report import check_output_dir, write_report
    from vla_ds.eval.setup import prepare
    from vla_ds.utils.dist import device_for, rank_world

    rank, world, local_rank = rank_world()
    job = prepare(args, rank, world, device_for(local_rank))
    out = Path(args.output_dir) if args.output_dir else default_output_dir(job.located)
    check_output_dir(out)
    mine = (predict_dataset(job.policy, job.dataset, args.batch_size, args.num_workers,
                            subsample(len(job.dataset), -(-args.max_samples // world) if args.max_samples else 0),
                            seed=args.seed)
            if job.dataset is not None else Predictions.empty())
    preds = gather_predictions(mine, world, job.horizon, job.action_dim)
    results = job.results(preds, args.tol)
    if rank == 0:
        write_report(out, results, preds, args.max_plots)
        log.info("eval: %d samples of %d episode(s); report in %s (eval.md)", len(preds.sample_ids),
                 len(results["episode_ids"]), out)
        results["output_dir"] = str(out)
    return results

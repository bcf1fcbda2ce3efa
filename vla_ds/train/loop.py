"""The training recipe: QwenVLA on DeepSpeed, one function, every rank.

Features:
  - any ds_configs/*.json (ZeRO-2/3, CPU offload), "auto" values resolved from the flags
  - per-module learning rates (--lr expert+fusion, --sensor-lr, --vl-lr, --vision-lr) under one
    warm-up / hold / cosine schedule (vla_ds/train/schedule.py), per step or per epoch
  - balanced sensor sampling (--sensor-sample-ratio), episode-level train/val split
  - sensor-weighted loss that is effective at any batch size (vla_ds/train/loss.py)
  - either action head (--action-head regression|flow); a flow head's noise and times are seeded
    per sample, so data-parallel layouts and resumed runs draw alike
  - the robot's state as an input (--state-enabled --state-keys pose,joints)
  - the old trainer's wandb metric names, mirrored to RUN_DIR/metrics.jsonl; rank-0 progress bar
  - validation with sensor / no-sensor losses; a non-finite loss stops every rank with the step
    and the offending sample ids
  - --eval-every N: the open-loop metrics of `vla-ds eval` (robot units, degrees) on the validation
    episodes, logged as eval/...; checkpoints/best follows --best-metric (default val/loss_epoch)
  - VL feature cache (--cache-policy auto|require|off): with a frozen backbone and a matching
    cache, batches carry cached features and the backbone's weights are never loaded
  - a phase hook (`Trainer(cfg, phase=...)`): a context manager around each stage -- model_load,
    engine_init, forward, backward, optimizer_step -- that `vla-ds profile` measures
  - resume on any number of processes (vla_ds/train/elastic.py); --global-batch-size keeps the
    effective batch when that number changes
Checkpointing and resume live in vla_ds/train/checkpoint.py, the run's data in
vla_ds/train/datasets.py.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
import yaml

from vla_ds.config import TrainConfig, save_config, with_world
from vla_ds.errors import UsageError
from vla_ds.train.metrics import Tally
from vla_ds.utils.dist import device_for, init_distributed
from vla_ds.utils.faults import trace_samples

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a run is; saved in checkpoints (JSON)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    consumed: int = 0  # samples this rank consumed in the current epoch since `base`
    base: int = 0  # the global position in the epoch where this layout started it (a resume's)
    best_val_loss: float | None = None  # the best value of --best-metric so far (the val loss by default)
    wandb_run_id: str | None = None
    losses: list = field(default_factory=list)  # (step, train/loss_step) history of this process


PhaseHook = Callable[[str], ContextManager]
PHASES = ("model_load", "engine_init", "forward", "backward", "optimizer_step")


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


class Trainer:
    """Holds the engine, data and bookkeeping of one run. Every method is collective unless noted.

    `phase(name)` is entered around each stage named in PHASES (set-up once, then every micro
    step): a hook for measuring them, a no-op by default.
    """

    def __init__(self, cfg: TrainConfig, phase: PhaseHook | None = None):
        from vla_ds.train.checkpoint import resolve_resume
        from vla_ds.train.datasets import load_stats
        from vla_ds.train.ds_config import load_ds_config, resolve_ds_config
        from vla_ds.train.engine import check_combination
        from vla_ds.train.init_from import weights_file

        # --global-batch-size -> --grad-accum-steps for the launch's world size, before anything starts
        self.cfg = cfg = with_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        self.phase = phase or _no_phase
        ds_raw = load_ds_config(cfg.run.ds_config)
        check_combination(cfg, ds_raw)  # before anything heavy loads, as is what --resume and --init-from name:
        self.run_dir = Path(cfg.run.output_dir)
        self.resume_from = resolve_resume(cfg.run.resume, self.run_dir)
        if cfg.run.init_from:
            weights_file(cfg.run.init_from)
        log.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        self.rank, self.world, self.local_rank = init_distributed()
        self.device = device_for(self.local_rank)
        torch.manual_seed(cfg.run.seed)
        self.stats = load_stats(cfg)
        from vla_ds.model.backbone import hidden_size, read_backbone_config

        self.ds_config = resolve_ds_config(
            ds_raw, micro_batch=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum_steps, world_size=self.world,
            grad_clip=cfg.optim.grad_clip, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
            hidden_size=hidden_size(read_backbone_config(cfg.model.backbone)),
        )
        with self.phase("model_load"):
            self._build_model_and_data()
        from vla_ds.train.evaluation import InTrainingEval

        self.evaluator = InTrainingEval(self) if cfg.run.eval_every else None  # refuses a run without val now
        from vla_ds.train.checkpoint import saved_world_size
        from vla_ds.train.elastic import prepare_resume

        # another world size: the checkpoint converted once, the engine told to load that format
        self.elastic = prepare_resume(self.resume_from, saved_world_size(self.resume_from), self.ds_config,
                                      self.rank, self.world)
        with self.phase("engine_init"):
            self._build_engine()
        self.state = TrainState()
        self._saved_step = -1
        self._resume()
        if self.rank == 0:  # only now: a run refused on the way (its cache, its checkpoint) writes nothing
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

    def _resume(self) -> None:
        """Collective. Continue from a checkpoint when --resume finds one (of any world size)."""
        from vla_ds.train.checkpoint import load_checkpoint
        from vla_ds.train.elastic import reshard_notice
        from vla_ds.train.metrics import truncate_metrics

        step_dir = self.resume_from
        if step_dir is None:
            return
        saved = load_checkpoint(step_dir, self.engine, model_config=self.cfg.model.to_dict(), universal=self.elastic)
        self.schedule.load_state_dict(saved["schedule"])
        st = self.state
        st.base = self.sampler.load_state_dict(saved["sampler"])
        st.step, st.epoch, st.consumed = saved["step"], saved["epoch"], 0
        if self.elastic:
            if self.cfg.optim.max_steps is None:  # the schedule's length, not one recomputed for this layout
                self.total_steps = saved["total_steps"]
            if self.rank == 0:
                log.warning(reshard_notice(saved, self.world, self.cfg.data.batch_size, self.cfg.optim.grad_accum_steps))
        st.best_val_loss, st.wandb_run_id = saved["best_val_loss"], saved["wandb_run_id"]
        self._saved_step = st.step
        if self.rank == 0:
            truncate_metrics(self.run_dir, st.step)
        msg = ""
        if self.cfg.run.rewarm:
            msg = f"; lr re-warmed over {self.schedule.rewarm()} steps"
        log.info("resumed from %s: step %d, epoch %d, %d samples into the epoch%s", step_dir, st.step, st.epoch,
                 st.base, msg)

    def state_for_checkpoint(self) -> dict:
        """trainer_state.json: everything besides the engine needed to continue exactly."""
        st = self.state
        return {
            "format": 2, "step": st.step, "epoch": st.epoch, "position": st.base + st.consumed * self.world,
            "best_val_loss": st.best_val_loss, "wandb_run_id": st.wandb_run_id, "world_size": self.world,
            "micro_batch": self.cfg.data.batch_size, "grad_accum_steps": self.cfg.optim.grad_accum_steps,
            "total_steps": self.total_steps, "sampler": self.sampler.state_dict(st.consumed, st.base),
            "schedule": self.schedule.state_dict(), "model": self.cfg.model.to_dict(),
        }

    def checkpoint(self, best: bool = False, final: bool = False) -> None:
        """Collective. Save this step (once), or only move pointers if it is saved already."""
        from vla_ds.train.checkpoint import point_at, save_checkpoint

        if self._saved_step == self.state.step:
            point_at(self.run_dir, self.state.step, best=best, final=final)
            return
        save_checkpoint(self.run_dir, self.state.step, self.engine, self.model, self.state_for_checkpoint(),
                        keep_last=self.cfg.run.keep_last, best=best, final=final)
        self._saved_step = self.state.step

    # ------------------------------------------------------------------ set-up
    def _build_model_and_data(self) -> None:
        from vla_ds.data.batch import collate
        from vla_ds.data.sampler import BalancedDistributedSampler
        from vla_ds.model.policy import QwenVLA
        from vla_ds.train.datasets import build_datasets, open_cache
        from vla_ds.train.ds_config import partitioned_load

        cfg = self.cfg
        full, self.train_ds, self.val_ds = build_datasets(cfg, load_images=False)
        self.cache = None
        if cfg.run.cache_policy != "off" and not cfg.model.trains_backbone:  # require + lora/full: refused earlier
            self.cache = open_cache(cfg, full.sample_ids(), self.rank)
        load_backbone = self.cache is None
        if self.cache is not None:
            from vla_ds.cache import CachedDataset

            self.train_ds = CachedDataset(self.train_ds, self.cache)
            self.val_ds = CachedDataset(self.val_ds, self.cache) if self.val_ds is not None else None
        else:  # the live backbone needs the images
            for ds in (self.train_ds, self.val_ds):
                if ds is not None:
                    ds.load_images = True
        self.model = QwenVLA(cfg.model, self.stats, device=self.device, load_backbone=load_backbone, views=full.view_names,
                             zero3=partitioned_load(self.ds_config))  # ZeRO-3: each rank reads only its shard
        self.param_counts = self.model.parameter_counts()  # before ZeRO-3 partitions the parameters
        if cfg.run.init_from:
            from vla_ds.train.init_from import load_init_weights

            self.init_report = load_init_weights(self.model, cfg.run.init_from)
        self.sampler = BalancedDistributedSampler(
            self.train_ds.sample_has_sensor, sensor_ratio=cfg.data.sensor_sample_ratio, num_replicas=self.world,
            rank=self.rank, seed=cfg.run.seed,
        )
        self.collate = collate
        per_step = cfg.data.batch_size * cfg.optim.grad_accum_steps
        self.steps_per_epoch = len(self.sampler) // per_step
        if self.steps_per_epoch == 0:
            raise UsageError(
                f"--data has {len(self.train_ds)} training samples, {len(self.sampler)} per rank: fewer than one optimizer "
                f"step of --batch-size {cfg.data.batch_size} x --grad-accum-steps {cfg.optim.grad_accum_steps}"
            )
        self.total_steps = cfg.optim.max_steps or cfg.optim.epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _build_engine(self) -> None:
        from vla_ds.train.engine import build_engine
        from vla_ds.train.schedule import GroupLRSchedule

        cfg = self.cfg
        self.engine, self.optimizer = build_engine(self.model, cfg, self.ds_config)
        self.zero_stage = self.engine.zero_optimization_stage()
        sched_total = self.total_steps if cfg.optim.sched_on == "step" else self.num_epochs
        floor = cfg.optim.min_lr / cfg.optim.lr if cfg.optim.lr > 0 else 0.0
        self.schedule = GroupLRSchedule(self.optimizer, sched_total, cfg.optim.warmup_ratio, cfg.optim.hold_ratio, floor)
        counts = self.param_counts
        log.info("parameters: %.2f M trainable, %.2f M frozen (%s)", counts["trainable_M"], counts["frozen_M"],
                 ", ".join(f"{c[:-2]} {v:.2f} M" for c, v in counts.items() if c.endswith("_M") and c not in ("trainable_M", "frozen_M") and v))

    def loader(self, dataset, sampler):
        # A generator of its own: creating the iterator must not draw from the global torch RNG,
        # or a resumed run's dropout masks would drift from the uninterrupted run's.
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 100_003 + self.state.epoch)
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.cfg.data.batch_size, sampler=sampler, num_workers=self.cfg.data.num_workers,
            collate_fn=self.collate, pin_memory=self.device.type == "cuda", generator=gen,
            persistent_workers=False, prefetch_factor=2 if self.cfg.data.num_workers else None,
        )

    # ------------------------------------------------------------------ steps
    def micro_step(self, batch: dict) -> tuple[float, int]:
        """Collective. Forward + backward of one micro batch; returns (weighted loss, sensor samples)."""
        with self.phase("forward"):
            loss, has = self.forward_loss(batch)
        with self.phase("backward"):
            self.engine.backward(loss)
        with self.phase("optimizer_step"):
            self.engine.step()
        return float(loss.detach()), int(has.sum())

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective. The weighted loss of one micro batch and its has-sensor flags; a non-finite
        loss on any rank stops every rank."""
        from vla_ds.train.loss import sample_weights, weighted_loss

        m = self.cfg.model
        if m.action_head == "flow":  # per-sample seeded noise and times (vla_ds/model/flow.py says why)
            from vla_ds.model.flow import training_draws

            batch = {**batch, **training_draws(batch["sample_ids"], m.horizon, m.action_dim, self.cfg.run.seed,
                                               self.state.epoch)}
        out = self.engine(batch)
        has = batch["has_sensor"].to(out.per_sample_loss.device)
        loss = weighted_loss(out.per_sample_loss, sample_weights(has, self.cfg.optim.sensor_loss_weight, self.cfg.model.sensor_enabled))
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            where = f"samples {batch['sample_ids']}" if not torch.isfinite(loss) else "another rank's batch"
            raise FloatingPointError(
                f"non-finite loss at step {self.state.step}, epoch {self.state.epoch} on rank {self.rank}: {where}"
            )
        return loss, has

    def validate(self) -> dict:
        """Collective. The validation losses (vla_ds/train/evaluation.py)."""
        from vla_ds.train.evaluation import validation_losses

        return validation_losses(self)

    def lr_metrics(self) -> dict:
        out = {"train/lr": self.optimizer.param_groups[0]["lr"]}
        for g in self.optimizer.param_groups:
            if not g.get("name", "").endswith("no_decay"):
                out[f"lr/{g.get('name', 'group')}"] = g["lr"]
        return out

    def lora_abs(self) -> float | None:
        vals = [p.detach().abs().mean().item() for n, p in self.model.named_parameters() if "lora_" in n and p.numel()]
        return sum(vals) / len(vals) if vals else None

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Collective. Train for --epochs / --max-steps; returns the last metrics logged."""
        from vla_ds.train.metrics import MetricsLogger
        from vla_ds.utils.progress import progress

        cfg, st = self.cfg, self.state
        self.logger = MetricsLogger(self.run_dir, cfg.to_dict(), rank=self.rank, wandb_mode=cfg.run.wandb_mode,
                                    project=cfg.run.wandb_project, run_id=st.wandb_run_id)
        st.wandb_run_id = self.logger.run_id
        counts = self.param_counts
        self.logger.log({"params/trainable_M": counts["trainable_M"], "params/frozen_M": counts["frozen_M"]}, st.step)
        self.bar = progress(total=self.total_steps, desc="train", unit="step", initial=st.step)
        self.last: dict = {}
        try:
            while st.step < self.total_steps:
                self._run_epoch()
        finally:
            self.bar.close()
            self.logger.close()
        return {**self.last, "step": st.step}

    def _run_epoch(self) -> None:
        """Collective. The rest of the current epoch (all of it unless resumed mid-epoch)."""
        cfg, st = self.cfg, self.state
        accum = cfg.optim.grad_accum_steps
        self.sampler.set_epoch(st.epoch)
        # whole optimizer steps in what the sampler has left of the epoch (all of it unless resumed)
        micro_left = self.sampler.remaining() // (cfg.data.batch_size * accum) * accum
        epoch, step, window = Tally(), Tally(), Tally()
        done = 0
        for k, batch in enumerate(self.loader(self.train_ds, self.sampler)):
            if k >= micro_left or st.step >= self.total_steps:
                break  # the epoch's tail that does not fill an optimizer step is dropped
            done += 1
            trace_samples(self.run_dir, st.step + 1, st.epoch, self.rank, batch["sample_ids"])
            loss, n_sensor = self.micro_step(batch)
            st.consumed += len(batch["sample_ids"])
            step.add(loss, n_sensor, len(batch["sample_ids"]))
            if (k + 1) % accum == 0:
                self._end_step(step, window)
                epoch.merge(step)
                step = Tally()
        if done >= micro_left or st.step >= self.total_steps:
            e = epoch.all_sum(self.device)
            row = {"train/loss_epoch": e.loss / max(e.micro, 1), "train/sensor_ratio": e.sensor / max(e.samples, 1),
                   "epoch": st.epoch}
            self.logger.log(row, st.step)
            self.last.update(row)
            if cfg.optim.sched_on == "epoch":
                self.schedule.step()
            st.epoch += 1
            st.consumed = st.base = 0
            improved = self._measure(val=not cfg.run.val_every, evaluate=False)
            self.checkpoint(best=improved)

    def _end_step(self, step: Tally, window: Tally) -> None:
        """Collective. Bookkeeping after an optimizer step: schedule, metrics, validation."""
        from vla_ds.train.metrics import system_metrics

        cfg, st = self.cfg, self.state
        st.step += 1
        grad_norm = self.engine.get_global_grad_norm()
        if cfg.optim.sched_on == "step":
            self.schedule.step()
        self.bar.update(1)
        window.merge(step)
        if st.step % cfg.run.log_every == 0 or st.step == self.total_steps:
            w, s = window.all_sum(self.device), step.all_sum(self.device)
            row = {
                "train/loss_step": w.loss / max(w.micro, 1),
                "train/grad_norm": float(grad_norm or 0.0),
                "train/sensor_samples": s.sensor,  # in this step's batch, all ranks
                "train/samples_per_s": w.samples / max(time.perf_counter() - window.start, 1e-9),
                "epoch": st.epoch,
                **self.lr_metrics(),
                **system_metrics(),
            }
            lora = self.lora_abs()
            if lora is not None:
                row["lora/avg_weight_abs"] = lora
            self.logger.log(row, st.step)
            self.last.update(row)
            st.losses.append([st.step, row["train/loss_step"]])
            self.bar.set_postfix(loss=f"{row['train/loss_step']:.4f}", lr=f"{row['train/lr']:.2e}",
                                 sps=f"{row['train/samples_per_s']:.1f}")
            window.reset()
        improved = self._measure(val=bool(cfg.run.val_every) and st.step % cfg.run.val_every == 0,
                                 evaluate=bool(cfg.run.eval_every) and st.step % cfg.run.eval_every == 0)
        if improved or (cfg.run.save_every and st.step % cfg.run.save_every == 0):
            self.checkpoint(best=improved)
        from vla_ds.utils.faults import fault_point

        fault_point("kill_at_step", st.step)

    def _measure(self, val: bool, evaluate: bool) -> bool:
        """Collective. Validate and/or evaluate (--eval-every), log, and say whether --best-metric
        improved (the same on every rank)."""
        row = {**(self.validate() if val else {}), **(self.evaluator() if evaluate else {})}
        if not row:
            return False
        st, metric = self.state, self.cfg.run.best_metric
        self.logger.log(row, st.step)
        self.last.update(row)
        v = row.get(metric)
        improved = v is not None and math.isfinite(v) and (
            st.best_val_loss is None or (v > st.best_val_loss if metric.endswith("within_tol") else v < st.best_val_loss))
        if improved:
            st.best_val_loss = v
        best = f" best {metric} so far" if improved else ""
        if "val/loss_epoch" in row:
            log.info("step %d: val loss %.4f (sensor %.4f, no sensor %.4f)%s", st.step, row["val/loss_epoch"],
                     row["val/loss_sensor"], row["val/loss_nosensor"], best if metric.startswith("val/") else "")
        if evaluate:
            log.info("step %d: eval final position error %.4g (zero motion %.4g, mean chunk %.4g), within tol %.1f%%%s",
                     st.step, row["eval/final_pos_err"], row["eval/zero_motion/final_pos_err"],
                     row["eval/mean_chunk/final_pos_err"], 100 * row["eval/within_tol"],
                     best if metric.startswith("eval/") else "")
        return improved


def train(cfg: TrainConfig) -> dict:
    """Collective. Run a whole training job; returns the final metrics (every rank)."""
    trainer = Trainer(cfg)
    log.info("training %d steps (%d per epoch, %d epochs) on %d process(es); run dir %s", trainer.total_steps,
             trainer.steps_per_epoch, trainer.num_epochs, trainer.world, trainer.run_dir)
    result = trainer.fit()
    trainer.checkpoint(final=True)
    log.info("final policy: %s", trainer.run_dir / "checkpoints" / "final" / "policy")
    return result

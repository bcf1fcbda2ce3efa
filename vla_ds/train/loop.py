"""The training recipe: QwenVLA on DeepSpeed, one function, every rank.

Features:
  - any ds_configs/*.json (ZeRO-2/3, CPU offload), "auto" values resolved from the flags
  - per-module learning rates (--lr expert+fusion, --sensor-lr, --vl-lr, --vision-lr) under one
    warm-up / hold / cosine schedule (vla_ds/train/schedule.py), per step or per epoch
  - balanced sensor sampling (--sensor-sample-ratio), episode-level train/val split
  - sensor-weighted loss that is effective at any batch size (vla_ds/train/loss.py)
  - the old trainer's wandb metric names, mirrored to RUN_DIR/metrics.jsonl; rank-0 progress bar
  - validation with sensor / no-sensor losses; a non-finite loss stops every rank with the step
    and the offending sample ids
  - VL feature cache (--cache-policy auto|require|off): with a frozen backbone and a matching
    cache, batches carry cached features and the backbone's weights are never loaded
Checkpointing and resume live in vla_ds/train/checkpoint.py.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from vla_ds.config import TrainConfig, save_config
from vla_ds.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Where a run is; saved in checkpoints (JSON)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    consumed: int = 0  # samples this rank consumed in the current epoch
    best_val_loss: float | None = None
    wandb_run_id: str | None = None
    losses: list = field(default_factory=list)  # (step, train/loss_step) history of this process


@dataclass
class _Tally:
    """Running sums of the loop (per step, per log window, per epoch)."""

    loss: float = 0.0  # sum of micro-batch losses
    micro: int = 0
    sensor: int = 0  # samples with a sensor reading
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, sensor: int, samples: int) -> None:
        self.loss += loss
        self.micro += 1
        self.sensor += sensor
        self.samples += samples

    def merge(self, other: "_Tally") -> None:
        self.loss += other.loss
        self.micro += other.micro
        self.sensor += other.sensor
        self.samples += other.samples

    def reset(self) -> None:
        self.__init__()

    def all_sum(self, device) -> "_Tally":
        """Collective."""
        loss, micro, sensor, samples = _all_sum([self.loss, self.micro, self.sensor, self.samples], device)
        return _Tally(loss, int(micro), int(sensor), int(samples), self.start)


def _all_sum(values: list[float], device) -> list[float]:
    """Collective. Element-wise sum over ranks."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def load_stats(cfg: TrainConfig, run_dir: Path):
    from vla_ds.data.format import find_episode_dirs
    from vla_ds.data.stats import STATS_FILE, NormStats, compute_stats

    if cfg.data.stats:
        return NormStats.load(cfg.data.stats)
    for spec in cfg.data.data:
        p = Path(spec) / STATS_FILE
        if p.is_file():
            return NormStats.load(p)
    log.warning("no stats.json beside --data: computing normalization stats now (run `vla-ds stats` to keep them)")
    find_episode_dirs(cfg.data.data)
    return compute_stats(cfg.data.data)


def build_datasets(cfg: TrainConfig, load_images: bool):
    """(all samples, train, val) of --data, split by episode. The views are resolved once on the
    whole data so both splits (and a VL cache) use the same ones. `load_images` can be switched
    on the returned datasets later."""
    from vla_ds.data.dataset import IntegratedDataset
    from vla_ds.data.split import split_by_episode

    kw = dict(horizon=cfg.model.horizon, sensor_length=cfg.model.sensor_temporal_length,
              sensor_channels=cfg.model.sensor_input_channels, load_sensor=cfg.model.sensor_enabled)
    try:
        full = IntegratedDataset(cfg.data.data, views=cfg.data.views, load_images=False, **kw)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    kw.update(views=full.view_names, load_images=load_images)
    train_ids, val_ids = split_by_episode(full.episode_ids, cfg.data.val_ratio, cfg.run.seed, full.episode_has_sensor)
    train = IntegratedDataset(cfg.data.data, episode_ids=set(train_ids), **kw)
    val = IntegratedDataset(cfg.data.data, episode_ids=set(val_ids), **kw) if val_ids else None
    return full, train, val


def open_cache(cfg: TrainConfig, sample_ids: list[str], rank: int):
    """Collective. The VL cache reader when --cache-policy lets it stand in for the backbone, else
    None. Rank 0 decides (and logs why) so every rank makes the same choice."""
    from vla_ds.cache import cache_dir_of, open_cache_for_training
    from vla_ds.cache_store import CacheReader

    decision = [None]
    if rank == 0:
        try:
            decision = [open_cache_for_training(cfg, sample_ids) is not None]
        except UsageError as e:
            decision = [str(e)]
    dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], str):
        raise UsageError(decision[0])
    return CacheReader(cache_dir_of(cfg)) if decision[0] else None


class Trainer:
    """Holds the engine, data and bookkeeping of one run. Every method is collective unless noted."""

    def __init__(self, cfg: TrainConfig):
        from vla_ds.train.ds_config import load_ds_config, resolve_ds_config
        from vla_ds.train.engine import check_combination, init_distributed

        self.cfg = cfg
        ds_raw = load_ds_config(cfg.run.ds_config)
        check_combination(cfg, ds_raw)  # before anything heavy loads
        log.info("resolved config:\n%s", yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip())
        self.rank, self.world, self.local_rank = init_distributed()
        self.device = torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        torch.manual_seed(cfg.run.seed)
        self.run_dir = Path(cfg.run.output_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.stats = load_stats(cfg, self.run_dir)
        self._build_model_and_data()
        from vla_ds.model.backbone import hidden_size, read_backbone_config

        self.ds_config = resolve_ds_config(
            ds_raw, micro_batch=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum_steps, world_size=self.world,
            grad_clip=cfg.optim.grad_clip, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
            hidden_size=hidden_size(read_backbone_config(cfg.model.backbone)),
        )
        self._build_engine()
        self.state = TrainState()
        self._saved_step = -1
        self._resume()

    def _resume(self) -> None:
        """Collective. Continue from a checkpoint when --resume finds one."""
        from vla_ds.train.checkpoint import load_checkpoint, resolve_resume
        from vla_ds.train.metrics import truncate_metrics

        step_dir = resolve_resume(self.cfg.run.resume, self.run_dir)
        if step_dir is None:
            return
        saved = load_checkpoint(self, step_dir)
        st = self.state
        st.step, st.epoch, st.consumed = saved["step"], saved["epoch"], saved["consumed"]
        st.best_val_loss, st.wandb_run_id = saved["best_val_loss"], saved["wandb_run_id"]
        self._saved_step = st.step
        if self.rank == 0:
            truncate_metrics(self.run_dir, st.step)
        msg = ""
        if self.cfg.run.rewarm:
            msg = f"; lr re-warmed over {self.schedule.rewarm()} steps"
        log.info("resumed from %s: step %d, epoch %d, %d samples into the epoch%s", step_dir, st.step, st.epoch,
                 st.consumed, msg)

    def state_for_checkpoint(self) -> dict:
        """trainer_state.json: everything besides the engine needed to continue exactly."""
        st = self.state
        return {
            "format": 1, "step": st.step, "epoch": st.epoch, "consumed": st.consumed,
            "best_val_loss": st.best_val_loss, "wandb_run_id": st.wandb_run_id, "world_size": self.world,
            "micro_batch": self.cfg.data.batch_size, "grad_accum_steps": self.cfg.optim.grad_accum_steps,
            "total_steps": self.total_steps, "sampler": self.sampler.state_dict(st.consumed),
            "schedule": self.schedule.state_dict(), "model": self.cfg.model.to_dict(),
        }

    def checkpoint(self, best: bool = False, final: bool = False) -> None:
        """Collective. Save this step (once), or only move pointers if it is saved already."""
        from vla_ds.train.checkpoint import ckpt_root, save_checkpoint, set_pointer, step_name

        if self._saved_step == self.state.step:
            if self.rank == 0:
                for flag, name in ((best, "best"), (final, "final")):
                    if flag:
                        set_pointer(ckpt_root(self.run_dir), name, step_name(self.state.step))
            dist.barrier()
            return
        save_checkpoint(self, best=best, final=final)
        self._saved_step = self.state.step

    # ------------------------------------------------------------------ set-up
    def _build_model_and_data(self) -> None:
        from vla_ds.data.dataset import collate
        from vla_ds.data.sampler import BalancedDistributedSampler
        from vla_ds.model.policy import QwenVLA

        cfg = self.cfg
        full, self.train_ds, self.val_ds = build_datasets(cfg, load_images=False)
        self.cache = None
        if cfg.run.cache_policy != "off" and not cfg.model.trains_backbone:  # require + lora/full: refused earlier
            self.cache = open_cache(cfg, full.sample_ids(), self.rank)
        load_backbone = self.cache is None
        if self.cache is not None:
            from vla_ds.cache_store import CachedDataset

            self.train_ds = CachedDataset(self.train_ds, self.cache)
            self.val_ds = CachedDataset(self.val_ds, self.cache) if self.val_ds is not None else None
        else:  # the live backbone needs the images
            for ds in (self.train_ds, self.val_ds):
                if ds is not None:
                    ds.load_images = True
        self.model = QwenVLA(cfg.model, self.stats, device=self.device, load_backbone=load_backbone)
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
        loss, has = self.forward_loss(batch)
        self.engine.backward(loss)
        self.engine.step()
        return float(loss.detach()), int(has.sum())

    def forward_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective. The weighted loss of one micro batch and its has-sensor flags; a non-finite
        loss on any rank stops every rank."""
        from vla_ds.train.loss import sample_weights, weighted_loss

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

    @torch.no_grad()
    def validate(self) -> dict:
        """Collective. Mean per-sample (unweighted) loss on the validation episodes, split by sensor."""
        if self.val_ds is None:
            return {}
        from vla_ds.data.sampler import BalancedDistributedSampler

        sampler = BalancedDistributedSampler(self.val_ds.sample_has_sensor, num_replicas=self.world, rank=self.rank,
                                             shuffle=False)
        n_real = len(self.val_ds)
        self.engine.eval()
        sums = [0.0, 0.0, 0.0, 0.0]  # loss sensor, n sensor, loss no-sensor, n no-sensor
        k = 0
        for batch in self.loader(self.val_ds, sampler):
            out = self.engine(batch)
            for loss, has in zip(out.per_sample_loss.float().tolist(), batch["has_sensor"].tolist()):
                if self.rank + k * self.world < n_real:  # padded duplicates (equal shards) do not count
                    sums[0 if has else 2] += loss
                    sums[1 if has else 3] += 1
                k += 1
        self.engine.train()
        s = _all_sum(sums, self.device)
        n = s[1] + s[3]
        return {
            "val/loss_epoch": (s[0] + s[2]) / max(n, 1),
            "val/loss_sensor": s[0] / s[1] if s[1] else float("nan"),
            "val/loss_nosensor": s[2] / s[3] if s[3] else float("nan"),
        }

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
        micro_left = self.steps_per_epoch * accum - st.consumed // cfg.data.batch_size
        epoch, step, window = _Tally(), _Tally(), _Tally()
        for k, batch in enumerate(self.loader(self.train_ds, self.sampler)):
            if k >= micro_left or st.step >= self.total_steps:
                break  # the epoch's tail that does not fill an optimizer step is dropped
            loss, n_sensor = self.micro_step(batch)
            st.consumed += len(batch["sample_ids"])
            step.add(loss, n_sensor, len(batch["sample_ids"]))
            if (k + 1) % accum == 0:
                self._end_step(step, window)
                epoch.merge(step)
                step = _Tally()
        if st.consumed // (cfg.data.batch_size * accum) >= self.steps_per_epoch or st.step >= self.total_steps:
            e = epoch.all_sum(self.device)
            row = {"train/loss_epoch": e.loss / max(e.micro, 1), "train/sensor_ratio": e.sensor / max(e.samples, 1),
                   "epoch": st.epoch}
            self.logger.log(row, st.step)
            self.last.update(row)
            if cfg.optim.sched_on == "epoch":
                self.schedule.step()
            st.epoch += 1
            st.consumed = 0
            improved = self._validate_and_log() if not cfg.run.val_every else False
            self.checkpoint(best=improved)

    def _end_step(self, step: "_Tally", window: "_Tally") -> None:
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
        improved = self._validate_and_log() if cfg.run.val_every and st.step % cfg.run.val_every == 0 else False
        if improved or (cfg.run.save_every and st.step % cfg.run.save_every == 0):
            self.checkpoint(best=improved)
        from vla_ds.train.checkpoint import _fault

        _fault("kill_at_step", st.step)

    def _validate_and_log(self) -> bool:
        """Collective. Validate, log, and say whether the validation loss improved (same on every rank)."""
        row = self.validate()
        if not row:
            return False
        self.logger.log(row, self.state.step)
        self.last.update(row)
        v = row["val/loss_epoch"]
        improved = self.state.best_val_loss is None or v < self.state.best_val_loss
        if improved:
            self.state.best_val_loss = v
        log.info("step %d: val loss %.4f (sensor %.4f, no sensor %.4f)%s", self.state.step, v,
                 row["val/loss_sensor"], row["val/loss_nosensor"], " best so far" if improved else "")
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

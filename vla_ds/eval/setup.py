"""An evaluation's inputs, checked before anything heavy loads: the policy, the data it is scored on,
this rank's share of the episodes, the mean-chunk yardstick, and the VL cache when one stands in.

Every mismatch is one line naming the file and the fix: action dims, sensor channels, views (the
dataset refuses an episode without one), episode ids, a run without a validation split, and stats
that differ from the ones the policy was trained with (`--other-stats` to evaluate anyway).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vla_ds.errors import UsageError

log = logging.getLogger(__name__)


@dataclass
class EvalJob:
    located: object  # locate.Located
    policy: object  # QwenVLA
    dataset: object | None  # this rank's episodes (None: it has none)
    episode_ids: list[str]
    selection: str
    data: list[str]
    chunk: np.ndarray  # (H, A) mean-chunk yardstick
    chunk_source: str
    vl_source: str  # "live backbone" or "VL cache DIR"
    horizon: int
    action_dim: int
    seed: int = 0  # a flow head's noise seed

    def results(self, preds, tol: float) -> dict:
        """eval.json's content for the gathered predictions."""
        from vla_ds.eval.metrics import DIM_NAMES, DIM_UNITS, score

        if not preds.sample_ids:
            raise UsageError(f"--episodes {self.selection}: the selected episodes hold no sample to evaluate")
        return {
            "format": "vla-ds-eval", "version": 1,
            "policy": str(self.located.policy_dir), "run": str(self.located.run_dir) if self.located.run_dir else None,
            "checkpoint": self.located.checkpoint, "data": [str(d) for d in self.data],
            "episodes": self.selection, "episode_ids": self.episode_ids, "samples": len(preds.sample_ids),
            "sensor_samples": int(preds.has_sensor.sum()), "tol": tol, "horizon": self.horizon,
            "dims": list(DIM_NAMES), "units": list(DIM_UNITS), "mean_chunk": self.chunk.tolist(),
            "mean_chunk_source": self.chunk_source, "vl_source": self.vl_source,
            "action_head": self.policy.config.action_head,
            **({"flow_steps": self.policy.config.flow_steps, "seed": self.seed}
               if self.policy.config.action_head == "flow" else {}),
            "metrics": score(preds.pred, preds.target, preds.mask, preds.has_sensor, preds.episode_ids,
                             self.chunk, tol),
        }


def scoring_chunk(train_dataset, stats, horizon: int) -> tuple[np.ndarray, str]:
    """(the mean-chunk yardstick (H, A), where it came from): the training split's mean chunk when the
    run is known, else the policy's normalization mean at every step."""
    from vla_ds.eval.metrics import mean_chunk

    if train_dataset is not None and len(train_dataset):
        chunks, masks = zip(*(train_dataset.actions(i) for i in range(len(train_dataset))))
        return mean_chunk(np.stack(chunks).astype(np.float64), np.stack(masks)), \
            f"the training split's mean chunk ({len(train_dataset)} samples)"
    mean = np.asarray(stats.action_mean, np.float64)
    return np.broadcast_to(mean, (horizon, len(mean))).copy(), "the policy's stats.json action mean"


def _same_paths(a: list[str], b: list[str]) -> bool:
    return [Path(p).resolve() for p in a] == [Path(p).resolve() for p in b]


def check_stats(policy_dir: Path, data: list[str], other_stats: bool) -> None:
    """The data's stats.json (if any) must be the one the policy normalizes with."""
    from vla_ds.data.stats import NormStats, stats_path

    path = stats_path(None, data)
    if path is None or other_stats:
        return
    mine, theirs = NormStats.load(policy_dir), NormStats.load(path)
    same = len(mine.action_mean) == len(theirs.action_mean) and np.allclose(
        mine.action_mean + mine.action_std, theirs.action_mean + theirs.action_std, rtol=1e-4, atol=1e-8)
    if not same:
        raise UsageError(f"{path} differs from the stats the policy was trained with ({policy_dir / 'stats.json'}): "
                         "--data is other data than the policy's; evaluate on its own data, or pass --other-stats "
                         "to score it on these sessions anyway (its own stats still denormalize its actions)")


def _open_cache(args, run_cfg, model_cfg, data, sample_ids):
    """A CacheReader standing in for the frozen backbone, or None (--cache-policy, as in training)."""
    from vla_ds.cache import open_cache_for_training
    from vla_ds.config import TrainConfig

    if args.cache_policy == "off" or (run_cfg is None and not args.cache_dir):
        if args.cache_policy == "require":
            raise UsageError("--cache-policy require: the policy is not inside a run, so name its cache with --cache-dir")
        return None
    flat = dict(run_cfg.flat()) if run_cfg is not None else {}
    flat.update(model_cfg.to_dict(), data=list(data), cache_policy=args.cache_policy)
    if args.cache_dir:
        flat["cache_dir"] = args.cache_dir
    if args.backbone:
        flat["backbone"] = args.backbone
    return open_cache_for_training(TrainConfig.from_flat(flat), sample_ids)


def prepare(args, rank: int, world: int, device) -> EvalJob:
    """Collective only through nothing: every rank reads the same files and decides alike."""
    from vla_ds.cache import CachedDataset
    from vla_ds.cache.store import episode_of
    from vla_ds.config import config_from_yaml
    from vla_ds.data.dataset import ACTION_DIM, IntegratedDataset
    from vla_ds.data.split import split_by_episode
    from vla_ds.data.stats import NormStats
    from vla_ds.eval.locate import RUN_CONFIG, locate, select_episodes
    from vla_ds.model.policy import QwenVLA
    from vla_ds.model.serialization import read_policy_config

    located = locate(args.policy)
    try:
        meta, mcfg = read_policy_config(located.policy_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    run_cfg = config_from_yaml(located.run_dir / RUN_CONFIG) if located.run_dir else None
    data = list(args.data) or (list(run_cfg.data.data) if run_cfg else [])
    if not data:
        raise UsageError(f"--data is required: {args.policy} is not inside a training run, so its data is unknown")
    if args.episodes == "val" and args.data and run_cfg and not _same_paths(args.data, run_cfg.data.data):
        raise UsageError(f"--episodes val reads the run's validation split of its own --data "
                         f"({' '.join(run_cfg.data.data)}); leave --data out, or pass --episodes all to score every "
                         "episode of the data given")
    if mcfg.action_dim != ACTION_DIM:
        raise UsageError(f"{located.policy_dir / 'config.json'}: the policy predicts {mcfg.action_dim} action dims, "
                         f"the dataset's chunks have {ACTION_DIM}; evaluate a policy trained on vla-ds data")
    views = meta.get("views")
    kw = dict(views=views, horizon=mcfg.horizon, sensor_length=mcfg.sensor_temporal_length)
    try:
        full = IntegratedDataset(data, load_images=False, load_sensor=False, **kw)
    except (FileNotFoundError, ValueError) as e:
        msg = str(e)
        if views and msg.startswith("--views: "):  # the views are the policy's, not a flag of eval
            msg = (f"--data: {msg.removeprefix('--views: ')}, and the policy ({located.policy_dir / 'config.json'}) "
                   f"was trained on {', '.join(views)}; evaluate it on data recorded with those cameras")
        raise UsageError(msg) from None
    if mcfg.sensor_enabled and any(full.episode_has_sensor) and full.sensor_channels != mcfg.sensor_input_channels:
        raise UsageError(f"--data {' '.join(data)}: the episodes hold {full.sensor_channels} sensor channels, the policy "
                         f"({located.policy_dir / 'config.json'}) reads {mcfg.sensor_input_channels}; evaluate it on "
                         "data recorded with its sensor")
    check_stats(located.policy_dir, data, args.other_stats)
    train_ids, val_ids = (split_by_episode(full.episode_ids, run_cfg.data.val_ratio, run_cfg.run.seed,
                                           full.episode_has_sensor) if run_cfg else (None, None))
    ids = select_episodes(args.episodes, full.episode_ids, val_ids, str(args.policy))
    train = (IntegratedDataset(data, load_images=False, load_sensor=False, episode_ids=set(train_ids), **kw)
             if train_ids else None)
    chunk, chunk_source = scoring_chunk(train, NormStats.load(located.policy_dir), mcfg.horizon)
    mine = ids[rank::world]
    eval_ids = set(ids)
    sample_ids = [s for s in full.sample_ids() if episode_of(s) in eval_ids]
    reader = _open_cache(args, run_cfg, mcfg, data, sample_ids) if mcfg.finetune_vl == "none" else None
    policy = QwenVLA.from_pretrained(located.policy_dir, backbone=args.backbone, device=device,
                                     load_backbone=reader is None)
    if args.flow_steps is not None:
        if mcfg.action_head != "flow":
            raise UsageError(f"--flow-steps: {located.policy_dir} has a {mcfg.action_head} head, which samples "
                             "nothing; leave the flag out")
        policy.config.flow_steps = args.flow_steps
    dataset = None
    if mine:
        sensor = dict(sensor_channels=mcfg.sensor_input_channels) if mcfg.sensor_enabled else {}
        dataset = IntegratedDataset(data, load_images=reader is None, load_sensor=mcfg.sensor_enabled,
                                    episode_ids=set(mine), **kw, **sensor)
        if reader is not None:
            dataset = CachedDataset(dataset, reader)
    return EvalJob(located, policy, dataset, ids, args.episodes, data, chunk, chunk_source,
                   f"VL cache {reader.dir}" if reader is not None else "live backbone", mcfg.horizon, mcfg.action_dim,
                   args.seed)

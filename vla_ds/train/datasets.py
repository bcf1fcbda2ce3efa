"""A run's data: normalization stats, the episode split, and the VL cache standing in for the backbone."""
from __future__ import annotations

import logging

import torch.distributed as dist

from vla_ds.config import TrainConfig
from vla_ds.errors import UsageError

log = logging.getLogger(__name__)


def load_stats(cfg: TrainConfig):
    """--stats, else stats.json beside the first --data dir that has one, else computed now."""
    from vla_ds.data.format import find_episode_dirs
    from vla_ds.data.stats import NormStats, compute_stats, stats_path

    path = stats_path(cfg.data.stats, cfg.data.data)
    if path is not None:
        return NormStats.load(path)
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
    from vla_ds.cache import CacheReader, cache_dir_of, open_cache_for_training

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

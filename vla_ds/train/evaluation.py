"""What training measures on the validation episodes: the loss (every validation), and with
--eval-every N the open-loop metrics of `vla-ds eval` in robot units and degrees (`eval/...`).

Both are collective: under ZeRO-3 every forward gathers parameters from every rank, so every rank
runs the same number of batches (shards padded to equal length; the padding is not counted).
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from vla_ds.utils.dist import all_sum, share

log = logging.getLogger(__name__)


@torch.no_grad()
def validation_losses(trainer) -> dict:
    """Collective. Mean per-sample (unweighted) loss on the validation episodes, split by sensor."""
    if trainer.val_ds is None:
        return {}
    from vla_ds.data.sampler import BalancedDistributedSampler

    rank, world = trainer.rank, trainer.world
    sampler = BalancedDistributedSampler(trainer.val_ds.sample_has_sensor, num_replicas=world, rank=rank,
                                         shuffle=False)
    n_real = len(trainer.val_ds)
    trainer.engine.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss sensor, n sensor, loss no-sensor, n no-sensor
    k = 0
    for batch in trainer.loader(trainer.val_ds, sampler):
        out = trainer.engine(batch)
        for loss, has in zip(out.per_sample_loss.float().tolist(), batch["has_sensor"].tolist()):
            if rank + k * world < n_real:  # padded duplicates (equal shards) do not count
                sums[0 if has else 2] += loss
                sums[1 if has else 3] += 1
            k += 1
    trainer.engine.train()
    s = all_sum(sums, trainer.device)
    n = s[1] + s[3]
    return {
        "val/loss_epoch": (s[0] + s[2]) / max(n, 1),
        "val/loss_sensor": s[0] / s[1] if s[1] else float("nan"),
        "val/loss_nosensor": s[2] / s[3] if s[3] else float("nan"),
    }


class InTrainingEval:
    """`--eval-every`: the validation samples (an evenly spaced `--eval-max-samples` of them) scored like
    `vla-ds eval` does, with the training split's mean chunk as yardstick, logged under eval/."""

    def __init__(self, trainer):
        from vla_ds.errors import UsageError
        from vla_ds.eval.run import subsample
        from vla_ds.eval.setup import scoring_chunk

        if trainer.val_ds is None:
            raise UsageError("--eval-every needs validation episodes: pass --val-ratio > 0 (or drop --eval-every)")
        cfg = trainer.cfg
        self.trainer, self.tol = trainer, cfg.run.eval_tol
        chosen = subsample(len(trainer.val_ds), cfg.run.eval_max_samples)
        per_rank = -(-len(chosen) // trainer.world)
        padded = chosen + chosen[: per_rank * trainer.world - len(chosen)]  # equal shards: same batch count
        self.indices = padded[trainer.rank * per_rank:(trainer.rank + 1) * per_rank]
        self.real = max(0, min(per_rank, len(chosen) - trainer.rank * per_rank))  # this shard's unpadded head
        self.chunk, _ = scoring_chunk(trainer.train_ds, trainer.stats, cfg.model.horizon)

    def __call__(self) -> dict:
        """Collective. {"eval/<metric>": ...} of the policy now (the same on every rank)."""
        from vla_ds.eval.metrics import scored
        from vla_ds.eval.run import Predictions, gather_predictions, predict_dataset

        t, cfg = self.trainer, self.trainer.cfg
        mine = predict_dataset(t.model, t.val_ds, cfg.data.batch_size, cfg.data.num_workers, self.indices,
                               desc="eval", forward=t.engine)
        mine = Predictions(*(v[: self.real] for v in mine))
        preds = gather_predictions(mine, t.world, cfg.model.horizon, cfg.model.action_dim)
        row = {}
        if t.rank == 0:
            for prefix, sel in (("", slice(None)), ("sensor/", preds.has_sensor), ("no_sensor/", ~preds.has_sensor)):
                if np.asarray(preds.has_sensor[sel]).size:
                    s = scored(preds.pred[sel], preds.target[sel], preds.mask[sel], self.chunk, self.tol)
                    row.update({f"eval/{prefix}{k}": v for k, v in s["policy"].items() if k != "samples"})
                    if not prefix:
                        row.update({f"eval/{m}/final_pos_err": s[m]["final_pos_err"] for m in ("zero_motion", "mean_chunk")})
            row["eval/samples"] = len(preds.sample_ids)
        return share(row, t.world)

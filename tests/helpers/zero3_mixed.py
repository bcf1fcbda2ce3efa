"""`torchrun --nproc_per_node 2 -m tests.helpers.zero3_mixed BACKBONE OUT.json SENSED0 SENSED1`: the
policy under ZeRO-3 where rank r's micro-batches of 2 hold SENSEDr sensed samples (0: no sensor key
at all, the encoder runs on its dummy row). Each rank writes OUT.json.rank<r>: its losses, and the
sum of the gathered sensor-encoder weights (its missing-sensor embedding aside) before and after
training. A rank that skipped a
submodule would hang the other in its gather or reduce-scatter (the launch's timeout)."""
from __future__ import annotations

import json
import sys

import torch


def main(backbone: str, out: str, sensed: list[int]) -> None:
    import deepspeed

    from tests.helpers.batches import batch_of
    from tests.model.test_zero3 import SMALL
    from vla_ds.data.batch import packed_sensor
    from vla_ds.model.config import ModelConfig
    from vla_ds.model.policy import QwenVLA
    from vla_ds.utils.dist import init_distributed

    rank, _, _ = init_distributed()
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, **SMALL, finetune_vl="lora", sensor_enabled=True,
                      fusion_strategy="cross_attention")
    policy = QwenVLA(cfg, device="cpu")
    optim = torch.optim.AdamW([{**g, "lr": 3e-3} for g in policy.parameter_groups(0.0)])
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optim,
                                      config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}})
    batch = batch_of(2, has_sensor=[i < sensed[rank] for i in range(2)], seed=rank)
    sensor, valid, rows = packed_sensor(batch, 2, 64, 17)  # the collate format: only the sensed windows
    del batch["sensor"], batch["sensor_mask"]
    if len(rows):
        batch.update(sensor=sensor.half(), sensor_mask=valid, sensor_rows=rows)

    def weights() -> float:
        # the encoding weights (the missing-sensor embedding learns from every unsensed sample)
        params = [p for n, p in engine.module.sensor_encoder.named_parameters() if n != "missing_embedding"]
        with deepspeed.zero.GatheredParameters(params):
            return float(sum(p.double().sum() for p in params))

    before, losses = weights(), []
    for _ in range(3):
        loss = engine(batch).per_sample_loss.mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with open(f"{out}.rank{rank}", "w") as f:
        json.dump({"losses": losses, "before": before, "after": weights()}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(sys.argv[3]), int(sys.argv[4])])

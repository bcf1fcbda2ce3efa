"""DeepSpeed's overhead: one ZeRO-2 training step vs a plain PyTorch loop on the same tiny policy
(CPU, one process, same batch, LoRA + sensor). Goal: ZeRO-2 <= 1.3x plain. Writes docs/performance.md.

    .venv/bin/python -m tests.benchmarks.bench_deepspeed [--steps 30]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from tests.benchmarks.report import machine, update_section


def _time(step, n: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args(argv)

    from vla_ds.config import TrainConfig
    from vla_ds.data import synthetic
    from vla_ds.data.batch import collate
    from vla_ds.data.dataset import IntegratedDataset
    from vla_ds.data.ingest import IngestOptions, preprocess
    from vla_ds.data.stats import compute_stats
    from vla_ds.model.policy import QwenVLA
    from vla_ds.model.tiny import write_tiny_model
    from vla_ds.train.ds_config import load_ds_config, resolve_ds_config
    from vla_ds.train.engine import build_engine, optimizer_groups
    from vla_ds.train.loss import sample_weights, weighted_loss
    from vla_ds.utils.dist import init_distributed

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        backbone = write_tiny_model(tmp / "backbone")
        synthetic.make_session_a(tmp / "raw" / "needle", seed=0, duration_s=4.0, frame_spacing_s=1.0, image_size=(96, 128))
        preprocess([str(tmp / "raw")], tmp / "ds", IngestOptions(max_side=128))
        stats = compute_stats([tmp / "ds"])
        ds = IntegratedDataset(tmp / "ds")
        batch = collate([ds[i % len(ds)] for i in range(args.batch_size)])
        cfg = TrainConfig.from_flat({
            "data": [str(tmp / "ds")], "backbone": str(backbone), "finetune_vl": "lora", "sensor_enabled": True,
            "sensor_hidden_dim": 64, "sensor_output_dim": 64, "expert_hidden_dim": 64, "sensor_num_heads": 2,
            "expert_num_heads": 2, "head_dropout": 0.0, "lora_dropout": 0.0, "grad_accum_steps": 1,
            "batch_size": args.batch_size,
        })
        w = sample_weights(batch["has_sensor"], 2.0, True)

        torch.manual_seed(0)
        plain_model = QwenVLA(cfg.model, stats, device="cpu")
        opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in optimizer_groups(plain_model, cfg)])

        def plain_step():
            loss = weighted_loss(plain_model(batch).per_sample_loss, w)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(plain_model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        t_plain = _time(plain_step, args.steps)

        init_distributed()
        torch.manual_seed(0)
        ds_model = QwenVLA(cfg.model, stats, device="cpu")
        ds_cfg = resolve_ds_config(load_ds_config(Path(__file__).resolve().parents[2] / "ds_configs" / "zero2.json"),
                                   micro_batch=args.batch_size, grad_accum=1, world_size=1, grad_clip=1.0, lr=1e-4,
                                   weight_decay=0.01, hidden_size=64)
        engine, _ = build_engine(ds_model, cfg, ds_cfg)

        def ds_step():
            loss = weighted_loss(engine(batch).per_sample_loss, w)
            engine.backward(loss)
            engine.step()

        t_ds = _time(ds_step, args.steps)
        torch.distributed.destroy_process_group()

    ratio = t_ds / t_plain
    md = "\n".join([
        "## DeepSpeed overhead (`tests/benchmarks/bench_deepspeed.py`)",
        "",
        f"Machine: {machine()}. Tiny Qwen2.5-VL + LoRA + sensor encoder + concat fusion + expert (head width 64), "
        f"batch {args.batch_size}, one process, median of {args.steps} steps after 5 warm-up steps.",
        "",
        "| loop | step time | ratio |",
        "|---|---|---|",
        f"| plain PyTorch (torch AdamW, grad clipping) | {t_plain * 1e3:.1f} ms | 1.00 |",
        f"| DeepSpeed ZeRO-2 (ds_configs/zero2.json, DeepSpeed AdamW) | {t_ds * 1e3:.1f} ms | {ratio:.2f} |",
        "",
        f"Goal ≤ 1.3×: {'met' if ratio <= 1.3 else 'not met'}.",
    ])
    print(md)
    update_section("performance.md", "deepspeed", md)


if __name__ == "__main__":
    main()

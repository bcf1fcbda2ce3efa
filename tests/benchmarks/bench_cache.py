"""VL feature cache: build throughput, one training step in cache mode vs live-backbone mode with
the same head (forward + backward + AdamW step), and cache-mode training with `--sensor-enabled` on
the users' mix (5 % of samples sensed): sparse batches vs the dense ones vla-ds shipped before vs no
sensor encoder, loader and steps together. Writes two sections of docs/performance.md.

    .venv/bin/python -m tests.benchmarks.bench_cache [--sessions 6] [--seconds 10] [--steps 20]

Live mode = what `--finetune-vl none --vl-tokens 0 --cache-policy off` does per step: decode the
views' JPEGs, run the processor and the frozen tiny backbone, pool its tokens, then the head. Cache
mode = read the features by memory map, then the same head (built with `load_backbone=False`: no
backbone weights at all).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tests.benchmarks.bench_loader import Dense  # the items of before: a float32 window for every sample
from tests.benchmarks.report import machine, publish, update_section
from vla_ds.cache import CachedDataset, CacheReader, build_cache
from vla_ds.config import TrainConfig
from vla_ds.data import synthetic
from vla_ds.data.batch import collate
from vla_ds.data.dataset import IntegratedDataset
from vla_ds.data.ingest import IngestOptions, preprocess
from vla_ds.model.config import ModelConfig
from vla_ds.model.policy import QwenVLA
from vla_ds.model.tiny import write_tiny_model

VIEWS = ["View1", "View5"]
BACKBONE = dict(finetune_vl="none", head_dropout=0.1, max_pixels=224 * 224)
# The cache removes the images and the backbone from a step; what is left is the head, so the
# speed-up depends on its size: measured for three.
HEADS = {
    "small": dict(expert_hidden_dim=64, expert_num_layers=2, expert_num_heads=4),
    "moderate": dict(expert_hidden_dim=256, expert_num_layers=4, expert_num_heads=8),
    "default": {},
}


def build_data(root: Path, sessions: int, seconds: float) -> Path:
    raw = root / "raw"
    for k in range(sessions):
        if k % 3 == 0:
            synthetic.make_session_a(raw / "needle", seed=k, duration_s=seconds, frame_spacing_s=0.5,
                                     image_size=(360, 480))
        else:
            synthetic.make_session_b(raw / "retina", seed=k, duration_s=seconds, frame_spacing_s=0.5,
                                     image_size=(360, 480))
    preprocess([str(raw)], root / "ds", IngestOptions(max_side=224), workers=2)
    return root / "ds"


def step_times(policy, batches, steps: int, make_batch) -> tuple[float, float]:
    """Median seconds per step: (batch loading + model step, model step alone)."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    full, model = [], []
    for k in range(steps + 3):
        t0 = time.perf_counter()
        batch = make_batch(batches[k % len(batches)])
        t1 = time.perf_counter()
        loss = policy(batch).per_sample_loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        if k >= 3:  # warm-up steps are not the steady state
            full.append(t2 - t0)
            model.append(t2 - t1)
    return statistics.median(full), statistics.median(model)


def train_rate(policy, ds, batch_size: int, batches: int, workers: int) -> tuple[float, list[int]]:
    """(samples/s, sensed samples per batch) of cache-mode training -- the loader (`workers`
    processes) and forward + backward + AdamW in the main process -- over `batches` batches in one
    seeded shuffled order: a mean over the order, sensed and unsensed batches alike."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    loader = iter(DataLoader(ds, batch_size=batch_size, sampler=order, num_workers=workers, collate_fn=collate))
    sensed = []
    for k in range(batches + 2):
        if k == 2:  # worker start-up and the first steps are not the steady state
            t0 = time.perf_counter()
        batch = next(loader)
        loss = policy(batch).per_sample_loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k >= 2:
            sensed.append(int(batch["has_sensor"].sum()))
    return batches * batch_size / (time.perf_counter() - t0), sensed


def sensor_mix(root: Path, backbone: Path, args) -> None:
    """The `cache-sensor` section: 1 sensed session in 20, as in the users' data."""
    raw = root / "mix-raw"
    for k in range(20):
        make = synthetic.make_session_a if k == 0 else synthetic.make_session_b
        make(raw / ("needle" if k == 0 else "retina"), seed=k, duration_s=args.seconds, frame_spacing_s=0.5,
             image_size=(360, 480))
    ds_dir = root / "mix"
    preprocess([str(raw)], ds_dir, IngestOptions(max_side=224), workers=2)
    cfg = TrainConfig.from_flat({"backbone": str(backbone), **BACKBONE, "data": [str(ds_dir)], "views": VIEWS,
                                 "vl_tokens": 0, "cache_dir": str(root / "mix-cache"), "num_workers": 0})
    build_cache(cfg, shard_size=256, num_workers=2)
    reader = CacheReader(root / "mix-cache")

    def dataset(sensor: bool):
        return CachedDataset(IntegratedDataset(ds_dir, views=VIEWS, load_images=False, load_sensor=sensor), reader)

    common = dict(backbone=str(backbone), **BACKBONE, vl_tokens=0)
    torch.manual_seed(0)
    sensed = QwenVLA(ModelConfig(**common, sensor_enabled=True), device="cpu", load_backbone=False)
    plain = QwenVLA(ModelConfig(**common, fusion_strategy="none"), device="cpu", load_backbone=False)
    sparse_ds = dataset(True)
    share = float(sparse_ds.sample_has_sensor.mean())
    runs = {"`--sensor-enabled`, sparse batches (vla-ds)": (sensed, sparse_ds),
            "`--sensor-enabled`, dense batches (vla-ds before: a float32 window per sample, every row encoded)":
                (sensed, Dense(sparse_ds)),
            "without a sensor encoder (`--fusion-strategy none`)": (plain, dataset(False))}
    rates = {name: train_rate(m, ds, args.batch_size, args.mix_batches, 2) for name, (m, ds) in runs.items()}
    new, old, none = (r[0] for r in rates.values())
    counts = rates[next(iter(rates))][1]
    load = os.getloadavg()[0]
    publish("cache-sensor", [
        "## Cache-mode training on the users' mix (`tests/benchmarks/bench_cache.py`)",
        "",
        f"Machine: {machine()}; load average {load:.1f} during the run. Data: 20 synthetic sessions of "
        f"{args.seconds:.0f} s, one with a sensor ({len(sparse_ds)} samples, {share:.1%} sensed; the users' mix is "
        f"5.5 %), pooled VL features from a cache, default head and sensor encoder (650 × 1026 windows), batch "
        f"{args.batch_size}, 2 loader workers, forward + backward + AdamW in the main process "
        f"(`torch.set_num_threads({args.threads})`), {args.mix_batches} batches in one shuffled order "
        f"({sum(c > 0 for c in counts)} of them with a sensed sample, {sum(counts)} sensed samples): "
        "a mean over the order, loader included.",
        "",
        "| training | samples/s | vs no encoder |",
        "|---|---|---|",
        *[f"| {name} | {rate:.1f} | {none / rate:.2f}× the time |" for name, (rate, _) in rates.items()],
        "",
        f"Sparse batches train **{new / old:.1f}×** as fast as the dense ones; against no sensor encoder a sample "
        f"takes {none / new:.2f}× the time (the sensed batches run the conv stems on a whole window; the others the "
        "dummy row, and AdamW updates the encoder's weights every step: see the sensor-step section).",
    ])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable figures on a shared machine)")
    ap.add_argument("--mix-batches", type=int, default=40, help="batches per loader on the users' mix")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        backbone = write_tiny_model(root / "tiny", seed=0)
        ds_dir = build_data(root, args.sessions, args.seconds)
        cfg = TrainConfig.from_flat({"backbone": str(backbone), **BACKBONE, "data": [str(ds_dir)], "views": VIEWS,
                                     "batch_size": args.batch_size, "num_workers": 0})
        builds = {}
        for name, tokens, workers in (("pooled (`--vl-tokens 0`), in the main process", 0, 0),
                                      ("pooled, 2 loader workers (decode + processor)", 0, 2),
                                      ("pooled + 17 tokens (`--vl-tokens 17`, the frozen default), 2 loader workers",
                                       17, 2)):
            cfg.run.cache_dir = str(root / f"cache{tokens}-{workers}")
            cfg.model = dataclasses.replace(cfg.model, vl_tokens=tokens)  # K is the model's --vl-tokens
            builds[name] = build_cache(cfg, shard_size=256, num_workers=workers)
        reader = CacheReader(root / "cache0-0")
        live_ds = IntegratedDataset(ds_dir, views=VIEWS, load_sensor=False)
        cache_ds = CachedDataset(IntegratedDataset(ds_dir, views=VIEWS, load_images=False, load_sensor=False), reader)
        n = len(live_ds)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randperm(n, generator=g)[: args.batch_size].tolist() for _ in range(8)]
        rows = {}
        for name, head in HEADS.items():
            # --vl-tokens 0 in both modes: live mode reduces the backbone's tokens as the pooled cache does
            config = ModelConfig(backbone=str(backbone), **BACKBONE, **head, vl_tokens=0)
            torch.manual_seed(0)
            live = QwenVLA(config, device="cpu", load_backbone=True)
            cached = QwenVLA(config, device="cpu", load_backbone=False)
            cached.load_state_dict({k: v for k, v in live.state_dict().items() if not k.startswith("vl.")})
            label = (f"{name}: expert {config.expert_hidden_dim} × {config.expert_num_layers} layers, "
                     f"{cached.parameter_counts()['trainable_M']:.1f} M parameters")
            rows[label] = (step_times(live, batches, args.steps, lambda b: collate([live_ds[i] for i in b])),
                          step_times(cached, batches, args.steps, lambda b: collate([cache_ds[i] for i in b])))
        item = live_ds[0]
        seq = int(live.vl.processor_inputs([item["images"]], [item["instruction"]])["input_ids"].shape[1])

    load = os.getloadavg()[0]
    lines = [
        "## VL feature cache (`tests/benchmarks/bench_cache.py`)",
        "",
        f"Machine: {machine()}. Data: {args.sessions} synthetic sessions, {n} samples, views {' + '.join(VIEWS)} "
        f"re-encoded at 224 px (longer side), `--max-pixels {224 * 224}` ({seq} tokens per sample with the "
        "instruction). Backbone: the tiny Qwen2.5-VL (vla-ds tiny-model), fp32.",
        "",
        "| cache build (1 process) | samples/s | bytes/sample |",
        "|---|---|---|",
        *[f"| {k} | {v['samples_per_s']:.0f} | {v['bytes_per_sample']} |" for k, v in builds.items()],
        "",
        f"One training step, batch {args.batch_size} (fusion none; forward + backward + AdamW step), median of "
        f"{args.steps} steps, `torch.set_num_threads({args.threads})`; the same head weights in both modes. "
        "Step times include getting the batch from the dataset in the main process (the model step alone in "
        "parentheses):",
        "",
        "| head | live backbone (`--cache-policy off`) | VL cache, pooled (`load_backbone=False`) | speed-up |",
        "|---|---|---|---|",
        *[f"| {name} | {live[0] * 1e3:.1f} ms ({live[1] * 1e3:.1f}) | {cache[0] * 1e3:.1f} ms ({cache[1] * 1e3:.1f}) "
          f"| **{live[0] / cache[0]:.1f}×** |" for name, (live, cache) in rows.items()],
        "",
        "Live mode decodes 2 JPEGs per sample, resizes and normalizes them (processor) and runs the frozen "
        "backbone under no_grad, then pools its tokens (`--vl-tokens 0`). Cache mode reads one fp16 row per "
        "sample from a memory map. In both the head attends over the same one pooled token: the step is the head's "
        "forward, backward and optimizer step alone, so the speed-up is (images + backbone + head) / head. "
        "With the tiny backbone the processor and JPEG decode are most of the removed cost, and the speed-up is "
        f"bounded by the head's own step: {' / '.join(f'{lv[0] / ch[0]:.1f}×' for lv, ch in rows.values())} for "
        f"the {' / '.join(name.split(':')[0] for name in rows)} heads "
        f"(the issue's 20× goal is {'met' if max(lv[0] / ch[0] for lv, ch in rows.values()) >= 20 else 'not met'} "
        "on this CPU with the tiny backbone). With the real 3B backbone the removed forward is, by estimate, "
        "~1.5 TFLOP per 2-view sample (vision tower 0.67 B parameters over 256 patches per 224-px view, language "
        "model ~2.8 B over ~160 tokens) against ~0.2 GFLOP for the moderate head's forward + backward, so the "
        f"speed-up there is orders of magnitude larger. Load average during the run: {load:.1f} on "
        f"{os.cpu_count()} cores (other jobs shared the machine; times vary by ~±30 %).",
    ]
    md = "\n".join(lines)
    print(md)
    update_section("performance.md", "cache", md)
    with tempfile.TemporaryDirectory() as tmp:
        sensor_mix(Path(tmp), write_tiny_model(Path(tmp) / "tiny", seed=0), args)


if __name__ == "__main__":
    main()

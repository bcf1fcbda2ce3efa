"""Host memory per rank while the policy loads, 2 processes: ZeRO-2 (every rank loads the whole
backbone), ZeRO-3 as vla-ds loads it (whole, then partitioned by `deepspeed.initialize`), and ZeRO-3
through transformers' partitioned path (`HfDeepSpeedConfig` -> `deepspeed.zero.Init`, as
`partitioned_loading` below): the candidate issue 18 asked for, measured before adopting it. For the tiny
backbone and for the 3B's widths with the depth cut to 2 LM and 2 vision blocks (random weights,
float32 as on a CPU; the 311 M-parameter embedding is whole-model size). LoRA, no sensor.

Per rank: the peak resident memory (ru_maxrss) after the policy is built and after
`deepspeed.initialize`, and the backbone parameters the rank holds after the build. Writes the
"zero3-load" section of docs/performance.md.

    .venv/bin/python -m tests.benchmarks.bench_zero3_load [--skip-3b]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

CASES = {"zero2": (2, False), "zero3, whole load (vla-ds)": (3, False),
         "zero3, transformers' zero.Init load": (3, True)}


@contextlib.contextmanager
def partitioned_loading(ds_cfg: dict, enabled: bool):
    """Under ZeRO-3, build the backbone partitioned: transformers' `from_pretrained` sees an
    `HfDeepSpeedConfig` and loads inside `deepspeed.zero.Init`, so each rank holds only its share of
    the weights (gathered one module at a time while they load), never the whole backbone. The
    policy's own heads and LoRA adapters are built whole and partitioned by `deepspeed.initialize`.
    The config is unset afterwards: a later model in the same process (eval, another run) loads whole."""
    if not enabled:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_cfg)  # transformers holds it by a weak reference
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


def _held(p) -> int:
    """Elements of `p` this rank stores: a ZeRO-3 partitioned parameter's share is its ds_tensor."""
    t = getattr(p, "ds_tensor", None)
    return t.numel() if t is not None and p.numel() == 0 else p.numel()


class _AnonPeak:
    """The peak of this process's anonymous resident memory (RssAnon: not the checkpoint's
    memory-mapped file pages, which every rank shares), sampled every 20 ms."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _now(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])  # kB
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            self._stop.wait(0.02)

    def stop(self):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())


def child(backbone: str, stage: int, partitioned: bool, out: str) -> None:
    """One rank: build the policy the way the trainer does, then deepspeed.initialize."""
    import deepspeed
    import torch

    from vla_ds.model.config import ModelConfig
    from vla_ds.model.policy import QwenVLA
    from vla_ds.utils.dist import init_distributed

    rank, world, _ = init_distributed()
    anon = _AnonPeak()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
          "zero_optimization": {"stage": stage}}
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, finetune_vl="lora", expert_hidden_dim=64, expert_num_layers=1,
                      expert_num_heads=4, dtype="float32")
    with partitioned_loading(ds, partitioned):
        policy = QwenVLA(cfg, device="cpu")
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    built_anon = anon.peak / 2**20
    held = sum(_held(p) for n, p in policy.named_parameters() if n.startswith("vl."))
    full = sum(getattr(p, "ds_numel", p.numel()) for n, p in policy.named_parameters() if n.startswith("vl."))
    optim = torch.optim.AdamW([{**g, "lr": 1e-4} for g in policy.parameter_groups(0.0)])
    deepspeed.initialize(model=policy, optimizer=optim, config=ds)
    init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    anon.stop()
    Path(f"{out}.rank{rank}").write_text(json.dumps({"built_gib": built, "init_gib": init, "held": held, "full": full,
                                                     "built_anon_gib": built_anon, "init_anon_gib": anon.peak / 2**20}))
    import torch.distributed as dist

    dist.destroy_process_group()


def _depth_cut_3b(root: Path) -> Path:
    import torch

    from vla_ds.model.tiny import build_tokenizer, full_size_config, write_tiny_model
    from vla_ds.profiling.plan import DEFAULT_BACKBONE

    config = full_size_config(DEFAULT_BACKBONE, build_tokenizer())
    config.text_config.num_hidden_layers = 2
    if getattr(config.text_config, "layer_types", None):
        config.text_config.layer_types = config.text_config.layer_types[:2]
    config.vision_config.depth = 2
    config.vision_config.fullatt_block_indexes = [1]
    path = root / "qwen2_5_vl_3b_depth2.json"
    config.to_json_file(str(path))
    return write_tiny_model(root / "qwen-3b-widths", config_json=path, dtype=torch.bfloat16)


def main() -> None:
    from tests.benchmarks.report import machine, publish
    from vla_ds.model.tiny import write_tiny_model
    from vla_ds.utils.dist import torchrun

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-3b", action="store_true", help="the tiny backbone only")
    args = ap.parse_args()
    lines = [f"Measured by `tests/benchmarks/bench_zero3_load.py` on {machine()}: 2 processes (gloo), LoRA, float32, "
             "peak resident memory per rank (ru_maxrss, GiB; the Python, torch and DeepSpeed runtime is ~0.45 GiB of "
             "it) and the share of the backbone's parameters a rank holds once the policy is built.", "",
             "| backbone | preset | backbone held per rank | peak RSS after build | peak after deepspeed.initialize | peak anonymous RSS after build | after initialize |",
             "|---|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {"tiny": write_tiny_model(root / "tiny", seed=0)}
        if not args.skip_3b:
            models["3B widths, 2 + 2 blocks"] = _depth_cut_3b(root)
        for label, backbone in models.items():
            for case, (stage, partitioned) in CASES.items():
                out = root / f"{label[:4]}-{stage}-{int(partitioned)}.json"
                proc = torchrun("tests.benchmarks.bench_zero3_load",
                                ["--child", str(backbone), str(stage), str(int(partitioned)), str(out)], nproc=2,
                                env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])}, timeout=1800)
                assert proc.returncode == 0, proc.stderr[-3000:]
                ranks = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in (0, 1)]
                held = max(r["held"] / r["full"] for r in ranks)
                peaks = " | ".join(f"{max(r[k] for r in ranks):.2f}" for k in ("built_gib", "init_gib", "built_anon_gib",
                                                                                 "init_anon_gib"))
                lines.append(f"| {label} ({ranks[0]['full'] / 1e6:.1f} M) | {case} | {held:.0%} | {peaks} |")
                print(lines[-1], flush=True)
    publish("zero3-load", lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5])
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        main()

"""Host memory per rank while the policy loads, 2 processes: ZeRO-2 (every rank loads the whole
backbone), ZeRO-3 as vla-ds loads it now (`vla_ds.model.zero3_load`: built under `zero.Init`, each rank
reading only its shard from the safetensors), and two baselines: ZeRO-3 loading whole then
partitioned by `deepspeed.initialize` (vla-ds before issue 18), and transformers' partitioned path
(`HfDeepSpeedConfig` -> `zero.Init` inside `from_pretrained`). For the tiny backbone, a wider test-size
one (66 M, the test's) and the 3B's widths with the depth cut to 2 LM and 2 vision blocks (random
weights, bf16 on disk, loaded in float32 as on a CPU; the 311 M-parameter embedding is whole-model
size). LoRA, no sensor. The measuring rank is `tests.helpers.load_peak`.

Writes the "zero3-load" section of docs/performance.md.

    .venv/bin/python -m tests.benchmarks.bench_zero3_load [--skip-3b]
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

CASES = {"zero2": "ZeRO-2 (whole)", "zero3-whole": "ZeRO-3, whole then partitioned (before)",
         "zero3-hf": "ZeRO-3, transformers' zero.Init load", "zero3": "**ZeRO-3, vla-ds partitioned load (now)**"}
# The test's wider backbone (tests/train/test_zero3_load_memory.py): weights well above the runtime.
WIDE = dict(hidden_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=4096,
            vision_hidden_size=256, vision_heads=4, vision_intermediate_size=1024)


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
    import torch

    from tests.benchmarks.report import machine, publish
    from tests.helpers.load_peak import run
    from vla_ds.model.tiny import TinySpec, write_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-3b", action="store_true", help="the small backbones only")
    args = ap.parse_args()
    lines = [f"Measured by `tests/benchmarks/bench_zero3_load.py` on {machine()}: 2 processes (gloo), LoRA, float32. "
             "Per rank (the larger of the two), GiB: the growth of anonymous resident memory (RssAnon) from just "
             "before the policy is built to its peak while building, and to its peak through deepspeed.initialize; "
             "the growth of the peak of all resident memory (ru_maxrss, the checkpoint's mapped file pages "
             "included); and the share of the backbone's parameters the rank holds once built. The libraries are "
             "imported before the baseline (~0.3 GiB anonymous, the same in every row).", "",
             "| backbone | load | backbone held per rank | anonymous: build | anonymous: + initialize | "
             "all resident: + initialize | vs ZeRO-2 (anonymous, + initialize) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {"tiny": write_tiny_model(root / "tiny", seed=0),
                  "wide test model": write_tiny_model(root / "wide", spec=TinySpec(**WIDE), dtype=torch.bfloat16)}
        if not args.skip_3b:
            models["3B widths, 2 + 2 blocks"] = _depth_cut_3b(root)
        for label, backbone in models.items():
            base = None
            for mode, case in CASES.items():
                ranks = run(backbone, mode, root / f"{label[:4]}-{mode}.json")
                held = max(r["held"] / r["full"] for r in ranks)
                build = max(r["built_anon_gib"] - r["before_anon_gib"] for r in ranks)
                init = max(r["init_anon_gib"] - r["before_anon_gib"] for r in ranks)
                rss = max(r["init_gib"] - r["before_gib"] for r in ranks)
                base = init if base is None else base
                lines.append(f"| {label} ({ranks[0]['full'] / 1e6:.1f} M) | {case} | {held:.0%} | {build:.3f} | "
                             f"{init:.3f} | {rss:.3f} | {init / base:.2f} |")
                print(lines[-1], flush=True)
    publish("zero3-load", lines)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()

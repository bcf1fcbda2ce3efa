"""`vla-ds convert CHECKPOINT OUT_DIR`: DeepSpeed checkpoint -> plain safetensors + a policy directory."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vla_ds.cli.common import subcommand

log = logging.getLogger(__name__)


def add_parser(sub, name: str) -> None:
    p = subcommand(sub, name, run,
                   help="DeepSpeed checkpoint -> plain safetensors + a policy that predicts without DeepSpeed",
                   description="Gather a ZeRO-2/3 checkpoint into OUT_DIR: model.safetensors (or shards + index), "
                               "policy/ (QwenVLA.from_pretrained) and, with --merge-lora, backbone/ (a Qwen2.5-VL "
                               "directory with the LoRA merged). CHECKPOINT: a step directory, a pointer "
                               "(RUN/checkpoints/latest|best|final), a run directory, or a raw DeepSpeed "
                               "directory with --policy-config. See docs/checkpoints.md.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="step directory, pointer, run directory or DeepSpeed dir")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, nargs="?",
                   help="output directory (new, or an earlier convert output); not with --universal")
    p.add_argument("--universal", action="store_true",
                   help="instead: write the step as DeepSpeed's universal checkpoint into STEP/universal/, which a "
                   "--resume on another number of processes reads (done on such a resume anyway; ahead of time "
                   "here, e.g. on a login node, so the job's ranks do not wait for it)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the written floating-point tensors")
    p.add_argument("--trainable-only", action="store_true",
                   help="write only the vla-ds-owned weights and the trained backbone part (LoRA adapters or "
                   "unfrozen blocks), not the frozen backbone")
    p.add_argument("--merge-lora", action="store_true",
                   help="fold the trained backbone (LoRA) into OUT_DIR/backbone, a standalone Qwen2.5-VL directory; "
                   "the policy then uses it frozen and holds no LoRA weights")
    p.add_argument("--adapter-only", action="store_true",
                   help="write only the LoRA as a standard PEFT adapter (adapter_config.json + "
                   "adapter_model.safetensors) that peft.PeftModel.from_pretrained(base, OUT_DIR) loads")
    p.add_argument("--max-shard-size", default="2GB",
                   help="above this, weights are sharded (model-0000k-of-0000n.safetensors + index)")
    p.add_argument("--tag", default=argparse.SUPPRESS,
                   help="DeepSpeed tag to read (unset: the one in the `latest` file)")
    p.add_argument("--policy-config", type=Path, default=argparse.SUPPRESS, metavar="DIR",
                   help="policy directory (config.json + stats.json) for a raw DeepSpeed checkpoint, or to override "
                   "the checkpoint's")
    p.add_argument("--backbone", default=argparse.SUPPRESS, metavar="PATH",
                   help="backbone directory, if it moved since training (unset: the one in the policy config)")


def run(args: argparse.Namespace) -> int:
    from vla_ds.convert import convert_checkpoint, convert_universal
    from vla_ds.errors import UsageError

    if args.universal:
        other = [f for f in ("trainable_only", "merge_lora", "adapter_only") if getattr(args, f)]
        if other:
            raise UsageError(f"--universal and --{other[0].replace('_', '-')}: the universal checkpoint is for resuming, "
                             "not a policy; give one of the two")
        if args.out_dir is not None:
            raise UsageError(f"--universal writes into the step directory (STEP/universal); drop OUT_DIR {args.out_dir}")
        convert_universal(args.checkpoint)
        return 0
    if args.out_dir is None:
        raise UsageError("OUT_DIR is missing: vla-ds convert CHECKPOINT OUT_DIR (or CHECKPOINT --universal)")

    convert_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype, trainable_only=args.trainable_only,
                       merge_lora=args.merge_lora, adapter_only=args.adapter_only,
                       max_shard_size=args.max_shard_size, tag=getattr(args, "tag", None),
                       policy_config=getattr(args, "policy_config", None), backbone=getattr(args, "backbone", None))
    return 0

"""`vla-ds convert`: a DeepSpeed checkpoint -> plain safetensors + a policy directory that predicts
without DeepSpeed (and, with --merge-lora, a standalone Qwen2.5-VL with the LoRA folded in).

The rooms: `checkpoint` (finding a checkpoint's pieces, gathering ZeRO shards, writing OUT_DIR; its
docstring documents the layout) and `lora` (the merge). Weight-file helpers (`read_state_dict`,
`refuse_pickle`) live in `vla_ds.utils.weights`.
"""
from vla_ds.convert.checkpoint import CheckpointSource, convert_checkpoint, convert_universal, resolve_checkpoint
from vla_ds.utils.weights import read_state_dict

__all__ = ["convert_checkpoint", "convert_universal", "resolve_checkpoint", "CheckpointSource", "read_state_dict"]

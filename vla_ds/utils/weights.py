"""Weight files: safetensors only, loaded strictly; pickles refused.

- `refuse_pickle(path)`: a one-line `UsageError` for a torch/python pickle (loading one can run
  arbitrary code); vla-ds never unpickles a file it is given
- `load_torch_state(path)` / `verify_torch_files(paths)`: the one way a DeepSpeed checkpoint's torch
  files are read: `weights_only=True` with an allowlist of the few DeepSpeed types their states hold
  (`DEEPSPEED_STATE_GLOBALS`), so a crafted pickle is refused in one line naming the file and never runs
- `load_strict(targets, tensors, required, source, against)`: copy tensors into a model's
  parameters/buffers with exact name and shape checks (never a silent partial load)
- `save_state_dict` / `read_state_dict`: model.safetensors, or the Hugging Face sharded layout
  (model-0000k-of-0000n.safetensors + model.safetensors.index.json) above a size
- `parse_size("2GB")`: sizes as the Hugging Face tools write them
"""
from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

from vla_ds.errors import UsageError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format


def is_pickle(path: str | os.PathLike) -> bool:
    """True if `path` is a file that is (or claims to be) a torch/python pickle: a pickle suffix, a
    zip archive (torch.save's format) or a pickle stream (protocol >= 2)."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(p, "rb") as f:
        head = f.read(4)
    return head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def refuse_pickle(path: str | os.PathLike) -> None:
    """Raise `UsageError` (one line) when `path` is a pickle: loading one can run arbitrary code."""
    if is_pickle(path):
        raise UsageError(
            f"{path} is a torch pickle, which can run code when loaded; vla-ds reads safetensors only: convert it "
            "where you trust it (torch.load + safetensors.torch.save_file) or point at a vla-ds checkpoint")


# The only non-tensor, non-builtin types in DeepSpeed 0.19's checkpoint states (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on the four presets' checkpoints -- ZeRO-2/3,
# with and without CPU offload -- in fp32 and bf16; the dynamic loss scaler is fp16's). Anything
# else in a checkpoint is refused, not unpickled.
DEEPSPEED_STATE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed_globals() -> list:
    out = []
    for name in DEEPSPEED_STATE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed release: that type cannot be in its files
            pass
    return out


def load_torch_state(path: str | os.PathLike, map_location=None, mmap: bool = False):
    """`torch.load(path, weights_only=True)` allowing `DEEPSPEED_STATE_GLOBALS` only (for this call:
    `safe_globals` is scoped, nothing else inherits it). A file that needs anything else -- a crafted
    pickle that would run code -- is a `UsageError` naming the file and what it asked for."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            # torch.serialization.load, not torch.load: a caller may have routed torch.load here
            # (vla_ds/train/elastic.py does, around DeepSpeed's converter)
            return torch.serialization.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
        what = f"references {found.group(1)}" if found else "holds objects other than tensors and DeepSpeed's state"
        raise UsageError(f"{path}: refused: it {what}, which no DeepSpeed checkpoint holds, and unpickling it could "
                         "run code; use a checkpoint written by your own runs, or ask its author for the converted "
                         "policy (safetensors)") from None
    except (RuntimeError, EOFError, OSError) as e:  # truncated or not a torch file at all
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__  # torch's own text runs to a paragraph
        raise UsageError(f"{path}: cannot be read ({why}): the checkpoint is damaged or incomplete; use an earlier "
                         "one") from None


def verify_torch_files(paths: Iterable[str | os.PathLike]) -> None:
    """Check that each torch file loads under `load_torch_state`'s rules (a `UsageError` otherwise), for
    code that must hand them to a loader we do not control (DeepSpeed's zero_to_fp32). Memory-mapped
    where the format allows, so a large optimizer shard is not read into memory to be checked."""
    import zipfile

    for p in paths:
        load_torch_state(p, map_location="cpu", mmap=zipfile.is_zipfile(p))


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """Bytes of "2GB", "500MB", "200KB" or an int; a `UsageError` naming `flag` otherwise."""
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        return int(text) if isinstance(text, int) else parse_size_to_int(str(text))
    except ValueError:
        raise UsageError(f"{flag} {text}: give a size such as 2GB, 500MB or 200KB") from None


def _names(names: list[str], k: int) -> str:
    return f"{names[:k]}{' ...' if len(names) > k else ''} ({len(names)})"


def load_strict(targets: dict, tensors: dict, required: Iterable[str], source: str, against: str) -> list[str]:
    """Copy `tensors` {name: tensor} into `targets` {name: parameter or buffer} in place.

    Strict: every name of `required` must be in `tensors`, every name of `tensors` in `targets`,
    and shapes must be equal; otherwise a `UsageError` naming `source` (the file) and `against`
    (what the model was built from) and the offending names. Entries are popped from `tensors` as
    they are copied, so a large checkpoint is not held twice. Returns the names copied.
    """
    import torch

    missing = [n for n in required if n not in tensors]
    unexpected = [n for n in tensors if n not in targets]
    if missing or unexpected:
        raise UsageError(f"{source}: its weights do not match the model built from {against}: missing "
                         f"{_names(missing, 5)}, unexpected {_names(unexpected, 5)}")
    names = list(tensors)
    with torch.no_grad():
        for name in names:
            value, target = tensors.pop(name), targets[name]
            if tuple(value.shape) != tuple(target.shape):
                raise UsageError(f"{source}: {name} is {tuple(value.shape)} there but {tuple(target.shape)} in the "
                                 f"model built from {against}")
            target.copy_(value)
    return names


def save_state_dict(tensors: dict, out_dir: str | os.PathLike, max_shard_size: str | int = "2GB") -> list[str]:
    """Write `tensors` as model.safetensors, or as Hugging Face shards + model.safetensors.index.json
    when they exceed `max_shard_size`. Returns the file names written."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=parse_size(max_shard_size))
    if not split.is_sharded:
        save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
        return [WEIGHTS]
    for fname, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, str(out_dir / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": split.metadata.get("total_size")}, "weight_map": split.tensor_to_filename}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors) + [INDEX]


def read_state_dict(out_dir: str | os.PathLike) -> dict:
    """The state dict `save_state_dict` wrote in `out_dir` (single file or index + shards)."""
    from safetensors.torch import load_file

    d = Path(out_dir)
    if (d / INDEX).is_file():
        weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        tensors = {}
        for fname in sorted(set(weight_map.values())):
            tensors.update(load_file(str(d / fname)))
        return tensors
    return load_file(str(d / WEIGHTS))

"""Load the Qwen2.5-VL partitioned under ZeRO-3: no rank ever holds the whole backbone.

transformers' own ZeRO-3 path (`HfDeepSpeedConfig`, then `zero.Init` inside `from_pretrained`)
ends partitioned too, but it reads every checkpoint tensor whole on every rank and gathers each
module to copy it in: at the 3B's widths its host peak per rank was *higher* than loading whole
(docs/performance.md, "zero3-load"). Here instead:

1. the model is constructed inside `deepspeed.zero.Init` with weight initialization skipped, so
   each module's parameters are partitioned as soon as the module exists, and the memory they had
   for that moment was never written (untouched pages are not resident);
2. each rank reads from the safetensors files only the rows of each tensor that overlap its own
   partition (`safe_open(...).get_slice`), casts them, and copies them into its shard (`ds_tensor`).

A rank's shard of a parameter is the flat range `[rank * n, (rank + 1) * n)` of the flattened
tensor, `n = ds_tensor.ds_numel` (the last shard padded): DeepSpeed's own layout
(`partition_parameters.Init._partition_param`). Checkpoint keys in the hub layout (`model.*`,
`visual.*`, `lm_head.*`, what `save_pretrained` writes) are mapped to transformers 5's module names
(`model.language_model.*`, `model.visual.*`); module names themselves are accepted too.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch

from vla_ds.errors import UsageError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def partitioned(p: torch.nn.Parameter) -> bool:
    """A ZeRO-3 parameter: its data is empty and `ds_tensor` holds this rank's shard."""
    return hasattr(p, "ds_tensor") and p.ds_tensor is not None


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """The parameter's whole shape (a ZeRO-3 partitioned one's data is empty; `ds_shape` keeps it)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def shard_range(p: torch.nn.Parameter) -> tuple[int, int]:
    """(start, count): the flat elements of `p` that this rank's shard holds (count excludes padding)."""
    n = p.ds_tensor.ds_numel
    start = p.ds_zero_partition_rank * n
    return start, max(0, min(n, p.ds_numel - start))


def assign(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Copy a whole tensor into `p`, which may be partitioned (then only this rank's range is copied)."""
    with torch.no_grad():
        if not partitioned(p):
            p.copy_(value)
            return
        if tuple(value.shape) != full_shape(p):
            raise ValueError(f"shape {tuple(value.shape)} does not match the parameter's {full_shape(p)}")
        start, count = shard_range(p)
        if count:
            _copy_range(p.ds_tensor.view(-1), value, full_shape(p), start, count)  # a tensor slices like a file


def module_name(key: str) -> str:
    """The transformers-5 parameter name of a checkpoint key (hub layout or already module names)."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.language_model.", "model.visual.")):
        return "model.language_model." + key[len("model."):]
    return key


def checkpoint_files(path: str | os.PathLike) -> dict[str, Path]:
    """{module name: safetensors file} of a model directory (sharded or single-file)."""
    root = Path(path)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        return {module_name(k): root / f for k, f in weight_map.items()}
    if (root / SINGLE_FILE).is_file():
        from safetensors import safe_open

        with safe_open(str(root / SINGLE_FILE), framework="pt") as f:
            return {module_name(k): root / SINGLE_FILE for k in f.keys()}
    raise UsageError(f"--backbone {path}: no {SINGLE_FILE} or {INDEX_FILE} there; ZeRO-3's partitioned load reads "
                     "safetensors only (re-save the model with save_pretrained, or use a ZeRO-2 config)")


def model_directory(path: str | os.PathLike) -> Path:
    """A local directory for `path`: itself, or a hub id's snapshot (fetched if the hub is reachable)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"]))


CHUNK_ELEMENTS = 1 << 24  # read at most ~16 M elements at a time: the 3B's embedding shard is 78 M


def _copy_range(dst: torch.Tensor, sliced, shape: tuple, start: int, count: int) -> None:
    """Copy elements [start, start + count) of the flattened checkpoint tensor into `dst` (flat,
    `count` long), reading whole rows of the first dimension (the one safetensors slices) that
    overlap the range, a chunk of rows at a time: the transient is one chunk in the file's dtype,
    not the whole shard."""
    row = 1
    for d in shape[1:]:
        row *= d
    per_chunk = max(1, CHUNK_ELEMENTS // row)
    done = 0
    first = start // row
    while done < count:
        rows = sliced[first:first + per_chunk].reshape(-1)
        offset = start + done - first * row  # where the range resumes inside these rows
        n = min(count - done, rows.numel() - offset)
        dst.narrow(0, done, n).copy_(rows.narrow(0, offset, n))
        done += n
        first += per_chunk


def load_shards(model: torch.nn.Module, path: str | os.PathLike, files: dict[str, Path] | None = None) -> None:
    """Fill every (partitioned or whole) parameter of `model` from the safetensors at `path`
    (`files`: its `checkpoint_files`), reading only this rank's range of each partitioned one.
    Tied parameters are filled once."""
    from safetensors import safe_open

    files = files or checkpoint_files(path)
    params = dict(model.named_parameters())  # de-duplicated: a tied lm_head is the embedding
    missing = sorted(n for n in params if n not in files)
    if missing:
        raise UsageError(f"--backbone {path}: the checkpoint has no weight for {len(missing)} parameter(s), e.g. "
                         f"{missing[0]}; is it a Qwen2.5-VL checkpoint?")
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        with safe_open(str(file), framework="pt") as f:
            reverse = {module_name(k): k for k in f.keys()}
            for name in names:
                p, sliced = params[name], f.get_slice(reverse[name])
                shape = full_shape(p)
                if tuple(sliced.get_shape()) != shape:
                    raise UsageError(f"--backbone {path}: {reverse[name]} has shape {tuple(sliced.get_shape())}, the "
                                     f"model's config says {shape}; the config.json does not match the weights")
                with torch.no_grad():
                    if partitioned(p):
                        start, count = shard_range(p)
                        if count:
                            _copy_range(p.ds_tensor.view(-1), sliced, shape, start, count)
                    else:
                        p.copy_(sliced[:] if shape else f.get_tensor(reverse[name]))


@contextlib.contextmanager
def _keep_arange_dtype():
    """zero.Init casts every floating tensor a constructor makes to the model dtype, the RoPE
    frequencies' explicit float32 `torch.arange` included; transformers' guard (5.2x) prevents it."""
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError:  # older transformers: bf16 RoPE buffers, as its own ZeRO-3 loading gives
        yield
        return
    with prevent_arange_dtype_change():
        yield


def _precision(ds_config: dict, dtype: torch.dtype) -> dict:
    """`ds_config` with its bf16/fp16 sections saying `dtype`. zero.Init is told the dtype this way,
    not by its `dtype=` argument: DeepSpeed 0.19.8 reads that as `(dtype or fp16) if the accelerator
    supports fp16 else bf16`, so on a CPU it builds bfloat16 shards whatever was asked."""
    return {**ds_config, "bf16": {**ds_config.get("bf16", {}), "enabled": dtype == torch.bfloat16},
            "fp16": {**ds_config.get("fp16", {}), "enabled": dtype == torch.float16}}


def load_partitioned(path: str | os.PathLike, dtype: torch.dtype, attn_implementation: str, ds_config: dict):
    """Collective. `Qwen2_5_VLForConditionalGeneration` of `path`, built partitioned by ZeRO-3 per
    `ds_config` (a resolved DeepSpeed config; its offload_param decides where the shards live), in
    eval mode. Every rank must call it: zero.Init assigns parameter ids in step."""
    import deepspeed
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    class ShardOnlyInit(deepspeed.zero.Init):
        """zero.Init without its broadcast of rank 0's values of each new parameter: those values are
        never initialized here, every shard is read from the checkpoint next, and the broadcast would
        write the whole tensor into every other rank's memory (the 3B's 311 M-element embedding
        included). `_zero_init_param` is DeepSpeed 0.16-0.19's hook; where it is absent the broadcast
        stays and only memory is lost."""

        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

        def _post_init_method(self, module):
            # A tied lm_head is replaced by the embedding right after construction: left whole and
            # untouched (its pages never written, so never resident) it costs nothing, where its
            # shard would be allocated and filled first (at the 3B's widths, 311 M / world elements).
            if not (tied and isinstance(module, torch.nn.Linear) and module.weight.shape == vocab_shape):
                super()._post_init_method(module)

    directory = model_directory(path)
    files = checkpoint_files(directory)  # refused here, before anything is built
    config = AutoConfig.from_pretrained(directory)
    text = config.get_text_config()
    tied = bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))
    vocab_shape = (text.vocab_size, text.hidden_size)
    with no_init_weights(), _keep_arange_dtype(), ShardOnlyInit(config_dict_or_path=_precision(ds_config, dtype)):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype,
                                                               attn_implementation=attn_implementation)
    model.tie_weights()
    if tied and model.lm_head.weight is not model.get_input_embeddings().weight:
        raise RuntimeError("the tied lm_head was not tied to the embedding after construction")  # a transformers change
    load_shards(model, directory, files)
    log.info("backbone loaded partitioned (ZeRO-3): %.1f M of %.1f M parameters on this rank",
             sum(p.ds_tensor.ds_numel if partitioned(p) else p.numel() for p in model.parameters()) / 1e6,
             sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()) / 1e6)
    return model.eval()

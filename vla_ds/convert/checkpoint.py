"""`vla-ds convert CHECKPOINT OUT_DIR`: a DeepSpeed checkpoint -> plain safetensors + a policy directory.

    OUT_DIR/
      model.safetensors            the policy's state dict (names as in `QwenVLA.named_parameters()`),
                                   or model-0000k-of-0000n.safetensors + model.safetensors.index.json
                                   above --max-shard-size (the Hugging Face layout)
      policy/                      config.json, model.safetensors, stats.json: `QwenVLA.from_pretrained`
                                   loads it and `predict` runs without DeepSpeed installed
      backbone/                    --merge-lora only: a Qwen2.5-VL directory with the LoRA folded in
      policy/adapter/              LoRA runs: the LoRA as a PEFT adapter (`PeftModel.from_pretrained`)

With --adapter-only, OUT_DIR holds just the PEFT adapter (adapter_config.json,
adapter_model.safetensors) and convert.json.
      convert.json                 what was converted (source, tag, step, ZeRO stage, options, files)

The weights come from DeepSpeed's own `zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`, which
gathers the ZeRO-2/3 partitions into fp32 master weights. It returns, for both stages, the trainable
parameters (fp32 masters), the frozen ones (as stored: the training dtype) when they are not
excluded, and both names of a tied tensor (`lm_head.weight` aliasing `embed_tokens.weight`) pointing
to one tensor. Its input files are DeepSpeed's torch pickles, which zero_to_fp32 unpickles with
`weights_only=False`: each is first checked to load with `weights_only=True` and only DeepSpeed's state
types allowed (`verify_torch_files`), so a crafted checkpoint is refused in one line and runs no code.
A file given as CHECKPOINT that is itself a pickle is refused outright (`refuse_pickle`).

The tensors are loaded into a `QwenVLA` rebuilt from the checkpoint's `policy/config.json` (float32,
on the CPU) with strict name and shape checks, so what is written is exactly what that policy holds;
a tied tensor is written once (under `named_parameters()`'s name). Everything is written into a
temporary sibling of OUT_DIR and renamed into place at the end: a crash never leaves a half OUT_DIR.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle  # only for pickle.UnpicklingError, raised by DeepSpeed reading its own shards
import re
from pathlib import Path
from types import SimpleNamespace

from vla_ds.errors import UsageError
from vla_ds.train.checkpoint import STATE_FILE
from vla_ds.utils.weights import WEIGHTS, load_strict, parse_size, refuse_pickle, save_state_dict, verify_torch_files

log = logging.getLogger(__name__)

MANIFEST = "convert.json"
FORMAT = "vla-ds-convert"
DTYPES = ("float32", "bfloat16", "float16")
_ZERO_STAGES = {"disabled": 0, "optimizer_states": 1, "gradients": 2, "weights": 3}


# ------------------------------------------------------------------------------------------ sources
@dataclasses.dataclass
class CheckpointSource:
    """Where a checkpoint's pieces are: DeepSpeed dir + tag, the policy dir (config.json, stats.json)."""

    ds_dir: Path
    tag: str
    policy_dir: Path
    step_dir: Path | None = None  # None for a raw DeepSpeed directory
    trainer_state: dict | None = None

    @property
    def step(self) -> int | None:
        return self.trainer_state.get("step") if self.trainer_state else None


def _ds_tags(ds_dir: Path) -> list[str]:
    if not ds_dir.is_dir():
        return []
    return sorted(p.name for p in ds_dir.iterdir() if p.is_dir() and any(p.glob("*_model_states.pt")))


def _pick_tag(ds_dir: Path, tag: str | None, default: str | None, what: str) -> str:
    if tag is None:
        latest = ds_dir / "latest"
        tag = latest.read_text().strip() if latest.is_file() else default
    if tag is None:
        raise UsageError(f"{what}: no `latest` file in {ds_dir}; pass --tag (tags there: "
                         f"{', '.join(_ds_tags(ds_dir)) or 'none'})")
    if not (ds_dir / tag).is_dir():
        raise UsageError(f"{what}: unknown tag {tag!r}: no directory {ds_dir / tag} (tags there: "
                         f"{', '.join(_ds_tags(ds_dir)) or 'none'})")
    return tag


def _check_policy_dir(d: Path, flag: str) -> Path:
    refuse_pickle(d)
    missing = [f for f in ("config.json", "stats.json") if not (d / f).is_file()]
    if missing:
        raise UsageError(f"{flag} {d}: not a vla-ds policy directory (no {' or '.join(missing)}); give the policy/ "
                         "directory of a checkpoint of the same run")
    return d


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None,
                       policy_config: str | os.PathLike | None = None) -> CheckpointSource:
    """CHECKPOINT -> `CheckpointSource`. Accepts a step directory, a pointer (checkpoints/latest|best|
    final), a run directory (its checkpoints/latest), a step's ds/ directory, or a raw DeepSpeed
    checkpoint directory (a `latest` file and tag subdirectories; needs `policy_config`)."""
    given = Path(path)
    what = f"CHECKPOINT {path}"
    if not given.exists():
        raise UsageError(f"{what}: no such file or directory; give a step directory (RUN/checkpoints/step_NNNNNN), "
                         "a pointer (RUN/checkpoints/latest|best|final) or a run directory")
    refuse_pickle(given)
    if given.is_file():
        raise UsageError(f"{what} is a file; give a checkpoint directory (RUN/checkpoints/latest) or a run directory")
    p = given.resolve()
    override = _check_policy_dir(Path(policy_config), "--policy-config") if policy_config is not None else None
    if (p / MANIFEST).is_file() or ((p / "config.json").is_file() and (p / WEIGHTS).is_file()):
        raise UsageError(f"{what} is already plain safetensors (a converted or policy directory); load it with "
                         "QwenVLA.from_pretrained, or point at a DeepSpeed checkpoint")
    if p.name == "ds" and (p.parent / STATE_FILE).is_file():
        p = p.parent  # the ds/ directory of a step directory
    for name in ("checkpoints/latest", "latest"):
        cand = p / name
        if not (p / STATE_FILE).is_file() and cand.is_dir() and (cand / STATE_FILE).is_file():
            p = cand.resolve()
            break
    if (p / STATE_FILE).is_file():
        ds_dir = p / "ds"
        if not ds_dir.is_dir():
            raise UsageError(f"{what}: {p} has no DeepSpeed state (no ds/ directory); it cannot be converted, "
                             "but its policy/ directory is already plain safetensors")
        try:
            state = json.loads((p / STATE_FILE).read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{what}: {p / STATE_FILE} is not valid JSON ({e}); use another checkpoint") from None
        policy_dir = override or _check_policy_dir(p / "policy", f"{what}: its")
        return CheckpointSource(ds_dir, _pick_tag(ds_dir, tag, p.name, what), policy_dir, p, state)
    if any(p.glob("*_model_states.pt")):  # a tag directory itself
        if tag is not None and tag != p.name:
            raise UsageError(f"{what} is the DeepSpeed tag directory {p.name!r}, but --tag {tag} was given")
        p, tag = p.parent, p.name
    if (p / "latest").is_file() or _ds_tags(p):
        if override is None:
            raise UsageError(f"{what} is a raw DeepSpeed checkpoint, which holds no model config: pass "
                             "--policy-config DIR (a policy directory with config.json and stats.json)")
        return CheckpointSource(p, _pick_tag(p, tag, None, what), override)
    if p.name.startswith("step_") or (p / "ds").is_dir() or (p / "checkpoints").is_dir():
        raise UsageError(f"{what}: no {STATE_FILE} (an incomplete checkpoint, or a run without checkpoints/latest); "
                         "give a complete step directory, or its ds/ directory with --policy-config STEP/policy")
    raise UsageError(f"{what} is not a checkpoint: no {STATE_FILE} (vla-ds step directory), no checkpoints/latest "
                     "(run directory) and no DeepSpeed `latest` file or tag directories")


# ------------------------------------------------------------------------------------------ DeepSpeed
def load_zero_state_dict(ds_dir: Path, tag: str, exclude_frozen: bool = False) -> tuple[dict, dict]:
    """DeepSpeed's consolidated fp32 state dict of `ds_dir/tag` (+ {"zero_stage", "world_size"})."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise UsageError(f"vla-ds convert needs deepspeed to read ZeRO shards ({e}); install it where you convert "
                         "(the converted policy does not need it)") from None
    verify_torch_files(sorted((ds_dir / tag).glob("*.pt")))  # before zero_to_fp32 unpickles them
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):  # zero_to_fp32 prints its progress
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag,
                                                          exclude_frozen_parameters=exclude_frozen)
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # corrupt/incomplete
        raise UsageError(f"{ds_dir / tag}: DeepSpeed cannot read this checkpoint ({str(e).splitlines()[0]}); is it "
                         "complete (one *_optim_states.pt per process)?") from None
    for line in out.getvalue().splitlines():
        log.debug("zero_to_fp32: %s", line)
    text, info = out.getvalue(), {}
    m = re.search(r"zero stage (?:ZeroStageEnum\.)?(\w+), world_size: (\d+)", text)
    if m:  # printed as a number or as the enum's name, depending on the DeepSpeed version
        stage = m.group(1)
        info["zero_stage"] = int(stage) if stage.isdigit() else _ZERO_STAGES.get(stage, stage)
        info["world_size"] = int(m.group(2))
    m = re.search(r"created by deepspeed==(\S+)", text)
    if m:
        info["deepspeed"] = m.group(1)
    return sd, info


# ------------------------------------------------------------------------------------------ files
def _check_out_dir(out: Path, source: CheckpointSource) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR {out} is a file; give a new directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UsageError(f"OUT_DIR {out} exists and is not the output of vla-ds convert; give a new directory "
                         "(an earlier convert output there would be replaced)")
    res = out.resolve()
    for src in filter(None, (source.step_dir, source.ds_dir)):
        if res == src or src in res.parents or res in src.parents:
            raise UsageError(f"OUT_DIR {out} overlaps the checkpoint {src}; write it elsewhere")


# ------------------------------------------------------------------------------------------ convert
def _read_config(source: CheckpointSource, backbone: str | None):
    """(policy config.json metadata, ModelConfig, NormStats) of the checkpoint."""
    from vla_ds.data.stats import NormStats
    from vla_ds.model.serialization import read_policy_config

    try:
        meta, config = read_policy_config(source.policy_dir)
        stats = NormStats.load(source.policy_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if backbone is not None:
        config = dataclasses.replace(config, backbone=str(backbone))
    saved = (source.trainer_state or {}).get("model")
    if saved is not None and backbone is None and saved != config.to_dict():
        diff = sorted(k for k in set(saved) | set(config.to_dict()) if saved.get(k) != config.to_dict().get(k))
        log.warning("%s and %s disagree on %s; using the policy config", source.step_dir / STATE_FILE,
                    source.policy_dir / "config.json", ", ".join(diff))
    return meta, config, stats


def _build_policy(config, stats, source: CheckpointSource):
    """A float32 CPU QwenVLA of `config`, whatever the training dtype (the fp32 masters must not be
    rounded on the way in), with a float backbone under --load-in-8bit (an int8 weight without its
    scales means nothing; the LoRA is what the checkpoint contributes)."""
    from vla_ds.model.policy import QwenVLA

    build = dataclasses.replace(config, dtype="float32", load_in_8bit=False)
    try:
        return QwenVLA(build, stats, device="cpu")
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot build the policy of {source.policy_dir / 'config.json'}: {str(e).splitlines()[0]}"
                         "; pass --backbone PATH if the backbone moved") from None


def _load_into(policy, sd: dict, source: CheckpointSource) -> list[str]:
    """Copy the checkpoint's tensors into the policy (strict: every saved weight present, no unknown
    name, equal shapes; `sd` is emptied as it goes); returns the names the checkpoint provided."""
    targets = {**dict(policy.named_buffers()), **dict(policy.named_parameters(remove_duplicate=False))}
    return load_strict(targets, sd, policy.saved_parameter_names(), str(source.ds_dir / source.tag),
                       str(source.policy_dir / "config.json"))


def _policy_tensors(policy, dtype, names: list[str] | None) -> dict:
    """named_parameters (tied tensors once) + persistent buffers, as `dtype`, restricted to `names`."""

    param_names = {n for n, _ in policy.named_parameters(remove_duplicate=False)}
    persistent = set(policy.state_dict(keep_vars=True)) - param_names
    items = list(policy.named_parameters()) + [(n, b) for n, b in policy.named_buffers() if n in persistent]
    wanted = None if names is None else set(names)
    seen, out = {}, {}
    for name, t in items:
        if wanted is not None and name not in wanted:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in seen:
            log.debug("%s shares storage with %s: written once", name, seen[key])
            continue
        if key is not None:
            seen[key] = name
        t = t.detach().to("cpu")
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    if wanted is not None:
        absent = sorted(wanted - set(out))
        if absent:
            raise KeyError(f"policy lacks {absent[:3]}")
    return out


def convert_universal(checkpoint: str | os.PathLike) -> Path:
    """`vla-ds convert CHECKPOINT --universal`: write the step as DeepSpeed's universal checkpoint into
    STEP/universal/, where a `--resume` on another number of processes reads it (otherwise its rank 0
    converts on the first such resume while the other ranks wait). Returns that directory."""
    from vla_ds.train.elastic import to_universal

    source = resolve_checkpoint(checkpoint)
    if source.step_dir is None:
        raise UsageError(f"CHECKPOINT {checkpoint}: --universal converts a vla-ds step directory (what --resume "
                         "takes), not a raw DeepSpeed directory")
    out = to_universal(source.step_dir, what="CHECKPOINT")
    log.info("universal checkpoint of %s in %s: --resume %s on any number of processes reads it", source.step_dir.name,
             out, source.step_dir)
    return out


def convert_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                       trainable_only: bool = False, merge_lora: bool = False, max_shard_size: str | int = "2GB",
                       tag: str | None = None, policy_config: str | os.PathLike | None = None,
                       backbone: str | os.PathLike | None = None, adapter_only: bool = False) -> dict:
    """Convert a DeepSpeed checkpoint into OUT_DIR (see the module docstring); returns the manifest."""
    import torch

    from vla_ds import __version__
    from vla_ds.convert.lora import merge_lora_in_place, merged_config, save_backbone
    from vla_ds.model.adapter import save_adapter
    from vla_ds.model.serialization import save_policy
    from vla_ds.utils.io import atomic_dir, write_json

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    parse_size(max_shard_size)
    out = Path(out_dir)
    source = resolve_checkpoint(checkpoint, tag, policy_config)
    _check_out_dir(out, source)
    meta, config, stats = _read_config(source, None if backbone is None else str(backbone))
    if adapter_only and merge_lora:
        raise UsageError("--adapter-only and --merge-lora: the merge folds the adapter away; give one of the two")
    if adapter_only and config.finetune_vl != "lora":
        raise UsageError(f"--adapter-only: {checkpoint} trained no LoRA (--finetune-vl {config.finetune_vl}); "
                         "convert it without --adapter-only")
    trainable_only = trainable_only or adapter_only
    if merge_lora and not config.trains_backbone:
        raise UsageError(f"--merge-lora: the checkpoint's backbone is frozen (--finetune-vl none), so there is nothing "
                         f"to merge; convert {checkpoint} without --merge-lora")
    policy = _build_policy(config, stats, source)
    # Frozen weights are only needed for a full dump or a merge; an 8-bit run's are int8 without
    # their scales, so those come from the (float) backbone directory instead.
    exclude_frozen = (trainable_only and not merge_lora) or config.load_in_8bit
    sd, info = load_zero_state_dict(source.ds_dir, source.tag, exclude_frozen)
    provided = set(_load_into(policy, sd, source))
    del sd
    kept = [n for n, _ in policy.named_parameters() if n not in provided]
    if kept and (config.load_in_8bit or not exclude_frozen):
        log.info("%d frozen backbone weights are not in the checkpoint%s: taken from %s", len(kept),
                 " (8-bit run)" if config.load_in_8bit else "", config.backbone)
    torch_dtype = getattr(torch, dtype)
    out_config, backbone_dir = config, None
    if merge_lora:
        backbone_dir = out.resolve() / "backbone"
        merged = merge_lora_in_place(policy.vl.model)
        out_config = merged_config(config, backbone_dir)
        saved_names = [n for n, _ in policy.named_parameters() if not n.startswith("vl.")]
        log.info("%d LoRA layers merged into the backbone%s", merged,
                 " (--finetune-vl full: its trained blocks are backbone weights already)" if not merged else "")
    else:
        saved_names = policy.saved_parameter_names()
    dump = _policy_tensors(policy, torch_dtype, saved_names if trainable_only else None)
    record = SimpleNamespace(config=out_config, vl_dim=meta.get("vl_dim", policy.vl_dim), stats=stats,
                             views=meta.get("views"),
                             saved_parameter_names=lambda: saved_names)
    with atomic_dir(out) as tmp:
        if adapter_only:
            save_adapter(out_config, dump, tmp)
            files = sorted(p.name for p in tmp.iterdir())
        else:
            files = save_state_dict(dump, tmp, max_shard_size)
            policy_tensors = dump if trainable_only else {n: dump[n] for n in saved_names}
            save_policy(record, tmp / "policy", state_dict=policy_tensors)
            del policy_tensors
        del dump
        if merge_lora:
            save_backbone(policy.vl.model, config.backbone, tmp / "backbone", torch_dtype, max_shard_size)
        manifest = {
            "format": FORMAT, "version": 1, "vla_ds": __version__,
            "source": str(source.step_dir or source.ds_dir), "ds_dir": str(source.ds_dir), "tag": source.tag,
            "step": source.step, **info, "dtype": dtype, "trainable_only": trainable_only, "merge_lora": merge_lora,
            "adapter_only": adapter_only, "weights": files, "policy": None if adapter_only else "policy",
            "backbone": "backbone" if merge_lora else None, "policy_backbone": out_config.backbone,
        }
        write_json(tmp / MANIFEST, manifest)
    what = f"PEFT adapter {out}" if adapter_only else f"policy {out / 'policy'}"
    log.info("converted %s (tag %s%s) -> %s: %s; %s%s", source.step_dir or source.ds_dir, source.tag,
             f", ZeRO-{info['zero_stage']}, {info['world_size']} processes" if "zero_stage" in info else "", out,
             ", ".join(files), what, f"; backbone {backbone_dir}" if backbone_dir else "")
    return manifest

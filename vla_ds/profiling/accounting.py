"""What a DeepSpeed engine holds, by kind and by place: the model-state part of `vla-ds profile`.

Model states are counted from the tensors themselves, not from formulas: the module's parameters
(ZeRO-3: this rank's partitions `ds_tensor`, plus anything gathered at that moment), and every
tensor reachable from the ZeRO optimizer object (its flat buffers, fp32 master partitions, gradient
partitions and buckets, and the inner torch/DeepSpeed Adam's `state`). Each storage is counted
once (views into flat buffers share one), first by the kind with the highest priority:

    parameters > gradients > optimizer states > other (communication buckets and the like)

Kinds from the optimizer follow the attribute path a tensor was found under: a path through
`grad`/`ipg` (or a `.grad` field) is a gradient, one through `state` or an fp32 master partition is
an optimizer state, a bit16 flat buffer is a parameter.

Where a tensor lives: on a GPU, its device (`cuda` = accelerator, `cpu` = host). With DeepSpeed's
CPU accelerator the two are one memory, so the place follows DeepSpeed's own placement rule
instead: with `offload_optimizer` its master weights, optimizer states and gradient partitions are
host tensors (ZeRO-2 `self.device = "cpu"`, ZeRO-3 `subgroup_to_device`), with `offload_param` the
parameter partitions are, and everything else stays on the accelerator -- the same split the
same run would have on a GPU.
"""
from __future__ import annotations

from collections import defaultdict

import torch

KINDS = ("parameters", "gradients", "optimizer_states", "other")
PLACES = ("accelerator", "host")
_PRIORITY = {k: i for i, k in enumerate(KINDS)}

# Attribute path fragments (lower case) that name a tensor's kind; first match wins.
_GRAD_WORDS = ("grad", "ipg")
_STATE_WORDS = ("state", "fp32", "master", "momentum")
_PARAM_WORDS = ("bit16", "fp16", "bf16", "param")
# Roots that DeepSpeed moves to the host when it offloads the optimizer.
# (ZeRO-2 `self.device = "cpu"`: fp32 partitions, their grads, the bit16 copy-back buffer and the
# CPU-side gradient staging buffer; ZeRO-3: fp32 partitions and the gradient partition buffer.)
_OPTIMIZER_OFFLOAD_ROOTS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "optimizer",
                            "grad_partitions_flat_buffer", "averaged_gradients",
                            "param_buffer_of_bit16_for_cpu_offload_groups", "temp_grad_buffer_for_cpu_offload",
                            "_DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition")


def _kind_of(path: str) -> str:
    low = path.lower()
    if any(w in low for w in _GRAD_WORDS):
        return "gradients"
    if "buffer" in low:  # staging/communication buffers (e.g. the bit16 copy-back buffer of offload)
        return "other"
    if "param_groups" in low or any(w in low for w in _STATE_WORDS):  # the inner Adam's params are the masters
        return "optimizer_states"
    if any(w in low for w in _PARAM_WORDS):
        return "parameters"
    return "other"


def _walk(obj, path: str, out: list, seen: set, depth: int, skip: set) -> None:
    """Collect (path, tensor) for every tensor reachable from `obj` through attributes/containers."""
    if depth > 6 or id(obj) in seen or id(obj) in skip:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        for attr in ("grad", "ds_tensor"):
            sub = getattr(obj, attr, None) if attr != "grad" or obj.is_leaf else None
            if isinstance(sub, torch.Tensor):
                _walk(sub, f"{path}.{attr}", out, seen, depth + 1, skip)
        return
    if isinstance(obj, torch.nn.Module):
        return  # the model is counted through its parameters, not re-walked from the optimizer
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, (list, tuple, set)):
        items = list(enumerate(obj))
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        items = list(vars(obj).items())
    else:
        return
    for key, value in items:
        name = key if isinstance(key, str) else f"[{key if isinstance(key, int) else type(key).__name__}]"
        _walk(value, f"{path}.{name}" if path else str(name), out, seen, depth + 1, skip)


def _storage(t: torch.Tensor) -> tuple[tuple, int]:
    s = t.untyped_storage()
    return (t.device.type, t.device.index, s.data_ptr()), s.nbytes()


def _offloads(optimizer) -> tuple[bool, bool]:
    """(optimizer offloaded, parameters offloaded) as the ZeRO optimizer itself reports them."""
    opt = bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False))
    par = bool(getattr(optimizer, "cpu_offload_params", False) or getattr(optimizer, "offload_param", False))
    return opt, par


def inventory(engine) -> list[tuple[str, str, str, int]]:
    """(kind, place, path, bytes) of every distinct storage this rank's engine holds right now."""
    module = engine.module
    optimizer = engine.optimizer
    accel = _accelerator_type()
    opt_off, par_off = _offloads(optimizer)
    found: list[tuple[str, str, torch.Tensor]] = []  # (kind, path, tensor)
    for name, p in module.named_parameters():
        ds = getattr(p, "ds_tensor", None)
        if ds is not None:
            found.append(("parameters", f"param_partition.{name}", ds))
        if p.numel():  # ZeRO-3 keeps an empty placeholder in p.data unless gathered
            found.append(("parameters", f"param.{name}", p.data))
        if p.grad is not None:
            found.append(("gradients", f"param_grad.{name}", p.grad))
    for name, b in module.named_buffers():
        found.append(("other", f"buffer.{name}", b))
    tensors: list = []
    if optimizer is not None:
        skip = {id(p) for p in module.parameters()}
        _walk(optimizer, "", tensors, set(), 0, skip)
    for path, t in tensors:
        found.append((_kind_of(path), path, t))
    best: dict[tuple, tuple[int, str, str, int]] = {}
    for kind, path, t in found:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key, nbytes = _storage(t)
        if nbytes == 0:
            continue
        pri = _PRIORITY[kind]
        if key not in best or pri < best[key][0]:
            best[key] = (pri, kind, path, nbytes)
    return [(kind, _place(dev_type, accel, path, opt_off, par_off), path, nbytes)
            for (dev_type, _, _), (_, kind, path, nbytes) in best.items()]


def model_state_bytes(engine) -> dict:
    """{kind: {place: bytes}} of this rank's engine right now (see the module docstring)."""
    out = {k: dict.fromkeys(PLACES, 0) for k in KINDS}
    for kind, place, _, nbytes in inventory(engine):
        out[kind][place] += nbytes
    return out


def _place(dev_type: str, accel: str, path: str, opt_off: bool, par_off: bool) -> str:
    if accel != "cpu":
        return "accelerator" if dev_type == accel else "host"
    root = path.split(".", 1)[0]
    if opt_off and (root in _OPTIMIZER_OFFLOAD_ROOTS and "ipg" not in path.lower()):
        return "host"
    if par_off and path.startswith("param_partition."):
        return "host"
    return "accelerator"


def _accelerator_type() -> str:
    try:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
    except Exception:  # noqa: BLE001 - deepspeed not importable: plain torch placement
        from vla_ds.utils.dist import device_for

        name = device_for().type
    return str(name).split(":")[0]


def merge_max(a: dict | None, b: dict) -> dict:
    """Element-wise max of two {kind: {place: bytes}} tables (peaks over snapshots)."""
    if a is None:
        return {k: dict(v) for k, v in b.items()}
    return {k: {p: max(a[k][p], b[k][p]) for p in PLACES} for k in KINDS}


def totals(table: dict, kinds=("parameters", "gradients", "optimizer_states")) -> dict:
    """{place: bytes} summed over `kinds`; by default the model states."""
    out = defaultdict(int)
    for k in kinds:
        for p, v in table[k].items():
            out[p] += v
    return dict(out)

"""`--init-from`: start a run from another run's weights (two-stage training), with a fresh optimizer.

Stage 1 (e.g. no sensor) -> stage 2 (`--sensor-enabled`): every weight whose name and shape match is
copied, weights the new model has but the file lacks keep their fresh initialisation ("missing"),
weights the file has but the new model lacks are ignored ("unexpected"); both lists are reported.
A name whose shape differs is an error (the two models disagree about a size).
"""
from __future__ import annotations

import logging
from pathlib import Path

from vla_ds.errors import UsageError
from vla_ds.model.zero3_load import assign, full_shape
from vla_ds.utils.weights import refuse_pickle

log = logging.getLogger(__name__)


def weights_file(path: str | Path) -> Path:
    """model.safetensors of a policy dir, of a checkpoint's policy/ or of a run's policy/."""
    p = Path(path)
    for cand in (p, p / "model.safetensors", p / "policy" / "model.safetensors"):
        if cand.is_file():
            try:  # e.g. the old trainer's qwen_vla_sensor.pt, or one renamed .safetensors: never unpickled
                refuse_pickle(cand)
            except UsageError as e:
                raise UsageError(f"--init-from {e}") from None
            return cand
    raise UsageError(f"--init-from {path}: no model.safetensors there (give a policy or checkpoint directory)")


def load_init_weights(model, path: str | Path) -> dict:
    """Copy matching weights from `path` into `model`; returns {"loaded", "missing", "unexpected"}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    src = weights_file(path)
    try:
        tensors = load_file(str(src))
    except (SafetensorError, OSError) as e:
        raise UsageError(f"--init-from {src}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); give "
                         "the policy directory a vla-ds run or `vla-ds convert` wrote") from None
    params = dict(model.named_parameters(remove_duplicate=False))
    wanted = set(model.saved_parameter_names())
    shape = {n: full_shape(p) for n, p in params.items()}
    mismatched = [f"{n} {tuple(t.shape)} vs {shape[n]}" for n, t in tensors.items()
                  if n in params and shape[n] != tuple(t.shape)]
    if mismatched:
        raise UsageError(f"--init-from {src}: shapes differ for {len(mismatched)} weight(s), e.g. {mismatched[0]}")
    loaded = [n for n in tensors if n in params]
    for n in loaded:  # a backbone built partitioned (ZeRO-3) takes this rank's range of each tensor
        assign(params[n], tensors[n])
    report = {"loaded": sorted(loaded), "missing": sorted(wanted - set(tensors)),
              "unexpected": sorted(set(tensors) - set(params))}
    log.info("--init-from %s: %d weights loaded; %d missing (fresh init)%s; %d unexpected (ignored)%s", src,
             len(report["loaded"]), len(report["missing"]), _head(report["missing"]), len(report["unexpected"]),
             _head(report["unexpected"]))
    return report


def _head(names: list[str], k: int = 4) -> str:
    return f": {', '.join(names[:k])}{' ...' if len(names) > k else ''}" if names else ""

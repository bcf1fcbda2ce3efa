"""`torchrun -m tests.helpers.load_peak BACKBONE MODE OUT.json`: one rank builds the policy (LoRA, no
sensor, float32) the way the trainer does, then `deepspeed.initialize`, and writes OUT.json.rank<r>
with its host-memory peaks. MODE is how the backbone is loaded:

- `zero2`: whole on every rank, ZeRO-2;
- `zero3-whole`: whole, then partitioned by deepspeed.initialize (vla-ds before the partitioned load);
- `zero3-hf`: transformers' path (`HfDeepSpeedConfig` -> `zero.Init` inside `from_pretrained`);
- `zero3`: vla-ds's partitioned load (`vla_ds.model.zero3_load`), what the trainer does under ZeRO-3.

Peaks, in GiB: ru_maxrss (all resident memory: the checkpoint's mapped file pages included) and the
anonymous resident memory (RssAnon, sampled every 5 ms), each before the build (the libraries already
imported, so what follows is the model's), after it and after deepspeed.initialize; plus the
backbone elements this rank holds and the backbone's total. With `--check`, after measuring:
`mismatched`, the backbone parameters (gathered) or buffers that differ from a whole
`from_pretrained` of the same directory.
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
import threading
from pathlib import Path

MODES = ("zero2", "zero3-whole", "zero3-hf", "zero3")


def _anon_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """The peak of this process's anonymous resident memory, sampled on a thread."""

    def __init__(self, every: float = 0.005):
        self.peak, self._stop, self._every = _anon_kb(), threading.Event(), every
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _anon_kb())
            self._stop.wait(self._every)

    def read(self) -> float:
        """The peak so far, GiB."""
        self.peak = max(self.peak, _anon_kb())
        return self.peak / 2**20

    def stop(self):
        self._stop.set()
        self._thread.join()


def _maxrss() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def held(p) -> int:
    """Elements of `p` this rank stores: a ZeRO-3 partitioned parameter's share is its ds_tensor."""
    t = getattr(p, "ds_tensor", None)
    return t.numel() if t is not None and p.numel() == 0 else p.numel()


@contextlib.contextmanager
def hf_partitioned(ds_cfg: dict):
    """transformers' ZeRO-3 loading: `from_pretrained` sees an `HfDeepSpeedConfig` (held by a weak
    reference, so kept alive here) and builds inside `zero.Init`; unset afterwards."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(ds_cfg)
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


def measure(backbone: str, mode: str):
    """Collective. Build, initialize and report this rank's peaks (see the module docstring);
    returns (row, the engine's policy)."""
    import deepspeed
    import peft  # noqa: F401 - the libraries' import cost before the baseline: the same in every mode
    import torch
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl  # noqa: F401

    from vla_ds.model.config import ModelConfig
    from vla_ds.model.policy import QwenVLA
    from vla_ds.utils.dist import init_distributed

    _, world, _ = init_distributed()
    stage = 2 if mode == "zero2" else 3
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": world,
          "zero_optimization": {"stage": stage}}
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, finetune_vl="lora", expert_hidden_dim=64, expert_num_layers=1,
                      expert_num_heads=4, dtype="float32")
    anon = AnonPeak()
    row = {"before_gib": _maxrss(), "before_anon_gib": anon.read()}
    with hf_partitioned(ds) if mode == "zero3-hf" else contextlib.nullcontext():
        policy = QwenVLA(cfg, device="cpu", zero3=ds if mode == "zero3" else None)
    row.update(built_gib=_maxrss(), built_anon_gib=anon.read())
    backbone_params = [p for n, p in policy.named_parameters() if n.startswith("vl.")]
    row.update(held=sum(held(p) for p in backbone_params),
               full=sum(getattr(p, "ds_numel", p.numel()) for p in backbone_params))
    optim = torch.optim.AdamW([{**g, "lr": 1e-4} for g in policy.parameter_groups(0.0)])
    engine, *_ = deepspeed.initialize(model=policy, optimizer=optim, config=ds)
    row.update(init_gib=_maxrss(), init_anon_gib=anon.read())
    anon.stop()
    return row, engine.module


def mismatched(model, backbone: str) -> list[str]:
    """Collective. Names of `model`'s parameters (gathered one at a time) and buffers that are not
    exactly those of a whole `from_pretrained(backbone)` in the same dtype."""
    import deepspeed
    import torch

    from vla_ds.model.backbone import load_vl_model

    dtype = next(model.parameters()).dtype
    whole = load_vl_model(backbone, dtype, "sdpa", "cpu")
    ref = {**dict(whole.named_parameters()), **dict(whole.named_buffers())}
    bad = []
    for name, p in model.named_parameters():
        if ".lora_" in name:  # the adapters are the policy's, not the checkpoint's
            continue
        with deepspeed.zero.GatheredParameters([p]):
            key = name.replace(".base_layer.", ".")
            if key not in ref or not torch.equal(p.data, ref[key].data):
                bad.append(name)
    bad += [n for n, b in model.named_buffers() if n not in ref or b.dtype != ref[n].dtype or not torch.equal(b, ref[n])]
    return bad


def main(backbone: str, mode: str, out: str, check: bool) -> None:
    import torch.distributed as dist

    from vla_ds.utils.dist import init_distributed

    rank, _, _ = init_distributed()
    row, policy = measure(backbone, mode)
    if check:
        row["mismatched"] = mismatched(policy.vl.model, backbone)
    Path(f"{out}.rank{rank}").write_text(json.dumps(row))
    dist.destroy_process_group()


def run(backbone: str | Path, mode: str, out: Path, nproc: int = 2, check: bool = False,
        timeout: int = 1800) -> list[dict]:
    """Launch `nproc` ranks of this module and return their rows."""
    from tests.helpers.runs import REPO
    from vla_ds.utils.dist import torchrun

    proc = torchrun("tests.helpers.load_peak", [str(backbone), mode, str(out), *(["--check"] if check else [])],
                    nproc=nproc,
                    env={"PYTHONPATH": str(REPO)}, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(nproc)]


if __name__ == "__main__":
    main(*sys.argv[1:4], check="--check" in sys.argv[4:])

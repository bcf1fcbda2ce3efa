"""Step checkpoints: atomic, exactly resumable, with latest / best / final pointers.

Layout of `RUN_DIR/checkpoints/`:

    step_000500/
      ds/step_000500/...       DeepSpeed engine state (`engine.save_checkpoint`): weights, ZeRO
                               partitions, optimizer state; ds/latest, ds/zero_to_fp32.py
      policy/                  `QwenVLA.from_pretrained`-loadable: config.json, model.safetensors
                               (trainable + vla-ds-owned weights, LoRA adapter), stats.json
      trainer_state.json       step, epoch, samples consumed in the epoch, sampler and lr-schedule
                               state, best val loss, wandb run id, world size, micro batch,
                               accumulation, the model config
      rng/rank_00000.json      python / numpy RNG states of each rank (JSON)
      rng/rank_00000.safetensors   torch CPU (and CUDA) generator states of each rank
      manifest.json            every file above with its size, written last (`vla_ds.utils.integrity`)
      universal/step_000500/   after a resume on another number of processes only: the step as a
                               DeepSpeed universal checkpoint (vla_ds/train/elastic.py), derived, kept
    latest -> step_000500      relative symlinks, replaced atomically; `best` follows the best
    best   -> step_000400      validation loss, `final` the end of training (the old trainer's
    final  -> step_001000      qwen_vla_sensor{,_best,_final}.pt)

Saving is collective: every rank writes its DeepSpeed shards and RNG state into
`.step_000500.tmp/`; then rank 0 writes the policy and trainer_state.json, renames the directory
into place and only then moves the pointers. A crash at any moment leaves the previous checkpoint
and every pointer valid. A checkpoint damaged afterwards (a disk filled by another job, a truncated
copy) is caught on resume by its manifest: `--resume auto` takes the newest step directory that
checks whole, says in one line which it skipped and why, and leaves the damaged one in place (if
training saves that step again, the damaged directory is kept as `step_NNNNNN.damaged`).

Nothing is pickled by vla-ds. DeepSpeed's own shards are torch files; on
resume DeepSpeed reads them through `SafeCheckpointEngine`, which loads with `weights_only=True` and
an allowlist of DeepSpeed's state types (`vla_ds.utils.weights.load_torch_state`): a crafted checkpoint
is refused in one line and runs no code.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vla_ds.errors import UsageError
from vla_ds.utils import integrity
from vla_ds.utils.faults import fault_point
from vla_ds.utils.io import ordinary_modes, write_json
from vla_ds.utils.logging import rank as launcher_rank
from vla_ds.utils.weights import load_torch_state

log = logging.getLogger(__name__)
POINTERS = ("latest", "best", "final")
STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d{6,})$")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def ckpt_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ------------------------------------------------------------------------------------------ pointers
def set_pointer(root: Path, name: str, target: str) -> None:
    """Atomically point `root/name` at the step directory `target` (a relative symlink)."""
    tmp = root / f".{name}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, root / name)


def read_pointer(root: Path, name: str) -> Path | None:
    p = root / name
    if not p.is_symlink():
        return None
    target = root / os.readlink(p)
    return target if (target / STATE_FILE).is_file() else None


def step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / STATE_FILE).is_file())


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> tuple[dict, dict]:
    """(JSON-able python/numpy state, tensors) of this process's generators."""
    py = random.getstate()
    np_state = np.random.get_state()
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    return js, tensors


def set_rng_state(js: dict, tensors: dict) -> None:
    v, state, gauss = js["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


# ------------------------------------------------------------------------------------------ saving
def save_checkpoint(run_dir: Path, step: int, engine, policy, trainer_state: dict, *, keep_last: int = 3,
                    best: bool = False, final: bool = False) -> Path:
    """Collective. Write RUN_DIR/checkpoints/step_NNNNNN atomically, then move the pointers.

    The parts are explicit: the DeepSpeed `engine` (its shards), the `policy` (rank 0 writes its
    directory, from ZeRO-3's consolidated weights when partitioned) and `trainer_state`, the JSON
    of everything else a resume needs (written as trainer_state.json). `keep_last` step
    directories are kept (0: all), never one that a pointer names.
    """
    from safetensors.torch import save_file

    root = ckpt_root(run_dir)
    name = step_name(step)
    tmp = root / f".{name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crash in an earlier save
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    from vla_ds.train.elastic import universal_info

    # (the client state that lets `vla_ds.train.elastic` convert it for another world size)
    engine.save_checkpoint(str(tmp / "ds"), tag=name, client_state=universal_info())
    js, tensors = rng_state()
    write_json(tmp / "rng" / f"rank_{rank:05d}.json", js)
    save_file(tensors, str(tmp / "rng" / f"rank_{rank:05d}.safetensors"))
    state_dict = engine._zero3_consolidated_16bit_state_dict() if engine.zero_optimization_stage() == 3 else None
    if rank == 0:
        policy.save_pretrained(tmp / "policy", state_dict=state_dict)
    dist.barrier()
    if rank == 0:
        fault_point("crash_in_save", step)
        write_json(tmp / STATE_FILE, trainer_state)
        ordinary_modes(tmp)  # safetensors and DeepSpeed write some files 0600
        integrity.write_manifest(tmp)
        final_dir = root / name
        damaged = integrity.check(final_dir) if final_dir.exists() else None
        if damaged:  # resume skipped it: keep it for the user to inspect, under a name nothing reads
            aside = _free_name(root / f"{name}.damaged")
            os.rename(final_dir, aside)
            log.warning("checkpoint %s was damaged (%s); kept as %s", final_dir, damaged, aside.name)
        if final_dir.exists():  # the same step saved again (e.g. epoch end == --save-every)
            old = root / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final_dir, old)
            os.rename(tmp, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final_dir)
        _set_pointers(root, name, latest=True, best=best, final=final)
        prune(root, keep_last)
        log.info("checkpoint %s%s%s", final_dir, " (best)" if best else "", " (final)" if final else "")
    dist.barrier()
    return root / name


def _free_name(path: Path) -> Path:
    n, cand = 1, path
    while cand.exists():
        n += 1
        cand = path.with_name(f"{path.name}.{n}")
    return cand


def point_at(run_dir: Path, step: int, *, best: bool = False, final: bool = False) -> None:
    """Collective. Move the best / final pointers to the already saved step `step`."""
    if dist.get_rank() == 0:
        _set_pointers(ckpt_root(run_dir), step_name(step), latest=False, best=best, final=final)
    dist.barrier()


def _set_pointers(root: Path, name: str, *, latest: bool, best: bool, final: bool) -> None:
    for flag, pointer in ((latest, "latest"), (best, "best"), (final, "final")):
        if flag:
            set_pointer(root, pointer, name)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step directories, never one a pointer names."""
    if keep_last <= 0:
        return
    pinned = {read_pointer(root, p) for p in POINTERS} - {None}
    for old in step_dirs(root)[:-keep_last]:
        if old not in pinned:
            shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------ resume
def resolve_resume(spec: str, run_dir: Path) -> Path | None:
    """--resume auto|none|PATH -> a step directory that checks whole, or None to start fresh.

    auto: the newest step directory of RUN_DIR/checkpoints that checks whole (`integrity.check`),
    each newer damaged one named in one line and left as it is; none there: a fresh start; only
    damaged ones: a one-line refusal. PATH: that step directory (or a run's latest), refused in
    one line when damaged -- a checkpoint the user named is never swapped for another."""
    if spec == "none":
        return None
    if spec == "auto":
        return _newest_whole(ckpt_root(run_dir))
    p = Path(spec)
    for cand in (p, p / "latest", p / "checkpoints" / "latest"):
        if (cand / STATE_FILE).is_file():
            why = integrity.check(cand)
            if why:
                raise UsageError(f"--resume {spec}: the checkpoint {cand.resolve()} is damaged: {why}; resume from an "
                                 "earlier step directory, or --resume auto to take the newest whole one")
            return cand.resolve()
    raise UsageError(f"--resume {spec}: not a checkpoint (no {STATE_FILE}); give a step directory or a run directory")


def _candidates(root: Path) -> list[Path]:
    """The step directories a resume may take, newest first: `latest` and every older step. A newer
    one than `latest` is left out: a run resumed from an earlier step abandoned it."""
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name)] if root.is_dir() else []
    found.sort(key=lambda p: int(STEP_DIR.match(p.name)[1]), reverse=True)  # step_1000000 after step_999999
    latest = root / os.readlink(root / "latest") if (root / "latest").is_symlink() else None
    if latest is None or not STEP_DIR.match(latest.name):
        return found
    newest = int(STEP_DIR.match(latest.name)[1])
    return [p for p in found if int(STEP_DIR.match(p.name)[1]) <= newest]


def _newest_whole(root: Path) -> Path | None:
    skipped = []
    for step_dir in _candidates(root):
        why = integrity.check(step_dir) or (None if (step_dir / STATE_FILE).is_file() else f"{STATE_FILE} is missing")
        if why is None:
            return step_dir.resolve()
        skipped.append(f"{step_dir.name} ({why})")
        if launcher_rank() == 0:  # every process resolves the same files; one notice
            log.warning("resume: skipping %s: %s; it is left as it is", step_dir, why)
    if skipped:
        raise UsageError(f"--resume auto: every checkpoint in {root} is damaged: {'; '.join(skipped)}; --resume none "
                         "starts over (each damaged one is kept aside when its step is saved again)")
    return None


def saved_world_size(step_dir: Path | None) -> int | None:
    """The number of processes that wrote `step_dir` (None: no checkpoint)."""
    return json.loads((step_dir / STATE_FILE).read_text())["world_size"] if step_dir is not None else None


def check_compatible(saved: dict, model_config: dict) -> None:
    """One-line refusal for a checkpoint that cannot continue this run (another world size can:
    vla_ds/train/elastic.py)."""
    diff = [f"{k} ({saved['model'].get(k)!r} -> {model_config.get(k)!r})"
            for k in sorted(set(saved["model"]) | set(model_config)) if saved["model"].get(k) != model_config.get(k)]
    if diff:
        raise UsageError(f"--resume: the checkpoint's model differs: {', '.join(diff)}; use the same model flags or "
                         "--init-from for a new run")


@contextlib.contextmanager
def safe_loading(engine):
    """Make `engine` read checkpoint files with `load_torch_state` for the duration (this engine
    only). DeepSpeed's own checkpoint engine calls `torch.load(..., weights_only=False)`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return load_torch_state(path, map_location=map_location)

    saved = engine.checkpoint_engine
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)
    try:
        yield
    finally:
        engine.checkpoint_engine = saved


def load_checkpoint(step_dir: Path, engine, *, model_config: dict, universal: bool = False) -> dict:
    """Collective. Restore the engine (weights, optimizer states) and this rank's RNG from `step_dir`;
    returns its trainer_state.json, from which the caller restores its own schedule, sampler and
    bookkeeping. Refuses (one line) a checkpoint of another model config. `universal`: the step was
    written by another number of processes; the engine (configured with "load_universal") reads
    STEP/universal/, which `vla_ds.train.elastic.to_universal` made."""
    from safetensors.torch import load_file

    from vla_ds.train.elastic import UNIVERSAL, rng_rank

    saved = json.loads((step_dir / STATE_FILE).read_text())
    check_compatible(saved, model_config)
    source = step_dir / (UNIVERSAL if universal else "ds")
    # ZeRO-3's universal load gives every param group the hyperparameters of group 0 (lr, weight
    # decay, names); ours differ per group (no_decay groups, per-module lr): put them back after it
    groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
    with safe_loading(engine):
        load_path, _ = engine.load_checkpoint(str(source), tag=step_dir.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if universal:
        for g, mine in zip(engine.optimizer.param_groups, groups):
            g.update(mine)
        # ... and one `step` tensor shared by every partition's state: each group's Adam step would
        # advance it once per optimizer step (7 after one step of 5 groups), breaking bias correction
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        for st in inner.state.values():
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].clone()
    if load_path is None:
        raise UsageError(f"--resume {step_dir}: DeepSpeed found no engine state in {source}")
    rng = step_dir / "rng" / f"rank_{rng_rank(dist.get_rank(), saved['world_size']):05d}"
    set_rng_state(json.loads(rng.with_suffix(".json").read_text()), load_file(str(rng.with_suffix(".safetensors"))))
    return saved

"""Real multi-process runs of vla-ds's own entry points, through the same launcher as the demo
(`vla_ds.utils.dist.torchrun`: torchrun on a free port, one thread per process, wandb off)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from vla_ds.utils.dist import free_port, process_group_cleanup, torchrun

REPO = Path(__file__).resolve().parents[2]
# Small head sizes: the point of these tests is the training machinery, not the model's capacity.
SMALL = [
    "--sensor-hidden-dim", "32", "--sensor-output-dim", "32", "--sensor-num-heads", "2",
    "--sensor-conv-blocks", "3", "--expert-hidden-dim", "32", "--expert-num-heads", "2", "--expert-num-layers", "2",
    "--num-workers", "0", "--wandb-mode", "disabled",
]


def metrics_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_training(args: list[str], nproc: int = 2, timeout: int = 420, expect_ok: bool = True, env: dict | None = None):
    """`torchrun --nproc_per_node N -m vla_ds.train --mode train ARGS`; returns (proc, metrics rows)."""
    proc = torchrun("vla_ds.train", ["--mode", "train", *args], nproc=nproc, env=env, timeout=timeout)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc, metrics_rows(Path(args[args.index("--output-dir") + 1]))


def run_module(module: str, args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None):
    """`torchrun -m MODULE ARGS` (nproc=0: a plain `python -m MODULE ARGS`)."""
    return torchrun(module, args, nproc=nproc, env=env, timeout=timeout)


def losses(rows: list[dict]) -> list[float]:
    return [r["train/loss_step"] for r in rows if "train/loss_step" in r]


def loss_by_step(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["train/loss_step"] for r in rows if "train/loss_step" in r}


def run_many(runs: list[list[str]], spec: Path, nproc: int = 2, timeout: int = 900, env: dict | None = None):
    """The runs ["train" | "profile", *ARGS] (each with its own --output-dir) in one launch
    (tests/helpers/run_many.py); returns the launch. `spec` is where the list is written."""
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(runs))
    # `-m tests.helpers.run_many` from any cwd
    proc = torchrun("tests.helpers.run_many", [str(spec)], nproc=nproc, env={"PYTHONPATH": str(REPO), **(env or {})},
                    timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextmanager
def group_of_one():
    """This (pytest's) process as a launch of one, for collective code run in-process: no launcher
    variables but a free MASTER_PORT going in; afterwards the group is destroyed and os.environ is
    as before, whatever `init_distributed` set (a later subprocess inherits os.environ: a leftover
    RANK alone once sent a plain `vla-ds train` to DeepSpeed's MPI discovery)."""
    saved = {name: os.environ.pop(name, None) for name in LAUNCHER_VARS}
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        with process_group_cleanup():
            yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_many_here(runs: list[list[str]], spec: Path) -> None:
    """`run_many`'s runs with one process: here, in pytest's process (its imports are paid already,
    a launch would pay ~10 s more), on one intra-op thread like a launched process."""
    import torch

    from tests.helpers.run_many import main

    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(json.dumps(runs))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with group_of_one():
            main(str(spec))
    finally:
        torch.set_num_threads(threads)


def run_trainings(runs: list[list[str]], spec: Path, nproc: int = 2, timeout: int = 900, env: dict | None = None):
    """The trainings `runs` (argument lists of the training entry) in one launch (nproc=1: in this
    process, proc None); returns (proc, [metrics rows of each run]). A run refused with a one-line
    error has no rows (see its run.log)."""
    if nproc == 1 and not env:
        proc = run_many_here([["train", *a] for a in runs], spec)
    else:
        proc = run_many([["train", *a] for a in runs], spec, nproc=nproc, timeout=timeout, env=env)
    return proc, [metrics_rows(Path(a[a.index("--output-dir") + 1])) for a in runs]


def launch_env(**extra: str) -> dict:
    """os.environ for a launch/*.sh script run the way a user runs it on this machine: one OpenMP
    thread per process, DeepSpeed's CPU accelerator, wandb off, and this venv's python (PYTHON) and
    deepspeed launcher (DEEPSPEED); `extra` on top."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
            "PYTHON": sys.executable, "DEEPSPEED": str(Path(sys.executable).parent / "deepspeed"), **extra}


def lora_run(root: Path, data: Path, backbone: Path, stage: int) -> Path:
    """2 processes, LoRA + sensor, 2 optimizer steps, one checkpoint at step 2 (ZeRO-3: with the flow
    head and the robot state, so that convert's tests cover them too). A large --vl-lr moves
    the LoRA adapters well away from their zero init in two steps, so a merge that forgot them
    would show. Launched the two ways users launch on one machine, so these runs are also the
    launcher tests' (tests/train/test_launchers.py): ZeRO-2 by launch/train_cpu.sh (torchrun), ZeRO-3
    by the deepspeed launcher with launch/train.py. Their output is kept in RUN/launch.log."""
    out = root / f"zero{stage}"
    args = ["--data", str(data), "--backbone", str(backbone), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum-steps", "1", "--log-every", "1", "--val-ratio", "0", "--max-steps", "2", "--save-every", "2",
            "--sensor-enabled", "--finetune-vl", "lora", "--lr", "2e-3", "--sensor-lr", "2e-3", "--vl-lr", "5e-2", *SMALL]
    if stage == 3:
        args += ["--action-head", "flow", "--state-enabled"]
    if stage == 2:
        cmd = ["bash", str(REPO / "launch" / "train_cpu.sh"), *args]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
               str(REPO / "launch" / "train.py"), "--mode", "train", "--ds-config", f"zero{stage}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=launch_env(), cwd=REPO)
    out.mkdir(parents=True, exist_ok=True)
    (out / "launch.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    return out

"""Real multi-process runs of vla-ds's own entry points, through the same launcher as the demo
(`vla_ds.utils.dist.torchrun`: torchrun on a free port, one thread per process, wandb off)."""
from __future__ import annotations

import json
from pathlib import Path

from vla_ds.utils.dist import torchrun

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
    repo = str(Path(__file__).resolve().parents[2])  # `-m tests.helpers.run_many` from any cwd
    proc = torchrun("tests.helpers.run_many", [str(spec)], nproc=nproc, env={"PYTHONPATH": repo, **(env or {})},
                    timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def run_trainings(runs: list[list[str]], spec: Path, nproc: int = 2, timeout: int = 900, env: dict | None = None):
    """The trainings `runs` (argument lists of the training entry) in one launch; returns (proc,
    [metrics rows of each run]). A run refused with a one-line error has no rows (see its run.log)."""
    proc = run_many([["train", *a] for a in runs], spec, nproc=nproc, timeout=timeout, env=env)
    return proc, [metrics_rows(Path(a[a.index("--output-dir") + 1])) for a in runs]

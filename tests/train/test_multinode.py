"""Multi-node launches without ssh, simulated on localhost: launch/train_multinode.sh run once per
"node" (two launcher processes started together, one trainer process each), for both recipes of
docs/training.md: torchrun (--nnodes 2 --node_rank R) and the DeepSpeed launcher (--no_ssh
--node_rank R, one hostfile). Both nodes must end in ONE checkpoint of a world of 2. Also the
ecosystem's `--deepspeed` spellings and the script's refusals."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers.runs import REPO, SMALL, launch_env, losses, metrics_rows
from vla_ds.utils.dist import free_port

SCRIPT = REPO / "launch" / "train_multinode.sh"
SCRIPT_VARS = ("LAUNCHER", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "NNODES", "NPROC_PER_NODE", "DS_CONFIG")


def _script_env(**env: str) -> dict:
    """`launch_env` without any of the script's variables that the caller's environment has, `env` on top."""
    return {**{k: v for k, v in launch_env().items() if k not in SCRIPT_VARS}, **env}


def _train_args(data: Path, backbone: Path, out: Path, max_steps: int) -> list[str]:
    """The cheapest run that still writes every part of a checkpoint: frozen backbone, no sensor,
    micro-batch 1, a checkpoint every 2 optimizer steps (ZeRO-3: the script's default preset)."""
    return ["--data", str(data), "--backbone", str(backbone), "--output-dir", str(out), "--finetune-vl", "none",
            "--batch-size", "1", "--grad-accum-steps", "1", "--max-steps", str(max_steps), "--save-every", "2",
            "--log-every", "1", "--val-ratio", "0", *SMALL]


def _launch_two_nodes(out: Path, launcher_flags: list[str], trainer_args: list[str], **env: str) -> list[str]:
    """Start `train_multinode.sh LAUNCHER_FLAGS -- TRAINER_ARGS` as node 0 and node 1 together;
    return each node's output (OUT/node{0,1}.log), asserting that both succeeded."""
    out.mkdir(parents=True, exist_ok=True)
    base = _script_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1", **env)
    procs, logs = [], [out / f"node{r}.log" for r in (0, 1)]
    for rank, log in enumerate(logs):
        with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall that node, and so both
            procs.append(subprocess.Popen(["bash", str(SCRIPT), *launcher_flags, "--", *trainer_args], cwd=REPO,
                                          env={**base, "NODE_RANK": str(rank)}, stdout=f, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        codes = [p.wait(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the launcher and its trainer: their own session
                p.wait()
    texts = [log.read_text() for log in logs]
    for rank, (code, text) in enumerate(zip(codes, texts)):
        assert code == 0, f"node {rank} exited {code}:\n{text[-6000:]}"
    return texts


def _check_one_checkpoint(run: Path, step: int) -> Path:
    """RUN/checkpoints/latest is step `step`: one directory holding both ranks' parts, a world of 2,
    and one metrics history (rank 0's) up to that step."""
    ckpt = (run / "checkpoints" / "latest").resolve()
    assert ckpt.name == f"step_{step:06d}"
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == step
    assert (ckpt / "policy" / "model.safetensors").is_file() and (ckpt / "policy" / "config.json").is_file()
    shards = sorted(p.name for p in (ckpt / "ds" / ckpt.name).iterdir())
    for rank in (0, 1):
        assert (ckpt / "rng" / f"rank_{rank:05d}.json").is_file(), f"rank {rank}'s RNG state"
        for kind in ("model", "optim"):  # ZeRO-3: every rank writes its partition of both
            assert f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt" in shards, shards
    rows = metrics_rows(run)
    assert sorted(r["step"] for r in rows if "train/loss_step" in r) == list(range(1, step + 1))
    assert all(math.isfinite(v) for v in losses(rows))
    return ckpt


@pytest.fixture(scope="module")
def torchrun_nodes(tmp_path_factory, train_data, tiny_model_dir) -> tuple[Path, list[str]]:
    """Two torchrun "nodes" (--nnodes 2 --node_rank 0|1, one process each), 2 steps: (run dir, logs)."""
    root = tmp_path_factory.mktemp("multinode_torchrun")
    logs = _launch_two_nodes(root, ["--log-dir", str(root / "torchrun_logs")],
                             _train_args(train_data, tiny_model_dir, root / "run", 2),
                             LAUNCHER="torchrun", NNODES="2", NPROC_PER_NODE="1")
    return root / "run", logs


@pytest.mark.slow
def test_two_torchrun_nodes_write_one_checkpoint_that_converts(torchrun_nodes, tmp_path):
    from vla_ds.convert.checkpoint import convert_checkpoint

    run, logs = torchrun_nodes
    assert "on 2 process(es)" in logs[0]
    assert (run.parent / "torchrun_logs").is_dir(), "the launcher flag before -- reached torchrun"
    ckpt = _check_one_checkpoint(run, 2)
    manifest = convert_checkpoint(ckpt, tmp_path / "converted")
    assert (tmp_path / "converted" / "model.safetensors").is_file()
    assert (tmp_path / "converted" / "policy" / "config.json").is_file()
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == 3


@pytest.mark.slow
def test_deepspeed_no_ssh_nodes_resume_the_two_node_checkpoint(torchrun_nodes, tmp_path, train_data, tiny_model_dir):
    """The other recipe (deepspeed --no_ssh --node_rank 0|1, one hostfile) continues that run to step 4,
    with DeepSpeed's `--deepspeed --deepspeed_config` on the trainer's command line."""
    run = tmp_path / "run"
    shutil.copytree(torchrun_nodes[0], run, symlinks=True)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names only: --no_ssh never resolves them
    ecosystem = ["--deepspeed", "--deepspeed_config", "ds_configs/zero3.json"]  # DeepSpeed's own spelling
    logs = _launch_two_nodes(tmp_path, ["--no_local_rank"], [*_train_args(train_data, tiny_model_dir, run, 4), *ecosystem],
                             LAUNCHER="deepspeed", HOSTFILE=str(hostfile))
    for rank, text in enumerate(logs):
        assert f"nnodes=2, num_local_procs=1, node_rank={rank}" in text  # deepspeed.launcher.launch, per node
    assert not any("--local_rank=" in t for t in logs), "the launcher flag before -- reached deepspeed"
    assert "resumed from" in logs[0] and "step 2," in logs[0]
    _check_one_checkpoint(run, 4)


@pytest.mark.parametrize("env, want", [
    ({}, "--hostfile H --master_addr n1 --master_port 29500 --no_python launch/train.py"),  # the ssh mode, as before
    ({"NODE_RANK": "1"}, "--hostfile H --no_ssh --node_rank 1 --master_addr n1 --master_port 29500 --no_python launch/train.py"),
    ({"LAUNCHER": "torchrun", "NODE_RANK": "1", "NNODES": "3", "NPROC_PER_NODE": "4"},
     "-m torch.distributed.run --nnodes 3 --node_rank 1 --nproc_per_node 4 --master_addr n1 --master_port 29500 "
     "--no_python launch/train.py"),
])
def test_script_command_lines(tmp_path, env, want):
    """What the script executes (the launcher replaced by `echo`): launcher flags before `--`, the
    trainer's after, the preset first so that a --ds-config of the user's wins."""
    (tmp_path / "H").write_text("n1 slots=1\n")
    proc = subprocess.run(["bash", str(SCRIPT), "--no_python", "--", "--data", "D", "--ds-config", "zero2"], cwd=REPO,
                          capture_output=True, text=True, timeout=30,
                          env=_script_env(MASTER_ADDR="n1", HOSTFILE=str(tmp_path / "H"), DEEPSPEED="echo",
                                          PYTHON="echo", **env))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.replace(str(tmp_path / "H"), "H").strip() == (
        f"{want} --mode train --ds-config ds_configs/zero3.json --data D --ds-config zero2")


@pytest.mark.parametrize("env, message", [
    ({"LAUNCHER": "mpirun", "NODE_RANK": "0"}, "LAUNCHER=mpirun: use deepspeed or torchrun"),
    ({"LAUNCHER": "torchrun"}, "LAUNCHER=torchrun needs NODE_RANK"),
    ({"LAUNCHER": "torchrun", "NODE_RANK": "1"}, "set NNODES"),
    ({"LAUNCHER": "torchrun", "NODE_RANK": "first"}, "NODE_RANK=first: give this node's index"),
    ({"NODE_RANK": "0", "HOSTFILE": "/nonexistent/hostfile"}, "HOSTFILE=/nonexistent/hostfile: no such file"),
])
def test_script_refuses_incomplete_settings(env, message):
    proc = subprocess.run(["bash", str(SCRIPT), "--data", "D"], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env=_script_env(MASTER_ADDR="127.0.0.1", **env))
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_script_needs_master_addr():
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=30,
                          env=_script_env(NODE_RANK="0"))
    assert proc.returncode != 0 and "set MASTER_ADDR" in proc.stderr


@pytest.mark.parametrize("flags, ds_config", [
    (["--deepspeed"], None),                                    # DeepSpeed's add_config_arguments
    (["--deepspeed", "--deepspeed_config", "zero3"], "zero3"),  # ... with its config flag
    (["--deepspeed", "ds_configs/zero3.json"], "ds_configs/zero3.json"),  # Hugging Face Trainer's
    (["--deepspeed=zero3", "--ds-config", "zero3"], "zero3"),
    (["--local_rank=1", "--deepspeed", "--data", "D"], None),   # as `deepspeed launch/train.py --deepspeed` passes it
])
def test_the_ecosystems_deepspeed_flags_are_accepted(flags, ds_config):
    from vla_ds.cli import build_parser
    from vla_ds.cli.train import apply_deepspeed_flag, build_launcher_parser

    for args in (build_launcher_parser().parse_args(["--mode", "train", *flags]),
                 build_parser().parse_args(["train", *flags])):
        apply_deepspeed_flag(args)
        assert getattr(args, "ds_config", None) == ds_config and "deepspeed" not in vars(args)


def test_deepspeed_config_disagreeing_with_ds_config_is_one_line():
    from vla_ds.cli.train import apply_deepspeed_flag, build_launcher_parser
    from vla_ds.errors import UsageError

    args = build_launcher_parser().parse_args(["--mode", "train", "--deepspeed", "zero3", "--ds-config", "zero2"])
    with pytest.raises(UsageError, match=r"^--deepspeed zero3 and --ds-config zero2 .*give one of them$"):
        apply_deepspeed_flag(args)


def test_flags_are_not_abbreviated(capsys):
    from vla_ds.cli.train import build_launcher_parser

    with pytest.raises(SystemExit):
        build_launcher_parser().parse_args(["--mode", "train", "--output", "runs/x"])
    assert "unrecognized arguments: --output" in capsys.readouterr().err

"""The reliability table's cases for the VL cache, checkpoints, hostile files and the library's
predict(): each builds one bad input or fault in a fresh directory and says what `vla-ds` (or
`QwenVLA.predict`) must answer -- one line naming the file or flag and the fix, nothing good
touched. Machinery: tests/reliability/harness.py. SLOW: the cases on the session's trained run
(`zero2_run`: 2 processes, LoRA + sensor, checkpoints/step_000002 = latest = final)."""
from __future__ import annotations

import json
import os
import socket
from functools import partial
from pathlib import Path

from tests.helpers.runs import SMALL
from tests.reliability.harness import Case, Env, Scenario
from tests.train.test_hostile_checkpoints import _plant  # a torch file whose unpickling runs `touch MARKER`
from vla_ds.errors import UsageError

STEP = "step_000002"
SHARD = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
PICKLE = "a torch pickle, which can run code when loaded"


# ------------------------------------------------------------------------------------------ helpers
def _train(env: Env, *flags: str, data: Path | None = None) -> list[str]:
    """`vla-ds train` on the session's data and tiny backbone into TMP/run; the last of a flag wins."""
    return ["train", "--data", str(data or env.fixture("train_data")), "--backbone",
            str(env.fixture("tiny_model_dir")), "--output-dir", str(env.tmp / "run"), *SMALL, *flags]


def _resume(env: Env, out: Path, *extra: str) -> list[str]:
    """The model of the session's zero2_run (tests/train/test_checkpoint.py `_args`), 1 process."""
    from tests.train.test_checkpoint import _args

    return ["train", *_args(env.fixture("train_data"), env.fixture("tiny_model_dir"), out, "--max-steps", "4", *extra)]


def _run_copy(env: Env, world_size: int | None = None, payload: str | None = None) -> tuple[Path, Path]:
    """A private copy of the session's zero2_run and its step directory; `world_size` rewrites its
    trainer_state.json, `payload` plants a shell command (touch TMP/pwned) in that file of ds/STEP, and
    the manifest is written again (a crafter writes one: the manifest catches damage, not intent)."""
    from vla_ds.utils.integrity import write_manifest

    out = env.copy("zero2_run", "run")
    step = out / "checkpoints" / STEP
    if world_size:
        state = json.loads((step / "trainer_state.json").read_text())
        (step / "trainer_state.json").write_text(json.dumps(dict(state, world_size=world_size)))
    if payload:
        _plant(step / "ds" / STEP / payload, env.tmp / "pwned")
    if world_size or payload:
        write_manifest(step)
    return out, step


def _truncate(path: Path, size: int = 1000) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


_CACHES: dict[str, tuple[Path, Path]] = {}


def _built_cache(env: Env) -> tuple[Path, Path]:
    """(a private copy of a small VL cache: 16 samples, 4 shards, K = 5, its dataset), the cache built
    once per session by `vla-ds cache` (< 1 s on the tiny backbone)."""
    from tests.helpers.cache import cli_args
    from tests.helpers.datasets import CACHE, make_dataset
    from vla_ds.cli import main

    factory = env.fixture("tmp_path_factory")
    key = str(factory.getbasetemp())
    if key not in _CACHES:
        root = factory.mktemp("reliability_cache")
        data = make_dataset(root, CACHE, stats=False)
        assert main(["cache", *cli_args(env.fixture("tiny_model_dir"), data, root / "cache")]) == 0
        _CACHES[key] = (root / "cache", data)
    ref, data = _CACHES[key]
    return env.copy_path(ref, "cache"), data


def _cache_cmd(env: Env, data: Path, cache: Path, *extra: str) -> list[str]:
    from tests.helpers.cache import cli_args

    return ["cache", *cli_args(env.fixture("tiny_model_dir"), data, cache, *extra)]


# -------------------------------------------------------------------------------------------- cache
def cache_require_without_cache(env: Env) -> Scenario:
    cache = env.tmp / "no_cache"
    return Scenario(argv=_train(env, "--finetune-vl", "none", "--cache-policy", "require", "--cache-dir", str(cache)),
                    names=["--cache-policy require", str(cache), "no VL cache", "vla-ds cache"],
                    absent=[env.tmp / "run", cache])


def cache_truncated_shard(env: Env) -> Scenario:
    cache, data = _built_cache(env)
    shard = _truncate(cache / "shards" / "000001.tokens.npy", 300)
    return Scenario(argv=_cache_cmd(env, data, cache, "--verify"), names=[str(shard), "truncated", "vla-ds cache"],
                    keep=[cache])


def cache_truncated_in_training(env: Env) -> Scenario:
    cache, data = _built_cache(env)
    shard = _truncate(cache / "shards" / "000002.pooled.npy", 100)  # its header cut too
    argv = _train(env, "--finetune-vl", "none", "--cache-dir", str(cache), "--vl-tokens", "5", data=data)
    return Scenario(argv=argv, names=[f"--cache-dir {cache}", str(shard), "unreadable", "vla-ds cache"],
                    keep=[cache], absent=[env.tmp / "run"])


def cache_live_lock(env: Env) -> Scenario:
    cache = env.tmp / "cache"
    cache.mkdir()
    lock = cache / ".lock"  # held by pytest's parent: alive, on this host
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": "x"}))
    return Scenario(argv=_cache_cmd(env, env.fixture("train_data"), cache),
                    names=[str(cache), f"pid {os.getppid()}", str(lock)], keep=[cache], absent=[cache / "shards"])


def cache_verify_differs(env: Env) -> Scenario:
    import numpy as np

    cache, data = _built_cache(env)
    path = cache / "shards" / "000000.pooled.npy"
    np.save(path, np.load(path) * 2)  # a well-formed shard with other numbers
    return Scenario(argv=_cache_cmd(env, data, cache, "--verify", "--verify-samples", "16"), exit=1,
                    names=["--verify", "differs from the cache", "rebuild the cache"], keep=[cache])


def cache_every_token(env: Env) -> Scenario:
    cache = env.tmp / "cache"
    return Scenario(argv=_cache_cmd(env, env.fixture("train_data"), cache, "--vl-tokens", "-1"),
                    names=["--vl-tokens -1", "--vl-tokens 0"], absent=[cache])


def cache_stale(env: Env) -> Scenario:
    cache, data = _built_cache(env)
    argv = _train(env, "--finetune-vl", "none", "--cache-policy", "require", "--cache-dir", str(cache),
                  "--vl-tokens", "5", "--max-pixels", "50176", data=data)
    return Scenario(argv=argv, names=["--cache-policy require", str(cache), "max_pixels", "vla-ds cache"],
                    keep=[cache], absent=[env.tmp / "run"])


# --------------------------------------------------------------------------------------- checkpoint
def ckpt_every_damaged(env: Env) -> Scenario:
    out, step = _run_copy(env)
    _truncate(step / "ds" / STEP / SHARD)
    return Scenario(argv=_resume(env, out), names=["--resume auto", "every checkpoint", "damaged", SHARD,
                                                   "--resume none"], keep=[out])


def ckpt_resume_damaged_path(env: Env) -> Scenario:
    out, step = _run_copy(env)
    _truncate(step / "ds" / STEP / SHARD)
    return Scenario(argv=_resume(env, out, "--resume", str(step)), names=[f"--resume {step}", "damaged", SHARD,
                                                                          "--resume auto"], keep=[out])


def ckpt_other_world_size(env: Env) -> Scenario:
    """A 2-process checkpoint resumed on 1 process goes through DeepSpeed's universal converter,
    which reads every shard: a crafted one is refused there too, and runs nothing."""
    out, step = _run_copy(env, payload=SHARD)
    return Scenario(argv=_resume(env, out), names=[str(step / "ds" / STEP / SHARD), "refused", "posix.system"],
                    keep=[out], after=_never_ran(env.tmp / "pwned"))


def ckpt_other_model(env: Env) -> Scenario:
    out, _ = _run_copy(env, world_size=1)
    return Scenario(argv=_resume(env, out, "--fusion-strategy", "gated"),
                    names=["--resume", "fusion_strategy ('concat' -> 'gated')", "--init-from"], keep=[out])


def ckpt_not_a_checkpoint(env: Env) -> Scenario:
    notes = env.tmp / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy needles")
    return Scenario(argv=_train(env, "--resume", str(notes)), names=[f"--resume {notes}", "not a checkpoint"],
                    keep=[notes], absent=[env.tmp / "run"])


def ckpt_incomplete_step(env: Env) -> Scenario:
    out, step = _run_copy(env)
    (step / "trainer_state.json").unlink()  # the save's last file
    return Scenario(argv=_resume(env, out, "--resume", str(step)), names=[f"--resume {step}", "trainer_state.json"],
                    keep=[out])


def ckpt_convert_damaged(env: Env) -> Scenario:
    out, step = _run_copy(env)
    shard = _truncate(step / "ds" / STEP / "mp_rank_00_model_states.pt", 100)
    return Scenario(argv=["convert", str(step), str(env.tmp / "out")], names=[str(shard), "damaged"], keep=[out],
                    absent=[env.tmp / "out"])


def ckpt_adapter_and_merge(env: Env) -> Scenario:
    out, step = _run_copy(env)
    return Scenario(argv=["convert", str(step), str(env.tmp / "out"), "--adapter-only", "--merge-lora"],
                    names=["--adapter-only and --merge-lora", "give one"], keep=[out], absent=[env.tmp / "out"])


# ----------------------------------------------------------------------------------------- security
def _never_ran(marker: Path):
    def check():
        assert not marker.exists(), "the payload ran"

    return check


def security_convert_pt(env: Env) -> Scenario:
    old, marker = env.tmp / "qwen_vla_sensor.pt", env.tmp / "pwned"
    _plant(old, marker)
    return Scenario(argv=["convert", str(old), str(env.tmp / "out")], names=[str(old), PICKLE, "safetensors"],
                    keep=[old], absent=[env.tmp / "out"], after=_never_ran(marker))


def security_resume_payload(env: Env) -> Scenario:
    file = "mp_rank_00_model_states.pt"  # the first file DeepSpeed's loader reads
    out, step = _run_copy(env, world_size=1, payload=file)  # 1 process: the resume reaches that loader
    return Scenario(argv=_resume(env, out), names=[str(step / "ds" / STEP / file), "refused", "posix.system"],
                    keep=[out], after=_never_ran(env.tmp / "pwned"))


def security_convert_payload(env: Env) -> Scenario:
    out, step = _run_copy(env, payload=SHARD)
    return Scenario(argv=["convert", str(step), str(env.tmp / "out")],
                    names=[str(step / "ds" / STEP / SHARD), "refused", "posix.system"], keep=[out],
                    absent=[env.tmp / "out"], after=_never_ran(env.tmp / "pwned"))


def security_init_from_pickle(env: Env) -> Scenario:
    weights, marker = env.tmp / "stage1.pt", env.tmp / "pwned"
    _plant(weights, marker)
    return Scenario(argv=_train(env, "--init-from", str(weights)), names=[f"--init-from {weights}", PICKLE],
                    keep=[weights], absent=[env.tmp / "run"], after=_never_ran(marker))


def security_disguised_safetensors(env: Env) -> Scenario:
    policy, marker = env.tmp / "policy", env.tmp / "pwned"
    policy.mkdir()
    (policy / "config.json").write_text("{}")
    _plant(policy / "model.safetensors", marker)  # a torch zip under an innocent name
    return Scenario(argv=_train(env, "--init-from", str(policy)),
                    names=[f"--init-from {policy / 'model.safetensors'}", PICKLE],
                    keep=[policy], absent=[env.tmp / "run"], after=_never_ran(marker))


def security_convert_into_user_dir(env: Env) -> Scenario:
    out, step = _run_copy(env)
    mine = env.tmp / "my_models"
    mine.mkdir()
    (mine / "important.txt").write_text("keep me")
    return Scenario(argv=["convert", str(step), str(mine)],
                    names=[str(mine), "not the output of vla-ds convert", "new directory"],
                    keep=[mine, out], absent=[mine / "model.safetensors", mine / "policy"])


def security_convert_into_checkpoint(env: Env) -> Scenario:
    out, step = _run_copy(env)
    return Scenario(argv=["convert", str(step), str(step / "converted")],
                    names=[str(step / "converted"), "overlaps the checkpoint", "elsewhere"], keep=[out],
                    absent=[step / "converted"])


# ------------------------------------------------------------------------------------------ predict
def _predict(env: Env, edit, names: list[str]) -> Scenario:
    """predict() on the session run's final policy (2 views, a 650 x 1026 sensor window) with good
    inputs for 2 samples, `edit(inputs)` applied first; the policy directory must stay as it was."""
    import torch

    from vla_ds.data.synthetic import synthetic_view
    from vla_ds.model.policy import QwenVLA

    policy_dir = Path(env.fixture("zero2_run")) / "checkpoints" / "final" / "policy"

    def call():
        policy = QwenVLA.from_pretrained(policy_dir, device="cpu")
        cfg = policy.config
        inputs = {"text_inputs": ["Insert the needle slowly.", "Retract the needle carefully."],
                  "image_inputs": [[synthetic_view(2 * b + v) for v in range(len(policy.views))] for b in range(2)],
                  "sensor_data": torch.zeros(2, cfg.sensor_temporal_length, cfg.sensor_input_channels)}
        edit(inputs)
        return policy.predict(**inputs)
    return Scenario(call=call, raises=UsageError, names=["predict: ", *names], keep=[policy_dir])


def _nan_reading(inputs: dict) -> None:
    inputs["sensor_data"][1, 3, 5] = float("nan")


def _other_channels(inputs: dict) -> None:
    inputs["sensor_data"] = inputs["sensor_data"][..., :514]


def _one_view(inputs: dict) -> None:
    inputs["image_inputs"][1] = inputs["image_inputs"][1][:1]


# --------------------------------------------------------------------------------------------- table
CASES: list[Case] = [
    Case("cache-01", "--cache-policy require, but no cache was built", cache_require_without_cache),
    Case("cache-02", "a cache shard cut short (an interrupted copy, a full disk), checked with --verify",
         cache_truncated_shard),
    Case("cache-03", "a cache shard cut short, met by a training run", cache_truncated_in_training),
    Case("cache-04", "another `vla-ds cache` is building into the same directory", cache_live_lock),
    Case("cache-05", "cached features that no longer match the backbone (--verify)", cache_verify_differs),
    Case("cache-06", "a cache asked to keep every VL token (--vl-tokens -1)", cache_every_token),
    Case("cache-07", "--cache-policy require with a cache built at another --max-pixels", cache_stale),
    Case("ckpt-01", "every checkpoint of the run is damaged (--resume auto)", ckpt_every_damaged),
    Case("ckpt-02", "--resume names a damaged checkpoint", ckpt_resume_damaged_path),
    Case("ckpt-03", "resume on another number of processes a checkpoint whose optimizer shard runs a shell command",
         ckpt_other_world_size),
    Case("ckpt-04", "resume with another model than the checkpoint's (--fusion-strategy)", ckpt_other_model),
    Case("ckpt-05", "--resume names a directory that is no checkpoint", ckpt_not_a_checkpoint),
    Case("ckpt-06", "--resume names a step directory whose save never finished", ckpt_incomplete_step),
    Case("ckpt-07", "convert a checkpoint with a damaged shard", ckpt_convert_damaged),
    Case("ckpt-08", "convert with both --adapter-only and --merge-lora", ckpt_adapter_and_merge),
    Case("security-01", "convert a torch pickle (.pt) from elsewhere", security_convert_pt),
    Case("security-02", "resume a checkpoint whose DeepSpeed file runs a shell command", security_resume_payload),
    Case("security-03", "convert a checkpoint whose optimizer shard runs a shell command", security_convert_payload),
    Case("security-04", "--init-from a torch pickle", security_init_from_pickle),
    Case("security-05", "--init-from a policy whose model.safetensors is really a pickle",
         security_disguised_safetensors),
    Case("security-06", "convert into a directory that holds the user's own files", security_convert_into_user_dir),
    Case("security-07", "convert into the checkpoint itself", security_convert_into_checkpoint),
    Case("predict-01", "predict() with NaN in a sensor window",
         partial(_predict, edit=_nan_reading, names=["sample(s) [1]", "NaN/inf", "bad_sensor='treat_as_missing'"])),
    Case("predict-02", "predict() with a sensor window of another channel count",
         partial(_predict, edit=_other_channels, names=["514 channels", "reads 1026", "--sensor-input-channels"])),
    Case("predict-03", "predict() with one camera view for a policy trained on two",
         partial(_predict, edit=_one_view, names=["sample 1 has 1 view(s)", "trained on 2 (View1, View5)",
                                                  "in that order"])),
]

# the cases on the session's trained run (zero2_run: built once, ~10 s on 2 processes)
SLOW = {"ckpt-01", "ckpt-02", "ckpt-03", "ckpt-04", "ckpt-06", "ckpt-07", "ckpt-08", "security-02", "security-03",
        "security-06", "security-07", "predict-01", "predict-02", "predict-03"}

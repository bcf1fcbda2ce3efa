"""DeepSpeed's JIT ops: a per-environment build directory, and a lock left by a killed build is
one line with the fix instead of a run that waits forever."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vla_ds.cli import main
from vla_ds.errors import UsageError
from vla_ds.utils.dist import torchrun
from vla_ds.utils.jit import check_stale_locks, extensions_dir, missing_ops

OP = "deepspeed_shm_comm"


def test_a_stale_lock_stops_a_training_run_in_one_line(tmp_path):
    """A build killed midway leaves <dir>/<op>/lock: torch would wait on it forever (silently) at the
    first init_distributed. The real `vla-ds train` entry refuses at once, naming the lock and the fix."""
    lock = tmp_path / OP / "lock"
    lock.parent.mkdir()
    lock.touch()
    start = time.monotonic()
    r = torchrun("vla_ds", ["train"], nproc=0, env={"TORCH_EXTENSIONS_DIR": str(tmp_path)}, timeout=120)
    assert r.returncode == 2, r.stderr
    assert time.monotonic() - start < 60
    lines = [line for line in r.stderr.splitlines() if str(lock) in line]
    assert len(lines) == 1 and lines[0].startswith("vla-ds train: ")
    assert f"rm {lock}" in lines[0] and OP in lines[0] and "killed" in lines[0]
    assert lock.exists()  # reported, never removed behind the user's back


def test_the_check_runs_before_any_command(tmp_path, monkeypatch, capfd):
    lock = tmp_path / "py311_cpu" / "cpu_adam" / "lock"  # torch's default layout, one level deeper
    lock.parent.mkdir(parents=True)
    lock.touch()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    out = tmp_path / "model"
    assert main(["tiny-model", str(out)]) == 2
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"rm {lock}" in err[0]
    assert not out.exists()


def test_a_lock_held_by_a_live_build_is_not_stale(tmp_path, caplog):
    """A process that holds the lock open (as torch's FileBaton does for the whole build) is a build
    in progress: logged, not an error. Once that process is gone, the same file is stale."""
    lock = tmp_path / OP / "lock"
    lock.parent.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, time\n"
         f"fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)\nprint('held', flush=True)\ntime.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with caplog.at_level(logging.INFO, logger="vla_ds"):
            check_stale_locks(tmp_path)
        assert caplog.text == ""  # a fresh lock: most likely a load's quick check, not worth a line
        old = time.time() - 60  # as old as a build a minute long
        os.utime(lock, (old, old))
        with caplog.at_level(logging.INFO, logger="vla_ds"):
            check_stale_locks(tmp_path)
        assert f"waiting for the build of {OP} by pid {holder.pid}" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(UsageError, match=f"rm {lock}"):
        check_stale_locks(tmp_path)


def test_no_locks_no_directory_no_error(tmp_path):
    check_stale_locks(tmp_path / "absent")
    (tmp_path / OP).mkdir()
    (tmp_path / OP / f"{OP}.so").touch()
    check_stale_locks(tmp_path)
    assert missing_ops(tmp_path, [OP, "cpu_adam"]) == ["cpu_adam"]


def test_extensions_dir_is_the_users_else_one_per_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert extensions_dir() == tmp_path / "mine"

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    venv = tmp_path / "venv"
    venv.mkdir()
    monkeypatch.setattr(sys, "prefix", str(venv))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    assert extensions_dir() == venv / "torch_extensions"  # a writable venv keeps its own ops

    # Not writable (here: not there) or not a venv: one directory per prefix under the user's cache.
    shared = tmp_path / "home" / ".cache" / "vla-ds" / "torch_extensions"
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "absent-a"))
    a = extensions_dir()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "absent-b"))
    b = extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/usr")
    system = extensions_dir()
    assert a.parent == b.parent == system.parent == shared and len({a, b, system}) == 3


def test_torchrun_children_get_the_extensions_dir(tmp_path, monkeypatch):
    (tmp_path / "show_dir.py").write_text("import os\nprint(os.environ['TORCH_EXTENSIONS_DIR'])\n")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    r = torchrun("show_dir", [], nproc=0, env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(extensions_dir()) == os.environ["TORCH_EXTENSIONS_DIR"]


def test_build_ops_builds_or_loads_the_shm_op(caplog):
    """The op every DeepSpeed run on CPU needs (at init_distributed): built once, then only loaded."""
    with caplog.at_level(logging.INFO, logger="vla_ds"):
        assert main(["build-ops", OP]) == 0
    assert (Path(os.environ["TORCH_EXTENSIONS_DIR"]) / OP / f"{OP}.so").is_file()
    assert f"DeepSpeed's ops are in {os.environ['TORCH_EXTENSIONS_DIR']}" in caplog.text
    assert main(["build-ops", "no_such_op"]) == 2


def test_ninja_is_this_interpreters_even_from_a_relative_path(tmp_path):
    """torch runs `ninja` from PATH inside the build directory. Started as PATH=.venv/bin python
    (sys.executable then is relative), Debian's ninja ran there and rebuilt every op that pip's
    ninja had built (their command hashes differ): use_extensions_dir puts the absolute dir first."""
    bin_dir = Path(os.path.abspath(sys.executable)).parent
    if not (bin_dir / "ninja").exists():
        pytest.skip("no ninja next to this interpreter")
    code = ("import os, shutil, sys; from vla_ds.utils.jit import use_extensions_dir\n"
            "assert not os.path.isabs(sys.executable)\n"
            f"use_extensions_dir(); os.chdir({str(tmp_path)!r}); print(shutil.which('ninja'))")
    env = {**os.environ, "PATH": os.pathsep.join([bin_dir.name, "/usr/bin", "/bin"])}
    # a bare name, found through the relative PATH entry (as a shell does with PATH=.venv/bin)
    r = subprocess.run([Path(sys.executable).name, "-c", code], cwd=bin_dir.parent, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(bin_dir / "ninja")

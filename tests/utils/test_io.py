"""Atomic writes: a failure mid-write leaves the previous content and no temporary files."""
from __future__ import annotations

import json
import os

import pytest

from vla_ds.utils.io import atomic_dir, atomic_file, write_json


def test_atomic_file_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "state.json"
    write_json(target, {"step": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write('{"step": 2, "half')
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    write_json(target, {"step": 2})
    assert json.loads(target.read_text()) == {"step": 2}


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "weights").write_text("v2-partial")
            raise RuntimeError("crash mid-save")
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(target) as d:
        (d / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with pytest.raises(FileExistsError):
        with atomic_dir(target, replace=False) as d:
            pass


def test_written_files_and_dirs_get_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_safetensors_in_an_atomic_dir_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    # safetensors creates its files 0600: a policy written that way is unreadable to the robot's
    # service user. What lands must have the modes of a plain open(), executables kept executable.
    import torch
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "policy") as d:
            save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
            (d / "sub").mkdir(mode=0o700)
            (d / "sub" / "tool.py").write_text("#!/usr/bin/env python\n")
            os.chmod(d / "sub" / "tool.py", 0o700)
    finally:
        os.umask(old)
    assert (tmp_path / "policy" / "model.safetensors").stat().st_mode & 0o777 == file_mode
    assert (tmp_path / "policy" / "sub").stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "policy" / "sub" / "tool.py").stat().st_mode & 0o777 == dir_mode

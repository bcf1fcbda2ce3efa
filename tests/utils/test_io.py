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

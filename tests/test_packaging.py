"""setup.cfg's dependency ranges admit what we test with; the install script is idempotent."""
from __future__ import annotations

import configparser
import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version


def _requirements(repo_root: Path) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(repo_root / "setup.cfg")
    lines = cfg["options"]["install_requires"].strip().splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def test_runtime_dependencies_are_declared_with_upper_bounds(repo_root):
    reqs = {r.name: r for r in _requirements(repo_root)}
    for name in ("deepspeed", "torch", "transformers", "peft", "bitsandbytes", "wandb", "safetensors"):
        assert name in reqs, name
        assert any(s.operator in ("<", "<=", "~=") for s in reqs[name].specifier), f"{name} needs an upper bound"
    assert Version("2.13.0") in reqs["torch"].specifier


def test_installed_versions_satisfy_the_ranges(repo_root):
    for req in _requirements(repo_root):
        installed = Version(md.version(req.name))
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} not in {req.specifier}"


def test_setup_script_second_run_installs_nothing(repo_root):
    venv = Path(sys.prefix)
    if not (venv / ".vla-ds-installed").exists():
        pytest.skip("this environment was not installed by launch/setup.sh")
    env = dict(os.environ, VLA_DS_VENV=str(venv))
    out = subprocess.run(
        ["bash", str(repo_root / "launch" / "setup.sh")], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout
    assert "pip install" not in out.stdout


def test_ci_runs_the_readme_test_command(repo_root):
    readme = (repo_root / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [block.split("\n", 1)[1].strip() for block in quickstart.split("```bash")[1:]]
    commands = [c.split("```", 1)[0].strip() for c in commands]
    assert len(commands) == 2, "the Quickstart has exactly two commands"
    assert "vla-ds demo" in commands[0]
    assert commands[1] in (repo_root / ".ci" / "run").read_text()

"""setup.cfg's dependency ranges admit what we test with; the install script is idempotent; a plain
(non-editable) install works from any directory."""
from __future__ import annotations

import configparser
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.helpers.runs import SMALL


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


@pytest.mark.slow
def test_a_plain_install_trains_from_any_directory(tmp_path, repo_root, tiny_model_dir, learn_data):
    """`pip install .` (not editable) into a fresh venv, then `vla-ds train --ds-config zero2` from an
    unrelated directory: the presets (and plan's 3B config) ship inside the package.

    The dependencies are this environment's, reached through a .pth line (which adds the directory
    to sys.path without running its .pth files, so the editable vla-ds there stays invisible):
    what is under test is vla-ds's own packaging, not pip resolving torch."""
    import site
    import sysconfig

    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info there
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(repo_root / name, src / name)
    shutil.copytree(repo_root / "vla_ds", src / "vla_ds", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    purelib = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (Path(purelib) / "test_deps.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    launcher = {"PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    proc = subprocess.run([str(vpy), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q",
                           str(src)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(vpy), "-c", "import vla_ds.train.ds_config as d, vla_ds.profiling.plan as p; "
                            "print(d.__file__); print(d.ds_config_path('zero2')); print(p.DEFAULT_BACKBONE)"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(w).is_file() and Path(w).is_relative_to(purelib) for w in where), where  # the installed copy
    out = elsewhere / "run"
    proc = subprocess.run([str(venv / "bin" / "vla-ds"), "train", "--data", str(learn_data), "--backbone",
                           str(tiny_model_dir), "--output-dir", str(out), "--ds-config", "zero2", "--max-steps", "2",
                           "--batch-size", "2", "--grad-accum-steps", "1", "--val-ratio", "0", *SMALL],
                          cwd=elsewhere, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "checkpoints" / "final" / "policy" / "model.safetensors").is_file()
    assert "ds_config: zero2" in proc.stderr

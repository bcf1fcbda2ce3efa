"""The repository passes its linter (ruff, configured in pyproject.toml): imports sorted, no unused
names, no undefined ones, the bug patterns it knows."""
from __future__ import annotations

import subprocess
import sys


def test_ruff_finds_nothing(repo_root):
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

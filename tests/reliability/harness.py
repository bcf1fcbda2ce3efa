"""The reliability table's machinery: a `Case` builds its scenario in a fresh directory and says
what must happen; `replay` runs the real command (`vla-ds ...` in this process, or a library call)
and checks it.

Every case is checked for the same three things:
  - the exit code (2 for a refusal, 0 for a fault vla-ds recovers from), or for a library call the
    exception type;
  - one line -- not a traceback -- holding every `names` needle (the file or flag, and the fix);
    for a recovery, the one notice line saying what was done;
  - that nothing good on disk changed: every file under each `keep` path has the bytes it had
    before, and no `absent` path appeared (a refused command wrote no output).

With RELIABILITY_LOG=FILE set, each replayed case appends {"id", "exit", "line"} to FILE (JSON
lines): what docs/reliability.md quotes, regenerated with
`RELIABILITY_LOG=/tmp/r.jsonl python -m pytest tests/reliability`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class Scenario:
    """What one case runs and expects. `argv` for `vla-ds` or `call` for a library call."""

    names: list[str]
    argv: list[str] | None = None
    call: Callable[[], object] | None = None
    exit: int = 2
    raises: type[BaseException] | None = None
    keep: list[Path] = field(default_factory=list)
    absent: list[Path] = field(default_factory=list)
    after: Callable[[], None] | None = None  # extra checks once it ran (e.g. what a recovery left)


@dataclass(frozen=True)
class Case:
    id: str  # area-NN, the row of docs/reliability.md
    what: str  # the bad input or the fault, as a user meets it
    build: Callable[[Env], Scenario]


class Env:
    """A case's fresh directory (`tmp`) and the session's shared artefacts, copied on request."""

    def __init__(self, tmp: Path, request):
        self.tmp, self._request = tmp, request

    def fixture(self, name: str):
        """A session fixture (read-only: copy before changing it)."""
        return self._request.getfixturevalue(name)

    def copy(self, fixture: str, name: str | None = None) -> Path:
        """A private copy of a session fixture's directory."""
        src = Path(self.fixture(fixture))
        dst = self.tmp / (name or src.name)
        shutil.copytree(src, dst, symlinks=True)
        return dst

    def raw_sessions(self) -> Path:
        """A private copy of the raw recordings the session's train_data was ingested from."""
        return self.copy_path(Path(self.fixture("train_data")).parent / "raw", "raw")

    def copy_path(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(src, dst, symlinks=True)
        return dst


def snapshot(paths: list[Path]) -> dict[str, str]:
    out = {}
    for root in paths:
        for p in [root] if root.is_file() else sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def error_lines(err: str) -> list[str]:
    """The lines of stderr that report (vla-ds's `vla-ds CMD: ...`, argparse's `CMD: error: ...`)."""
    return [ln for ln in err.splitlines() if ln.startswith("vla-ds ") or ": error: " in ln]


def probe_ops() -> None:
    """DeepSpeed probes its ops once per process (at the first process group): it links a test
    program against libaio and silences that through `sys.stderr.fileno()`, which under capfd is
    not fd 2, so its "collect2: error" would read as a second error line. A real `vla-ds train`
    (a terminal, a subprocess) never shows it. Probed here, before replay reads stderr."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__  # noqa: B018 - the probe runs on first access


def replay(sc: Scenario, capfd, case_id: str = "") -> str:
    from vla_ds.cli import main

    before = snapshot(sc.keep)
    probe_ops()
    capfd.readouterr()
    if sc.call is not None:
        try:
            sc.call()
        except BaseException as e:  # noqa: BLE001 - the type is what is checked
            assert sc.raises is not None and isinstance(e, sc.raises), f"raised {type(e).__name__}: {e}"
            message = str(e)
        else:
            raise AssertionError(f"expected {sc.raises.__name__}, nothing raised")
        lines = [message] if "\n" not in message else message.splitlines()
    else:
        try:
            rc = main(sc.argv)
        except SystemExit as e:  # argparse
            rc = e.code
        err = capfd.readouterr().err
        assert "Traceback" not in err, err[-3000:]
        assert rc == sc.exit, f"exit {rc}, expected {sc.exit}:\n{err[-3000:]}"
        lines = error_lines(err) if sc.exit else [ln for ln in err.splitlines() if all(n in ln for n in sc.names)]
    assert len(lines) == 1, lines
    for needle in sc.names:
        assert needle in lines[0], (needle, lines[0])
    assert snapshot(sc.keep) == before, "a good file changed"
    for p in sc.absent:
        assert not p.exists(), f"{p} was written"
    if sc.after is not None:
        sc.after()
    if os.environ.get("RELIABILITY_LOG"):
        with open(os.environ["RELIABILITY_LOG"], "a") as f:
            exit = sc.raises.__name__ if sc.call is not None else sc.exit
            f.write(json.dumps({"id": case_id, "exit": exit, "line": lines[0]}) + "\n")
    return lines[0]

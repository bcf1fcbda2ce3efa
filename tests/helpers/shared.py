"""The session's shared launch: the 2-process trainings and profiles of every selected test module,
one after the other in a single torchrun launch (run_many.py), so that the ~15 s start-up of a
launch is paid once, not once per module.

A test module takes part by defining `shared_runs(ctx) -> {name: ARGS}` (argument lists of the
training entry, each with its own --output-dir) and/or `shared_profiles(ctx) -> {name: ARGS}` (of
`python -m vla_ds.profiling`; a profile has no metrics rows, its results are files). There,
`ctx.fixture(name)` gives a session fixture, `ctx.root(name)` a fresh directory, `ctx.selected(test)`
whether a test of that module runs in this session and `ctx.uses(fixture)` whether one that requests
`fixture` does (a module whose tests are all deselected adds nothing); what must exist before the
launch (a VL cache, runs that crash on purpose) the module prepares there too. Its tests read the
results through the session fixture `shared`: `shared.run(module, name)` -> SharedRun(dir, rows,
log: rank 0's lines of that run), `shared.output`: every rank's output of the whole launch. A run
that fails (one line for bad input, else its exception) does not stop the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.helpers.runs import metrics_rows, run_many

KINDS = {"shared_runs": "train", "shared_profiles": "profile"}


@dataclass
class SharedRun:
    dir: Path
    rows: list[dict]
    log: str


class Context:
    def __init__(self, request, tmp_path_factory, module):
        self._request, self._factory, self._module = request, tmp_path_factory, module

    def fixture(self, name: str):
        return self._request.getfixturevalue(name)

    def root(self, name: str) -> Path:
        return self._factory.mktemp(name)

    def selected(self, test: str) -> bool:
        """Whether `test` of this module runs in this session: "name" (any parameters) or "name[id]"."""
        return any(item.module is self._module and (item.name == test or item.name.startswith(test + "["))
                   for item in self._request.session.items)

    def uses(self, fixture: str) -> bool:
        """Whether a test of this module that runs in this session requests `fixture`."""
        return any(item.module is self._module and fixture in getattr(item, "fixturenames", ())
                   for item in self._request.session.items)


class Shared:
    def __init__(self, runs: dict[tuple[str, str], SharedRun], output: str):
        self._runs, self.output = runs, output

    def run(self, module: str, name: str) -> SharedRun:
        return self._runs[module, name]


def launch_shared(request, tmp_path_factory) -> Shared:
    modules = []
    for item in request.session.items:
        if any(hasattr(item.module, hook) for hook in KINDS) and item.module not in modules:
            modules.append(item.module)
    keys, commands = [], []
    for module in modules:
        for hook, kind in KINDS.items():
            if hasattr(module, hook):
                for name, args in getattr(module, hook)(Context(request, tmp_path_factory, module)).items():
                    keys.append((module.__name__, name))
                    commands.append([kind, *args])
    root = tmp_path_factory.mktemp("shared_launch")
    proc = run_many(commands, root / "runs.json", timeout=2400)
    runs = {}
    for key, command in zip(keys, commands):
        out = Path(command[command.index("--output-dir") + 1])
        log = out / "run.log"
        runs[key] = SharedRun(out, metrics_rows(out), log.read_text() if log.exists() else "")
    return Shared(runs, proc.stdout + proc.stderr)

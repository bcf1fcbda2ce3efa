"""The package's shape: no import circles, floors that only import downward, the CLI imported by
nothing in the library, presets shipped identically, and README's Layout naming what is there."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.imports import cycles, import_graph

PACKAGE = Path(__file__).resolve().parents[1] / "vla_ds"

# Floors, bottom to top: a module imports from its own floor and the floors below, never above.
FLOORS = [
    ("vla_ds", "vla_ds.errors"),  # __version__, UsageError
    ("vla_ds.utils",),  # io, logging, progress, dist, faults, weights
    ("vla_ds.data",),
    ("vla_ds.model",),
    ("vla_ds.config",),
    ("vla_ds.cache",),
    ("vla_ds.eval",),  # scores policies (the trainer's --eval-every calls it)
    ("vla_ds.train",),
    ("vla_ds.convert",),  # reads what train writes
    ("vla_ds.serve",),  # loads a policy (eval's locate) and answers the robot
    ("vla_ds.profiling",),  # runs the trainer
    ("vla_ds.demo",),  # the whole pipeline
    ("vla_ds.cli", "vla_ds.__main__"),  # argv; every package's __main__ is a door into it
]


def floor_of(module: str) -> int:
    if module.endswith(".__main__"):
        return len(FLOORS) - 1
    best = None
    for k, names in enumerate(FLOORS):
        for name in names:
            exact = name == "vla_ds"  # the top-level __init__ only, not everything under it
            if module == name or (not exact and module.startswith(name + ".")):
                best = k
    assert best is not None, f"{module} is on no floor: add it to FLOORS (and README's Layout)"
    return best


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


def test_no_import_circles(graph):
    assert cycles(graph) == []


def test_the_circle_finder_finds_circles(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.b import f\n")  # a package face: no circle
    (pkg / "sub" / "b.py").write_text("def f():\n    from pkg import c\n")  # lazy imports count
    (pkg / "c.py").write_text("from . import d\n")
    (pkg / "d.py").write_text("import pkg.sub.b\n")
    g = import_graph(pkg)
    assert g["pkg.sub"] == {"pkg.sub.b"} and g["pkg.c"] == {"pkg.d"} and g["pkg.d"] == {"pkg.sub.b"}
    assert cycles(g) == [["pkg.c", "pkg.d", "pkg.sub.b"]]


def test_floors_only_import_downward(graph):
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if floor_of(d) > floor_of(m)]
    assert upward == []


def test_nothing_in_the_library_imports_the_cli(graph):
    def is_cli(m: str) -> bool:
        return m == "vla_ds.cli" or m.startswith("vla_ds.cli.")

    offenders = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
                 if is_cli(d) and not is_cli(m) and not m.endswith("__main__")]
    assert offenders == []
    # the entry scripts (`python -m vla_ds.train`, ...) are doors into the CLI and nothing else
    for m in (m for m in graph if m.endswith("__main__")):
        assert graph[m] and all(is_cli(d) for d in graph[m]), (m, graph[m])


def test_utils_import_nothing_of_vla_ds_but_errors(graph):
    for m, deps in graph.items():
        if m.startswith("vla_ds.utils"):
            assert all(d == "vla_ds.errors" or d.startswith("vla_ds.utils") for d in deps), (m, deps)


def test_the_shipped_presets_equal_the_top_level_ones(repo_root):
    top = {p.name: p.read_bytes() for p in (repo_root / "ds_configs").glob("*.json")}
    shipped = {p.name: p.read_bytes() for p in (PACKAGE / "train" / "ds_configs").glob("*.json")}
    assert top and shipped == top, "edit ds_configs/ and copy it to vla_ds/train/ds_configs/ (or the reverse)"


def test_readme_layout_names_every_package_and_only_real_paths(repo_root):
    readme = (repo_root / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    for path in re.findall(r"(?<![\w/.])((?:vla_ds|tests|launch|docs|ds_configs)/[\w/.]*)", layout):
        assert (repo_root / path.rstrip(".")).exists(), f"README Layout names {path}, which does not exist"
    for pkg in sorted(p.parent for p in PACKAGE.rglob("__init__.py")):
        rel = pkg.relative_to(repo_root).as_posix() + "/"
        assert rel in layout, f"README Layout does not mention {rel}"

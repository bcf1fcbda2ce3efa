"""Replays docs/reliability.md: every bad input and fault of the table, through the real command,
ends in its exit code and one line naming the file or flag, and changes nothing good on disk
(tests/reliability/harness.py). The table's rows are the cases of cases_*.py, one for one."""
from __future__ import annotations

import re

import pytest

from tests.reliability import cases_data, cases_train
from tests.reliability.harness import Env, replay

MODULES = [cases_data, cases_train]
CASES = [c for m in MODULES for c in m.CASES]
SLOW = set().union(*(m.SLOW for m in MODULES))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.id in SLOW else [])
                                  for c in CASES])
def test_case(case, tmp_path, request, capfd, in_process_group):
    replay(case.build(Env(tmp_path, request)), capfd, case.id)


def test_the_table_in_docs_is_the_suite(repo_root):
    text = (repo_root / "docs" / "reliability.md").read_text()
    rows = re.findall(r"^\| (\w+-\d\d) \| (.+?) \|", text, flags=re.M)
    assert [r[0] for r in rows] == [c.id for c in CASES], "docs/reliability.md lists the cases, in order"
    assert [r[1] for r in rows] == [c.what for c in CASES]
    assert len(CASES) >= 44 and len({c.id for c in CASES}) == len(CASES)

"""setup_logging: -v turns on vla-ds's debug output only, and other ranks stay at warnings."""
from __future__ import annotations

import logging

from vla_ds.utils.logging import setup_logging


def test_verbose_is_debug_for_vla_ds_only(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    setup_logging(verbose=True)
    assert logging.getLogger("vla_ds.profiling.run").isEnabledFor(logging.DEBUG)
    assert not logging.getLogger("matplotlib.font_manager").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("some_library").isEnabledFor(logging.INFO)
    setup_logging(verbose=False)
    assert not logging.getLogger("vla_ds.profiling.run").isEnabledFor(logging.DEBUG)
    assert logging.getLogger("vla_ds.profiling.run").isEnabledFor(logging.INFO)


def test_other_ranks_only_warn(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    setup_logging(verbose=True)
    assert not logging.getLogger("vla_ds.train.loop").isEnabledFor(logging.INFO)
    assert logging.getLogger("vla_ds.train.loop").isEnabledFor(logging.WARNING)
    monkeypatch.delenv("RANK")
    setup_logging(verbose=False)

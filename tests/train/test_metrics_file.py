"""metrics.jsonl survives a kill mid-write: a torn last line is dropped with a notice, never fatal."""
from __future__ import annotations

import json

import pytest

from vla_ds.errors import UsageError
from vla_ds.train.metrics import METRICS_FILE, MetricsLogger, read_metrics, truncate_metrics

TORN = '{"step": 3, "time": 1.0, "train/lo'  # what a SIGKILL inside write() leaves


def _history(run_dir, steps, torn=True):
    lines = [json.dumps({"step": s, "time": 1.0, "train/loss": 1.0 / s}) for s in steps]
    (run_dir / METRICS_FILE).write_text("".join(line + "\n" for line in lines) + (TORN if torn else ""))


def test_a_torn_last_line_is_dropped_on_resume(tmp_path, caplog):
    _history(tmp_path, [1, 2])
    truncate_metrics(tmp_path, max_step=2)  # what a resume from step 2 does
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "last line is torn" in caplog.text
    assert (tmp_path / METRICS_FILE).read_text().endswith("}\n")


def test_reading_and_appending_after_a_torn_line(tmp_path, caplog):
    _history(tmp_path, [1, 2])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    logger = MetricsLogger(tmp_path, {}, rank=0, wandb_mode="disabled")  # e.g. --resume none into the same dir
    logger.log({"train/loss": 0.5}, step=3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3], "the new record starts its own line"
    logger.close()


def test_a_damaged_line_before_the_end_is_one_line_naming_it(tmp_path):
    _history(tmp_path, [1, 2], torn=False)
    text = (tmp_path / METRICS_FILE).read_text().splitlines()
    (tmp_path / METRICS_FILE).write_text("\n".join([text[0], "garbage", text[1]]) + "\n")
    with pytest.raises(UsageError, match=r"metrics.jsonl: line 2 is not JSON"):
        truncate_metrics(tmp_path, max_step=2)

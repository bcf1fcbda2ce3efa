"""Normalization statistics: exact values on known data, JSON round trip, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vla_ds.cli import main
from vla_ds.data.ingest import IngestOptions, preprocess
from vla_ds.data.stats import NormStats, compute_stats
from vla_ds.errors import UsageError


def test_stats_exact_on_a_ramp(exact_session_a, exact_session_b, tmp_path):
    preprocess([str(exact_session_a), str(exact_session_b)], tmp_path / "ds", IngestOptions(sensor_dtype="float32"))
    stats = compute_stats([tmp_path / "ds"])
    # 4 steps of session A (1 s) and 4 of B (0.5 s): per-dim means of the two constant ramps
    a = np.array([[1.0, 0, -0.5, 0.2, -0.1, 0]] * 4 + [[0.5, 0, -0.25, 0.1, -0.05, 0]] * 4)
    np.testing.assert_allclose(stats.action_mean[:6], a.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats.action_std[:6], a.std(0), atol=1e-5)
    assert stats.action_mean[6] == pytest.approx(0.625)  # progress 0.25..1.0 in both
    # sensor: per channel over every stored row; force (channel 0) separate from the A-scan
    (ep,) = [p for p in (tmp_path / "ds" / "episodes").iterdir() if (p / "sensor.npy").exists()]
    rows = np.load(ep / "sensor.npy").astype(np.float64)
    np.testing.assert_allclose(stats.sensor_mean, rows.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats.sensor_std, rows.std(0), rtol=1e-6)
    assert len(stats.sensor_mean) == 1026
    assert stats.counts["force_mean_std"][0] == pytest.approx(rows[:, 0].mean())
    assert stats.counts["sensor_rows"] == len(rows)


def test_round_trip_and_validation(tmp_path):
    s = NormStats.identity(7, 1026)
    path = s.save(tmp_path)
    assert path.name == "stats.json"
    assert NormStats.load(tmp_path) == s
    mean, std = NormStats([0.0] * 7, [0.0] * 7, [0.0] * 7, [0.0] * 7).action_arrays()
    assert (std > 0).all(), "a dimension that never moves must not divide by zero"
    with pytest.raises(ValueError, match="action_std"):
        NormStats([0.0] * 7, [1.0] * 6, [0.0] * 7, [0.0] * 7)
    with pytest.raises(ValueError, match="channels"):
        s.sensor_arrays(10)
    bad = json.loads(path.read_text())
    bad["version"] = 99
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="version"):
        NormStats.load(path)
    with pytest.raises(UsageError, match="vla-ds stats"):
        NormStats.load(tmp_path / "nope.json")


def test_cli_preprocess_then_stats(exact_session_a, tmp_path):
    out = tmp_path / "ds"
    assert main(["preprocess", str(exact_session_a), "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["episodes"] == 1
    assert main(["stats", str(out)]) == 0
    assert NormStats.load(out).action_dim == 7
    assert main(["stats", str(out), str(out)]) == 2  # several dirs need --out
    assert main(["stats", str(out), str(out), "--out", str(tmp_path / "s.json")]) == 0

"""Each kind of bad input: a one-line error naming the file, or a counted skip; nothing half-written."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vla_ds.cli import main
from vla_ds.data.dataset import IntegratedDataset
from vla_ds.data.ingest import IngestOptions, preprocess
from vla_ds.data.sources import SourceError

SKIP = IngestOptions(skip_bad=True, sensor_dtype="float32")


def _assert_nothing_written(out):
    episodes = out / "episodes"
    assert not episodes.exists() or not list(episodes.iterdir()), "no (half-)episode may remain"


def _one_line(err: SourceError, *needles):
    msg = str(err)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, (n, msg)


def test_truncated_jpeg(exact_session_a, tmp_path):
    img = sorted((exact_session_a / "View1" / "left").glob("*.jpg"))[2]
    img.write_bytes(img.read_bytes()[:200])
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, img, "unreadable image")
    _assert_nothing_written(tmp_path / "ds")
    summary = preprocess([str(exact_session_a)], tmp_path / "ds", SKIP)
    assert summary["dropped"] == {"corrupt_image:View1": 1} and summary["samples"] == 3


def test_npz_missing_key_and_wrong_shapes(exact_session_a, tmp_path):
    npz = next(exact_session_a.glob("sensor_data_*.npz"))
    z = dict(np.load(npz))
    np.savez(npz, timestamps=z["timestamps"], forces=z["forces"])
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, npz, "alines")
    np.savez(npz, timestamps=z["timestamps"], forces=z["forces"], alines=z["alines"][:-5])
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, npz, "alines has shape")
    _assert_nothing_written(tmp_path / "ds")
    summary = preprocess([str(exact_session_a)], tmp_path / "ds", SKIP)
    assert summary["episodes"] == 0 and "alines" in summary["skipped_sessions"][0]["reason"]


def test_csv_missing_column(exact_session_a, tmp_path):
    csv = next(exact_session_a.glob("robot_state_*.csv"))
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(",".join(x for i, x in enumerate(ln.split(",")) if i != 13) for ln in lines))
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, csv, "pose_a")
    _assert_nothing_written(tmp_path / "ds")


def test_nan_in_sensor_stream(exact_session_a, tmp_path):
    npz = next(exact_session_a.glob("sensor_data_*.npz"))
    z = dict(np.load(npz))
    z["alines"][700, 3] = np.nan  # inside frame 1's window (rows 650..1299)
    np.savez(npz, **z)
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, npz, "NaN", "--skip-bad")
    _assert_nothing_written(tmp_path / "ds")
    summary = preprocess([str(exact_session_a)], tmp_path / "ds", SKIP)
    assert summary["dropped"] == {"sensor_window_with_nan": 1}
    ds = IntegratedDataset(tmp_path / "ds", views=["View1"])
    assert ds.sample_has_sensor.tolist() == [True, False, True, True]
    assert all(np.isfinite(ds[i]["sensor"].numpy()).all() for i in range(len(ds)))


def test_empty_session(tmp_path):
    s = tmp_path / "src" / "recv_all_20251027_000000"
    (s / "View1" / "left").mkdir(parents=True)
    (s / "robot_state_x.csv").write_text("recv_timestamp\n")
    with pytest.raises(SourceError) as e:
        preprocess([str(s)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, s, "empty session")
    summary = preprocess([str(s)], tmp_path / "ds", SKIP)
    assert summary["episodes"] == 0 and len(summary["skipped_sessions"]) == 1


def test_json_that_is_not_a_list(exact_session_b, tmp_path):
    bad = next(exact_session_b.glob("*View5_single.json"))
    bad.write_text(json.dumps({"frames": []}))
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_b)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, bad, "expected a JSON list")
    _assert_nothing_written(tmp_path / "ds")
    summary = preprocess([str(exact_session_b)], tmp_path / "ds", SKIP)
    assert summary["episodes"] == 1 and summary["dropped"] == {"bad_frame_list": 1}


def test_cli_reports_bad_input_in_one_line(exact_session_b, tmp_path, capfd):
    bad = next(exact_session_b.glob("*View1_single.json"))
    bad.write_text("[{")
    assert main(["preprocess", str(exact_session_b), "--out", str(tmp_path / "ds")]) == 2
    err = [ln for ln in capfd.readouterr().err.splitlines() if "vla-ds preprocess" in ln]
    assert len(err) == 1 and str(bad) in err[0] and "invalid JSON" in err[0]
    assert main(["preprocess", str(tmp_path / "missing"), "--out", str(tmp_path / "ds")]) == 2
    assert main(["preprocess", str(exact_session_b), "--out", str(tmp_path / "ds"), "--max-side", "-1"]) == 2

"""Each kind of bad input: a one-line error naming the file, or a counted skip; nothing half-written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vla_ds.cli import main
from vla_ds.data.dataset import IntegratedDataset
from vla_ds.data.ingest import IngestOptions, preprocess
from vla_ds.data.sources import SourceError
from vla_ds.data.stats import compute_stats

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
    assert all(np.isfinite(ds[i]["sensor"].numpy()).all() for i in range(len(ds)) if ds.sample_has_sensor[i])


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


def _cli_line(capfd, command: str, *needles) -> str:
    """The one `vla-ds COMMAND:` line of stderr (no traceback), holding every needle."""
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"vla-ds {command}:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def test_npz_with_object_arrays_is_never_unpickled(exact_session_a, tmp_path, capfd):
    npz = next(exact_session_a.glob("sensor_data_*.npz"))
    z = dict(np.load(npz))
    alines = np.empty(len(z["alines"]), object)
    alines[:] = list(z["alines"])  # one Python object per row: only pickle can store it
    np.savez(npz, timestamps=z["timestamps"], forces=z["forces"], alines=alines)
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, npz, "alines holds Python objects", "never unpickles")
    _assert_nothing_written(tmp_path / "ds")
    assert main(["preprocess", str(exact_session_a), "--out", str(tmp_path / "ds")]) == 2
    _cli_line(capfd, "preprocess", npz, "never unpickles")
    summary = preprocess([str(exact_session_a)], tmp_path / "ds", SKIP)
    assert summary["episodes"] == 0 and "Python objects" in summary["skipped_sessions"][0]["reason"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_in_robot_csv(exact_session_a, tmp_path, capfd, value):
    csv = next(exact_session_a.glob("robot_state_*.csv"))
    lines = csv.read_text().splitlines()
    header = lines[0].split(",")
    row = lines[151].split(",")  # line 152 of the file: t0 + 0.5 s, inside the session
    row[header.index("pose_b")] = value
    lines[151] = ",".join(row)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, csv, "line 152:", "NaN/inf in pose_b", "--skip-bad")
    _assert_nothing_written(tmp_path / "ds")
    assert main(["preprocess", str(exact_session_a), "--out", str(tmp_path / "ds")]) == 2
    _cli_line(capfd, "preprocess", csv, "line 152")
    summary = preprocess([str(exact_session_a)], tmp_path / "ds", SKIP)
    assert summary["dropped"] == {"robot_state_nan_rows": 1} and summary["samples"] == 4
    assert compute_stats([tmp_path / "ds"]).action_mean[4] == pytest.approx(-0.1, abs=1e-6)  # the ramp, no NaN


def test_nan_in_a_frame_list(exact_session_b, tmp_path):
    bad = next(exact_session_b.glob("*View5_single.json"))
    frames = json.loads(bad.read_text())
    frames[2]["robot_state"]["ee_pose"][0] = float("nan")
    bad.write_text(json.dumps(frames))  # json writes NaN, and reads it back
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_b)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, bad, "frame 2", "NaN/inf")
    summary = preprocess([str(exact_session_b)], tmp_path / "ds", SKIP)
    assert summary["episodes"] == 1 and summary["dropped"] == {"bad_frame_list": 1}


def _point_at(frame_list, image: str) -> None:
    frames = json.loads(frame_list.read_text())
    frames[1]["image"] = image
    frame_list.write_text(json.dumps(frames))


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_images_outside_the_source_folder(exact_session_b, tmp_path, capfd, kind):
    """An image path that leaves the frame list's folder (an absolute path elsewhere, or ../) is
    refused unless --allow-external-images; --skip-bad drops that image and counts it."""
    outside = tmp_path / "elsewhere" / "img.jpg"
    outside.parent.mkdir()
    shutil.copy(next((exact_session_b / "View1").glob("*.jpg")), outside)
    lst = next(exact_session_b.glob("*View1_single.json"))
    written = str(outside) if kind == "absolute" else "../../elsewhere/img.jpg"
    _point_at(lst, written)
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_b)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, lst, written, outside, "lies outside the source folder", "--allow-external-images")
    _assert_nothing_written(tmp_path / "ds")
    assert main(["preprocess", str(exact_session_b), "--out", str(tmp_path / "ds")]) == 2
    _cli_line(capfd, "preprocess", lst, outside, "--allow-external-images")
    summary = preprocess([str(exact_session_b)], tmp_path / "skip", SKIP)
    assert summary["dropped"] == {"external_image:View1": 1} and summary["frames_missing_a_view"] == {"View1": 1}
    allowed = IngestOptions(skip_bad=True, sensor_dtype="float32", allow_external_images=True)
    assert preprocess([str(exact_session_b)], tmp_path / "skip", allowed)["written"] == 1, "the image is back: rewritten"
    assert main(["preprocess", str(exact_session_b), "--out", str(tmp_path / "ds"), "--max-side", "0",
                 "--allow-external-images"]) == 0
    ds = IntegratedDataset(tmp_path / "ds", views=["View1"])
    assert len(ds) == 4 and ds.episodes[0].frames.images["View1"][1] == str(outside)


def test_stats_refuse_nan(exact_session_a, tmp_path, capfd):
    out = tmp_path / "ds"
    preprocess([str(exact_session_a)], out, IngestOptions(sensor_dtype="float32"))
    (ep,) = (out / "episodes").iterdir()
    sensor = np.load(ep / "sensor.npy")
    sensor[700, 5] = np.inf
    np.save(ep / "sensor.npy", sensor)
    assert main(["stats", str(out)]) == 2
    _cli_line(capfd, "stats", ep / "sensor.npy", "NaN/inf in sensor row 700", "vla-ds preprocess")
    frames = json.loads((ep / "frames.json").read_text())
    frames["pose"][3][1] = float("nan")
    (ep / "frames.json").write_text(json.dumps(frames))
    assert main(["stats", str(out)]) == 2
    _cli_line(capfd, "stats", ep / "frames.json", "frame 3", exact_session_a)
    assert not (out / "stats.json").exists()


def test_stats_name_a_path_that_holds_no_dataset(tmp_path, capfd):
    assert main(["stats", str(tmp_path / "missing")]) == 2
    _cli_line(capfd, "stats", f"DATASET_DIR {tmp_path / 'missing'}: no such file or directory")
    assert main(["stats", str(tmp_path / "*.none"), "--out", str(tmp_path / "s.json")]) == 2
    _cli_line(capfd, "stats", f"DATASET_DIR {tmp_path / '*.none'}: the glob matches nothing")


def test_preprocess_names_a_missing_source_or_an_empty_glob(tmp_path, capfd):
    assert main(["preprocess", str(tmp_path / "missing"), "--out", str(tmp_path / "ds")]) == 2
    _cli_line(capfd, "preprocess", f"SRC {tmp_path / 'missing'}: no such directory")
    assert main(["preprocess", str(tmp_path / "recv_all_*"), "--out", str(tmp_path / "ds")]) == 2
    _cli_line(capfd, "preprocess", f"SRC {tmp_path / 'recv_all_*'}: the glob matches nothing")


def test_a_killed_writes_temp_folder_is_never_an_episode(tmp_path):
    # atomic_dir writes `.<episode>.<random>.tmp/` and renames it; a SIGKILL leaves it, meta.json included
    from vla_ds.data.format import EPISODES_DIR, META_FILE, find_episode_dirs

    episodes = tmp_path / "dataset" / EPISODES_DIR
    for name in ("ep_a", ".ep_b.k3j2.tmp", ".ep_a.x9.old"):
        (episodes / name).mkdir(parents=True)
        (episodes / name / META_FILE).write_text("{}")
    assert [p.name for p in find_episode_dirs([tmp_path / "dataset"])] == ["ep_a"]


def test_an_empty_session_folder_beside_good_ones_is_reported(exact_session_a, tmp_path):
    empty = exact_session_a.parent / "recv_all_20251027_000001"  # a copy that never finished
    empty.mkdir()
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_a.parent)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, empty, "empty session")
    summary = preprocess([str(exact_session_a.parent)], tmp_path / "ds", SKIP)
    assert summary["episodes"] == 1 and [s["source"] for s in summary["skipped_sessions"]] == [str(empty)]


def test_preprocess_clears_the_temporaries_a_killed_run_left_and_only_those(exact_session_a, tmp_path):
    import os

    from vla_ds.errors import UsageError
    from vla_ds.utils.lock import LOCK_FILE

    out = tmp_path / "ds"
    preprocess([str(exact_session_a)], out, SKIP)
    (episode,) = (out / "episodes").iterdir()
    meta = (episode / "meta.json").read_bytes()
    # what a SIGKILL inside atomic_dir / atomic_file leaves (tempfile's 8-character names) ...
    left = [out / "episodes" / f".{episode.name}.k3j2a_9x.tmp", out / "episodes" / f".{episode.name}.q1w2e3r4.old",
            out / "episodes" / ".other_ep.abcdefgh.tmp"]
    for d in left:
        (d / "images").mkdir(parents=True)
        (d / "meta.json").write_text("{}")
    (out / ".summary.json.zz00yy11.tmp").write_text("{")
    # ... and what is not ours to delete
    mine = [out / "episodes" / ".notes", out / "episodes" / ".ep.tmp", out / "my_notes.txt"]
    for p in mine:
        p.write_text("keep")
    # a live preprocess into the same directory: refused, nothing touched
    (out / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "since": "now"}))
    with pytest.raises(UsageError) as e:
        preprocess([str(exact_session_a)], out, SKIP)
    assert f"--out {out}: another preprocess holds it (pid {os.getppid()}" in str(e.value)
    assert all(d.exists() for d in left)
    (out / LOCK_FILE).unlink()  # (a lock whose process is gone is taken over: tests/cache)
    summary = preprocess([str(exact_session_a)], out, SKIP)
    assert summary["unchanged"] == 1 and (episode / "meta.json").read_bytes() == meta
    assert not any(d.exists() for d in left) and not (out / ".summary.json.zz00yy11.tmp").exists()
    assert all(p.read_text() == "keep" for p in mine) and not (out / LOCK_FILE).exists()


def test_a_sensor_of_another_width_is_caught_at_preprocess(exact_session_a, tmp_path, capfd):
    npz = next(exact_session_a.glob("sensor_data_*.npz"))
    z = dict(np.load(npz))
    np.savez(npz, **dict(z, alines=z["alines"][:, :1000]))
    with pytest.raises(SourceError) as e:
        preprocess([str(exact_session_a)], tmp_path / "ds", IngestOptions())
    _one_line(e.value, npz, "1001 sensor channels (1 force + 1000 A-scan)", "--sensor-input-channels is 1026",
              "pass --sensor-input-channels 1001 to preprocess and to training")
    _assert_nothing_written(tmp_path / "ds")
    assert main(["preprocess", str(exact_session_a), "--out", str(tmp_path / "ds"), "--sensor-input-channels", "1001"]) == 0
    assert json.loads(next((tmp_path / "ds" / "episodes").glob("*/meta.json")).read_text())["sensor"]["channels"] == 1001


def test_a_session_unpacked_one_level_deep_is_found(exact_session_a, tmp_path):
    # an archive of recv_all_X unpacked into a folder of the same name: recv_all_X/recv_all_X/...
    outer = tmp_path / "copy" / exact_session_a.name
    shutil.copytree(exact_session_a, outer / exact_session_a.name)
    summary = preprocess([str(tmp_path / "copy")], tmp_path / "ds", IngestOptions())
    assert summary["episodes"] == 1 and not summary["skipped_sessions"]

"""Both input layouts end to end: ingest -> dataset -> batch, with exact expected values."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from vla_ds.data.batch import collate
from vla_ds.data.dataset import IntegratedDataset
from vla_ds.data.format import EpisodeMeta, FrameTable, wrap_degrees
from vla_ds.data.ingest import IngestOptions, preprocess

F32 = IngestOptions(sensor_dtype="float32")


def _episode(ds_dir):
    (ep,) = sorted((ds_dir / "episodes").iterdir())
    return ep


def test_wrap_degrees_takes_the_short_way():
    assert wrap_degrees(np.array([179.9 - (-179.9)]))[0] == pytest.approx(-0.2)
    assert wrap_degrees(np.array([-179.9 - 179.9]))[0] == pytest.approx(0.2)
    assert wrap_degrees(np.array([-180.0, 180.0, 540.0, 0.0])).tolist() == [180.0, 180.0, 180.0, 0.0]


def test_layout_a_end_to_end_exact(exact_session_a, tmp_path):
    out = tmp_path / "ds"
    summary = preprocess([str(exact_session_a.parent)], out, F32)
    assert summary["episodes"] == 1 and summary["samples"] == 4 and summary["sensor_share"] == 1.0
    # right camera: frame 2 is 70 ms off (beyond 50 ms), frame 4 has none
    assert summary["frames_missing_a_view"] == {"View1_right": 2}
    meta = EpisodeMeta.load(_episode(out))
    assert meta.views == ["View1", "View1_right", "View5"]
    assert meta.instruction == "Perform the task: needle insertion." and meta.instruction_source == "folder-name"
    assert meta.sensor == {"rows": meta.sensor["rows"], "channels": 1026, "dtype": "float32"}

    ds = IntegratedDataset(out, views=["View1", "View5"])
    assert len(ds) == 4  # 5 frames -> 4 samples (the last frame has no next frame)
    item = ds[0]
    # x +1/s, z -0.5/s, yaw +0.2 deg/s, pitch -0.1 deg/s: constant steps, also across the seam
    expected = np.zeros((8, 7), np.float32)
    expected[:4, :6] = [1.0, 0.0, -0.5, 0.2, -0.1, 0.0]
    expected[:4, 6] = [0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(item["actions"].numpy(), expected, atol=1e-4)
    assert item["action_mask"].tolist() == [True] * 4 + [False] * 4
    assert ds[3]["action_mask"].sum() == 1
    # frame 1's window: sensor rows with time in (t0, t0+1] = rows 650..1299 of the source
    w = ds[1]
    assert w["has_sensor"] and int(w["sensor_mask"].sum()) == 650
    force = w["sensor"][:, 0].numpy()
    np.testing.assert_array_equal(force, np.arange(650, 1300, dtype=np.float32))
    np.testing.assert_array_equal(w["sensor"][:, 1:].numpy(), np.repeat((np.arange(650, 1300) % 1000)[:, None], 1025, 1))
    assert [tuple(im.shape) for im in item["images"]] == [(48, 64, 3), (48, 64, 3)]  # (H, W, RGB) uint8
    assert item["images"][0].dtype == torch.uint8
    assert item["sample_id"] == f"{meta.episode_id}:000000"

    # choosing the right camera leaves out the frames that lack it
    ds_r = IntegratedDataset(out, views=["View1", "View1_right"])
    assert len(ds_r) == 3 and ds_r.excluded_frames == 1


def test_layout_b_end_to_end_exact(exact_session_b, tmp_path):
    out = tmp_path / "ds"
    summary = preprocess([str(exact_session_b)], out, IngestOptions())
    assert summary["samples"] == 4 and summary["sensor_share"] == 0.0
    ep = _episode(out)
    table = FrameTable.load(ep)
    # images written on another machine were found relative to the JSON and re-encoded here
    assert all(p.startswith("images/") for p in table.images["View1"])
    ds = IntegratedDataset(out)
    assert ds.view_names == ["View1", "View5"]
    item = ds[0]
    expected = np.zeros((8, 7), np.float32)
    expected[:4, :6] = [0.5, 0.0, -0.25, 0.1, -0.05, 0.0]  # 0.5 s frame spacing
    expected[:4, 6] = [0.25, 0.5, 0.75, 1.0]
    np.testing.assert_allclose(item["actions"].numpy(), expected, atol=1e-4)
    assert not item["has_sensor"] and "sensor" not in item and "sensor_mask" not in item  # nothing to ship


def test_layout_b_with_sensor_interval_and_half_second_frames(tmp_path):
    from tests.helpers.sessions import T0, index_sensor, ramp_robot
    from vla_ds.data.synthetic import write_session_b

    times = {"View1": T0 + np.arange(4) * 0.5}
    src = write_session_b(tmp_path / "src" / "s", "s", times, ramp_robot(), index_sensor(T0 - 1.0, T0 + 3.0), (48, 64))
    preprocess([str(src)], tmp_path / "ds", F32)
    ds = IntegratedDataset(tmp_path / "ds")
    w = ds[1]  # interval (t0, t0+0.5] -> 325 rows, then padding
    assert w["has_sensor"] and int(w["sensor_mask"].sum()) == 325
    np.testing.assert_array_equal(w["sensor"][:325, 0].numpy(), np.arange(650, 975, dtype=np.float32))
    assert w["sensor"][325:].abs().sum() == 0
    assert ds.sample_has_sensor.tolist() == [True, True, True]


def test_long_window_keeps_the_most_recent_rows(tmp_path):
    from tests.helpers.sessions import T0, index_sensor, ramp_robot
    from vla_ds.data.synthetic import write_session_a

    times = {"View1": T0 + np.array([0.0, 1.2, 2.4])}
    src = write_session_a(tmp_path / "src" / "t", times, ramp_robot(), index_sensor(T0 - 1.2, T0 + 3.0), (48, 64))
    preprocess([str(src)], tmp_path / "ds", F32)
    w = IntegratedDataset(tmp_path / "ds")[1]  # (t0, t0+1.2] = rows 780..1559: keep the last 650
    assert int(w["sensor_mask"].sum()) == 650
    np.testing.assert_array_equal(w["sensor"][:, 0].numpy(), np.arange(1560 - 650, 1560, dtype=np.float32))


def test_sensor_float16_by_default_and_float32_when_out_of_range(exact_session_a, tmp_path):
    preprocess([str(exact_session_a)], tmp_path / "ds16", IngestOptions())
    assert EpisodeMeta.load(_episode(tmp_path / "ds16")).sensor["dtype"] == "float16"
    assert np.load(_episode(tmp_path / "ds16") / "sensor.npy", mmap_mode="r").dtype == np.float16
    # values above float16's range must not overflow to inf
    npz = next(exact_session_a.glob("sensor_data_*.npz"))
    z = dict(np.load(npz))
    z["alines"] = z["alines"] * 100.0
    np.savez(npz, **z)
    preprocess([str(exact_session_a)], tmp_path / "dsbig", IngestOptions())
    mm = np.load(_episode(tmp_path / "dsbig") / "sensor.npy", mmap_mode="r")
    assert mm.dtype == np.float32 and np.isfinite(mm).all() and mm[:, 1:].max() == 99900.0


def test_mixed_dataset_batches_and_workers(exact_session_a, exact_session_b, tmp_path):
    preprocess([str(exact_session_a.parent.parent)], tmp_path / "ds", IngestOptions(sensor_dtype="float32"))
    ds = IntegratedDataset(str(tmp_path / "d*"))  # globs work too
    assert len(ds.episodes) == 2 and ds.view_names == ["View1", "View5"]
    assert sorted(ds.episode_has_sensor) == [False, True]
    batch = collate([ds[i] for i in range(len(ds))])
    # the sensor is sparse: the windows of the 4 sensed samples, and where they sit in the batch
    assert batch["actions"].shape == (8, 8, 7) and batch["sensor"].shape == (4, 650, 1026)
    assert batch["sensor_rows"].tolist() == batch["has_sensor"].nonzero().flatten().tolist()
    assert batch["sensor"].dtype == torch.float32 and batch["sensor_mask"].shape == (4, 650)
    assert collate([ds[i] for i in range(len(ds)) if not ds.sample_has_sensor[i]]).keys().isdisjoint(
        {"sensor", "sensor_mask", "sensor_rows"}), "a batch without a sensed sample carries no sensor"
    assert batch["has_sensor"].sum() == 4 and len(batch["images"]) == 8 and len(batch["images"][0]) == 2
    assert len(set(batch["sample_ids"])) == 8
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate)
    seen = [sid for b in loader for sid in b["sample_ids"]]
    assert seen == ds.sample_ids()
    no_img = IntegratedDataset(tmp_path / "ds", load_images=False)
    assert "images" not in no_img[0]


def test_preprocess_is_idempotent_and_notices_changes(exact_session_a, tmp_path):
    out = tmp_path / "ds"
    first = preprocess([str(exact_session_a)], out, IngestOptions())
    ep = _episode(out)
    mtime = (ep / "meta.json").stat().st_mtime_ns
    again = preprocess([str(exact_session_a)], out, IngestOptions())
    assert first["written"] == 1 and again["unchanged"] == 1 and again["written"] == 0
    assert (ep / "meta.json").stat().st_mtime_ns == mtime
    img = next((exact_session_a / "View5").glob("*.jpg"))
    img.write_bytes(img.read_bytes())  # same bytes, new mtime: re-ingested
    os.utime(img, ns=(mtime + 10**9, mtime + 10**9))
    assert preprocess([str(exact_session_a)], out, IngestOptions())["written"] == 1
    # options are part of the key too
    assert preprocess([str(exact_session_a)], out, IngestOptions(max_side=32))["written"] == 1
    assert [p.name for p in (out / "episodes").iterdir()] == [ep.name]


def test_instruction_sources(exact_session_a, exact_session_b, tmp_path):
    srcs = [str(exact_session_a), str(exact_session_b)]
    by_name = preprocess(srcs, tmp_path / "a", IngestOptions())["episode_records"]
    assert sorted(r["instruction"] for r in by_name) == [
        "Perform the task: needle insertion.",
        "Perform the task: retina approach.",
    ]
    mapping = tmp_path / "instructions.json"
    mapping.write_text(json.dumps({"retina_*": "Approach the retina and stop 100 um above it."}))
    (exact_session_a.parent / "instruction.txt").write_text("Insert the needle into the vein.\n")
    recs = preprocess(srcs, tmp_path / "b", IngestOptions(instructions_file=str(mapping)))["episode_records"]
    assert sorted(r["instruction"] for r in recs) == [
        "Approach the retina and stop 100 um above it.",
        "Insert the needle into the vein.",
    ]
    recs = preprocess(srcs, tmp_path / "c", IngestOptions(instruction="Do it."))["episode_records"]
    assert {r["instruction"] for r in recs} == {"Do it."}

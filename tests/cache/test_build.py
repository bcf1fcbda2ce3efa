"""Building the cache: N processes = 1 process, kill and resume, the lock, bad samples."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess

import numpy as np
import pytest

from tests.helpers.cache import SHARD_SIZE, TOKENS, cli_args, run_cache_cli
from vla_ds.cache import CacheReader, build_cache
from vla_ds.data.dataset import IntegratedDataset
from vla_ds.errors import UsageError


def shard_bytes(cache_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache_dir / "shards").glob("*.npy"))}


def assert_same_content(a, b):
    ra, rb = CacheReader(a), CacheReader(b)
    assert ra.index == rb.index and ra.episode_keys == rb.episode_keys
    assert json.loads((a / "plan.json").read_text()) == json.loads((b / "plan.json").read_text())
    assert shard_bytes(a) == shard_bytes(b)  # bit-identical features


def test_build_covers_every_sample_and_a_rerun_encodes_nothing(ref_cache, cache_data, cfg_for):
    ds = IntegratedDataset(cache_data, load_images=False)
    reader = CacheReader(ref_cache)
    assert sorted(reader.index) == sorted(ds.sample_ids()) and len(reader) == 16
    assert reader.missing(ds.sample_ids()) == [] and reader.dim == 64 and reader.vl_tokens == TOKENS
    plan = json.loads((ref_cache / "plan.json").read_text())["shards"]
    assert [len(s["samples"]) for s in plan] == [SHARD_SIZE] * 4
    pooled = np.load(ref_cache / "shards" / "000000.pooled.npy")
    assert pooled.dtype == np.float16 and pooled.shape == (SHARD_SIZE, 64)
    assert reader.bytes_per_sample() == (64 + TOKENS * 64) * 2 + TOKENS
    assert not (ref_cache / ".lock").exists()
    again = build_cache(cfg_for(ref_cache))  # --cache-dtype omitted: the existing cache's is kept
    assert again["encoded"] == 0 and again["shards_written"] == 0 and again["samples"] == 16


@pytest.mark.slow
def test_two_process_build_equals_one_process_build(ref_cache, tiny_model_dir, cache_data, tmp_path):
    out = tmp_path / "cache2"
    proc = run_cache_cli(cli_args(tiny_model_dir, cache_data, out), nproc=2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    writers = [json.loads(p.read_text())["written_by"] for p in sorted((out / "shards").glob("*.json"))]
    assert sorted(w["rank"] for w in writers) == [0, 0, 1, 1] and {w["world"] for w in writers} == {2}
    assert_same_content(out, ref_cache)


@pytest.mark.slow
def test_kill_mid_shard_then_resume_gives_identical_content(ref_cache, tiny_model_dir, cache_data, tmp_path,
                                                            cfg_for, one_thread):
    out = tmp_path / "cache"
    proc = run_cache_cli(cli_args(tiny_model_dir, cache_data, out), env={"VLA_DS_FAULT": "cache_mid_shard:1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    shards = out / "shards"
    # shard 0 committed; shard 1's arrays written but not committed: it is in no manifest
    assert (shards / "000000.json").exists() and (shards / "000001.pooled.npy").exists()
    assert not (shards / "000001.json").exists() and not (out / "manifest.json").exists()
    assert (out / ".lock").exists()  # the killed process could not clean up; its pid is dead
    with pytest.raises(FileNotFoundError, match="no finished build"):
        CacheReader(out)
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("000000.*")}
    summary = build_cache(cfg_for(out), shard_size=SHARD_SIZE)
    assert summary["encoded"] == 12 and summary["shards_written"] == 3  # shard 0 was not re-encoded
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("000000.*")} == before
    assert not (out / ".lock").exists()
    assert_same_content(out, ref_cache)


def test_a_live_lock_refuses_a_second_build(cfg_for, tmp_path):
    import socket

    out = tmp_path / "cache"
    out.mkdir()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        with pytest.raises(UsageError) as e:
            build_cache(cfg_for(out), shard_size=SHARD_SIZE)
        msg = str(e.value)
        assert "\n" not in msg and f"pid {holder.pid}" in msg and str(out / ".lock") in msg
        assert not (out / "shards").exists()  # nothing was interleaved
    finally:
        holder.kill()
        holder.wait()
    assert build_cache(cfg_for(out), shard_size=SHARD_SIZE)["samples"] == 16  # dead holder: taken over


def test_unreadable_image_stops_or_is_skipped(cache_data, cfg_for, tmp_path):
    from vla_ds.cache import open_cache_for_training

    data = tmp_path / "data"
    shutil.copytree(cache_data, data)
    ds = IntegratedDataset(data, load_images=False)
    ep = ds.episodes[0]
    image = ep.dir / ep.frames.images["View5"][1]
    image.write_bytes(b"not a jpeg at all")
    bad_id = f"{ep.meta.episode_id}:000001"
    cfg = cfg_for(tmp_path / "cache", data=[str(data)], cache_policy="require")
    with pytest.raises(UsageError) as e:
        build_cache(cfg, shard_size=SHARD_SIZE)
    msg = str(e.value)
    assert "\n" not in msg and bad_id in msg and str(image) in msg and "--skip-bad" in msg
    summary = build_cache(cfg, shard_size=SHARD_SIZE, skip_bad=True)
    assert summary["skipped_bad"] == 1 and summary["samples"] == 15
    reader = CacheReader(tmp_path / "cache")
    assert reader.missing(ds.sample_ids()) == [bad_id] and bad_id in reader.bad
    with pytest.raises(KeyError, match="skipped as bad"):
        reader.features(bad_id)
    with pytest.raises(UsageError, match="1 of 16 samples .*1 skipped as bad"):
        open_cache_for_training(cfg, ds.sample_ids())
    # reruns retry the bad sample alone (a one-sample shard that stays pending while the image is bad)
    for _ in range(2):
        again = build_cache(cfg, shard_size=SHARD_SIZE, skip_bad=True)
        assert again["encoded"] == 0 and again["skipped_bad"] == 1 and again["samples"] == 15
    plan = json.loads((tmp_path / "cache" / "plan.json").read_text())["shards"]
    assert len(plan) == 5 and plan[-1]["samples"] == [bad_id]
    image.write_bytes((cache_data / image.relative_to(data)).read_bytes())  # fixed: the next build picks it up
    assert build_cache(cfg, shard_size=SHARD_SIZE)["encoded"] == 1
    assert open_cache_for_training(cfg, ds.sample_ids()) is not None

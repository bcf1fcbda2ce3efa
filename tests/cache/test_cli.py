"""`vla-ds cache` / `python -m vla_ds.cache` and the training entry's `--mode cache`."""
from __future__ import annotations

import argparse
import logging

import numpy as np
import pytest

from tests.helpers.cache import cli_args
from vla_ds.cache import CacheReader
from vla_ds.cli import cache as cache_cmd
from vla_ds.model.config import FROZEN_VL_TOKENS


def test_parser_has_training_and_cache_flags():
    p = argparse.ArgumentParser()
    cache_cmd.add_parser(p.add_subparsers(dest="command"), "cache")
    args = p.parse_args(["cache", "--data", "d", "--max-pixels", "50176", "--vl-tokens", "9", "--skip-bad",
                         "--cache-dtype", "float32", "--local_rank", "0"])
    assert args.max_pixels == 50176 and args.vl_tokens == 9 and args.skip_bad and args.cache_dtype == "float32"
    assert args.shard_size == 2048 and not args.verify and args.run is cache_cmd.run
    assert not hasattr(p.parse_args(["cache", "--data", "d"]), "vl_tokens")  # auto: resolved from the model config
    assert p.parse_args(["cache", "--data", "d", "--vl-tokens", "-1"]).vl_tokens == -1
    with pytest.raises(SystemExit):  # K is the model's --vl-tokens, no longer a cache setting of its own
        p.parse_args(["cache", "--data", "d", "--cache-tokens", "9"])


def test_build_verify_and_errors(tiny_model_dir, cache_data, tmp_path, caplog):
    out = tmp_path / "cache"
    with caplog.at_level(logging.INFO):
        assert cache_cmd.main(cli_args(tiny_model_dir, cache_data, out)) == 0
    assert "16/16 samples in 4 shards" in caplog.text and len(CacheReader(out)) == 16
    assert cache_cmd.main(cli_args(tiny_model_dir, cache_data, out, "--verify", "--verify-samples", "4")) == 0
    path = out / "shards" / "000000.pooled.npy"
    np.save(path, np.load(path) * 2)
    assert cache_cmd.main(cli_args(tiny_model_dir, cache_data, out, "--verify")) == 1
    assert "differs from the cache" in caplog.text
    caplog.clear()
    assert cache_cmd.main(["--backbone", str(tiny_model_dir), "--cache-dir", str(out)]) == 2
    assert "--data is required" in caplog.text
    assert cache_cmd.main(cli_args(tiny_model_dir, cache_data, out, "--max-pixels", "50176")) == 2
    assert "max_pixels (cache: 12544, now: 50176; --max-pixels)" in caplog.text


def test_training_entry_mode_cache(tiny_model_dir, cache_data, tmp_path):
    """The old trainer's launch line: `python -m vla_ds.train --mode cache ...` builds with the defaults."""
    from vla_ds.cli.train import launcher_main

    out = tmp_path / "runs" / "vla"
    rc = launcher_main(["--mode", "cache", "--data", str(cache_data), "--backbone", str(tiny_model_dir), "--finetune-vl", "none",
               "--output-dir", str(out), "--num-workers", "0", "--batch-size", "4"])
    assert rc == 0
    reader = CacheReader(tmp_path / "runs" / "vl_cache")  # the default: OUTPUT_DIR/../vl_cache
    assert len(reader) == 16 and reader.vl_tokens == FROZEN_VL_TOKENS and len(reader.shards) == 1


def test_demo_cache_stage(tiny_model_dir, cache_data, tmp_path):
    from vla_ds.demo import cache_stage

    result = cache_stage(tiny_model_dir, cache_data, tmp_path / "vl_cache", ["View1", "View5"])
    assert result["samples"] == 16 and result["vl_tokens"] == 5 and result["verify"]["ok"]


def test_a_truncated_shard_is_one_line_and_a_build_repairs_it(ref_cache, copy_cache, tiny_model_dir, cache_data,
                                                              cfg_for, caplog):
    """A shard file cut short (an interrupted copy, a full disk): reading it would fail in a loader
    worker with numpy's "mmap length is greater than file size". Opening the cache names the file
    and the repair instead; `vla-ds cache` encodes that shard again, and only that one."""
    from vla_ds.cache import open_cache_for_training
    from vla_ds.errors import UsageError

    out = copy_cache(ref_cache)
    early = CacheReader(out)  # opened before the damage: the lazy memory map refuses in one line too
    path = out / "shards" / "000001.tokens.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    sid = next(s for s, (shard, _) in early.index.items() if early.shards[shard] == "000001")
    for attempt in (lambda: CacheReader(out), lambda: early.features(sid),
                    lambda: open_cache_for_training(cfg_for(out), list(early.index))):  # --cache-policy auto
        with pytest.raises(UsageError) as e:
            attempt()
        msg = str(e.value)
        assert "\n" not in msg and f"--cache-dir {out}" in msg and f"shard file {path} is truncated" in msg, msg
        assert "`vla-ds cache`" in msg and "vla-ds cache --verify" in msg
    caplog.clear()
    assert cache_cmd.main(cli_args(tiny_model_dir, cache_data, out, "--verify")) == 2
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("vla-ds cache:")]
    assert f"shard file {path} is truncated" in line
    with caplog.at_level(logging.INFO):
        assert cache_cmd.main(cli_args(tiny_model_dir, cache_data, out)) == 0
    assert "16/16 samples in 4 shards (4 encoded now" in caplog.text
    repaired, ref = CacheReader(out).features(sid), CacheReader(ref_cache).features(sid)
    assert all(np.allclose(repaired[k].numpy(), ref[k].numpy(), atol=2e-2) for k in ref)

"""--cache-policy auto|require|off and the fingerprint: a stale cache is never used."""
from __future__ import annotations

import json
import logging
import shutil

import pytest

from tests.helpers.cache import TOKENS
from vla_ds.cache import CacheReader, build_cache, compute_fingerprint, open_cache_for_training
from vla_ds.data.dataset import IntegratedDataset
from vla_ds.errors import UsageError
from vla_ds.model.config import FROZEN_VL_TOKENS, ModelConfig

VIEWS = ["View1", "View5"]


@pytest.fixture(scope="module")
def other_backbone(tmp_path_factory):
    from vla_ds.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("seed1") / "tiny", seed=1)


@pytest.fixture
def ids(cache_data):
    return IntegratedDataset(cache_data, load_images=False).sample_ids()


def refusal(cfg, ids) -> str:
    with pytest.raises(UsageError) as e:
        open_cache_for_training(cfg, ids)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("--cache-policy require: ")
    return msg


def test_fingerprint_needs_no_weights_and_tells_backbones_apart(tiny_model_dir, other_backbone, tmp_path, cfg_for):
    base = compute_fingerprint(cfg_for(tmp_path).model, VIEWS)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_model_dir, moved)  # same files elsewhere (new mtimes): the same backbone
    assert compute_fingerprint(cfg_for(tmp_path, backbone=str(moved)).model, VIEWS) == base
    other = compute_fingerprint(cfg_for(tmp_path, backbone=str(other_backbone)).model, VIEWS)
    assert {k for k in base if base[k] != other[k]} == {"backbone_weights"}  # same architecture, other weights
    px = compute_fingerprint(cfg_for(tmp_path, max_pixels=224 * 224).model, VIEWS)
    assert {k for k in base if base[k] != px[k]} == {"max_pixels"} and px["max_pixels"] == 224 * 224
    assert base["max_pixels"] == 112 * 112 and base["compute_dtype"] == "float32"


def test_policies_on_a_valid_cache(ref_cache, cfg_for, ids, caplog):
    assert open_cache_for_training(cfg_for(ref_cache, cache_policy="off"), ids) is None
    for policy in ("auto", "require"):
        reader = open_cache_for_training(cfg_for(ref_cache, cache_policy=policy), ids)
        assert isinstance(reader, CacheReader) and reader.has_tokens
    with caplog.at_level(logging.INFO):
        assert open_cache_for_training(cfg_for(ref_cache, finetune_vl="lora"), ids) is None
    assert "VL cache not used (--finetune-vl lora trains the backbone" in caplog.text
    msg = refusal(cfg_for(ref_cache, finetune_vl="full", cache_policy="require"), ids)
    assert "--finetune-vl full" in msg and "stale" in msg
    msg = refusal(cfg_for(ref_cache.parent / "nothing", cache_policy="require"), ids)
    assert "no VL cache" in msg and "vla-ds cache" in msg
    msg = refusal(cfg_for(ref_cache, cache_policy="require"), ids + ["ghost-00000000:000003"])
    assert "1 of 17 samples" in msg and "ghost-00000000:000003" in msg


@pytest.mark.parametrize("change, field", [
    ({"max_pixels": 224 * 224}, "max_pixels"),
    ({"min_pixels": 64 * 64}, "min_pixels"),
    ({"vl_feature_layer": 1}, "feature_layer"),
    ({"views": ["View5", "View1"]}, "views"),
    ("other_backbone", "backbone_weights"),
])
def test_a_changed_setting_makes_the_cache_stale(ref_cache, cfg_for, ids, other_backbone, change, field, caplog):
    if change == "other_backbone":
        change = {"backbone": str(other_backbone)}
    msg = refusal(cfg_for(ref_cache, cache_policy="require", **change), ids)
    assert f"{field} (cache: " in msg and "was built differently" in msg
    with caplog.at_level(logging.INFO):
        assert open_cache_for_training(cfg_for(ref_cache, cache_policy="auto", **change), ids) is None
    assert field in caplog.text and "live backbone" in caplog.text
    with pytest.raises(UsageError, match=f"holds features made differently: {field}"):
        build_cache(cfg_for(ref_cache, **change))  # never mixed into the same directory


def test_the_cache_must_hold_the_models_vl_tokens(cfg_for, ref_cache, tmp_path, ids, caplog):
    """K is the model's --vl-tokens: a cache of another K is never used, and never extended."""
    msg = refusal(cfg_for(ref_cache, vl_tokens=0, cache_policy="require"), ids)
    assert f"(cache: --vl-tokens {TOKENS}, now: --vl-tokens 0)" in msg and "holds 5 pooled tokens" in msg
    assert "the pooled vector" in msg and "vla-ds cache --vl-tokens 0" in msg
    with caplog.at_level(logging.INFO):  # auto: the frozen default (17) is not this cache's 5
        assert open_cache_for_training(cfg_for(ref_cache, vl_tokens=None), ids) is None
    assert f"(cache: --vl-tokens {TOKENS}, now: --vl-tokens {FROZEN_VL_TOKENS})" in caplog.text
    with pytest.raises(UsageError, match=f"--vl-tokens 0: .* was built with --vl-tokens {TOKENS}; pass --vl-tokens"):
        build_cache(cfg_for(ref_cache, vl_tokens=0))
    # every VL token: no cache can stand in (auto falls back to the live backbone), none can be built
    every = "the model attends over every VL token (--vl-tokens -1): a cache cannot stand in"
    assert every in refusal(cfg_for(ref_cache, vl_tokens=-1, cache_policy="require"), ids)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert open_cache_for_training(cfg_for(ref_cache, vl_tokens=-1), ids) is None
    assert every in caplog.text
    with pytest.raises(UsageError, match="--vl-tokens -1 keeps every VL token, which a cache cannot store; use "
                                         r"--vl-tokens 0 \(pooled\) or K >= 1 \+ views$"):
        build_cache(cfg_for(tmp_path / "c", vl_tokens=-1))
    with pytest.raises(UsageError, match=r"--vl-tokens 2 must be at least 1 \+ the number of views \(3 for 2 views"):
        build_cache(cfg_for(tmp_path / "c", vl_tokens=2))
    # a pooled-only cache for --vl-tokens 0
    cfg = cfg_for(tmp_path / "p", vl_tokens=0, cache_policy="require")
    assert build_cache(cfg, shard_size=8)["vl_tokens"] == 0
    reader = open_cache_for_training(cfg, ids)
    assert reader is not None and not reader.has_tokens
    assert "holds the pooled vector per sample" in refusal(cfg_for(tmp_path / "p", cache_policy="require"), ids)


def test_auto_builds_the_frozen_default_whatever_the_finetune_mode(cfg_for, tmp_path, ids):
    """The old workflow: `--mode cache` with the run's flags (even --finetune-vl lora), then training
    with --finetune-vl none: both resolve --vl-tokens auto to FROZEN_VL_TOKENS."""
    assert ModelConfig(finetune_vl="none").resolved_vl_tokens == FROZEN_VL_TOKENS == 17
    cfg = cfg_for(tmp_path / "x", vl_tokens=None, finetune_vl="lora")
    assert build_cache(cfg, shard_size=8)["vl_tokens"] == FROZEN_VL_TOKENS
    reader = open_cache_for_training(cfg_for(tmp_path / "x", vl_tokens=None, cache_policy="require"), ids)
    assert reader.vl_tokens == FROZEN_VL_TOKENS
    tokens = reader.features(ids[0])
    assert tokens["vl_tokens"].shape == (FROZEN_VL_TOKENS, 64)
    # the tiny views have 2 x 2 merged tokens: 4 of each view's 8 cells are filled, the rest masked out
    assert tokens["vl_tokens_mask"].tolist() == ([True] * 4 + [False] * 4) * 2 + [True]


def test_changed_instruction_re_encodes_that_episode_only(ref_cache, copy_cache, cache_data, cfg_for, tmp_path,
                                                          one_thread):
    data = tmp_path / "data"
    shutil.copytree(cache_data, data)
    cache = copy_cache(ref_cache)
    ds = IntegratedDataset(data, load_images=False)
    ep = ds.episodes[-1]
    meta = json.loads((ep.dir / "meta.json").read_text())
    meta["instruction"] = "Retract the needle carefully."
    (ep.dir / "meta.json").write_text(json.dumps(meta))
    cfg = cfg_for(cache, data=[str(data)], cache_policy="require")
    msg = refusal(cfg, ds.sample_ids())
    n = sum(s.startswith(ep.meta.episode_id) for s in ds.sample_ids())
    assert f"{n} of 16 samples" in msg and "stale" in msg
    summary = build_cache(cfg)
    assert summary["encoded"] == n and summary["samples"] == 16
    reader = open_cache_for_training(cfg, ds.sample_ids())
    assert reader is not None and reader.missing(ds.sample_ids()) == []

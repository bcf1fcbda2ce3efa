"""Training from the VL cache: the backbone's weights are never loaded, it learns, and its first
step's loss equals the live backbone's (fp32 cache, same initial weights)."""
from __future__ import annotations

import pytest

from tests.helpers.runs import SMALL, losses

pytestmark = pytest.mark.slow


def _args(data, backbone, cache_dir) -> list[str]:
    return ["--data", str(data), "--backbone", str(backbone), "--views", "View1", "View5", "--finetune-vl", "none",
            "--vl-tokens", "5", "--cache-dir", str(cache_dir), "--sensor-enabled", "--fusion-strategy",
            "cross_attention", "--max-steps", "30", "--batch-size", "2", "--grad-accum-steps", "1", "--log-every", "1",
            "--val-ratio", "0", "--head-dropout", "0", "--lr", "3e-3", "--sensor-lr", "3e-3", *SMALL]


def shared_runs(ctx) -> dict:
    """An fp32 VL cache of learn_data_x4 (K = 5), then for the session's shared launch: the first 3
    steps of the run on the live backbone (ZeRO-2) and the whole run from the cache under ZeRO-2
    and ZeRO-3."""
    from vla_ds.cache import build_cache
    from vla_ds.config import TrainConfig

    if not ctx.selected("test_cache_mode_matches_live_mode_and_learns"):
        return {}
    data, backbone, root = ctx.fixture("learn_data_x4"), ctx.fixture("tiny_model_dir"), ctx.root("cache_mode")
    cache_dir = root / "vl_cache"
    common = {"backbone": str(backbone), "finetune_vl": "none", "data": [str(data)], "views": ["View1", "View5"],
              "vl_tokens": 5, "cache_dir": str(cache_dir), "num_workers": 0}
    build_cache(TrainConfig.from_flat(common), shard_size=4, cache_dtype="float32")
    args = _args(data, backbone, cache_dir)
    runs = {"live": [*args, "--output-dir", str(root / "live"), "--cache-policy", "off", "--max-steps", "3",
                     "--ds-config", "zero2"]}
    for preset in ("zero2", "zero3"):
        runs[preset] = [*args, "--output-dir", str(root / preset), "--cache-policy", "require", "--ds-config", preset]
    return runs


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_cache_mode_matches_live_mode_and_learns(preset, shared):
    cached, live = shared.run(__name__, preset), shared.run(__name__, "live")
    assert "the backbone's weights are not needed" in cached.log
    assert "the backbone's weights are not needed" not in live.log
    lc, ll = losses(cached.rows), losses(live.rows)
    assert lc[0] == pytest.approx(ll[0], rel=1e-5), "same weights, same batch: same first-step loss"
    assert lc[1] == pytest.approx(ll[1], rel=1e-4)
    assert sum(lc[-5:]) / 5 < 0.5 * sum(lc[:5]) / 5

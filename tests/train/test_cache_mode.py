"""Training from the VL cache: the backbone's weights are never loaded, it learns, and its first
step's loss equals the live backbone's (fp32 cache, same initial weights)."""
from __future__ import annotations

import pytest

from tests.train.conftest import SMALL, losses, run_training

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_cache_mode_matches_live_mode_and_learns(preset, tmp_path, learn_data, tiny_model_dir):
    from vla_ds.cache import build_cache
    from vla_ds.config import TrainConfig

    cache_dir = tmp_path / "vl_cache"
    common = {"backbone": str(tiny_model_dir), "finetune_vl": "none", "data": [str(learn_data)],
              "views": ["View1", "View5"], "vl_tokens": 5, "cache_dir": str(cache_dir), "num_workers": 0}
    build_cache(TrainConfig.from_flat(common), shard_size=4, cache_dtype="float32")
    args = ["--data", str(learn_data), "--backbone", str(tiny_model_dir), "--views", "View1", "View5",
            "--finetune-vl", "none", "--vl-tokens", "5", "--cache-dir", str(cache_dir), "--sensor-enabled",
            "--fusion-strategy", "cross_attention", "--max-steps", "30", "--batch-size", "2", "--grad-accum-steps", "1",
            "--log-every", "1", "--val-ratio", "0", "--head-dropout", "0", "--lr", "3e-3", "--sensor-lr", "3e-3",
            *SMALL]
    proc, cached = run_training([*args, "--output-dir", str(tmp_path / "cached"), "--cache-policy", "require",
                                 "--ds-config", preset])
    assert "the backbone's weights are not needed" in proc.stderr
    _, live = run_training([*args, "--output-dir", str(tmp_path / "live"), "--cache-policy", "off", "--max-steps", "3",
                            "--ds-config", "zero2"])
    lc, ll = losses(cached), losses(live)
    assert lc[0] == pytest.approx(ll[0], rel=1e-5), "same weights, same batch: same first-step loss"
    assert lc[1] == pytest.approx(ll[1], rel=1e-4)
    assert sum(lc[-5:]) / 5 < 0.5 * sum(lc[:5]) / 5

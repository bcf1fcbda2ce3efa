"""Training from the VL cache: the backbone's weights are never loaded, it learns, and its first
step's loss equals the live backbone's (fp32 cache, same initial weights)."""
from __future__ import annotations

import pytest

from tests.helpers.runs import SMALL, losses, run_trainings

pytestmark = pytest.mark.slow


def _args(data, backbone, cache_dir) -> list[str]:
    return ["--data", str(data), "--backbone", str(backbone), "--views", "View1", "View5", "--finetune-vl", "none",
            "--vl-tokens", "5", "--cache-dir", str(cache_dir), "--sensor-enabled", "--fusion-strategy",
            "cross_attention", "--max-steps", "30", "--batch-size", "2", "--grad-accum-steps", "1", "--log-every", "1",
            "--val-ratio", "0", "--head-dropout", "0", "--lr", "3e-3", "--sensor-lr", "3e-3", *SMALL]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, learn_data_x4, tiny_model_dir) -> dict:
    """An fp32 VL cache of learn_data_x4 (K = 5), then in one launch: the first 3 steps of the run on the
    live backbone (ZeRO-2) and the whole run from the cache under ZeRO-2 and ZeRO-3."""
    from vla_ds.cache import build_cache
    from vla_ds.config import TrainConfig

    root = tmp_path_factory.mktemp("cache_mode")
    cache_dir = root / "vl_cache"
    common = {"backbone": str(tiny_model_dir), "finetune_vl": "none", "data": [str(learn_data_x4)],
              "views": ["View1", "View5"], "vl_tokens": 5, "cache_dir": str(cache_dir), "num_workers": 0}
    build_cache(TrainConfig.from_flat(common), shard_size=4, cache_dtype="float32")
    args = _args(learn_data_x4, tiny_model_dir, cache_dir)
    argv = {"live": [*args, "--output-dir", str(root / "live"), "--cache-policy", "off", "--max-steps", "3",
                     "--ds-config", "zero2"]}
    for preset in ("zero2", "zero3"):
        argv[preset] = [*args, "--output-dir", str(root / preset), "--cache-policy", "require", "--ds-config", preset]
    _, rows = run_trainings(list(argv.values()), root / "runs.json")
    return {name: (root / name, r) for name, r in zip(argv, rows)}


@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_cache_mode_matches_live_mode_and_learns(preset, runs):
    run_dir, cached = runs[preset]
    assert "the backbone's weights are not needed" in (run_dir / "run.log").read_text()
    assert "the backbone's weights are not needed" not in (runs["live"][0] / "run.log").read_text()
    lc, ll = losses(cached), losses(runs["live"][1])
    assert lc[0] == pytest.approx(ll[0], rel=1e-5), "same weights, same batch: same first-step loss"
    assert lc[1] == pytest.approx(ll[1], rel=1e-4)
    assert sum(lc[-5:]) / 5 < 0.5 * sum(lc[:5]) / 5

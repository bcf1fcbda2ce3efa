"""DeepSpeed does what the batch arithmetic says: 1 process x micro 4 == 2 processes x micro 2, and
micro 1 x accum 4 == micro 4 x accum 1 (fp32, CPU, dropout off), for both action heads (the flow
head's noise and times are drawn per sample, so every layout draws the same ones).

Adam divides by sqrt(v) + eps, so a gradient that is zero in exact arithmetic (the key bias of an
attention layer: softmax ignores a constant shift) but 1e-12 of rounding noise in practice becomes
a full +-lr step whose sign is noise. The runs here use eps = 1e-3 (a copy of zero2.json) so that
only real gradients move weights and the comparison is tight.
"""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.helpers.runs import SMALL, losses, run_trainings

pytestmark = pytest.mark.slow

DETERMINISTIC = ["--head-dropout", "0", "--lora-dropout", "0", "--val-ratio", "0", "--max-steps", "4",
                 "--lr", "1e-3", "--sensor-lr", "1e-3", "--vl-lr", "1e-3", "--sensor-enabled", "--finetune-vl", "lora",
                 "--grad-clip", "0"]


FLOW = ["--action-head", "flow", "--state-enabled"]
HEADS = {"regression": "", "flow": "flow_"}  # head -> prefix of its run names


def _weights(out):
    return load_file(str(out / "checkpoints" / "final" / "policy" / "model.safetensors"))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("equivalence")


def _eps_config(repo_root, root):
    cfg = json.loads((repo_root / "ds_configs" / "zero2.json").read_text())
    cfg["optimizer"]["params"]["eps"] = 1e-3
    path = root / "zero2_eps.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def ds_config(root, repo_root):
    return str(_eps_config(repo_root, root))


def _args(out, train_data, tiny_model_dir, micro, accum, ds_config, *extra):
    return ["--data", str(train_data), "--backbone", str(tiny_model_dir), "--output-dir", str(out), "--batch-size",
            str(micro), "--grad-accum-steps", str(accum), "--log-every", "1", "--ds-config", ds_config,
            *DETERMINISTIC, *SMALL, *extra]


@pytest.fixture(scope="module")
def single(root, train_data, tiny_model_dir, ds_config) -> dict:
    """The one-process runs, in one launch: micro-batch 4 (the reference both comparisons share),
    micro 1 x accumulation 4, and micro 4 with a 100x smaller lr; each with the flow head too
    (flow_...). name -> (weights, losses)."""
    runs = {"micro4": (4, 1), "accum": (1, 4), "slow": (4, 1, "--lr", "1e-5"),
            "flow_micro4": (4, 1, *FLOW), "flow_accum": (1, 4, *FLOW), "flow_slow": (4, 1, "--lr", "1e-5", *FLOW)}
    argv = [_args(root / name, train_data, tiny_model_dir, r[0], r[1], ds_config, *r[2:]) for name, r in runs.items()]
    _, rows = run_trainings(argv, root / "single.json", nproc=1)
    return {name: (_weights(root / name), losses(r)) for name, r in zip(runs, rows)}


def _assert_same(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < atol, f"max weight difference {worst:.2e}"


def shared_runs(ctx) -> dict:
    """2 processes x micro-batch 2, for the session's shared launch."""
    if not ctx.selected("test_data_parallel_equals_bigger_micro_batch"):
        return {}
    root = ctx.root("equivalence_two")
    ds_config = str(_eps_config(ctx.fixture("repo_root"), root))
    return {f"{prefix}two": _args(root / f"{prefix}two", ctx.fixture("train_data"), ctx.fixture("tiny_model_dir"), 2, 1,
                                  ds_config, *(FLOW if prefix else []))
            for prefix in HEADS.values()}


@pytest.mark.parametrize("head", list(HEADS))
def test_data_parallel_equals_bigger_micro_batch(shared, single, head):
    one, l1 = single[HEADS[head] + "micro4"]
    run = shared.run(__name__, HEADS[head] + "two")
    two, l2 = _weights(run.dir), losses(run.rows)
    assert l1 == pytest.approx(l2, rel=1e-5) and len(l1) == 4
    _assert_same(one, two, atol=1e-5)


@pytest.mark.parametrize("head", list(HEADS))
def test_accumulation_equals_bigger_micro_batch(single, head):
    (accum, la), (micro, lm) = single[HEADS[head] + "accum"], single[HEADS[head] + "micro4"]
    assert la == pytest.approx(lm, rel=1e-5)
    _assert_same(accum, micro, atol=1e-5)


@pytest.mark.parametrize("head", list(HEADS))
def test_the_compared_runs_trained(single, head):
    # training moved the weights: with a smaller lr they end elsewhere (were they untouched, both
    # runs would equal the seeded initialisation and the comparisons above would prove nothing)
    slow, micro = single[HEADS[head] + "slow"][0], single[HEADS[head] + "micro4"][0]
    assert max((slow[k] - micro[k]).abs().max().item() for k in micro) > 1e-4

"""The flow-matching action head: its loss is the documented one, its draws are per sample and
seeded, sampling integrates the velocity field, inference never reads the recorded actions, and
`predict` is reproducible with K samples per observation."""
from __future__ import annotations

import pytest
import torch

from vla_ds.errors import UsageError
from vla_ds.model.action_head import masked_action_loss
from vla_ds.model.flow import (
    TIME_MIN,
    flow_loss_inputs,
    integrate,
    sample_noise,
    seeded_draws,
    time_from_uniform,
    training_draws,
)
from vla_ds.model.policy import QwenVLA


def _flow(small_config, **kw):
    torch.manual_seed(0)
    return QwenVLA(small_config(action_head="flow", **kw), device="cpu")


def test_the_loss_is_the_velocity_regression_of_the_straight_path(small_config, make_batch):
    policy = _flow(small_config, fusion_strategy="gated").eval()
    batch = make_batch(3)
    batch["action_mask"][2, 5:] = False
    batch.update(training_draws(batch["sample_ids"], 8, 7, seed=1, epoch=0))
    with torch.no_grad():
        out = policy(batch)
        target = policy.normalizer.normalize_actions(batch["actions"])
        t, noise = batch["flow_time"], batch["flow_noise"]
        x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * target
        memory, mask = policy.memory(batch)
        v = policy.expert(memory, mask, x_t, t)
    want, _ = masked_action_loss(v, noise - target, batch["action_mask"])
    torch.testing.assert_close(out.per_sample_loss, want)
    assert out.valid_steps.tolist() == [8, 8, 5]
    torch.testing.assert_close(out.actions, x_t - t[:, None, None] * v)  # the one-step estimate
    # the path's ends: t = 1 is the noise, t = 0 the target, and the velocity points from data to noise
    xs, u = flow_loss_inputs(target, noise, torch.tensor([1.0, 0.0, 0.5]))
    torch.testing.assert_close(xs[0], noise[0])
    torch.testing.assert_close(xs[1], target[1])
    torch.testing.assert_close(u, noise - target)


def test_times_follow_beta_1_5_biased_to_the_noisy_end():
    t = time_from_uniform(torch.rand(200_000, generator=torch.Generator().manual_seed(0)))
    assert t.min() >= TIME_MIN and t.max() <= 1.0
    # Beta(1.5, 1): mean 0.6, P(t > 1/2) = 1 - 0.5^1.5 = 0.646
    assert t.mean().item() == pytest.approx(0.6, abs=0.005)
    assert (t > 0.5).float().mean().item() == pytest.approx(1 - 0.5 ** 1.5, abs=0.005)


def test_draws_are_per_sample_whatever_the_batch_and_new_each_epoch():
    a, ua = seeded_draws(["x", "y"], (8, 7), "k")
    b, ub = seeded_draws(["z", "y", "x"], (8, 7), "k")
    assert torch.equal(a[0], b[2]) and torch.equal(a[1], b[1]) and ua[0] == ub[2]
    assert not torch.equal(a[0], a[1])
    e0, e1 = training_draws(["x"], 8, 7, seed=0, epoch=0), training_draws(["x"], 8, 7, seed=0, epoch=1)
    assert not torch.equal(e0["flow_noise"], e1["flow_noise"])
    assert not torch.equal(sample_noise(["x"], 8, 7, seed=0), sample_noise(["x"], 8, 7, seed=1))
    assert training_draws([], 8, 7, 0, 0)["flow_noise"].shape == (0, 8, 7)


def test_euler_integration_from_noise_to_the_chunk():
    # a constant field v = c carries x_1 = noise to x_0 = noise - c, in any number of steps
    c = torch.randn(2, 8, 7)
    calls = []

    def field(memory, mask, x, t):
        calls.append(t[0].item())
        return c

    noise = torch.randn(2, 8, 7)
    torch.testing.assert_close(integrate(field, None, None, noise, 4), noise - c)
    assert calls == [1.0, 0.75, 0.5, 0.25]
    # v = x (the straight path to 0 from x_1 scaled): Euler's x_{k+1} = x_k (1 - 1/N)
    torch.testing.assert_close(integrate(lambda m, k, x, t: x, None, None, noise, 10), noise * 0.9 ** 10)


class _Poisoned(torch.utils.data.Dataset):
    """A dataset's items with the recorded chunk replaced by NaN: any read of it shows in the predictions."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = dict(self.items[i])
        item["actions"] = torch.full_like(item["actions"], float("nan"))
        return item


def test_inference_never_reads_the_recorded_actions(small_config, make_batch):
    from vla_ds.eval.run import predict_dataset

    policy = _flow(small_config)
    b = make_batch(4)
    items = [{"images": b["images"][i], "instruction": b["instructions"][i], "actions": b["actions"][i],
              "action_mask": b["action_mask"][i], "has_sensor": bool(b["has_sensor"][i]),
              "state": b["state"][i], "state_mask": b["state_mask"][i],
              "sample_id": b["sample_ids"][i], "episode_id": "e", **({"sensor": b["sensor"][i],
                                                                       "sensor_mask": b["sensor_mask"][i]}
                                                                      if b["has_sensor"][i] else {})}
             for i in range(4)]
    clean = predict_dataset(policy, items, batch_size=4, num_workers=0)
    poisoned = predict_dataset(policy, _Poisoned(items), batch_size=3, num_workers=0)
    assert torch.isfinite(torch.as_tensor(poisoned.pred)).all()
    torch.testing.assert_close(torch.as_tensor(clean.pred), torch.as_tensor(poisoned.pred), atol=1e-5, rtol=1e-5)
    assert policy.training, "predict_dataset puts the policy back in training mode"
    # and forward without actions samples: another seed of the noise, other chunks
    policy.eval()
    nb = {k: v for k, v in b.items() if k not in ("actions", "action_mask")}
    with torch.no_grad():
        one, again = policy(nb).actions, policy(nb).actions
        other = policy({**nb, "flow_noise": sample_noise(b["sample_ids"], 8, 7, seed=5)}).actions
    assert torch.equal(one, again) and not torch.allclose(one, other)


def test_predict_is_seeded_and_draws_k_chunks_per_observation(small_config, make_batch):
    policy = _flow(small_config, sensor_enabled=False)
    b = make_batch(2)
    a = policy.predict(b["instructions"], b["images"], num_samples=5, seed=3)
    assert a.shape == (2, 5, 8, 7)
    assert torch.equal(a, policy.predict(b["instructions"], b["images"], num_samples=5, seed=3))
    assert not torch.allclose(a, policy.predict(b["instructions"], b["images"], num_samples=5, seed=4))
    assert (a[:, 0] - a[:, 1]).abs().max() > 1e-3, "K samples are K draws"
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(policy.predict(b["instructions"], b["images"], generator=g1),
                       policy.predict(b["instructions"], b["images"], generator=g2))
    assert policy.predict(b["instructions"], b["images"]).shape == (2, 8, 7)
    # more Euler steps: another integration of the same field, close to the default's
    fine = policy.predict(b["instructions"], b["images"], seed=3, flow_steps=40)
    assert not torch.equal(fine, policy.predict(b["instructions"], b["images"], seed=3))
    with pytest.raises(UsageError, match="num_samples=0"):
        policy.predict(b["instructions"], b["images"], num_samples=0)
    # a regression head's K chunks are K copies of its one
    torch.manual_seed(0)
    reg = QwenVLA(small_config(sensor_enabled=False), device="cpu")
    k = reg.predict(b["instructions"], b["images"], num_samples=3)
    assert k.shape == (2, 3, 8, 7) and torch.equal(k[:, 0], k[:, 2])
    torch.testing.assert_close(k[:, 0], reg.predict(b["instructions"], b["images"]))


@pytest.mark.parametrize("fusion, finetune", [("concat", "none"), ("cross_attention", "lora"), ("gated", "full"),
                                              ("none", "lora")])
def test_every_submodule_gets_a_gradient_every_step(small_config, make_batch, fusion, finetune):
    # with every fusion and fine-tune mode, and a batch without any sensor reading (ZeRO-3 needs them all)
    policy = _flow(small_config, fusion_strategy=fusion, finetune_vl=finetune, state_enabled=True,
                   sensor_enabled=fusion != "none", unfreeze_last_n=1)
    batch = make_batch(3, has_sensor=[False, False, False])
    policy(batch).per_sample_loss.mean().backward()
    none = [n for n, p in policy.named_parameters() if p.requires_grad and p.grad is None]
    assert not none, none

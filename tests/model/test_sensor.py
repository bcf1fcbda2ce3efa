"""Sensor encoder: the real (650, 1026) window, valid-length masks, missing sensors, per-sample norms."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers.batches import SENSOR_C, SENSOR_T
from vla_ds.data.stats import NormStats
from vla_ds.model.layers import masked_mean
from vla_ds.model.normalize import Normalizer
from vla_ds.model.sensor import SensorEncoder, SensorFeatures


def _small_encoder(**kw) -> SensorEncoder:
    torch.manual_seed(0)
    args = dict(input_channels=SENSOR_C, temporal_length=SENSOR_T, hidden_dim=32, output_dim=48, conv_blocks=2,
                num_layers=1, num_heads=4, dropout=0.0)
    args.update(kw)
    return SensorEncoder(**args)


def test_real_window_shape_with_default_sizes():
    enc = SensorEncoder(dropout=0.0).eval()  # 1026 channels, 650 steps, 4 stride-2 blocks, output 3072
    x = torch.randn(2, 650, 1026)
    valid = torch.ones(2, 650, dtype=torch.bool)
    valid[1, 300:] = False
    x[1, 300:] = 0
    with torch.no_grad():
        out = enc(x, valid, torch.tensor([True, True]))
    assert out.tokens.shape == (2, 41, 3072) and out.pooled.shape == (2, 3072) and out.mask.shape == (2, 41)
    # 300 valid steps -> 150 -> 75 -> 38 -> 19 valid tokens
    assert out.mask.sum(1).tolist() == [41, 19]
    assert torch.isfinite(out.tokens).all()
    with pytest.raises(ValueError, match=r"sensor window is \(B, 600, 1026\); the model expects \(B, 650, 1026\)"):
        enc(torch.zeros(1, 600, 1026), torch.ones(1, 600, dtype=torch.bool), torch.tensor([True]))


def test_padded_rows_change_nothing(small_config, make_batch):
    from vla_ds.model.policy import QwenVLA

    policy = QwenVLA(small_config(), device="cpu").eval()
    batch = make_batch(2, has_sensor=[True, True])
    batch["sensor_mask"][0, 40:] = False
    other = {**batch, "sensor": batch["sensor"].clone()}
    other["sensor"][0, 40:] = 1e3  # garbage past the valid length
    with torch.no_grad():
        a, b = policy.encode_sensor(batch, 2), policy.encode_sensor(other, 2)
    torch.testing.assert_close(a.pooled, b.pooled)
    other["sensor"][0, 10] += 5.0  # ... but a valid row does matter
    with torch.no_grad():
        c = policy.encode_sensor(other, 2)
    assert not torch.allclose(a.pooled[0], c.pooled[0])
    torch.testing.assert_close(a.pooled[1], c.pooled[1])


def test_missing_sensor_is_a_learned_embedding_not_a_reading_of_zeros():
    enc = _small_encoder().eval()
    x = torch.randn(3, SENSOR_T, SENSOR_C)
    x[2] = 0  # a present sensor that reads exactly zero
    valid = torch.ones(3, SENSOR_T, dtype=torch.bool)
    out = enc(x, valid, torch.tensor([True, False, True]))
    assert out.present.tolist() == [True, False, True]
    torch.testing.assert_close(out.pooled[1], enc.missing_embedding)
    assert torch.equal(out.tokens[1], enc.missing_embedding.expand(out.tokens.shape[1], -1))
    assert out.mask[1].all()
    assert not torch.allclose(out.pooled[2], enc.missing_embedding, atol=1e-3)
    # has_sensor=True without a single valid row counts as missing too
    no_rows = enc(x[:1], torch.zeros(1, SENSOR_T, dtype=torch.bool), torch.tensor([True]))
    torch.testing.assert_close(no_rows.pooled[0], enc.missing_embedding)


def test_force_and_ascan_both_reach_the_output():
    enc = _small_encoder().eval()
    x = torch.randn(1, SENSOR_T, SENSOR_C)
    valid = torch.ones(1, SENSOR_T, dtype=torch.bool)
    has = torch.tensor([True])
    base = enc(x, valid, has).pooled
    force, ascan = x.clone(), x.clone()
    force[..., 0] += 1.0
    ascan[..., 5] += 1.0
    assert not torch.allclose(enc(force, valid, has).pooled, base, atol=1e-4)
    assert not torch.allclose(enc(ascan, valid, has).pooled, base, atol=1e-4)
    assert enc.force_stem[0][0].in_channels == 1 and enc.ascan_stem[0][0].in_channels == SENSOR_C - 1


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_encoding_does_not_depend_on_the_rest_of_the_batch(mode):
    # 95 % of training samples carry no sensor: a batch statistic (BatchNorm) would learn their zeros.
    enc = _small_encoder()
    enc.train(mode == "train")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    x = torch.randn(16, SENSOR_T, SENSOR_C)
    x[1:] = 0
    valid = torch.ones(16, SENSOR_T, dtype=torch.bool)
    has = torch.zeros(16, dtype=torch.bool)
    has[0] = True
    alone = enc(x[:1], valid[:1], has[:1]).pooled
    crowd = enc(x, valid, has).pooled[:1]
    torch.testing.assert_close(alone, crowd, atol=1e-5, rtol=1e-4)


def test_batch_without_any_sensor_still_trains_every_parameter_finitely():
    enc = _small_encoder()
    x = torch.zeros(4, SENSOR_T, SENSOR_C)
    out = enc(x, torch.zeros(4, SENSOR_T, dtype=torch.bool), torch.zeros(4, dtype=torch.bool))
    (out.tokens.square().mean() + out.pooled.sum()).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, f"{name} got no gradient (a ZeRO-3 rank would hang)"
        assert torch.isfinite(p.grad).all(), name
    assert enc.missing_embedding.grad.abs().sum() > 0


def test_sensor_normalization_uses_the_stats_per_channel_and_zeroes_invalid_rows():
    mean = [float(i) for i in range(SENSOR_C)]
    std = [1.0 + i for i in range(SENSOR_C)]
    stats = NormStats([0.0] * 7, [1.0] * 7, [-1.0] * 7, [1.0] * 7, sensor_mean=mean, sensor_std=std)
    norm = Normalizer(stats, action_dim=7, sensor_channels=SENSOR_C)
    x = torch.randn(2, SENSOR_T, SENSOR_C) * 5
    valid = torch.ones(2, SENSOR_T, dtype=torch.bool)
    valid[1, 20:] = False
    out = norm.normalize_sensor(x, valid)
    expected = (x - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out[0], expected[0])
    torch.testing.assert_close(out[1, :20], expected[1, :20])
    assert torch.equal(out[1, 20:], torch.zeros(SENSOR_T - 20, SENSOR_C))
    with pytest.raises(ValueError, match="sensor stats have 17 channels, the model expects 1026"):
        Normalizer(stats, action_dim=7, sensor_channels=1026)


def test_policy_takes_the_real_window_end_to_end(small_config, make_batch):
    from vla_ds.model.policy import QwenVLA

    stats = NormStats.identity(7, sensor_channels=1026)
    cfg = small_config(sensor_input_channels=1026, sensor_temporal_length=650, sensor_conv_blocks=4)
    policy = QwenVLA(cfg, stats=stats, device="cpu").eval()
    batch = make_batch(2, has_sensor=[True, False], t=650, c=1026)
    batch["sensor_mask"][0, 500:] = False  # a window shorter than 650 steps, padded
    with torch.no_grad():
        out = policy(batch)
        sensor = policy.encode_sensor(batch, 2)
    assert out.actions.shape == (2, 8, 7) and torch.isfinite(out.per_sample_loss).all()
    assert sensor.tokens.shape == (2, 41, 48) and sensor.mask[0].sum() == 32  # 500 -> 250 -> 125 -> 63 -> 32


def _dense_reference(enc, x, valid, has):
    """The encoder as batches were dense: every row of (B, T, C) encoded, zero windows included,
    then the unsensed ones replaced by the missing-sensor embedding."""
    tokens, token_mask = enc._encode(x, valid)
    present = has & token_mask.any(dim=1)
    missing = enc.missing_embedding.to(tokens.dtype)
    pooled = torch.where(present[:, None], masked_mean(tokens, token_mask), missing.expand(len(x), -1))
    tokens = torch.where(present[:, None, None], tokens, missing.expand_as(tokens))
    return SensorFeatures(tokens, token_mask | ~present[:, None], pooled, present)


@pytest.mark.parametrize("fusion", ["concat", "cross_attention", "gated"])
@pytest.mark.parametrize("b, sensed", [(1, 0), (1, 1), (8, 0), (8, 3), (8, 8)])
def test_sparse_batches_give_the_dense_paths_losses(small_config, make_batch, monkeypatch, fusion, b, sensed):
    from vla_ds.data.batch import packed_sensor
    from vla_ds.model.policy import QwenVLA

    policy = QwenVLA(small_config(fusion_strategy=fusion), device="cpu").eval()
    dense = make_batch(b, has_sensor=[i % 3 == 0 and i // 3 < sensed or sensed == b for i in range(b)], seed=b)
    assert int(dense["has_sensor"].sum()) == sensed
    dense["sensor"] = dense["sensor"].half().float()  # the windows travel as float16
    sensor, valid, rows = packed_sensor(dense, b, SENSOR_T, SENSOR_C)
    sparse = {k: v for k, v in dense.items() if k not in ("sensor", "sensor_mask")}
    if sensed:
        sparse.update(sensor=sensor.half(), sensor_mask=valid, sensor_rows=rows)
    with torch.no_grad():
        got = policy(sparse)
        normalize = policy.normalizer.normalize_sensor
        monkeypatch.setattr(policy, "encode_sensor", lambda batch, _: _dense_reference(
            policy.sensor_encoder, normalize(batch["sensor"], batch["sensor_mask"]), batch["sensor_mask"],
            batch["has_sensor"]))
        want = policy(dense)
    torch.testing.assert_close(got.per_sample_loss, want.per_sample_loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.actions, want.actions, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("sensed, rows_encoded", [(0, 1), (1, 1), (3, 3)])
def test_the_encoder_runs_on_the_sensed_rows_only(small_config, make_batch, sensed, rows_encoded):
    # 94.5 % of the users' samples have no sensor: encoding their zero windows was 77 % of a step
    from vla_ds.model.policy import QwenVLA

    policy = QwenVLA(small_config(), device="cpu")
    seen = []
    policy.sensor_encoder.ascan_stem[0].register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    batch = make_batch(8, has_sensor=[i < sensed for i in range(8)])
    policy(batch).per_sample_loss.sum().backward()
    # (a batch with none: one dummy window of 2^blocks rows, so every submodule still runs)
    assert seen == [(rows_encoded, SENSOR_C - 1, SENSOR_T if sensed else 2 ** 2)]
    assert all(p.grad is not None for p in policy.sensor_encoder.parameters())

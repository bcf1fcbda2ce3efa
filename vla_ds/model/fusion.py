"""Fusion of VL features and sensor features into the memory the action expert attends to.

Every fusion returns `(memory (B, L, E), mask (B, L))`: one fused token per VL token, at the
expert width E. The strategies (`--fusion-strategy`):

- none: `m_i = P_vl(v_i)` -- VL only; also what every strategy becomes without `--sensor-enabled`.
- concat: `m_i = W [LN(v_i); LN(s)] + b` with s the pooled sensor vector: a linear map of the
  concatenation, computed as `W_vl LN(v_i) + W_s LN(s) + b` (the same function without a
  (B, L, D + S) copy).
- cross_attention: VL tokens attend to the sensor **tokens** (B, T', S):
  `m_i = q_i + MHA(LN(q_i), k, v)` then a pre-norm feed-forward, with `q = P_vl(v)`,
  `k = v = P_s(sensor tokens)`. (The old trainer pooled the VL side to a single token attending
  to a single sensor token, so the softmax weight was always 1 and the sensor had no effect.)
- gated: `g_i = sigmoid(W_g [q_i; s'])`, `m_i = g_i * q_i + (1 - g_i) * s'` with `q = P_vl(v)`
  and `s' = P_s(s)`: a learned per-token, per-channel choice between VL and sensor.

All submodules of a strategy run on every batch, as ZeRO-3 requires.
"""
from __future__ import annotations

import torch
from torch import nn

from vla_ds.model.layers import NormLinear
from vla_ds.model.sensor import SensorFeatures
from vla_ds.model.vl_tokens import VLFeatures


class NoFusion(nn.Module):
    """VL tokens projected to the expert width; the sensor is not an input."""

    uses_sensor = False

    def __init__(self, vl_dim: int, sensor_dim: int, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.vl_proj = NormLinear(vl_dim, width)

    def forward(self, vl: VLFeatures, sensor: SensorFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vl_proj(vl.tokens), vl.mask


class _SensorFusion(nn.Module):
    """Base of the fusions that need the sensor: VL and sensor projections to the expert width."""

    uses_sensor = True
    sensor_bias = True

    def __init__(self, vl_dim: int, sensor_dim: int, width: int, num_heads: int, dropout: float):
        super().__init__()
        self.vl_proj = NormLinear(vl_dim, width)
        self.sensor_proj = NormLinear(sensor_dim, width, bias=self.sensor_bias)

    def forward(self, vl: VLFeatures, sensor: SensorFeatures | None) -> tuple[torch.Tensor, torch.Tensor]:
        if sensor is None:
            raise ValueError(f"{type(self).__name__} needs sensor features (the sensor encoder did not run)")
        return self.fuse(self.vl_proj(vl.tokens), vl.mask, sensor), vl.mask

    def fuse(self, q: torch.Tensor, mask: torch.Tensor, sensor: SensorFeatures) -> torch.Tensor:
        raise NotImplementedError


class ConcatFusion(_SensorFusion):
    """Linear map of [VL token; pooled sensor] for every VL token."""

    # One bias for the concatenated map: the VL projection's; the sensor half has none.
    sensor_bias = False

    def fuse(self, q, mask, sensor):
        return q + self.sensor_proj(sensor.pooled).unsqueeze(1)


class CrossAttentionFusion(_SensorFusion):
    """VL tokens (queries) attend to the sensor token sequence; pre-norm residual block."""

    def __init__(self, vl_dim: int, sensor_dim: int, width: int, num_heads: int, dropout: float):
        super().__init__(vl_dim, sensor_dim, width, num_heads, dropout)
        self.norm_q = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, dropout=dropout, batch_first=True)
        self.norm_ff = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))

    def fuse(self, q, mask, sensor):
        kv = self.sensor_proj(sensor.tokens)
        attended, _ = self.attn(self.norm_q(q), kv, kv, key_padding_mask=~sensor.mask, need_weights=False)
        h = q + attended
        return h + self.ff(self.norm_ff(h))


class GatedFusion(_SensorFusion):
    """Per-token sigmoid gate between the VL token and the pooled sensor vector."""

    def __init__(self, vl_dim: int, sensor_dim: int, width: int, num_heads: int, dropout: float):
        super().__init__(vl_dim, sensor_dim, width, num_heads, dropout)
        self.gate = nn.Linear(2 * width, width)

    def fuse(self, q, mask, sensor):
        s = self.sensor_proj(sensor.pooled).unsqueeze(1).expand_as(q)
        g = torch.sigmoid(self.gate(torch.cat([q, s], dim=-1)))
        return g * q + (1 - g) * s


FUSIONS = {"none": NoFusion, "concat": ConcatFusion, "cross_attention": CrossAttentionFusion, "gated": GatedFusion}


def build_fusion(strategy: str, vl_dim: int, sensor_dim: int, width: int, num_heads: int,
                 dropout: float = 0.0) -> nn.Module:
    """The fusion module for `--fusion-strategy` (none when the sensor is disabled)."""
    if strategy not in FUSIONS:
        raise ValueError(f"--fusion-strategy {strategy!r} is not one of {'|'.join(FUSIONS)}")
    return FUSIONS[strategy](vl_dim, sensor_dim, width, num_heads, dropout)

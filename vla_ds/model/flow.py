"""`--action-head flow`: the action expert as a conditional flow-matching model (pi0's convention).

    x_t  = t · noise + (1 − t) · target        noise ~ N(0, I) of the chunk's shape (H, A)
    t    ~ Beta(1.5, 1) on [0.001, 1]           biased to t = 1, the noisy end (pi0)
    u    = noise − target                        the velocity of that straight path, d x_t / dt
    loss = masked mean over the valid steps of ℓ(v(x_t, t | memory) − u)      ℓ: --action-loss
    sample: x_1 = noise; N = --flow-steps Euler steps x ← x − v(x, t) / N from t = 1 to 0; x_0 is the chunk

`target` is the normalized chunk; the step mask and the trainer's per-sample (sensor) weights apply
as for the regression head. Where demonstrations disagree (the same view followed by +x in some
episodes and −x in others) a regression head predicts their mean; the flow head's samples land on
one mode or the other.

The velocity network is the regression head's decoder (`QueryDecoder`) with the noisy chunk and the
time added to its queries: `q_h = query_h + W_a x_t[h] + MLP(sincos(t))`. Only the noised target
enters it during training, as the method requires; at inference nothing but noise and the memory.

Draws are per sample and seeded (`seeded_draws`: a generator per sample id), not from the global
RNG: training seeds them with (--seed, epoch, sample id), so one process at micro-batch 4 draws
what two processes at micro-batch 2 draw, and a resumed run what the uninterrupted one drew;
validation and `vla-ds eval` seed them with the sample id alone, so their numbers do not depend on
batching, world size or when they ran.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from vla_ds.model.action_head import QueryDecoder

TIME_BETA = 1.5  # t ~ Beta(TIME_BETA, 1): density ∝ t^0.5, more weight near the noise
TIME_MIN = 0.001  # t never 0 exactly (pi0): the velocity at the data end is not trained on alone
# Periods of the time embedding's sinusoids (pi0's): fine enough to tell 1/10-steps apart.
MIN_PERIOD, MAX_PERIOD = 4e-3, 4.0


def time_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Beta(TIME_BETA, 1) by its inverse CDF (u^(1/β)), scaled onto [TIME_MIN, 1]: a generator-driven
    draw (torch's Beta sampler takes no generator)."""
    return TIME_MIN + (1.0 - TIME_MIN) * u.clamp(0.0, 1.0) ** (1.0 / TIME_BETA)


def seeded_draws(sample_ids: list[str], shape: tuple[int, ...], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (B, *shape), uniform (B,)) on the CPU, float32: sample i's from a generator seeded by
    (`key`, sample_ids[i]) alone, whatever else is in the batch."""
    noise, uniform = [], []
    for sid in sample_ids:
        g = torch.Generator().manual_seed(zlib.crc32(f"{key}|{sid}".encode()))
        noise.append(torch.randn(shape, generator=g))
        uniform.append(torch.rand((), generator=g))
    if not noise:
        return torch.zeros(0, *shape), torch.zeros(0)
    return torch.stack(noise), torch.stack(uniform)


def training_draws(sample_ids: list[str], horizon: int, action_dim: int, seed: int, epoch: int) -> dict:
    """The batch keys a flow head's training step reads: `flow_noise` (B, H, A) and `flow_time` (B,),
    seeded by (seed, epoch, sample id): a sample gets new noise every epoch, the same on any layout."""
    noise, u = seeded_draws(sample_ids, (horizon, action_dim), f"train|{seed}|{epoch}")
    return {"flow_noise": noise, "flow_time": time_from_uniform(u)}


def sample_noise(sample_ids: list[str], horizon: int, action_dim: int, seed: int = 0) -> torch.Tensor:
    """The starting noise (B, H, A) of inference on dataset samples (`vla-ds eval`, --eval-every):
    seeded by (seed, sample id), so a sample's chunk does not depend on its batch or rank."""
    return seeded_draws(sample_ids, (horizon, action_dim), f"sample|{seed}")[0]


def validation_draws(sample_ids: list[str], horizon: int, action_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, t) of a validation loss: seeded by the sample id, the same at every validation."""
    noise, u = seeded_draws(sample_ids, (horizon, action_dim), "val")
    return noise, time_from_uniform(u)


def time_embedding(t: torch.Tensor, width: int) -> torch.Tensor:
    """(B,) times -> (B, width) sin/cos features at periods MIN_PERIOD..MAX_PERIOD (zero-padded to an odd width)."""
    half = width // 2
    frac = torch.linspace(0.0, 1.0, half, device=t.device, dtype=torch.float32)
    period = MIN_PERIOD * (MAX_PERIOD / MIN_PERIOD) ** frac
    angle = t.float()[:, None] * (2 * math.pi / period)[None]
    emb = torch.cat([angle.sin(), angle.cos()], dim=-1)
    return nn.functional.pad(emb, (0, width - 2 * half))


class FlowExpert(QueryDecoder):
    """The velocity field v(x_t, t | memory) -> (B, H, A), normalized action space."""

    def __init__(self, horizon: int = 8, action_dim: int = 7, width: int = 512, num_layers: int = 4,
                 num_heads: int = 8, dropout: float = 0.1):
        super().__init__(horizon, action_dim, width, num_layers, num_heads, dropout)
        self.width = width
        self.action_in = nn.Linear(action_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`memory` (B, L, E) + mask, noisy chunk `x_t` (B, H, A), time `t` (B,) -> velocity (B, H, A)."""
        dtype = memory.dtype
        extra = self.action_in(x_t.to(dtype)) + self.time_mlp(time_embedding(t, self.width).to(dtype))[:, None, :]
        return self.decode(memory, memory_mask, extra)


def flow_loss_inputs(target: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, u) of the straight path between `target` (B, H, A) and `noise` at times `t` (B,), fp32."""
    tt = t.float()[:, None, None]
    return tt * noise + (1.0 - tt) * target, noise - target


def integrate(expert: FlowExpert, memory: torch.Tensor, memory_mask: torch.Tensor, noise: torch.Tensor,
              steps: int) -> torch.Tensor:
    """Euler integration of the velocity field from `noise` (B, H, A) at t = 1 to t = 0 in `steps`
    steps -> chunks (B, H, A), fp32. Collective under ZeRO-3 like any forward (the same `steps`
    on every rank)."""
    x = noise.float()
    for k in range(steps):
        t = torch.full((x.shape[0],), 1.0 - k / steps, device=x.device)
        x = x - expert(memory, memory_mask, x, t).float() / steps
    return x

"""Small building blocks shared by the VL encoder, the sensor encoder and the fusions."""
from __future__ import annotations

import torch
from torch import nn


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` (B, L, D) over the positions where `mask` (B, L) is True -> (B, D).

    Padding is never averaged in; a row with no valid position gives zeros, not NaN. `masked_fill`
    rather than a multiply, so a non-finite value at a padded position cannot leak in.
    """
    m = mask.unsqueeze(-1)
    total = x.masked_fill(~m, 0).sum(dim=1)
    count = m.sum(dim=1).clamp(min=1).to(x.dtype)
    return total / count


class NormLinear(nn.Sequential):
    """LayerNorm then Linear: brings features of any scale (last or middle hidden states, cached
    features, sensor tokens) to a common width on a common scale."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim, bias=bias))
